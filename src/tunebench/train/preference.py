"""Preference objectives (DPO, ORPO, SimPO) as an Objective for the shared fit loop.

A pair's chosen and rejected responses are joined padding-free into one row (position ids restart
for each, so neither attends to the other) and rows of pairs are joined up to train.step_tokens,
exactly as SFT joins examples: one forward sees both sides of every pair. Only the sum of each
response's label log-probs is needed, so the output layer runs at labelled positions only
(loss.label_logprobs).

DPO's reference model is the model training starts from (the SFT run: a fresh LoRA adapter starts
as the identity, a continued SFT adapter or a full model starts as itself), so its log-probs are
computed once, before the first step, with no gradient, and cached in the run folder
(data/reference_logps.json): no second copy of the model is ever loaded.
"""

from __future__ import annotations

import json
import logging

import torch
import torch.nn.functional as F

from tunebench.config import TrainConfig
from tunebench.data.batches import join_examples, pad_batch
from tunebench.runs import write_json_atomic
from tunebench.train.loss import label_logprobs

log = logging.getLogger(__name__)
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo")
REFERENCE_FILE = "reference_logps.json"


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss on summed log-probs, and the implicit rewards β·(log π − log π_ref)."""
    reward_chosen = beta * (chosen - ref_chosen)
    reward_rejected = beta * (rejected - ref_rejected)
    logits = reward_chosen - reward_rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, reward_chosen.detach(), reward_rejected.detach()


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, lam: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ORPO loss on mean per-token log-probs: NLL of chosen − λ·log σ(log odds ratio)."""
    log_odds = (chosen_mean - rejected_mean) - (torch.log1p(-torch.exp(chosen_mean))
                                                - torch.log1p(-torch.exp(rejected_mean)))
    losses = -chosen_mean - lam * F.logsigmoid(log_odds)
    return losses, (lam * chosen_mean).detach(), (lam * rejected_mean).detach()


def simpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO loss: −log σ(β·(mean log π(chosen) − mean log π(rejected)) − γ)."""
    losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
    return losses, (beta * chosen_mean).detach(), (beta * rejected_mean).detach()


def pair_row(pair: dict) -> dict:
    """Chosen then rejected, joined padding-free into one row (position ids restart for each)."""
    return join_examples([pair["chosen"], pair["rejected"]], budget=1 << 62)[0]


def pair_micro_batches(groups: list[list[dict]], pad_id: int, step_tokens: int | None) -> list[tuple[dict, int]]:
    """(tensor batch, real token count) per micro-batch; batch["reference"] holds (pairs, 2) when known."""
    if step_tokens:
        pairs = [pair for group in groups for pair in group]
        rows = join_examples([pair_row(p) for p in pairs], step_tokens)
        counts = [sum(1 for p in row["position_ids"] if p == 0) // 2 for row in rows]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        groups = [pairs[s : s + n] for s, n in zip(starts, counts)]
        rows = [[row] for row in rows]
    else:
        rows = [[pair_row(p) for p in group] for group in groups]
    out = []
    for group, row_group in zip(groups, rows):
        batch = pad_batch(row_group, pad_id)
        if all("reference" in p for p in group):
            batch["reference"] = torch.tensor([p["reference"] for p in group], dtype=torch.float32)
        out.append((batch, sum(len(r["input_ids"]) for r in row_group)))
    return out


def sequence_logps(model, batch: dict[str, torch.Tensor], answer_only_logits: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed label log-prob, labelled token count) of every response in the batch, in row order.

    Responses are told apart by their position ids restarting at 0; padding (its own restart, with
    no labels) is dropped, so the result alternates chosen, rejected, chosen, ...
    """
    logps, where = label_logprobs(model, batch, answer_only_logits)
    starts = (batch["position_ids"] == 0).flatten()
    segment = (starts.cumsum(0) - 1).view(batch["position_ids"].shape)[:, 1:].flatten()[where]
    n = int(starts.sum())
    sums = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, segment, logps)
    counts = torch.bincount(segment, minlength=n)
    present = counts > 0
    return sums[present], counts[present]


