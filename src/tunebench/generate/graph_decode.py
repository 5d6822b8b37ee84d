"""Decoding over a static KV cache where each decode step is one CUDA graph (`generate.cuda_graphs`).

transformers' generate runs, for every new token, the model's forward plus a dozen logits-processor
and stopping-criteria kernels, each launched from Python, and syncs with the GPU to see whether all
rows have finished: with a small model the GPU waits on the host most of the time. Here one decode
step (the forward over each row's newest token, the repetition penalty, the choice of the next token,
the end-of-answer bookkeeping) reads and writes only buffers allocated before it, so it is captured
once per batch as a CUDA graph and replayed by one host call per token. The host looks at the rows
every `check_every` steps only (stop strings; whether every row has finished). Capturing costs
one decode step.

Every layer gets a full-length static cache (a sliding-window layer too: its window is applied by
the attention mask over absolute positions), so a step's work does not depend on how far the answer
has got. Each new token's attention reads each key/value head once (decode_attention.py); with
`compile`, the step's decoder layers are torch.compile'd (decode_compile.py), which fuses their
many small kernels (the kernel count, not the weights, sets a small model's step time); uncompiled,
the RMSNorms at least run as one fused kernel each (decode_norms.py), and a small Gemma 3's attention and
MLP run fused, with Triton kernels on a GPU (decode_fused_layers.py). What transformers recomputes
for every forward the loop keeps itself: the attention masks (decode_masks.py, from the slots each
row attends to), the cache slot each step writes (`slot_writes`), cos/sin by position
(decode_rotary.py), and the tokens of each row for the repetition penalty (`history`, read at those
ids only, not across the vocabulary). Finished rows are dropped from the batch once few rows are
left (`compact`). On CPU (tests; `cuda_graphs: true`
without a GPU) the same step runs without a graph; greedy answers equal transformers' generate token
for token (tests/generate/test_graph_decode.py).
"""

from __future__ import annotations

import inspect
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.cache_utils import Cache, StaticLayer

from tunebench.generate import decode_warmup
from tunebench.generate.decode_attention import decode_attention
from tunebench.generate.decode_compile import compiled_decode_layers, eager_cache_update
from tunebench.generate.decode_fused_layers import fused_layers
from tunebench.generate.decode_masks import StepMasks, mask_kind
from tunebench.generate.decode_norms import fused_norms
from tunebench.generate.decode_rotary import rotary_tables
from tunebench.generate.slot_writes import SlotWrites
from tunebench.train.wrapped import causal_lm

# One run at a time in a process: a run switches the shared model's attention and layer calls (serve
# and the local judge already generate one request at a time).
RUN_LOCK = threading.RLock()


@dataclass(frozen=True)
class DecodeSettings:
    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int
    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_new_tokens: int = 0  # the end tokens are held back until a row has this many


def static_cache(model, length: int) -> Cache:
    """A cache of `length` positions in every layer, allocated by the first (prefill) forward."""
    config = model.config.get_text_config()
    return Cache(layers=[StaticLayer(max_cache_len=length) for _ in range(config.num_hidden_layers)])


