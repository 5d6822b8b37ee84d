"""Prompt templates: one renderer for training and for inference, so they can never drift apart.

A conversation renders to segments; each is prompt text (no loss) or answer text (loss). A prompt
for generation is the same rendering of the conversation up to the last user turn: by
construction it is exactly the token prefix that training put in front of the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from tunebench.errors import ConfigError

ALPACA_JA_PREAMBLE = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n"
CHAT_END_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class Segment:
    text: str
    is_answer: bool
    # The course and Alpaca templates close an answer with the tokenizer's EOS token id, added
    # at tokenisation (never as text, which could tokenize differently).
    add_eos: bool = False


class Template(Protocol):
    """A prompt style: how a conversation renders, where generation stops, which tokens end an answer."""

    name: str
    stop_strings: tuple[str, ...]  # text the model would write next if it ran past its answer

    def render(self, messages: list[dict[str, str]], tokenizer, add_generation_prompt: bool) -> list[Segment]: ...

    def end_token_ids(self, tokenizer) -> list[int]: ...


def eos_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


@dataclass(frozen=True)
class InstructionTemplate:
    """A plain-text template: a header around each instruction; each answer closes with EOS."""

    name: str
    user: str  # formatted with {instruction}
    preamble: str  # once, before the first instruction (after any system text)
    stop_strings: tuple[str, ...]

    def render(self, messages: list[dict[str, str]], tokenizer, add_generation_prompt: bool) -> list[Segment]:
        segments: list[Segment] = []
        prefix = "".join(m["content"] + "\n\n" for m in messages if m["role"] == "system") + self.preamble
        for message in messages:
            if message["role"] == "user":
                text = ("\n" if segments else "") + self.user.format(instruction=message["content"])
                segments.append(Segment(prefix + text, is_answer=False))
                prefix = ""
            elif message["role"] == "assistant":
                segments.append(Segment(message["content"], is_answer=True, add_eos=True))
        if add_generation_prompt and (not segments or segments[-1].is_answer):
            raise ValueError("a generation prompt needs messages that end with a user turn")
        return segments

    def end_token_ids(self, tokenizer) -> list[int]:
        return eos_ids(tokenizer)


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's own chat template; its end-of-turn tokens end an answer as EOS does."""

    name: str = "chat"
    stop_strings: tuple[str, ...] = ()

    def render(self, messages: list[dict[str, str]], tokenizer, add_generation_prompt: bool) -> list[Segment]:
        return render_chat(messages, tokenizer, add_generation_prompt)

    def end_token_ids(self, tokenizer) -> list[int]:
        ids, vocab = eos_ids(tokenizer), tokenizer.get_vocab()
        return ids + [vocab[t] for t in CHAT_END_TOKENS if t in vocab and vocab[t] not in ids]


# The registry: config, CLI choices, data, generation and the judge all read template names here.
TEMPLATES: dict[str, Template] = {t.name: t for t in (
    InstructionTemplate("course", user="### 指示\n{instruction}\n### 回答\n", preamble="",
                        stop_strings=("### 指示", "### 回答")),
    InstructionTemplate("alpaca-ja", user="### 指示:\n{instruction}\n\n### 応答:\n", preamble=ALPACA_JA_PREAMBLE,
                        stop_strings=("### 指示:", "### 応答:")),
    ChatTemplate(),
)}
TEMPLATE_NAMES = tuple(TEMPLATES)
TemplateName = Literal[TEMPLATE_NAMES]  # type: ignore[valid-type]  # the config's type for data.template


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template '{name}' (choose from: {', '.join(TEMPLATE_NAMES)})")
    return TEMPLATES[name]


def render_segments(messages: list[dict[str, str]], template: str, tokenizer=None,
                    add_generation_prompt: bool = False) -> list[Segment]:
    """Render a conversation. For inference pass messages ending in a user turn and
    add_generation_prompt=True; the last segment is then the prompt the answer follows."""
    return get_template(template).render(messages, tokenizer, add_generation_prompt)


def render_chat(messages: list[dict[str, str]], tokenizer, add_generation_prompt: bool) -> list[Segment]:
    """The tokenizer's own chat template, split into segments by rendering growing prefixes."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "data.template is 'chat' but this tokenizer has no chat template; "
            "use template 'course' or 'alpaca-ja', or a chat model's tokenizer"
        )
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ConfigError("this chat template does not render conversations as growing prefixes; "
                              "use template 'course' or 'alpaca-ja'")
        segments.append(Segment(prompt[len(done):], is_answer=False))
        segments.append(Segment(full[len(prompt):], is_answer=True))
        done = full
    if add_generation_prompt:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        segments.append(Segment(prompt[len(done):], is_answer=False))
    return segments


def render_prompt(instruction: str, template: str, tokenizer=None, system: str | None = None) -> str:
    """The text a model is given to answer one instruction (what generation and serving use)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]
    return "".join(s.text for s in render_segments(messages, template, tokenizer, add_generation_prompt=True))


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """Token ids that end an answer: EOS, plus the chat template's end-of-turn tokens."""
    return get_template(template).end_token_ids(tokenizer)
