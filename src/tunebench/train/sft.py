"""`tunebench train`: supervised fine-tuning, read top to bottom.

load config → prepare data → load model → attach method → loop (accumulate, step, log, eval,
save) → save the adapter (or full model) with its tokenizer, template and fingerprints.

Why our own loop rather than TRL's SFTTrainer: the data stage already produces ids and masks; the
loop needs atomic checkpoints and a resume that replays the exact data order (micro-batch k of
the run is a pure function of the seed and k); and the loss is a token-sum normalised over the
whole accumulation window, so gradient accumulation gives the same update as one big batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tunebench import __version__
from tunebench.config import Config
from tunebench.config_checks import check_config
from tunebench.data.batches import join_examples, pad_batch
from tunebench.data.prepare import prepare, read_rows
from tunebench.errors import ConfigError, DataError
from tunebench.models.load import compute_dtype, load_base_model, pick_device
from tunebench.models.tokenizer import load_tokenizer
from tunebench.runs import RunDir, append_jsonl, read_jsonl, write_json_atomic
from tunebench.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tunebench.train.distributed import Dist
from tunebench.train.fingerprint import code_fingerprint
from tunebench.train.loss import answer_tokens, evaluate, token_loss_sum, use_answer_only_logits
from tunebench.train.methods import count_parameters, make_trainable
from tunebench.train.offload import enable_offload, use_offload
from tunebench.train.tracking import Trackers

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def micro_batch_order(n_rows: int, batch_size: int, seed: int, count: int) -> list[list[int]]:
    """The first `count` micro-batches of the run: each epoch a fresh seeded permutation."""
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < count:
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        batches += [perm[i : i + batch_size] for i in range(0, n_rows, batch_size)]
        epoch += 1
    return batches[:count]


def micro_batches(groups: list[list[dict]], pad_id: int, step_tokens: int | None) -> list[tuple[dict, int]]:
    """(tensor batch, real token count) for one optimizer step on this process.

    groups are the step's micro-batches of rows; with step_tokens they are run padding-free,
    joined into rows of at most step_tokens tokens (see data.batches.join_examples).
    """
    if step_tokens:
        groups = [[row] for row in join_examples([row for group in groups for row in group], step_tokens)]
    return [(pad_batch(group, pad_id), sum(len(row["input_ids"]) for row in group)) for group in groups]


def total_steps(config: Config, n_rows: int, world: int = 1) -> int:
    t = config.train
    if t.max_steps is not None:
        return t.max_steps
    micro_per_epoch = math.ceil(n_rows / t.per_device_train_batch_size)
    return max(1, math.ceil(t.num_train_epochs * micro_per_epoch / (t.gradient_accumulation_steps * world)))


def train(config: Config, run: RunDir, resume: bool = False, allow_contamination: bool = False) -> Path:
    """Fine-tune and return the folder holding the final adapter (or full model)."""
    t = config.train
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_config(config, world_size)  # every problem at once, before any data or model is loaded
    set_seed(t.seed)
    dist = Dist(cpu=not torch.cuda.is_available())  # one process unless run under accelerate launch
    device = dist.device or pick_device()
    dtype = compute_dtype(t.precision, device)

    # data (rank 0 prepares; the others then find it done)
    tokenizer = load_tokenizer(config.model)
    tokenizer_name = config.model.tokenizer or config.model.name_or_path
    if dist.is_main:
        run.save_config(config)
        prepare(config, run, tokenizer, tokenizer_name, allow_contamination=allow_contamination)
    dist.barrier()
    summary = prepare(config, run, tokenizer, tokenizer_name, allow_contamination=allow_contamination)
    rows = read_rows(run.data_dir / "train.jsonl")
    eval_rows = read_rows(run.data_dir / "eval.jsonl")
    if not rows:
        raise DataError("the prepared training set is empty")

    # model
    model = load_base_model(config.model, dtype if t.method != "full" else torch.float32,
                            quantize_4bit=t.method == "qlora", device=device)
    # the two automatic levers, decided for this model and machine (recorded in the log)
    t = replace(t, answer_only_logits=use_answer_only_logits(t.answer_only_logits, model, t.method, dist.world),
                offload_frozen=use_offload(t.offload_frozen, model, t.method, t.gradient_checkpointing, device,
                                           dist.world))
    log.info("answer_only_logits: %s, offload_frozen: %s", t.answer_only_logits, t.offload_frozen)
    model = dist.wrap(make_trainable(model, t))
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

    # optimisation
    world = dist.world
    steps = total_steps(config, len(rows), world)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.learning_rate,
                                  fused=device.type == "cuda")
    from transformers import get_scheduler

    scheduler = get_scheduler({"constant": "constant_with_warmup"}.get(t.lr_scheduler, t.lr_scheduler),
                              optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=steps)

    start = 0
    checkpoint = latest_checkpoint(run.checkpoints)
    if resume and checkpoint is not None:
        start = load_checkpoint(checkpoint, dist.unwrap(model), optimizer, scheduler)["step"]
        log.info("resuming from %s (step %d of %d)", checkpoint, start, steps)
    elif resume:
        log.info("no complete checkpoint in %s: starting from step 0", run.checkpoints)
    elif checkpoint is not None:
        raise ConfigError(f"{run.root} already has checkpoints: pass --resume to continue, "
                          "or choose another --run-dir")
    if run.metrics.exists() and dist.is_main:
        # Steps logged after the checkpoint we resume from will be trained (and logged) again.
        kept = [record for record in read_jsonl(run.metrics) if record["step"] <= start]
        run.metrics.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")

    accum = t.gradient_accumulation_steps
    # prefix/prompt tuning prepend virtual tokens to each row, so their rows are never joined
    step_tokens = None if t.method in ("prefix", "prompt") else t.step_tokens
    # Micro-batch k of the run is the same whatever the number of processes: with a global batch of
    # accum × world micro-batches per step, rank r takes every world-th one, so a checkpoint
    # resumes on another number of GPUs when accum × world is unchanged.
    per_step = accum * world
    order = micro_batch_order(len(rows), t.per_device_train_batch_size, t.seed, steps * per_step)
    pad_id = tokenizer.pad_token_id
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dtype == torch.bfloat16
                else contextlib.nullcontext)
    trackers = Trackers(t.report_to, run.root, asdict(config))
    window = {"loss_sum": 0.0, "tokens": 0, "answer_tokens": 0, "steps": 0, "time": time.perf_counter()}
    bar = tqdm(total=steps, initial=start, desc=f"train {t.method}", unit="step", dynamic_ncols=True,
               disable=not dist.is_main)
    for step in range(start, steps):
        step_batches = order[step * per_step : (step + 1) * per_step]
        # Normalise by the answer tokens of the whole global batch, which every rank can count.
        n_answer = sum(answer_tokens(rows[i]) for idx in step_batches for i in idx)
        micro = micro_batches([[rows[i] for i in idx] for idx in step_batches[dist.rank :: world]],
                              pad_id, step_tokens)
        for k, (batch, real_tokens) in enumerate(micro):
            batch = {key: v.to(device) for key, v in batch.items()}
            with dist.no_sync(model, last=k == len(micro) - 1):
                with autocast():
                    loss_sum = token_loss_sum(model, batch, t.answer_only_logits)
                # Backward outside autocast (PyTorch's advice). DDP averages gradients over ranks;
                # × world turns that average into the global sum.
                (loss_sum * world / max(n_answer, 1)).backward()
            window["loss_sum"] += loss_sum.item()
            window["tokens"] += real_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window["answer_tokens"] += n_answer
        window["steps"] += 1
        done = step + 1
        if done % t.logging_steps == 0 or done == steps:
            elapsed = time.perf_counter() - window["time"]
            record = {"step": done, "loss": dist.sum(window["loss_sum"]) / max(window["answer_tokens"], 1),
                      "learning_rate": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens_per_s": dist.sum(window["tokens"]) / elapsed if elapsed else 0.0,
                      "epoch": done * per_step * t.per_device_train_batch_size / len(rows)}
            if device.type == "cuda":
                record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if t.eval_steps is None and eval_rows and done == steps and dist.is_main:
                record["eval_loss"] = evaluate(dist.unwrap(model), eval_rows, t.per_device_train_batch_size,
                                               pad_id, device, autocast)
            if dist.is_main:
                append_jsonl(run.metrics, record)
                trackers.log(record, done)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            window = {"loss_sum": 0.0, "tokens": 0, "answer_tokens": 0, "steps": 0, "time": time.perf_counter()}
        if t.eval_steps and eval_rows and (done % t.eval_steps == 0 or done == steps) and dist.is_main:
            eval_loss = evaluate(dist.unwrap(model), eval_rows, t.per_device_train_batch_size, pad_id, device,
                                 autocast)
            append_jsonl(run.metrics, {"step": done, "eval_loss": eval_loss})
            trackers.log({"eval_loss": eval_loss}, done)
        if done % t.save_steps == 0 and done < steps:
            if dist.is_main:
                save_checkpoint(run.checkpoints, done, dist.unwrap(model), optimizer, scheduler,
                                {"steps": steps, "micro_batches_per_step": per_step}, t.save_total_limit)
            dist.barrier()
        bar.update(1)
    bar.close()
    trackers.close()
    target = run.full_model if t.method == "full" else run.adapter
    if dist.is_main:
        target = save_final(dist.unwrap(model), tokenizer, config, run, summary.fingerprint, steps)
    dist.barrier()
    return target


def save_final(model, tokenizer, config: Config, run: RunDir, data_fingerprint: str, steps: int) -> Path:
    """Save the adapter in plain peft format (or the full model), atomically, with its metadata."""
    target = run.full_model if config.train.method == "full" else run.adapter
    tmp = target.with_name(f".tmp-{target.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    meta = {"base_model": config.model.name_or_path, "method": config.train.method,
            "template": config.data.template, "max_seq_length": config.data.max_seq_length,
            "steps": steps, "data_fingerprint": data_fingerprint, "code_fingerprint": code_fingerprint(),
            "tunebench_version": __version__}
    write_json_atomic(tmp / "tunebench.json", meta)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    (target / "config.yaml").write_text(run.config_file.read_text(encoding="utf-8"), encoding="utf-8")
    log.info("saved %s", target)
    return target
