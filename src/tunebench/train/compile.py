"""Regional compilation (`train.compile`): each decoder layer goes through torch.compile in place.

Why per layer and not the whole model: every layer of a decoder runs the same code, so one graph
(two for models that alternate sliding and global attention) serves all of them and compiling
takes seconds, not minutes; peft's LoRA/DoRA layers and bitsandbytes' 4-bit linears are inside the
layer and traced with it; DDP wraps the model afterwards, untouched.

Gradient checkpointing: transformers 5.17 (the GPU machines') checkpoints around each layer's call,
so the compiled layer runs inside the checkpoint and again in its recompute; 5.24 (the CPU tests')
checkpoints inside the layer's forward, which the compiled call then contains (dynamo turns it into
a recompute inside the compiled backward). Moving the checkpoint inside the compiled call under 5.17
too was measured on an H200 and was slower, with offload's memory lost (docs/PERFORMANCE.md).

Shapes: the joined rows of `train.step_tokens` vary in length from step to step. Each micro-batch
is right-padded to a multiple of BUCKET tokens (bucket_batch: labels -100, position ids restarting
at 0, so the padding is one more example that nothing attends to and no loss sees, as pad_batch
already pads to a multiple of 8), so a run meets at most step_tokens / BUCKET sequence lengths.
On top of that dynamo's automatic dynamic shapes (torch.compile's default) turn the sequence
length symbolic at the first recompile, so in practice a run compiles each layer graph twice:
once for the first length, once for all others. Padding keeps the bound where a model's code
specialises on the length (a guard dynamo cannot make symbolic), and gives tensor-core-friendly
lengths.

Compile time is counted apart from step time (compile_seconds: dynamo's compile callbacks, the
lazily compiled backward included), so the loop can log tokens/s without it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import torch
import torch.utils.checkpoint
from torch import nn

from tunebench.config_checks import compile_refusal, graphs_refusal
from tunebench.data.tokens import IGNORE
from tunebench.errors import ConfigError, failure_reason
from tunebench.train.wrapped import causal_lm

log = logging.getLogger(__name__)

# torch.utils.checkpoint's control flow, not an error (private name; an empty tuple where a torch lacks it)
StopRecomputation = getattr(torch.utils.checkpoint, "_StopRecomputationError", ())

BUCKET = 128  # tokens; sequence lengths are padded to a multiple of this when compile is on
BACKEND = "inductor"  # the tests use aot_eager: the same tracing, without C++/Triton code generation
# Graph variants a layer may need: buckets × (sliding, global attention) × (train, eval, no-grad passes).
RECOMPILE_LIMIT = 64


def use_compile(setting: bool | str, device: torch.device | None, sharded: bool,
                dora: bool = False, virtual_tokens: bool = False) -> bool:
    """Resolve train.compile: auto is on for CUDA (off on CPU, where kernel launches cost little and the
    compile would only add minutes), unless sharding rules it out; true insists, false declines.
    DoRA: auto stays off, since dynamo cannot trace peft's DoRA layer (it clears a cache dict inside the
    checkpointed forward and reads a weight class's module name), so the layer would run eagerly anyway;
    true compiles what dynamo can and gives eager's results. Prefix and prompt tuning (virtual tokens): auto
    stays off, as their prepended keys or embeddings through compiled layers have not been measured on a GPU."""
    if setting is False:
        return False
    why = compile_refusal(sharded)
    if why and setting is True:
        raise ConfigError(f"train.compile: {why}; set train.compile to auto or false")
    if setting != "auto":
        if device is not None and device.type == "cpu" and BACKEND == "inductor" and not cpp_compiler():
            raise ConfigError("train.compile: true on CPU needs a C++ compiler for inductor (g++ or clang++ on PATH, "
                              "or CXX); install one, or set train.compile to auto or false")
        return True
    if why or dora or virtual_tokens:
        log.info("train.compile auto: off (%s)", why or ("peft's DoRA layers cannot be traced: no gain" if dora else
                 "prefix/prompt tuning's virtual tokens through compiled layers are not measured yet; true tries it"))
        return False
    return device is not None and device.type == "cuda"


def use_graphs(setting: bool | str, device: torch.device | None, compiled: bool, checkpointing: bool,
               offload: bool, world: int, objective: str) -> bool:
    """Resolve train.cuda_graphs: the compiled layers replayed as CUDA graphs (inductor's cudagraph trees).

    A replayed layer writes its outputs into memory the next replay reuses, so nothing may call a layer
    again before its backward has run: gradient checkpointing does (its recompute), and offload points
    the weights at new memory each step. auto: on where it can run, on one process with objective sft
    (several processes and the preference objectives' reference passes are not measured yet)."""
    if setting is False:
        return False
    cuda = device is not None and device.type == "cuda"
    why = graphs_refusal(compiled, checkpointing, offload) if cuda else "it needs a CUDA GPU"
    if why and setting is True:
        raise ConfigError(f"train.cuda_graphs: {why}; set it to auto or false")
    if why or (setting == "auto" and (world > 1 or objective != "sft")):
        return False
    return True


def graph_step_begin(on: bool) -> None:
    """Tell inductor's CUDA graphs that a new forward starts (the last one's outputs are done with)."""
    if on:
        torch.compiler.cudagraph_mark_step_begin()


def cpp_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def decoder_layers(model) -> nn.ModuleList:
    """The decoder's list of layers under peft and any wrapper."""
    layers = getattr(causal_lm(model).get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not layers:
        raise ConfigError(f"train.compile: {type(causal_lm(model)).__name__} has no decoder `layers` list "
                          "to compile; set train.compile: false")
    return layers


def compile_options(graphs: bool = False) -> dict | None:
    """Inductor options of the compiled layers: replayed as CUDA graphs (train.cuda_graphs)."""
    return {"triton.cudagraphs": True} if graphs else None


def compile_layers(model, backend=None, fall_back: bool = False, options: dict | None = None) -> int:
    """Compile every decoder layer of `model` in place (module.compile); returns how many.

    In place, so the model's structure, parameter names, hooks of checkpointing and the saved
    adapter are unchanged, and DDP can wrap the model afterwards. Each layer's compiled call is
    wrapped in a CompiledLayer (work that must stay outside the graph, like offload's weight
    streaming, runs there). `fall_back` (train.compile: auto): the first compile failure turns every
    layer back to eager (EagerFallback). `options`: inductor's (compile_options); other backends take none."""
    raise_recompile_limit(RECOMPILE_LIMIT)
    start_clock()
    layers = decoder_layers(model)
    fallback = EagerFallback() if fall_back else None  # one for all the layers
    for layer in layers:
        layer.compile(backend=backend or BACKEND, **({"options": options} if options else {}))
        CompiledLayer(layer, fallback)
    return len(layers)


def raise_recompile_limit(limit: int) -> None:
    """Lets dynamo keep at least `limit` graphs per function (for the whole process)."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.7
    setattr(config, name, max(getattr(config, name), limit))


class CompiledLayer:
    """A decoder layer's call once compiled: `before` callbacks, run eagerly outside the graph, then the
    compiled layer (or the eager one once the run's EagerFallback has given up on compiling).

    The callbacks run before each call and again just before the layer's backward (a hook on the
    gradient of its output): where the checkpoint is inside the layer's forward (transformers 5.24), the
    compiled graph recomputes the layer in its own backward, which no module call announces. Installed
    as the layer's `_compiled_call_impl`, which nn.Module.__call__ calls in place of the eager
    `_call_impl` (what module.compile() put there is kept as `compiled`)."""

    def __init__(self, layer: nn.Module, fallback: EagerFallback | None = None):
        self.layer = layer
        self.compiled = layer._compiled_call_impl
        self.fallback = fallback  # how retry_step finds it from the model
        self.before: list = []
        layer._compiled_call_impl = self

    def __call__(self, *args, **kwargs):
        self.run_before()
        out = self.run(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        if self.before and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(self.before_backward)
        return out

    def run_before(self) -> None:
        for callback in self.before:
            callback()

    def before_backward(self, grad: torch.Tensor) -> torch.Tensor:
        self.run_before()
        return grad

    def run(self, *args, **kwargs):
        if self.fallback is None:
            return self.compiled(*args, **kwargs)
        if not self.fallback.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:
                if not self.fallback.give_up(exc):
                    raise
        return self.layer._call_impl(*args, **kwargs)


def compiled_layer(layer: nn.Module) -> CompiledLayer | None:
    """The CompiledLayer of a layer compile_layers compiled (None for an eager layer)."""
    call = getattr(layer, "_compiled_call_impl", None)
    return call if isinstance(call, CompiledLayer) else None


class EagerFallback:
    """Under train.compile: auto, a model or torch version that dynamo or inductor cannot handle (no
    Triton for the GPU, no C compiler, an untraceable layer) must not stop a run that would train
    eagerly: the first failure of a compiled layer turns every layer back to eager for the rest of
    the run, with one warning. A failing forward is answered eagerly on the spot; a failure while
    compiling the backward (done lazily, in the first backward) surfaces from the step, which the
    loop then runs again eagerly (`retry_step`). Out-of-memory errors are not compile failures, nor is
    the exception by which non-re-entrant checkpointing ends a recompute early once it has what the
    backward needs (it passes through the compiled layer when transformers checkpoints around the
    layer's call); any other error is taken for one, and a real fault (bad input, a CUDA error) fails
    again eagerly and is raised from there."""

    def __init__(self):
        self.failed = False

    def give_up(self, exc: BaseException) -> bool:
        """Turn every layer back to eager because of `exc`; False when `exc` is no compile failure to
        fall back from (out of memory) or the layers are eager already."""
        if self.failed or isinstance(exc, (torch.cuda.OutOfMemoryError, StopRecomputation)):
            return False
        self.failed = True
        log.warning("train.compile auto: the compiled decoder layers failed (%s); training on without compiling "
                    "(train.compile: false skips trying)", failure_reason(exc))
        return True


def retry_step(model, exc: BaseException) -> bool:
    """Whether a training step of `model` that raised `exc` should run again, eagerly: its layers were
    compiled under train.compile auto and have just been turned back to eager."""
    try:
        compiled = compiled_layer(decoder_layers(model)[0])
    except (ConfigError, AttributeError):
        return False
    return compiled is not None and compiled.fallback is not None and compiled.fallback.give_up(exc)


def bucket_batch(batch: dict[str, torch.Tensor], pad_id: int, multiple: int = BUCKET) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch's token tensors to a multiple of `multiple` columns.

    Packed/joined rows (position_ids, no attention mask): the padding continues as one more example
    (position ids 0, 1, …), which transformers keeps apart like any other example; padded rows
    (attention_mask) get mask 0. Labels are -100 either way, so the loss is unchanged. Other keys
    (DPO's per-pair reference log-probs) have no sequence axis and pass through."""
    width = batch["input_ids"].shape[1]
    fill = -(-width // multiple) * multiple - width
    if fill == 0:
        return batch
    rows = batch["input_ids"].shape[0]
    pads = {"input_ids": torch.full((rows, fill), pad_id, dtype=torch.long),
            "labels": torch.full((rows, fill), IGNORE, dtype=torch.long),
            "position_ids": torch.arange(fill, dtype=torch.long).expand(rows, fill),
            "attention_mask": torch.zeros((rows, fill), dtype=torch.long)}
    return {key: torch.cat([value, pads[key].to(value.device)], dim=1) if key in pads else value
            for key, value in batch.items()}


class CompileClock:
    """Seconds spent compiling, from dynamo's start/end callbacks (nested compiles count once)."""

    def __init__(self):
        self.total = 0.0
        self.graphs = 0
        self.started: float | None = None

    def start(self, *_args) -> None:  # older torch calls the callbacks with no argument
        self.started = time.perf_counter()

    def end(self, *args) -> None:
        if self.started is None:
            return
        from torch._dynamo.utils import counters

        took, self.started = time.perf_counter() - self.started, None
        self.total += took
        self.graphs += 1
        trigger = getattr(args[0], "callback_trigger", None) if args else None  # dynamo, lazy_backward, ...
        # Graph breaks mean parts of a layer run eagerly (slower, not wrong): TORCH_LOGS=graph_breaks says where.
        log.info("compile: %s %.1f s (%.1f s in all, %d graph breaks)", getattr(trigger, "name", "graph").lower(),
                 took, self.total, sum(counters["graph_break"].values()))


CLOCK: CompileClock | None = None


def start_clock() -> None:
    """Register the clock with dynamo (again after torch._dynamo.reset(), which drops the callbacks)."""
    global CLOCK
    from torch._dynamo.callback import callback_handler

    CLOCK = CLOCK or CompileClock()
    if CLOCK.start not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(CLOCK.start)
        callback_handler.register_end_callback(CLOCK.end)


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (0 when nothing was compiled)."""
    return CLOCK.total if CLOCK is not None else 0.0
