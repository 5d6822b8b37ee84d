"""Setup for a training run, apart from the loop: data (once), model and levers, optimizer, resume.

Each function decides one thing and hands it on in the TrainState; none of them trains.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from tunebench.config import Config, TrainConfig
from tunebench.data.prepare import Summary
from tunebench.errors import ConfigError
from tunebench.models.load import load_base_model
from tunebench.models.trained import find_trained
from tunebench.runs import DATA_SUMMARY, TRAINED_META, RunDir, read_jsonl
from tunebench.train.checkpoint import latest_checkpoint, load_checkpoint
from tunebench.train.checkpointing import micro_batch_tokens, use_checkpointing
from tunebench.train.compile import compile_layers, compile_options, use_compile, use_graphs
from tunebench.train.dequant import use_compile_dequant, use_torch_dequant
from tunebench.train.distributed import Dist
from tunebench.train.guard_skip import use_skip_guards
from tunebench.train.loop import TrainState
from tunebench.train.loss import use_answer_only_logits
from tunebench.train.methods import count_parameters, get_method, make_trainable
from tunebench.train.offload import enable_offload, use_offload

log = logging.getLogger(__name__)


def prepare_once(config: Config, run: RunDir, dist: Dist, prepare_fn: Callable[[], Summary],
                 prepared: Summary | None) -> Summary:
    """The data stage, run once per run: by the caller (`prepared`), or here on rank 0 while the
    other ranks wait and then read its summary."""
    if prepared is not None:
        return prepared
    if dist.is_main:
        run.save_config(config)
        summary = prepare_fn()
    dist.barrier()
    if not dist.is_main:
        summary = Summary(**json.loads((run.data_dir / DATA_SUMMARY).read_text(encoding="utf-8")))
    return summary


def autocast_for(dtype: torch.dtype) -> Callable:
    return ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dtype == torch.bfloat16
            else contextlib.nullcontext)


def resolve_levers(t: TrainConfig, model, device: torch.device, world: int, sharded: bool = False,
                   max_seq_length: int = 1024) -> TrainConfig:
    """The automatic levers, decided once for this model and machine (recorded in the log)."""
    tokens = micro_batch_tokens(t.step_tokens, t.per_device_train_batch_size, max_seq_length, t.objective != "sft")
    t = replace(t, answer_only_logits=use_answer_only_logits(t.answer_only_logits, model, t.method, sharded),
                compile=use_compile(t.compile, device, sharded, t.use_dora, get_method(t.method).virtual_tokens),
                gradient_checkpointing=use_checkpointing(t.gradient_checkpointing, model, device, tokens,
                                                         t.offload_frozen, world))
    t = replace(t, offload_frozen=use_offload(t.offload_frozen, model, t.method, t.gradient_checkpointing, device,
                                              world, compiled=t.compile))
    t = replace(t, cuda_graphs=use_graphs(t.cuda_graphs, device, t.compile, t.gradient_checkpointing,
                                          t.offload_frozen, world, t.objective))
    t = replace(t, compile_dequant=use_compile_dequant(t.compile_dequant, get_method(t.method).quantized, t.compile,
                                                       t.cuda_graphs),
                compile_skip_guards=use_skip_guards(t.compile_skip_guards, device, t.compile, t.cuda_graphs, world,
                                                    t.objective))
    log.info("answer_only_logits: %s, gradient_checkpointing: %s, offload_frozen: %s, compile: %s, cuda_graphs: %s, "
             "compile_dequant: %s, compile_skip_guards: %s", t.answer_only_logits, t.gradient_checkpointing,
             t.offload_frozen, t.compile, t.cuda_graphs, t.compile_dequant, t.compile_skip_guards)
    return t


@dataclass(frozen=True)
class StartPoint:
    """Where training starts: the base to load, an adapter to go on training, and what the result applies to."""

    config: Config  # model.name_or_path is the base to load; data.template the run's template
    adapter: Path | None = None
    base_model: str = ""
    source: str = ""  # the run started from ("" for a plain base model)


def resolve_start(config: Config) -> StartPoint:
    """train.init_from (or model.name_or_path naming a finished run) → the base and adapter to load."""
    source = config.train.init_from
    if source is None and find_trained(Path(config.model.name_or_path)) is not None:
        source = config.model.name_or_path
    if source is None:
        return StartPoint(config, None, config.model.name_or_path)
    trained = find_trained(Path(source))
    if trained is None:
        raise ConfigError(f"train.init_from: {source} holds no finished run (no tunebench.json in it, "
                          "its adapter/ or its model/); train it first, or give a model id")
    meta = json.loads((trained / TRAINED_META).read_text(encoding="utf-8"))
    template = meta.get("template") or config.data.template
    if template != config.data.template:
        log.info("data.template: %s, the template %s was trained with", template, source)
    adapter = trained if (trained / "adapter_config.json").exists() else None
    if adapter is not None:
        kind = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("peft_type")
        if kind != "LORA" and (get_method(config.train.method).lora or config.train.method == "full"):
            raise ConfigError(f"train.init_from: {source} is a {kind} adapter; lora, qlora and full can start "
                              "from a LoRA adapter or a full model only")
    base = meta["base_model"] if adapter is not None else str(trained)
    started = replace(config, model=replace(config.model, name_or_path=base),
                      data=replace(config.data, template=template))
    return StartPoint(started, adapter, base, str(trained))


def load_model(config: Config, dist: Dist, device: torch.device, dtype: torch.dtype, adapter: Path | None = None):
    """Load the base (+ the adapter of the run started from), resolve the levers, attach the method;
    returns (model, train config)."""
    t = config.train
    method = get_method(t.method)
    # Full fine-tuning keeps fp32 weights (autocast computes in bf16); fp64 when asked (exactness checks).
    weights = dtype if method.peft or dtype == torch.float64 else torch.float32
    model = load_base_model(config.model, weights, quantize_4bit=method.quantized, device=device,
                            sharded=dist.sharded)
    if adapter is not None and not method.peft:  # full training goes on from the merged SFT model
        from peft import PeftModel

        model, adapter = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload(), None
    t = resolve_levers(t, model, device, dist.world, dist.sharded, config.data.max_seq_length)
    model = make_trainable(model, t, adapter)
    if t.compile_dequant:  # 4-bit weights dequantized by torch ops the compiled layers trace (train/dequant.py)
        log.info("compile_dequant: %d 4-bit linear layers dequantize with torch ops", use_torch_dequant(model))
    if t.compile:  # in place, before DDP wraps the model (train/compile.py)
        options = compile_options(t.cuda_graphs)
        log.info("compile: %d decoder layers (compiled at their first use%s)",
                 compile_layers(model, fall_back=config.train.compile == "auto", options=options),
                 ", replayed as CUDA graphs" if t.cuda_graphs else "")
    model = dist.wrap(model)
    if t.offload_frozen:
        offload = enable_offload(model, device)
        log.info("offload: %.2f GiB of frozen weights in host memory, streamed one layer ahead%s",
                 offload.host_bytes / 2**30, " (input embedding on the host)" if offload.embedding else "")
    model.train()
    if device.type == "cuda":  # the logged peak is the training peak; loading may briefly need more
        log.info("GPU memory after loading: %.2f GiB (peak while loading %.2f GiB)",
                 torch.cuda.memory_allocated(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30)
        torch.cuda.reset_peak_memory_stats(device)
    trainable, total = count_parameters(model)
    log.info("%s: %s trainable of %s parameters (%.2f%%) on %s, %s", t.method, f"{trainable:,}", f"{total:,}",
             100 * trainable / total, device, dtype)
    return model, t


def build_optimizer(state: TrainState) -> None:
    """AdamW (no decay on biases and norms) and the learning-rate schedule over state.steps."""
    from transformers import get_scheduler

    t = state.train
    state.dist.reshard(state.model)  # the sharded parameters, not copies gathered by a pass before
    state.params = [p for p in state.model.parameters() if p.requires_grad]
    decay = [p for p in state.params if p.ndim >= 2]
    no_decay = [p for p in state.params if p.ndim < 2]
    state.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                         {"params": no_decay, "weight_decay": 0.0}], lr=t.learning_rate,
                                        fused=state.device.type == "cuda")
    state.scheduler = get_scheduler({"constant": "constant_with_warmup"}.get(t.lr_scheduler, t.lr_scheduler),
                                    state.optimizer, num_warmup_steps=t.warmup_steps,
                                    num_training_steps=state.steps)


def resume_from_checkpoint(state: TrainState, resume: bool) -> None:
    """Restore the newest complete checkpoint (with --resume) and trim metrics logged after it."""
    run, dist = state.run, state.dist
    checkpoint = latest_checkpoint(run.checkpoints)
    if resume and checkpoint is not None:
        state.start = load_checkpoint(checkpoint, dist.unwrap(state.model), state.optimizer,
                                      state.scheduler)["step"]
        log.info("resuming from %s (step %d of %d)", checkpoint, state.start, state.steps)
    elif resume:
        log.info("no complete checkpoint in %s: starting from step 0", run.checkpoints)
    elif checkpoint is not None:
        raise ConfigError(f"{run.root} already has checkpoints: pass --resume to continue, "
                          "or choose another --run-dir")
    if run.metrics.exists() and dist.is_main:
        # Steps logged after the checkpoint we resume from will be trained (and logged) again.
        kept = [record for record in read_jsonl(run.metrics) if record["step"] <= state.start]
        run.metrics.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
