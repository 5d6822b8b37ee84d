"""Pack encoded examples into rows and pad rows into batches.

Packing puts several examples in one row of at most max_seq_length tokens. Position ids restart
at 0 for each example, and the row is passed with no attention mask: transformers then reads the
example boundaries off the position ids and builds a block-diagonal causal mask (flash-attention
uses them as varlen boundaries), so no token attends across examples. The first token of every
example is a prompt token labelled -100, so no loss crosses a boundary either.
"""

from __future__ import annotations

from typing import Any

import torch

from tunebench.data.tokens import IGNORE, Encoded


def pack_examples(examples: list[Encoded], max_len: int) -> list[dict[str, list[int]]]:
    """Greedy packing in the given order: start a new row when the next example does not fit."""
    return join_examples([{"input_ids": e.input_ids, "labels": e.labels} for e in examples], max_len)


def pad_batch(rows: list[dict[str, Any]], pad_id: int, multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest (rounded up to `multiple_of`). Packed rows (with position_ids)
    get no attention mask; their padding forms one more 'example' whose labels are all -100."""
    longest = max(len(r["input_ids"]) for r in rows)
    width = -(-longest // multiple_of) * multiple_of
    packed = "position_ids" in rows[0]
    batch: dict[str, list] = {"input_ids": [], "labels": []}
    if packed:
        batch["position_ids"] = []
    else:
        batch["attention_mask"] = []
    for row in rows:
        fill = width - len(row["input_ids"])
        batch["input_ids"].append(list(row["input_ids"]) + [pad_id] * fill)
        batch["labels"].append(list(row["labels"]) + [IGNORE] * fill)
        if packed:
            batch["position_ids"].append(list(row["position_ids"]) + list(range(fill)))
        else:
            batch["attention_mask"].append([1] * len(row["input_ids"]) + [0] * fill)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def join_examples(rows: list[dict[str, Any]], budget: int) -> list[dict[str, list[int]]]:
    """Concatenate rows (padding-free) into as few rows of at most `budget` tokens as the order allows.

    Each row keeps its own position ids (packed rows keep theirs), so the joined row is exactly a
    packed row: the same examples, no padding, no attention across them. A row longer than the
    budget is joined with nothing.
    """
    out: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        if current["input_ids"] and len(current["input_ids"]) + len(row["input_ids"]) > budget:
            out.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += row["input_ids"]
        current["labels"] += row["labels"]
        current["position_ids"] += row.get("position_ids") or list(range(len(row["input_ids"])))
    if current["input_ids"]:
        out.append(current)
    return out
