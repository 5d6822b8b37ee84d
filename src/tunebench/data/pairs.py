"""Preference pairs: read, validate, render and tokenise {prompt, chosen, rejected}.

Accepted shapes (JSONL/JSON/Parquet/dataset folders/hub ids, through the same readers as SFT data):
- {"prompt": str, "chosen": str, "rejected": str};
- chat-message pairs: {"prompt": [messages], "chosen": [assistant message(s)] or str, "rejected": ...},
  or {"chosen": [messages], "rejected": [messages]} holding whole conversations;
- hh-rlhf style {"chosen": str, "rejected": str}, each the whole dialogue
  ("\\n\\nHuman: … \\n\\nAssistant: …"): the shared part up to the last "Assistant:" is the prompt.

A pair renders with the SFT template: the prompt is exactly the generation prompt (encode_prompt),
the response is the last answer segment (+EOS for course/alpaca), and only the response is
labelled, masked by the prompt's own token length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from tunebench.data.readers import message_list, text_value
from tunebench.data.records import Example, Origin, Problem, RawRow
from tunebench.data.templates import render_segments
from tunebench.data.tokens import Encoded, encode_segments, fit_length

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class Pair:
    prompt: list[dict[str, str]]  # messages ending with a user turn
    chosen: str
    rejected: str
    origin: Origin

    def as_example(self) -> Example:
        """The prompt as an example (for the contamination guard, which reads user turns)."""
        return Example(messages=self.prompt, origin=self.origin)


def is_pair_row(data: dict[str, Any]) -> bool:
    return "chosen" in data and "rejected" in data


def row_to_pair(row: RawRow, problems: list[Problem]) -> Pair | None:
    """Validate one row and build its pair; on failure record a problem naming the field."""
    data = row.data
    for key in ("chosen", "rejected"):
        if data.get(key) is None:
            problems.append(Problem(row.origin, key, "is missing", "missing"))
            return None
    if "prompt" not in data and isinstance(data["chosen"], str):
        pair = split_hh(row, problems)
    elif "prompt" not in data:
        pair = split_conversations(row, problems)
    else:
        pair = explicit_pair(row, problems)
    if pair is not None and pair.chosen.strip() == pair.rejected.strip():
        problems.append(Problem(row.origin, "rejected", "equals chosen; a pair needs two different answers",
                                "duplicate"))
        return None
    return pair


def answer_text(row: RawRow, key: str, value: Any, problems: list[Problem]) -> str | None:
    """A response given as a string or as a list ending in one assistant message."""
    if isinstance(value, list):
        messages = message_list(row, key, value, problems)
        if messages is None:
            return None
        if messages[-1]["role"] != "assistant":
            problems.append(Problem(row.origin, key, "must end with an assistant message", "type"))
            return None
        return messages[-1]["content"]
    return text_value(row, key, value, problems)


def explicit_pair(row: RawRow, problems: list[Problem]) -> Pair | None:
    prompt_value = row.data["prompt"]
    if isinstance(prompt_value, list):
        prompt = message_list(row, "prompt", prompt_value, problems)
        if prompt is not None and prompt[-1]["role"] != "user":
            problems.append(Problem(row.origin, "prompt", "must end with a user message", "type"))
            prompt = None
    else:
        text = text_value(row, "prompt", prompt_value, problems)
        prompt = None if text is None else [{"role": "user", "content": text}]
    chosen = answer_text(row, "chosen", row.data["chosen"], problems)
    rejected = answer_text(row, "rejected", row.data["rejected"], problems)
    if prompt is None or chosen is None or rejected is None:
        return None
    return Pair(prompt, chosen, rejected, row.origin)


def split_conversations(row: RawRow, problems: list[Problem]) -> Pair | None:
    """Two whole conversations as message lists: the shared messages before the last answer are the prompt."""
    chosen = message_list(row, "chosen", row.data["chosen"], problems)
    rejected = message_list(row, "rejected", row.data["rejected"], problems) if chosen else None
    if chosen is None or rejected is None:
        return None
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant" or len(messages) < 2 or messages[-2]["role"] != "user":
            problems.append(Problem(row.origin, key, "must end with a user turn and then an assistant turn", "type"))
            return None
    if chosen[:-1] != rejected[:-1]:
        problems.append(Problem(row.origin, "rejected", "its conversation before the last answer differs from "
                                "chosen's (the prompt must be shared)", "mismatch"))
        return None
    return Pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], row.origin)


def hh_turns(dialogue: str) -> list[dict[str, str]] | None:
    """'\\n\\nHuman: …\\n\\nAssistant: …' to messages; None if it does not follow that shape."""
    parts = TURN.split(dialogue)
    if parts[0].strip() or len(parts) < 3:
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": text.strip()} for who, text in zip(parts[1::2], parts[2::2])]


def split_hh(row: RawRow, problems: list[Problem]) -> Pair | None:
    """hh-rlhf style: both fields hold the whole dialogue; split the shared prefix off as the prompt."""
    texts = [text_value(row, key, row.data[key], problems) for key in ("chosen", "rejected")]
    if None in texts:
        return None
    cut = [text.rfind(ASSISTANT) for text in texts]
    for key, at in zip(("chosen", "rejected"), cut):
        if at < 0:
            problems.append(Problem(row.origin, key, 'has no "\\n\\nAssistant:" turn; expected the hh-rlhf '
                                    "dialogue format, or add a \"prompt\" field", "type"))
            return None
    prompts = [text[:at] for text, at in zip(texts, cut)]
    if prompts[0] != prompts[1]:
        problems.append(Problem(row.origin, "rejected", "the dialogue before the last Assistant turn differs "
                                "from chosen's (prompt mismatch)", "mismatch"))
        return None
    turns = hh_turns(prompts[0])
    answers = [text[at + len(ASSISTANT):].strip() for text, at in zip(texts, cut)]
    if turns is None or turns[-1]["role"] != "user" or not all(t["content"] for t in turns):
        problems.append(Problem(row.origin, "chosen", "the dialogue before the last Assistant turn must be "
                                "Human/Assistant turns ending with a Human turn", "type"))
        return None
    for key, answer in zip(("chosen", "rejected"), answers):
        if not answer:
            problems.append(Problem(row.origin, key, "the last Assistant turn is empty", "empty"))
            return None
    return Pair(turns, answers[0], answers[1], row.origin)


def encode_response(prompt: list[dict[str, str]], answer: str, template: str, tokenizer,
                    prefix: list[int]) -> Encoded:
    """Prompt + one answer, with labels on the answer only (earlier assistant turns are prompt)."""
    segments = render_segments(prompt + [{"role": "assistant", "content": answer}], template, tokenizer)
    segments = [replace(s, is_answer=False) for s in segments[:-1]] + segments[-1:]
    return encode_segments(segments, tokenizer, prefix)


def encode_pair(pair: Pair, template: str, tokenizer, prefix: list[int], max_len: int, policy: str
                ) -> dict | None:
    """{"chosen": {input_ids, labels}, "rejected": {...}}; None when either side does not fit."""
    out = {}
    for key in ("chosen", "rejected"):
        fitted = fit_length(encode_response(pair.prompt, getattr(pair, key), template, tokenizer, prefix),
                            max_len, policy)
        if fitted is None:
            return None
        out[key] = {"input_ids": fitted.input_ids, "labels": fitted.labels}
    return out
