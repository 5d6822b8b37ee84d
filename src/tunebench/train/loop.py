"""The fit loop every objective shares: accumulate, step, log, eval, checkpoint.

What differs between SFT and the preference objectives (DPO, ORPO, SimPO) is only how a step's
rows become micro-batches, what the step's loss is normalised by, and the summed loss (and
statistics) of one micro-batch: an `Objective`. The loop, the exact-resume data order, the
checkpoints and the metrics are one piece of code for all of them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Protocol

import torch
from tqdm import tqdm

from tunebench.config import Config, TrainConfig
from tunebench.runs import RunDir, append_jsonl
from tunebench.train.checkpoint import optimizer_state, save_checkpoint, trainable_state
from tunebench.train.compile import bucket_batch, compile_seconds, graph_step_begin, retry_step
from tunebench.train.distributed import Dist
from tunebench.train.guard_skip import GuardSkip
from tunebench.train.loss import evaluate
from tunebench.train.methods import get_method
from tunebench.train.sharding import whole
from tunebench.train.tracking import Trackers


class Objective(Protocol):
    """How one training objective turns rows into a loss; the loop does the rest."""

    name: str

    def weight(self, rows: list[dict]) -> int:
        """What the loss of the whole global batch is normalised by (answer tokens, pairs)."""

    def micro_batches(self, groups: list[list[dict]], pad_id: int, step_tokens: int | None
                      ) -> list[tuple[dict, int]]:
        """(tensor batch, real token count) for one optimizer step on this process."""

    def loss(self, model, batch: dict[str, torch.Tensor], answer_only_logits: bool
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed loss of a micro-batch (to be divided by the weight) and summed statistics, as detached
        0-dim tensors: they stay on the device until the log line, so no micro-batch waits for the GPU."""

    def record(self, sums: dict[str, float], weight: int) -> dict[str, float]:
        """The logged values for a window, from summed statistics over summed weight."""


@dataclass
class TrainState:
    """Everything setup decided, handed to fit and save (the levers already resolved in `train`)."""

    config: Config
    train: TrainConfig
    run: RunDir
    dist: Dist
    device: torch.device
    autocast: Callable[[], Any]
    tokenizer: Any
    rows: list[dict]
    eval_rows: list[dict]
    data_fingerprint: str
    model: Any = None
    params: list = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    steps: int = 0
    start: int = 0
    order: list[list[int]] = field(default_factory=list)  # micro-batch k of the run (row indices)
    base_model: str = ""  # what the saved adapter applies to (the SFT run's base when starting from one)
    guard_skip: GuardSkip = field(default_factory=lambda: GuardSkip(False))  # train.compile_skip_guards

    def config_dict(self) -> dict:
        return asdict(self.config)

    @property
    def step_tokens(self) -> int | None:
        """Token budget of a joined row; prefix/prompt tuning prepend virtual tokens to each row, so
        their rows are never joined."""
        return None if get_method(self.train.method).virtual_tokens else self.train.step_tokens

    @property
    def per_step(self) -> int:
        """Micro-batches in one optimizer step over all processes."""
        return self.train.gradient_accumulation_steps * self.dist.world


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    weight: int = 0
    tokens: int = 0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)
    compiled_before: float = field(default_factory=compile_seconds)  # compile time is not step time

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        """Sum on the device, in float64 (as the numbers would be on the host), without a sync."""
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().double()


def fit(state: TrainState, objective: Objective) -> None:
    """Train from state.start to state.steps in the run's micro-batch order (state.order)."""
    t, dist = state.train, state.dist
    trackers = Trackers(t.report_to, state.run.root, state.config_dict())
    window = Window()
    bar = tqdm(total=state.steps, initial=state.start, desc=f"train {t.method}"
               + ("" if objective.name == "sft" else f" {objective.name}"), unit="step", dynamic_ncols=True,
               disable=not dist.is_main)
    for step in range(state.start, state.steps):
        step_batches = state.order[step * state.per_step : (step + 1) * state.per_step]
        before = replace(window, sums=dict(window.sums))
        try:
            grad_norm = train_step(state, objective, step_batches, window)
        except Exception as exc:  # compiled layers that failed in their backward: the step again, eagerly
            if not retry_step(state.model, exc):
                raise
            state.optimizer.zero_grad(set_to_none=True)
            window = before
            grad_norm = train_step(state, objective, step_batches, window)
        done = step + 1
        if done % t.logging_steps == 0 or done == state.steps:
            record = log_window(state, objective, window, done, grad_norm, trackers)
            bar.set_postfix(postfix(record))
            window = Window()
        maybe_evaluate(state, done, trackers)
        maybe_checkpoint(state, done)
        bar.update(1)
    bar.close()
    trackers.close()