def cache_argument(model) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.24 (`past_key_values`, its name
    on the GPU machines' 5.17, still works there but warns)."""
    return "cache" if "cache" in inspect.signature(type(causal_lm(model)).forward).parameters else "past_key_values"


def penalize_repeats(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: a token already in the row has its logit divided by `penalty`
    (multiplied where negative). logits: (rows, vocab) float, changed in place; history: (rows, n) the
    rows' token ids (repeats allowed). Reads and writes only those n columns of each row, not the vocab."""
    picked = logits.gather(1, history)
    return logits.scatter_(1, history, torch.where(picked < 0, picked * penalty, picked / penalty))


def sample(logits: torch.Tensor, s: DecodeSettings) -> torch.Tensor:
    """One token per row from temperature, top-k and top-p (in transformers' order), drawn as
    argmax(p / E) with E ~ Exp(1): a draw from p without a host sync. logits: (rows, vocab) float."""
    if s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1)  # ascending, as transformers' top-p warper
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - s.top_p
        drop[:, -1] = False  # the likeliest token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


class GraphDecode:
    """One batch of left-padded prompts decoded to at most `settings.max_new_tokens` new tokens each.

    `stopped(new)` gets the new tokens so far, (rows, tokens) on the device, and returns which rows
    hold a stop string (None: no stop strings). Call `run()` once; it returns each row's new tokens, pad
    after the row ended (as transformers' generate fills them)."""

    def __init__(self, model, prompts: list[list[int]], settings: DecodeSettings,
                 stopped: Callable[[torch.Tensor], list[bool]] | None = None, check_every: int = 16,
                 use_graph: bool | None = None, compact_below: float = 0.25, compact_min_rows: int = 8,
                 compile: bool = False):
        self.model, self.settings, self.stopped, self.check_every = model, settings, stopped, check_every
        self.compile = compile  # the decode step's layers through torch.compile (decode_compile.py)
        self.compact_below, self.compact_min_rows, self.compactions = compact_below, compact_min_rows, 0
        device = next(model.parameters()).device
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        rows, width = len(prompts), max(len(p) for p in prompts)
        self.width, slots = width, width + settings.max_new_tokens  # the cache's slots
        self.cache = static_cache(model, slots)
        self.cache_argument = cache_argument(model)
        pad = settings.pad_id
        prompt = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        # Each row's tokens by cache slot: the left-padded prompt, then each new token as it is chosen. Slots not
        # chosen yet hold the row's first token, already in the row (the repetition penalty reads every slot).
        self.history = torch.cat([prompt, prompt[:, :1].expand(rows, slots - width)], 1)
        # The cache slots each row attends to: the prompt's real tokens, then each new token as it is fed.
        self.mask = torch.zeros(rows, slots, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            self.mask[row, width - len(p) : width] = True
        self.positions = torch.tensor([[len(p)] for p in prompts], device=device)  # of the next token fed
        self.tokens = torch.full((rows, 1), pad, device=device)  # the newest token of each row
        self.answers = torch.full((rows, settings.max_new_tokens), pad, device=device)  # every row's new tokens
        self.rows = torch.arange(rows, device=device)  # which of the batch's rows each buffer row is
        # one add a step moves all three: the index of the next new token, the cache slot it is written to,
        # and the slot of the token being fed (the one chosen last)
        self.counters = torch.tensor([0, width, width - 1], device=device)
        self.step, self.slot, self.fed = self.counters[0:1], self.counters[1:2], self.counters[2:3]
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.eos = torch.tensor(settings.eos_ids, device=device)
        self.end_columns = None
        if settings.min_new_tokens:
            vocab = model.get_output_embeddings().weight.shape[0]
            self.end_columns = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.end_columns[[i for i in settings.eos_ids if 0 <= i < vocab]] = True
        self.masks = None  # StepMasks where the model takes the loop's own masks (set by run)

    @property
    def generated(self) -> torch.Tensor:
        """The new tokens of the rows still decoding, by step (a view: pad after a row ended)."""
        return self.history[:, self.width :]

    def choose(self, logits: torch.Tensor) -> None:
        """Picks each row's next token from its logits (rows, vocab) and records it; a finished row gets pad."""
        s = self.settings
        logits = logits.float()
        if self.end_columns is not None:
            logits = logits.masked_fill(self.end_columns & (self.step < s.min_new_tokens), float("-inf"))
        if s.repetition_penalty != 1.0:
            logits = penalize_repeats(logits, self.history, s.repetition_penalty)
        chosen = sample(logits, s) if s.do_sample else logits.argmax(-1)
        chosen = torch.where(self.done, s.pad_id, chosen)
        self.done |= torch.isin(chosen, self.eos)
        self.history.index_copy_(1, self.slot, chosen[:, None])
        self.tokens.copy_(chosen[:, None])
        self.mask.index_fill_(1, self.slot, True)  # the cache slot this token is fed into
        self.counters += 1

    def forward_newest(self) -> None:
        """One decode step: the newest token of every row through the model, then the next token."""
        masks = self.masks(self.mask, self.fed) if self.masks is not None else self.mask.long()
        out = self.model(input_ids=self.tokens, attention_mask=masks, position_ids=self.positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_argument: self.cache})
        self.positions += 1
        self.choose(out.logits[:, -1])

    def prefill(self) -> None:
        positions = (self.mask[:, : self.width].long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=self.history[:, : self.width], attention_mask=self.mask.long(),
                         position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{self.cache_argument: self.cache})
        self.choose(out.logits[:, -1])

    def slot_writes(self) -> SlotWrites:
        """The cache's update for the decode steps (slot_writes.py)."""
        return SlotWrites(self.cache.layers, self.fed)

    def capture(self) -> Callable[[], None]:
        """The decode step as a replayable CUDA graph; runs one real step first (warm-up on a side
        stream, as CUDA graph capture asks: cuBLAS workspaces and lazy state are created outside)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward_newest()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.forward_newest()
        return graph.replay

    def compact(self, new: int) -> None:
        """Drops the finished rows from the cache and every per-row buffer (their answers are kept):
        a step's memory traffic follows its rows, and the last long answers would otherwise run at
        the cost of the whole batch."""
        keep = (~self.done).nonzero().flatten()
        self.answers[self.rows, :new] = self.generated[:, :new]  # later columns: pad (the slots not chosen yet
        # hold the row's first token)
        self.rows = self.rows[keep]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
        for name in ("tokens", "positions", "mask", "history", "done"):
            setattr(self, name, getattr(self, name)[keep])
        self.compactions += 1

    def worth_compacting(self) -> bool:
        rows = self.done.shape[0]
        return rows >= self.compact_min_rows and int((~self.done).sum()) <= rows * self.compact_below

    def finished(self, new: int) -> bool:
        """The host's look at the rows after `new` tokens: marks rows holding a stop string as done;
        True when every row is done."""
        if self.stopped is not None:
            hits = [i for i, hit in enumerate(self.stopped(self.generated[:, :new])) if hit]
            if hits:
                self.done[hits] = True
        return bool(self.done.all())

    @contextmanager
    def running(self):
        """The model as the loop runs it (see the module's docstring); restored after the block."""
        dtype = self.model.get_input_embeddings().weight.dtype
        decode_warmup.wait()  # no warm-up kernel on the GPU while a step is captured
        with RUN_LOCK, ExitStack() as stack:
            own_attention = stack.enter_context(decode_attention(self.model))
            stack.enter_context(rotary_tables(self.model, self.mask.shape[1], dtype))
            stack.enter_context(compiled_decode_layers(self.model) if self.compile else fused_norms(self.model))
            kind = mask_kind(self.model) if own_attention else None
            if kind is not None:
                self.masks = StepMasks(self.model, kind, self.mask.shape[1], self.mask.device)
                if not self.compile:  # the layers' own fused one-token forwards write the cache by slot_writes
                    stack.enter_context(fused_layers(self.model))
            yield

    def start(self) -> None:
        """The prompts' pass; after it the decode steps write the cache themselves where the loop builds
        the masks (the cache's own update counts positions, which nothing then reads)."""
        self.prefill()
        if self.masks is not None:
            self.cache.update = self.slot_writes()
        if self.compile:
            eager_cache_update(self.cache)

    @torch.no_grad()
    def run(self) -> list[list[int]]:
        with self.running():
            return self.decode()

    def decode(self) -> list[list[int]]:
        limit = self.settings.max_new_tokens
        self.start()
        new = 1
        step = self.forward_newest
        if new < limit and self.finished(new):  # every row ended at its first token
            limit = new
        elif self.use_graph and new < limit:
            step = self.capture()  # its warm-up made one more token
            new += 1
        while new < limit:
            if new % self.check_every == 0:
                if self.finished(new):
                    break
                if self.worth_compacting():
                    self.compact(new)
                    if self.use_graph:  # a graph for the fewer rows; the old one is freed with `step`
                        step = self.capture()
                        new += 1
                        continue
            step()
            new += 1
        self.answers[self.rows] = self.generated
        return self.answers[:, :new].tolist()
