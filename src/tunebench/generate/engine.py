"""Batched generation with transformers: left padding, per-row stopping, answer-only output.

Prompts are sorted by length so each batch pads little, then answers are returned in the input
order. Each prompt is encoded by the data stage's own encoder (the training prefix), left-padded
with an attention mask, so greedy batched outputs equal one-at-a-time outputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Callable, Protocol

import torch
from transformers import StoppingCriteriaList

from tunebench.config import GenerateConfig
from tunebench.data.templates import get_template, stop_token_ids
from tunebench.data.tokens import encode_prompt, special_prefix
from tunebench.errors import failure_reason
from tunebench.generate.decode_fused_layers import fused_kernels
from tunebench.generate.graph_decode import DecodeSettings, GraphDecode
from tunebench.generate.merge_adapter import merge_for_generation
from tunebench.generate.stops import (
    STOP_CHECK_EVERY,
    StopStringsEvery,
    rows_holding_stop,
    stop_window,
    tokens_until_stop,
)

log = logging.getLogger(__name__)

EMPTY_RETRY_MIN_TOKENS = 8


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


# generate.compile auto compiles models below this size: their decode step is bound by kernel count,
# which fusing cuts (Gemma 3 270M: 2.7 → 1.5 ms a step, norms already fused); a 13B-class step is bound
# by memory traffic, and compiling only adds its time (the 4-bit llm-jp-3-13b shape: no faster, 7 s more).
COMPILE_BELOW_PARAMETERS = 3_000_000_000
# ... and only for jobs this long: compiling costs 5-12 s before the first token (inductor's disk cache warm or
# not) and saved ~0.2 s per batch of 100 prompts answered to 512 tokens on Gemma 3 270M before its attention
# ran in Triton kernels (1.82 against 2.23 ms a step at 100 rows), so it pays from ~2,500-6,000 prompts. A
# model whose one-token layers the loop fuses with Triton kernels (decode_fused_layers.py: Gemma 3 under
# 600 M parameters) is never compiled under auto: its uncompiled step is the faster one (1.21 against
# 1.82 ms at 100 rows, H100: docs/PERFORMANCE.md).
COMPILE_FROM_PROMPTS = 6000


def compiles_decode(setting: str | bool, device: torch.device, parameters: int = 0, prompts: int = 1,
                    fused_kernels: bool = False) -> bool:
    """generate.compile: auto compiles the decode loop's layers on a CUDA GPU for a model of fewer than
    COMPILE_BELOW_PARAMETERS parameters answering a job of at least COMPILE_FROM_PROMPTS prompts (on CPU
    compiling costs more than it saves), unless the loop runs the model's layers through its own kernels
    (`fused_kernels`); true: any model and job, also on CPU."""
    if setting == "auto":
        return device.type == "cuda" and parameters < COMPILE_BELOW_PARAMETERS and prompts >= COMPILE_FROM_PROMPTS \
            and not fused_kernels
    return bool(setting)


def prompt_learning(model) -> bool:
    """A prefix- or prompt-tuned peft model: its forward brings its own virtual tokens and key/value
    prefix, which the decode loop's static cache has no room for (transformers' generate handles them)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def uses_graph_decode(setting: str | bool, device: torch.device) -> bool:
    """generate.cuda_graphs: auto captures the decode step on a CUDA GPU; true also runs tunebench's
    decode loop on CPU (without a graph: the same answers, for tests); false: transformers' generate."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


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
        # what the driver has free plus what torch's allocator holds unused (an earlier batch's cache)
        free_bytes = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - \
            torch.cuda.memory_allocated(device)
    per_row = kv_bytes_per_token(model.config) * (longest_prompt + max_new_tokens)
    return max(1, min(n_items, int(free_bytes * share // per_row)))


@dataclass
class DecodeFallbacks:
    graphs_failed: bool = False  # the captured decode failed under generate.cuda_graphs: auto
    compile_failed: bool = False  # its compiled layers failed under generate.compile: auto


def parameter_count(model) -> int:
    """Parameters of the model; a bitsandbytes 4-bit weight holds two per stored byte."""
    return sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())


# Settings a model's own generation_config may carry that transformers' generate applies and the
# decode loop does not: such a model keeps transformers' generate.
LOOP_UNSUPPORTED = ("suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "sequence_bias", "min_p",
                    "typical_p", "epsilon_cutoff", "eta_cutoff", "min_length", "forced_bos_token_id",
                    "forced_eos_token_id", "exponential_decay_length_penalty", "encoder_repetition_penalty")


def loop_unsupported(model) -> list[str]:
    """The model generation_config's settings, from LOOP_UNSUPPORTED, that differ from the defaults."""
    from transformers import GenerationConfig

    own, default = getattr(model, "generation_config", None), GenerationConfig()
    return [k for k in LOOP_UNSUPPORTED if own is not None and getattr(own, k, None) != getattr(default, k, None)]


