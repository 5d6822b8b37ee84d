"""`tunebench train`: supervised fine-tuning, read top to bottom.

setup (train/setup.py: data prepared once → model → levers → method → optimizer → resume) →
fit (train/loop.py: accumulate, step, log, eval, checkpoint, with SFT's loss below) → save the
adapter (or full model) with its tokenizer, template and fingerprints.

Why our own loop rather than TRL's SFTTrainer: the data stage already produces ids and masks; the
loop needs atomic checkpoints and a resume that replays the exact data order (micro-batch k of
the run is a pure function of the seed and k); and the loss is a token-sum normalised over the
whole accumulation window, so gradient accumulation gives the same update as one big batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from tunebench import __version__
from tunebench.config import Config
from tunebench.config_checks import check_config
from tunebench.data.batches import join_examples, pad_batch
from tunebench.data.prepare import Summary, prepare, prepare_pairs, read_token_rows
from tunebench.errors import DataError
from tunebench.models.load import compute_dtype, pick_device
from tunebench.models.tokenizer import load_tokenizer
from tunebench.runs import CONFIG, TRAINED_META, RunDir, write_json_atomic
from tunebench.train.checkpoint import trainable_state
from tunebench.train.distributed import Dist
from tunebench.train.fingerprint import code_fingerprint
from tunebench.train.guard_skip import GuardSkip
from tunebench.train.loop import TrainState, fit
from tunebench.train.loss import answer_tokens, token_loss_sum
from tunebench.train.methods import get_method
from tunebench.train.preference import Preference, attach_reference
from tunebench.train.setup import (
    StartPoint,
    autocast_for,
    build_optimizer,
    load_model,
    prepare_once,
    resolve_start,
    resume_from_checkpoint,
)
from tunebench.train.sharding import whole_state_dict

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


class SFT:
    """Next-token cross-entropy on answer tokens, normalised by the global batch's answer tokens."""

    name = "sft"

    def weight(self, rows: list[dict]) -> int:
        return sum(answer_tokens(row) for row in rows)

    def micro_batches(self, groups, pad_id, step_tokens):
        return micro_batches(groups, pad_id, step_tokens)

    def loss(self, model, batch, answer_only_logits):
        loss_sum = token_loss_sum(model, batch, answer_only_logits)
        return loss_sum, {"loss": loss_sum.detach()}

    def record(self, sums, weight):
        return {"loss": sums.get("loss", 0.0) / max(weight, 1)}


def train(config: Config, run: RunDir, resume: bool = False, allow_contamination: bool = False,
          prepared: Summary | None = None) -> Path:
    """Fine-tune and return the folder holding the final adapter (or full model).

    setup (data once, model, levers, optimizer, resume) → fit → save_final. `prepared`: the data
    stage's summary when the caller (the pipeline) already ran it for this run. train.objective
    picks the loss: SFT below, or DPO/ORPO/SimPO on pairs (train/preference.py).
    """
    t = config.train
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_config(config, world_size)  # every problem at once, before any data or model is loaded
    set_seed(t.seed)
    state = setup(resolve_start(config), run, resume, allow_contamination, prepared)
    objective = SFT() if t.objective == "sft" else Preference(state.train)
    fit(state, objective)
    return finish(state)


def setup(start: StartPoint, run: RunDir, resume: bool, allow_contamination: bool, prepared: Summary | None
          ) -> TrainState:
    """Data (prepared once), model with its levers decided, DPO's reference log-probs, optimizer and
    the resume point (restored after the reference pass, which needs the starting weights)."""
    config = start.config
    # one process unless run under accelerate launch
    dist = Dist(cpu=not torch.cuda.is_available(), sharding=config.train.sharding)
    device = dist.device or pick_device()
    dtype = compute_dtype(config.train.precision, device)
    tokenizer = load_tokenizer(config.model)
    tokenizer_name = config.model.tokenizer or config.model.name_or_path
    prepare_fn = prepare if config.train.objective == "sft" else prepare_pairs
    summary = prepare_once(config, run, dist, lambda: prepare_fn(config, run, tokenizer, tokenizer_name,
                                                                 allow_contamination=allow_contamination), prepared)
    rows = read_token_rows(run.data_dir / "train.jsonl")
    if not rows:
        raise DataError("the prepared training set is empty")
    model, t = load_model(config, dist, device, dtype, start.adapter)
    state = TrainState(config=config, train=t, run=run, dist=dist, device=device, autocast=autocast_for(dtype),
                       tokenizer=tokenizer, rows=rows, eval_rows=read_token_rows(run.data_dir / "eval.jsonl"),
                       data_fingerprint=summary.fingerprint, model=model, base_model=start.base_model,
                       guard_skip=GuardSkip(t.compile_skip_guards))
    state.steps = total_steps(config, len(rows), dist.world)
    # Micro-batch k of the run is the same whatever the number of processes: with a global batch of
    # accum × world micro-batches per step, rank r takes every world-th one, so a checkpoint
    # resumes on another number of GPUs when accum × world is unchanged.
    state.order = micro_batch_order(len(rows), t.per_device_train_batch_size, t.seed, state.steps * state.per_step)
    if t.objective == "dpo":
        attach_reference(state, reference_key(start, summary.fingerprint, dtype))
    build_optimizer(state)
    resume_from_checkpoint(state, resume)
    return state


def reference_key(start: StartPoint, data_fingerprint: str, dtype: torch.dtype) -> str:
    """What DPO's cached reference log-probs depend on: the pairs, the starting model and its precision."""
    meta = (Path(start.source) / TRAINED_META).read_text(encoding="utf-8") if start.source else start.base_model
    return hashlib.sha256(json.dumps([data_fingerprint, meta, start.config.train.method, str(dtype)]).encode()
                          ).hexdigest()[:16]


def finish(state: TrainState) -> Path:
    """Save the final adapter (or full model) on rank 0; every rank returns its folder."""
    target = state.run.adapter if get_method(state.train.method).peft else state.run.full_model
    model, dist = state.dist.unwrap(state.model), state.dist
    # Sharded, every rank gathers the weights to save (the adapter's, or the whole model's) and rank 0
    # writes them in the format one process writes.
    weights = None
    if dist.sharded:
        weights = trainable_state(model) if get_method(state.train.method).peft else whole_state_dict(model)
    if dist.is_main:
        target = save_final(model, state.tokenizer, state.config, state.run, state.data_fingerprint, state.steps,
                            state.base_model, weights)
    dist.barrier()
    return target


def save_final(model, tokenizer, config: Config, run: RunDir, data_fingerprint: str, steps: int,
               base_model: str | None = None, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Save the adapter in plain peft format (or the full model), atomically, with its metadata.
    weights: the model's (or adapter's) tensors gathered whole, when the model itself holds shards."""
    target = run.adapter if get_method(config.train.method).peft else run.full_model
    tmp = target.with_name(f".tmp-{target.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights is not None else {}))
    tokenizer.save_pretrained(tmp)
    meta = {"base_model": base_model or config.model.name_or_path, "method": config.train.method,
            "objective": config.train.objective,
            "template": config.data.template, "max_seq_length": config.data.max_seq_length,
            "steps": steps, "data_fingerprint": data_fingerprint, "code_fingerprint": code_fingerprint(),
            "tunebench_version": __version__}
    write_json_atomic(tmp / TRAINED_META, meta)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    (target / CONFIG).write_text(run.config_file.read_text(encoding="utf-8"), encoding="utf-8")
    log.info("saved %s", target)
    return target