def train_step(state: TrainState, objective: Objective, step_batches: list[list[int]], window: Window
               ) -> torch.Tensor:
    """One optimizer step over the global batch `step_batches`; returns the gradient norm (a 0-dim
    tensor, read only when logged: nothing in a step waits for the GPU)."""
    t, dist, rows, model = state.train, state.dist, state.rows, state.model
    # Normalise by the weight of the whole global batch, which every rank can count.
    weight = objective.weight([rows[i] for idx in step_batches for i in idx])
    dist.reshard(model)
    micro = objective.micro_batches([[rows[i] for i in idx] for idx in step_batches[dist.rank :: dist.world]],
                                    state.tokenizer.pad_token_id, state.step_tokens)
    for k, (batch, real_tokens) in enumerate(micro):
        if t.compile:  # a bounded set of lengths for the compiled layers (train/compile.py)
            batch = bucket_batch(batch, state.tokenizer.pad_token_id)
        batch = {key: v.to(state.device) for key, v in batch.items()}
        graph_step_begin(t.cuda_graphs)
        with state.guard_skip.around(batch), dist.no_sync(model, last=k == len(micro) - 1):
            with state.autocast():
                loss_sum, stats = objective.loss(model, batch, t.answer_only_logits)
            # Backward outside autocast (PyTorch's advice). DDP (and FSDP's reduce-scatter) averages
            # gradients over ranks; × world turns that average into the global sum.
            (loss_sum * dist.world / max(weight, 1)).backward()
        window.add(stats)
        window.tokens += real_tokens
    grad_norm = whole(torch.nn.utils.clip_grad_norm_(state.params, t.max_grad_norm))
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    window.weight += weight
    window.steps += 1
    return grad_norm


def log_window(state: TrainState, objective: Objective, window: Window, done: int, grad_norm: torch.Tensor,
               trackers: Trackers) -> dict:
    """Write one metrics line for the window ending at step `done` (the window's one host sync)."""
    dist = state.dist
    # one all-reduce, which waits for the window's GPU work, so the time below is all of it
    sums = dist.sum_all({**window.sums, "tokens": window.tokens})
    tokens = sums.pop("tokens")
    compiled = compile_seconds() - window.compiled_before
    elapsed = time.perf_counter() - window.started - compiled
    record = {"step": done, **objective.record(sums, window.weight),
              "learning_rate": state.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
              "tokens_per_s": tokens / elapsed if elapsed else 0.0,
              "epoch": done * state.per_step * state.train.per_device_train_batch_size / len(state.rows)}
    if compiled:
        record["compile_s"] = compiled
    if state.device.type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(state.device) / 2**30
        if dist.world > 1:  # sharded, the ranks' peaks differ a little (uneven shards, rank 0's saves)
            record["peak_memory_gib_per_rank"] = dist.each(record["peak_memory_gib"])
    if state.train.eval_steps is None and state.eval_rows and done == state.steps and dist.gathers:
        record["eval_loss"] = eval_loss(state)
    if dist.is_main:
        append_jsonl(state.run.metrics, record)
        trackers.log(record, done)
    return record


def postfix(record: dict) -> dict[str, str]:
    """The progress bar's numbers: loss, learning rate, throughput and any preference statistics."""
    shown = {"loss": f"{record['loss']:.4f}", "lr": f"{record['learning_rate']:.2e}",
             "tok_s": f"{record['tokens_per_s']:.0f}"}
    if "reward_margin" in record:
        shown["margin"] = f"{record['reward_margin']:.3f}"
        shown["acc"] = f"{record['reward_accuracy']:.2f}"
    return shown


def eval_loss(state: TrainState) -> float:
    graph_step_begin(state.train.cuda_graphs)
    return evaluate(state.dist.unwrap(state.model), state.eval_rows, state.train.per_device_train_batch_size,
                    state.tokenizer.pad_token_id, state.device, state.autocast)


def maybe_evaluate(state: TrainState, done: int, trackers: Trackers) -> None:
    """Held-out loss every eval_steps (and at the end) when eval_steps is set."""
    t = state.train
    if t.eval_steps and state.eval_rows and (done % t.eval_steps == 0 or done == state.steps) and state.dist.gathers:
        value = eval_loss(state)  # sharded, every rank runs the forward passes
        if state.dist.is_main:
            append_jsonl(state.run.metrics, {"step": done, "eval_loss": value})
            trackers.log({"eval_loss": value}, done)


def maybe_checkpoint(state: TrainState, done: int) -> None:
    """Save checkpoint-<done> every save_steps (not at the end: the final save follows)."""
    t = state.train
    if done % t.save_steps == 0 and done < state.steps:
        dist = state.dist
        if dist.gathers:  # whole tensors, whatever the number of processes: the checkpoint resumes on any
            model = dist.unwrap(state.model)
            weights, optimizer = trainable_state(model), optimizer_state(state.optimizer)
        if dist.is_main:
            save_checkpoint(state.run.checkpoints, done, weights, optimizer, state.scheduler,
                            {"steps": state.steps, "micro_batches_per_step": state.per_step}, t.save_total_limit)
        dist.barrier()
