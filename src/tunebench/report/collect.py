"""Gather what a run directory holds into one plain record for reports and leaderboards."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunebench.runs import CONFIG, DATA_DIR, DATA_SUMMARY, METRICS, NLL, PREDICTIONS, SCORES, VALIDATION, read_jsonl


@dataclass
class RunRecord:
    name: str
    root: Path
    config: dict[str, Any] = field(default_factory=dict)
    data_summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    predictions: dict[Any, dict] = field(default_factory=dict)
    scores: dict[str, Any] | None = None
    nll: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    defects: list[str] = field(default_factory=list)  # what the report could not use, file:line first

    @property
    def losses(self) -> list[tuple[int, float]]:
        return [(m["step"], m["loss"]) for m in self.metrics if "loss" in m]

    @property
    def eval_losses(self) -> list[tuple[int, float]]:
        return [(m["step"], m["eval_loss"]) for m in self.metrics if "eval_loss" in m]

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of one logged quantity, e.g. reward_margin of a preference run."""
        return [(m["step"], m[key]) for m in self.metrics if key in m]

    @property
    def task_scores(self) -> dict[Any, float | None]:
        return {row["task_id"]: row["score"] for row in (self.scores or {}).get("per_task", [])}

    def answer_lengths(self) -> dict[str, float]:
        lengths = [len(p["output"]) for p in self.predictions.values() if isinstance(p.get("output"), str)]
        if not lengths:
            return {}
        return {"n": len(lengths), "mean": statistics.fmean(lengths), "median": statistics.median(lengths),
                "min": min(lengths), "max": max(lengths), "empty": sum(1 for n in lengths if n == 0)}

    def setting(self, dotted: str) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def read_predictions(path: Path) -> tuple[dict[Any, dict], list[str]]:
    """The submission's rows by task_id, and its defects worded as `tunebench validate` words them:
    a report shows a broken row instead of failing on it."""
    rows: dict[Any, dict] = {}
    defects: list[str] = []
    lines = path.read_bytes().splitlines() if path.exists() else []
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            defects.append(f"{path}:{line_no}: not valid UTF-8 JSON; the line is left out")
            continue
        if not isinstance(row, dict) or "task_id" not in row:
            defects.append(f"{path}:{line_no}: not a JSON object with a task_id; the line is left out")
            continue
        for key in ("input", "output"):
            if not isinstance(row.get(key), str):
                defects.append(f"{path}:{line_no}: task_id {row['task_id']}: field '{key}' must be a string, "
                               f"got {type(row.get(key)).__name__}")
        rows[row["task_id"]] = row
    return rows, defects


def load_run(root: Path) -> RunRecord:
    config = yaml.safe_load((root / CONFIG).read_text(encoding="utf-8")) if (root / CONFIG).exists() else {}
    predictions, defects = read_predictions(root / PREDICTIONS)
    return RunRecord(
        name=(config or {}).get("name") or root.name, root=root, config=config or {},
        data_summary=read_json(root / DATA_DIR / DATA_SUMMARY) or {},
        metrics=read_jsonl(root / METRICS),
        predictions=predictions, defects=defects,
        scores=read_json(root / SCORES), nll=read_json(root / NLL),
        validation=read_json(root / VALIDATION))


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def config_differences(runs: list[RunRecord]) -> dict[str, list[Any]]:
    """Settings whose values differ between runs (all settings for a single run)."""
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    if len(runs) == 1:
        return {k: [flat[0].get(k)] for k in keys}
    return {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1}


def wins_and_losses(a: RunRecord, b: RunRecord, top: int = 5) -> tuple[list, list]:
    """Tasks where run b scored most above / below run a: (task_id, score a, score b, delta)."""
    sa, sb = a.task_scores, b.task_scores
    deltas = [(t, sa[t], sb[t], sb[t] - sa[t]) for t in sa if t in sb and sa[t] is not None and sb[t] is not None]
    deltas.sort(key=lambda d: d[3])
    wins = [d for d in reversed(deltas) if d[3] > 0][:top]
    losses = [d for d in deltas if d[3] < 0][:top]
    return wins, losses
