"""Batched generation with transformers: left padding, per-row stopping, answer-only output.

Prompts are sorted by length so each batch pads little, then answers are returned in the input
order. Each prompt is encoded by the data stage's own encoder (the training prefix), left-padded
with an attention mask, so greedy batched outputs equal one-at-a-time outputs.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch
from transformers import StoppingCriteriaList

from tunebench.config import GenerateConfig
from tunebench.data.templates import get_template, stop_token_ids
from tunebench.data.tokens import encode_prompt, special_prefix
from tunebench.errors import failure_reason
from tunebench.generate.merge_adapter import merge_for_generation
from tunebench.generate.stops import STOP_CHECK_EVERY, StopStringsEvery, tokens_until_stop

log = logging.getLogger(__name__)

EMPTY_RETRY_MIN_TOKENS = 8
# With a static cache each distinct prompt width is a new compiled graph: widths are rounded up to
# a multiple of this (extra left padding, which greedy answers do not depend on).
STATIC_WIDTH_MULTIPLE = 64


@dataclass
class Answer:
    index: int
    text: str
    new_tokens: int
    stopped: bool  # ended by EOS or a stop string (not by max_new_tokens)


class GenerationBackend(Protocol):
    """What generate, pairs make and serve need of a generator (transformers' Generator, vLLM's)."""

    def generate(self, items: list[list[dict[str, str]]], on_answer: Callable[[Answer], None] | None = None,
                 progress=None) -> list[Answer]: ...


def stop_strings_for(config: GenerateConfig, template: str) -> list[str]:
    return list(config.stop) if config.stop is not None else list(get_template(template).stop_strings)


def clean_answer(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut at the first stop string (template residue such as the next '### 指示') and trim."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
    return text.strip(), cut >= 0


def uses_static_cache(setting: str | bool, device: torch.device, task_set: bool) -> bool:
    """generate.compile: auto compiles on a CUDA GPU only (on CPU compiling costs more than it saves) and
    only the batches of a task set, where a few shapes repeat over many rows; serve's and the local
    judge's one-off prompts (and an empty answer's retry) would each pay a compile of their own shape."""
    return device.type == "cuda" and task_set if setting == "auto" else bool(setting)


@functools.cache
def warn_static_cache_uncompiled() -> None:
    """Once per process: serve makes a Generator per request."""
    log.warning("generate.compile: true off a CUDA GPU uses the static KV cache without compiling "
                "(transformers compiles the decode step on GPUs only)")


def kv_bytes_per_token(model_config, dtype_bytes: int = 2) -> int:
    """Bytes of key/value cache one token takes across all layers."""
    text = getattr(model_config, "text_config", None) or model_config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * dtype_bytes


def auto_batch_size(model, n_items: int, longest_prompt: int, max_new_tokens: int,
                    free_bytes: int | None = None, share: float = 0.4) -> int:
    """Rows per batch: on a GPU as many as `share` of free memory holds in KV cache (all tasks at
    once for small models, which is what makes batching pay); on CPU a small batch."""
    device = next(model.parameters()).device
    if free_bytes is None:
        if device.type != "cuda":
            return min(n_items, 8)
        free_bytes = torch.cuda.mem_get_info(device)[0]
    per_row = kv_bytes_per_token(model.config) * (longest_prompt + max_new_tokens)
    return max(1, min(n_items, int(free_bytes * share // per_row)))


class Generator:
    """Holds a model, tokenizer and template; turns instructions into answers.

    A LoRA adapter on an unquantised base is merged into the model passed in (in place) unless
    generate.merge_adapter is false. `stop_check_every`: stop strings are checked on the host every
    that many tokens; None checks them on every token with transformers' own `stop_strings`."""

    def __init__(self, model, tokenizer, template: str, config: GenerateConfig,
                 stop_check_every: int | None = STOP_CHECK_EVERY):
        self.model = merge_for_generation(model, config.merge_adapter)
        self.tokenizer = tokenizer
        self.template = template
        self.config = config
        self.stops = stop_strings_for(config, template)
        self.eos_ids = stop_token_ids(tokenizer, template)
        self.prefix = special_prefix(tokenizer)
        self.stop_check_every = stop_check_every
        self.static_cache_failed = False  # set when a compiled decode failed under generate.compile: auto
        if config.compile is True and next(self.model.parameters()).device.type != "cuda":
            warn_static_cache_uncompiled()

    def with_settings(self, **changes) -> Generator:
        """The same model, tokenizer and template with some generate settings changed (per request)."""
        generator = Generator(self.model, self.tokenizer, self.template, replace(self.config, **changes),
                              self.stop_check_every)
        generator.static_cache_failed = self.static_cache_failed
        return generator

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_prompt(messages, self.template, self.tokenizer, self.prefix)

    def generation_kwargs(self, max_new_tokens: int | None = None, min_new_tokens: int = 0) -> dict:
        c = self.config
        kwargs = {"max_new_tokens": max_new_tokens or c.max_new_tokens, "do_sample": c.do_sample,
                  "min_new_tokens": min_new_tokens,
                  "repetition_penalty": c.repetition_penalty, "eos_token_id": self.eos_ids,
                  "pad_token_id": self.tokenizer.pad_token_id}
        if c.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = c.no_repeat_ngram_size
        if c.do_sample:
            kwargs.update(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k or None)
        else:  # greedy: unset the sampling knobs a model's generation_config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.stops:
            kwargs.update(stop_strings=self.stops, tokenizer=self.tokenizer)
        return kwargs

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int | None = None,
                       min_new_tokens: int = 0, stopping_criteria=None, streamer=None,
                       task_set: bool = False) -> list[Answer]:
        """One batch of encoded prompts, left-padded. `stopping_criteria` (a transformers
        StoppingCriteriaList) and `streamer` are passed to model.generate (serve uses them);
        `task_set`: a batch of `generate` (see uses_static_cache).

        Under generate.compile: auto, a static-cache/compiled decode that fails (a model or torch
        version torch.compile cannot handle) is reported once and the batch generated without it."""
        device = next(self.model.parameters()).device
        static = uses_static_cache(self.config.compile, device, task_set) and not self.static_cache_failed
        try:
            return self.decode(prompts, max_new_tokens, min_new_tokens, stopping_criteria, streamer, static)
        except Exception as exc:  # whatever torch.compile raises; the plain path reraises real faults
            if not static or self.config.compile is True or streamer is not None or \
                    isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            log.warning("generate.compile: the static-cache decode step failed (%s); generating without it "
                        "(generate.compile: false skips trying)", failure_reason(exc))
            self.static_cache_failed = True
        return self.decode(prompts, max_new_tokens, min_new_tokens, stopping_criteria, streamer, False)

    def decode(self, prompts: list[list[int]], max_new_tokens: int | None, min_new_tokens: int, stopping_criteria,
               streamer, static: bool) -> list[Answer]:
        """model.generate on the left-padded batch; `static`: the static KV cache (compiled on a GPU)."""
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        kwargs = self.generation_kwargs(max_new_tokens, min_new_tokens)
        if static:
            # transformers compiles the decode step itself when the cache is static and the device a GPU
            kwargs["cache_implementation"] = "static"
            width = -(-width // STATIC_WIDTH_MULTIPLE) * STATIC_WIDTH_MULTIPLE
        criteria = list(stopping_criteria or [])
        host_stops = self.stops and streamer is None and self.stop_check_every  # a stream checks every token
        if host_stops:
            del kwargs["stop_strings"], kwargs["tokenizer"]
            criteria.append(StopStringsEvery(self.tokenizer, self.stops, width, self.stop_check_every))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, streamer=streamer,
                                  stopping_criteria=StoppingCriteriaList(criteria) if criteria else None, **kwargs)
        return self.read_answers(out[:, width:].tolist(), bool(host_stops))

    def read_answers(self, generated: list[list[int]], host_stops: bool) -> list[Answer]:
        """Each row's new tokens up to EOS/pad (and, with host stop checks, up to its stop string) as text."""
        answers = []
        # A finished row is filled with pad ids until the batch ends: those are not generated text.
        ends = set(self.eos_ids) | {self.tokenizer.pad_token_id}
        for row, tokens in enumerate(generated):
            ended_by_eos = False
            for cut, token in enumerate(tokens):
                if token in ends:
                    tokens, ended_by_eos = tokens[:cut], True
                    break
            if host_stops:  # drop what was generated after the stop string, up to the next check
                tokens = tokens[: tokens_until_stop(self.tokenizer, tokens, self.stops) or len(tokens)]
            text, stopped = clean_answer(self.tokenizer.decode(tokens, skip_special_tokens=True), self.stops)
            answers.append(Answer(row, text, len(tokens), stopped or ended_by_eos))
        return answers

    def generate(self, items: list[list[dict[str, str]]], on_answer: Callable[[Answer], None] | None = None,
                 progress=None) -> list[Answer]:
        """Answer conversations in batches of config.batch_size, longest first; results in input order.
        `on_answer` is called as each batch finishes (for resumable writing)."""
        encoded = [self.encode(m) for m in items]
        order = sorted(range(len(items)), key=lambda i: -len(encoded[i]))
        results: list[Answer | None] = [None] * len(items)
        size = self.config.batch_size or auto_batch_size(
            self.model, len(items), max((len(e) for e in encoded), default=1), self.config.max_new_tokens)
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            for position, answer in zip(chunk, self.generate_batch([encoded[i] for i in chunk], task_set=True)):
                if not answer.text:
                    # An immediate EOS or stop string leaves nothing, which a submission may not hold:
                    # answer again with EOS suppressed for the first tokens.
                    answer = self.generate_batch([encoded[position]], min_new_tokens=EMPTY_RETRY_MIN_TOKENS)[0]
                answer.index = position
                results[position] = answer
                if on_answer:
                    on_answer(answer)
            if progress is not None:
                progress.update(len(chunk))
        return results  # type: ignore[return-value]
