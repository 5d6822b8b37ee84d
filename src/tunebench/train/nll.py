"""`tunebench eval nll`: mean per-token negative log-likelihood of reference answers.

An API-free signal that moves with fine-tuning: ELYZA-tasks-100's reference answers, rendered
with the run's own template and masked exactly as in training, scored by the model.
"""

from __future__ import annotations

from tunebench.data.templates import render_segments
from tunebench.data.tokens import encode_segments
from tunebench.errors import DataError
from tunebench.tasksets import load_tasks
from tunebench.train.loss import loss_totals


def reference_nll(model, tokenizer, template: str, tasks_name: str = "elyza-tasks-100", batch_size: int = 4,
                  max_length: int = 2048, limit: int | None = None) -> dict:
    """`limit`: score only the first N tasks with a reference (a quick run's generate.limit)."""
    tasks = [t for t in load_tasks(tasks_name) if t.reference][:limit]
    if not tasks:
        raise DataError(f"{tasks_name} has no reference answers (field 'output'); use elyza-tasks-100")
    rows = []
    for task in tasks:
        messages = [{"role": "user", "content": task.input}, {"role": "assistant", "content": task.reference}]
        enc = encode_segments(render_segments(messages, template, tokenizer), tokenizer)
        rows.append({"input_ids": enc.input_ids[:max_length], "labels": enc.labels[:max_length]})
    total, count = loss_totals(model, rows, batch_size, tokenizer.pad_token_id, next(model.parameters()).device)
    return {"tasks": tasks_name, "n_tasks": len(rows), "tokens": count, "nll": total / count}
