"""The training objective: next-token cross-entropy summed over labelled (answer) positions.

One definition serves training, held-out eval loss and the reference-answer NLL, so the three
numbers are the same quantity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunebench.data.batches import pad_batch
from tunebench.data.tokens import IGNORE


def loss_tokens(labels: torch.Tensor) -> int:
    """Positions the loss sees: labelled tokens after the first column (which is never predicted)."""
    return int((labels[:, 1:] != IGNORE).sum())


def answer_tokens(row: dict) -> int:
    """The same count for one unpadded row of label ids."""
    return sum(1 for label in row["labels"][1:] if label != IGNORE)


def token_loss_sum(model, batch: dict[str, torch.Tensor], answer_only_logits: bool = False) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled positions.

    answer_only_logits: run the decoder, then the output layer only on the hidden states that
    predict a labelled token (N of B×T), so prompt positions never get vocabulary-wide logits.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    if answer_only_logits:
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = causal.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = causal.get_output_embeddings()(hidden[:, :-1][keep])  # (N, vocab)
        cap = getattr(causal.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    logits = model(**inputs, use_cache=False).logits
    logits = logits[:, -labels.shape[1]:]  # prompt tuning prepends virtual tokens to the logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def loss_totals(model, rows: list[dict], batch_size: int, pad_id: int, device) -> tuple[float, int]:
    """(summed loss, loss tokens) over rows of ids and labels, in batches."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(rows[i : i + batch_size], pad_id).items()}
        total += token_loss_sum(model, batch).item()
        count += loss_tokens(batch["labels"])
    return total, count


def evaluate(model, rows: list[dict], batch_size: int, pad_id: int, device, autocast) -> float:
    """Mean per-token loss on held-out rows."""
    model.eval()
    with autocast():
        total, count = loss_totals(model, rows, batch_size, pad_id, device)
    model.train()
    return total / max(count, 1)