class Preference:
    """DPO, ORPO or SimPO: the loss of a step is the mean over its pairs."""

    def __init__(self, train: TrainConfig):
        self.name = train.objective
        self.train = train

    def weight(self, rows: list[dict]) -> int:
        return len(rows)

    def micro_batches(self, groups, pad_id, step_tokens):
        return pair_micro_batches(groups, pad_id, step_tokens)

    def pair_losses(self, sums: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None):
        t = self.train
        chosen, rejected = sums[0::2], sums[1::2]
        if self.name == "dpo":
            return dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], t.dpo_beta, t.dpo_label_smoothing)
        chosen_mean, rejected_mean = chosen / counts[0::2], rejected / counts[1::2]
        if self.name == "orpo":
            return orpo_loss(chosen_mean, rejected_mean, t.orpo_lambda)
        return simpo_loss(chosen_mean, rejected_mean, t.simpo_beta, t.simpo_gamma)

    def loss(self, model, batch, answer_only_logits):
        sums, counts = sequence_logps(model, batch, answer_only_logits)
        reference = batch.get("reference")
        losses, reward_chosen, reward_rejected = self.pair_losses(sums, counts, reference)
        total = losses.sum()
        stats = {"loss": total, "reward_margin": (reward_chosen - reward_rejected).sum(),
                 "reward_accuracy": (reward_chosen > reward_rejected).sum(),
                 "logps_chosen": sums[0::2].sum(), "logps_rejected": sums[1::2].sum()}
        if self.name == "dpo":
            stats["ref_logps_chosen"] = reference[:, 0].sum()
            stats["ref_logps_rejected"] = reference[:, 1].sum()
        return total, {key: value.detach() for key, value in stats.items()}

    def record(self, sums, weight):
        return {key: value / max(weight, 1) for key, value in sums.items()}


def reference_shares(order: list[list[int]], per_step: int, world: int, n_rows: int, batch_size: int
                     ) -> list[list[list[int]]]:
    """The micro-batches (lists of pair indices) the reference pass runs, one list per forward group.

    Each pair is first met in a training step, as part of one rank's share of it; the reference pass
    runs that share exactly as the step will (same pairs joined into the same rows), so in bf16 the
    policy's log-probs at that step equal the reference's bit for bit while they are the same model:
    DPO's first loss is log 2, not log 2 plus the noise of another batch composition. Pairs the run
    never reaches (max_steps shorter than an epoch) follow in plain batches.
    """
    seen: set[int] = set()
    shares: list[list[list[int]]] = []
    for start in range(0, len(order), per_step):
        step = order[start : start + per_step]
        for rank in range(world):
            share = step[rank::world]
            if any(i not in seen for idx in share for i in idx):
                shares.append(share)
                seen.update(i for idx in share for i in idx)
        if len(seen) == n_rows:
            break
    rest = [i for i in range(n_rows) if i not in seen]
    shares += [[rest[i : i + batch_size]] for i in range(0, len(rest), batch_size)]
    return shares


@torch.no_grad()
def compute_reference(model, rows: list[dict], shares: list[list[list[int]]], pad_id: int, step_tokens: int | None,
                      device, autocast, answer_only_logits: bool) -> list[list[float]]:
    """[chosen, rejected] summed log-probs of every pair under `model` as it is now (eval mode), each
    computed in the micro-batch composition of its share (see reference_shares); the first value
    computed for a pair is kept."""
    model.eval()
    out: list[list[float] | None] = [None] * len(rows)
    for share in shares:
        flat = [i for idx in share for i in idx]
        values: list[list[float]] = []
        for batch, _ in pair_micro_batches([[rows[i] for i in idx] for idx in share], pad_id, step_tokens):
            batch = {k: v.to(device) for k, v in batch.items() if k != "reference"}
            with autocast():
                sums, _ = sequence_logps(model, batch, answer_only_logits)
            values += sums.view(-1, 2).float().cpu().tolist()
        for i, value in zip(flat, values):
            if out[i] is None:
                out[i] = value
    model.train()
    return out


def attach_reference(state, key: str) -> None:
    """Give every pair row its reference log-probs: from the run's cache when it matches `key`
    (data fingerprint + starting point), else computed now by the starting model, in the composition
    the run's steps will train each pair in (state.order), and cached."""
    path = state.run.data_dir / REFERENCE_FILE
    cached = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if cached.get("key") == key and len(cached.get("logps", [])) == len(state.rows):
        logps = cached["logps"]
        log.info("reference log-probs: %d pairs from %s", len(logps), path)
    else:
        t = state.train
        model = state.dist.unwrap(state.model)
        shares = reference_shares(state.order, state.per_step, state.dist.world, len(state.rows),
                                  t.per_device_train_batch_size)
        logps = compute_reference(model, state.rows, shares, state.tokenizer.pad_token_id, state.step_tokens,
                                  state.device, state.autocast, t.answer_only_logits)
        if state.dist.is_main:
            write_json_atomic(path, {"key": key, "logps": logps})
        log.info("reference log-probs: computed for %d pairs by the starting model, cached in %s", len(logps), path)
    for row, pair in zip(state.rows, logps):
        row["reference"] = pair