class Generator:
    """Holds a model, tokenizer and template; turns instructions into answers.

    A LoRA adapter on an unquantised base is merged into the model passed in (in place) unless
    generate.merge_adapter is false. `stop_check_every`: stop strings are checked on the host every
    that many tokens; None checks them on every token with transformers' own `stop_strings`.
    `fallbacks`: what failed under auto, shared by the copies `with_settings` makes (serve's requests,
    the local judge's prompts), so a failure is tried and reported once."""

    def __init__(self, model, tokenizer, template: str, config: GenerateConfig,
                 stop_check_every: int | None = STOP_CHECK_EVERY, fallbacks: DecodeFallbacks | None = None):
        self.model = merge_for_generation(model, config.merge_adapter)
        self.tokenizer = tokenizer
        self.template = template
        self.config = config
        self.stops = stop_strings_for(config, template)
        self.eos_ids = stop_token_ids(tokenizer, template)
        self.prefix = special_prefix(tokenizer)
        self.stop_check_every = stop_check_every
        self.fallbacks = fallbacks or DecodeFallbacks()
        self.parameters = parameter_count(self.model)

    @cached_property
    def runs_fused_kernels(self) -> bool:
        """Whether the decode loop runs this model's one-token layers with their Triton kernels (decided once:
        generate.compile auto leaves such a model uncompiled)."""
        return fused_kernels(self.model, next(self.model.parameters()).device)

    def with_settings(self, **changes) -> Generator:
        """The same model, tokenizer and template with some generate settings changed (per request)."""
        return Generator(self.model, self.tokenizer, self.template, replace(self.config, **changes),
                         self.stop_check_every, self.fallbacks)

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
                       job_size: int | None = None) -> list[Answer]:
        """One batch of encoded prompts, left-padded. `stopping_criteria` (a transformers
        StoppingCriteriaList) and `streamer` are passed to model.generate (serve uses them). `job_size`:
        the prompts of the whole job this batch is part of (generate.compile auto; default this batch's).

        Plain batches go through the captured decode loop (graph_decode.py) where generate.cuda_graphs
        allows, its layers compiled where generate.compile allows. Under auto, a compile that fails is
        reported once and the loop goes on uncompiled; a capture that fails (a model or kernel CUDA
        graphs cannot hold) is reported once and this generator goes on with transformers' generate."""
        device = next(self.model.parameters()).device
        graphs = uses_graph_decode(self.config.cuda_graphs, device) and not self.fallbacks.graphs_failed and \
            not (stopping_criteria or streamer or self.config.no_repeat_ngram_size or prompt_learning(self.model)
                 or loop_unsupported(self.model))
        while graphs:
            fused = self.config.compile == "auto" and self.runs_fused_kernels
            compile = compiles_decode(self.config.compile, device, self.parameters, job_size or len(prompts),
                                      fused) and \
                not self.fallbacks.compile_failed
            try:
                generated = self.decode_in_graphs(prompts, max_new_tokens, min_new_tokens, compile)
            except Exception as exc:  # whatever capture or compiling raises; the plain path reraises real faults
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                if compile and self.config.compile == "auto":
                    log.warning("generate.compile: the compiled decode step failed (%s); decoding without "
                                "compiling (generate.compile: false skips trying)", failure_reason(exc))
                    self.fallbacks.compile_failed = True
                    continue
                if self.config.cuda_graphs is True or compile:
                    raise
                log.warning("generate.cuda_graphs: the captured decode step failed (%s); generating with "
                            "transformers' generate (generate.cuda_graphs: false skips trying)", failure_reason(exc))
                self.fallbacks.graphs_failed = True
                break
            return self.read_answers(generated, host_stops=bool(self.stops))
        return self.decode(prompts, max_new_tokens, min_new_tokens, stopping_criteria, streamer)

    def decode_in_graphs(self, prompts: list[list[int]], max_new_tokens: int | None, min_new_tokens: int,
                         compile: bool) -> list[list[int]]:
        """tunebench's decode loop: static KV cache, one CUDA graph per decode step (eager on CPU);
        `compile`: its decoder layers torch.compile'd. Returns each row's new tokens."""
        c = self.config
        settings = DecodeSettings(max_new_tokens or c.max_new_tokens, tuple(self.eos_ids), self.tokenizer.pad_token_id,
                                  c.repetition_penalty, c.do_sample, c.temperature, c.top_p, c.top_k, min_new_tokens)
        every = self.stop_check_every or 1
        stopped = None
        if self.stops:
            window = stop_window(self.stops, every)
            stopped = lambda new: rows_holding_stop(self.tokenizer, self.stops, new[:, -window:].tolist(), window)  # noqa: E731
        return GraphDecode(self.model, prompts, settings, stopped, every, compile=compile).run()

    def decode(self, prompts: list[list[int]], max_new_tokens: int | None, min_new_tokens: int, stopping_criteria,
               streamer) -> list[Answer]:
        """transformers' model.generate on the left-padded batch."""
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        kwargs = self.generation_kwargs(max_new_tokens, min_new_tokens)
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
            for position, answer in zip(chunk, self.generate_batch([encoded[i] for i in chunk], job_size=len(items))):
                if not answer.text:
                    # An immediate EOS or stop string leaves nothing, which a submission may not hold:
                    # answer again with EOS suppressed for the first tokens.
                    answer = self.generate_batch([encoded[position]], min_new_tokens=EMPTY_RETRY_MIN_TOKENS,
                                                 job_size=len(items))[0]
                answer.index = position
                results[position] = answer
                if on_answer:
                    on_answer(answer)
            if progress is not None:
                progress.update(len(chunk))
        return results  # type: ignore[return-value]
