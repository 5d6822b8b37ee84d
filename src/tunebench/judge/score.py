"""`tunebench judge`: score a predictions file 1–5 and report the mean with a 95% CI."""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

from tunebench.config import JudgeConfig
from tunebench.errors import DataError
from tunebench.generate.validate import validate_predictions
from tunebench.judge.backends import JudgeBackend, make_backend
from tunebench.judge.language import apply_language_gate, fails_gate, language_summary
from tunebench.judge.length import length_stats
from tunebench.judge.rubric import load_rubric
from tunebench.judge.runner import Item, JudgeRunner
from tunebench.judge.stats import bootstrap_ci
from tunebench.runs import JUDGMENTS, SCORES, write_json_atomic
from tunebench.tasksets import Task, load_tasks, read_records

log = logging.getLogger(__name__)


@dataclass
class ScoreReport:
    data: dict

    def table(self) -> str:
        d = self.data
        lines = [f"{'task':>6}  {'score':>5}  reason"]
        for row in d["per_task"]:
            score = "  -  " if row["score"] is None else f"{row['score']:5.2f}"
            reason = (row["reason"] or row.get("error") or "").replace("\n", " ")[:70]
            lines.append(f"{row['task_id']!s:>6}  {score}  {reason}")
        if d.get("lengths", {}).get("n"):
            lines.append(f"answer length (chars): mean {d['lengths']['mean']:.0f}, median {d['lengths']['median']:.0f}, "
                         f"max {d['lengths']['max']}; under {d['language']['threshold']:.0%} Japanese letters: "
                         f"{len(d['language']['flagged'])} answer(s)")
        lines.append(f"judge {d['judge']} on {d['tasks']}: mean {d['mean']:.3f} "
                     f"(95% CI {d['ci_low']:.3f}–{d['ci_high']:.3f}), {d['scored']} scored, {d['unscored']} unscored"
                     if d["scored"] else f"judge {d['judge']}: no answer could be scored ({d['unscored']} unscored)")
        return "\n".join(lines)


def read_predictions(path: Path, tasks: list[Task]) -> list[dict]:
    """The predictions, validated first (validate.py's rules): a duplicated task, an empty or
    non-string output would otherwise be judged (and paid for) as "None", "123" or twice."""
    issues = validate_predictions(path, tasks, require_all=False, allow_extra_fields=True)
    if issues:
        more = f" (and {len(issues) - 3} more)" if len(issues) > 3 else ""
        raise DataError(f"{path}: {'; '.join(str(i) for i in issues[:3])}{more}; nothing was judged. "
                        f"See `tunebench validate {path} --tasks ...`")
    return [row for _, row in read_records(path, ("task_id", "input", "output"))]


def build_items(predictions: list[dict], tasks_name: str, task_list: list[Task] | None = None) -> list[Item]:
    tasks = {t.task_id: t for t in task_list or load_tasks(tasks_name)}
    items = []
    for row in predictions:
        task = tasks.get(row["task_id"])
        if task is None:
            raise DataError(f"task_id {row['task_id']!r} is not in {tasks_name}: judge with the task file it answers")
        if task.input != row["input"]:
            raise DataError(f"task_id {row['task_id']!r}: input differs from {tasks_name}; wrong --tasks?")
        items.append(Item(row["task_id"], row["input"], row["output"], task.reference, task.eval_aspect))
    return items


def aggregate(items: list[Item], judgments: dict, judge: str, tasks_name: str, prompt_hash: str) -> dict:
    per_task, means = [], []
    for item in items:
        records = judgments[item.task_id]
        scores = [r["score"] for r in records if r["score"] is not None]
        mean = statistics.fmean(scores) if scores else None
        if mean is not None:
            means.append(mean)
        per_task.append({"task_id": item.task_id, "score": mean, "scores": [r["score"] for r in records],
                         "spread": statistics.pstdev(scores) if len(scores) > 1 else 0.0 if scores else None,
                         "reason": next((r["reason"] for r in records if r["reason"]), None),
                         "error": next((r["error"] for r in records if r["error"]), None if records else "not judged"),
                         "output": item.output})
    low, high = bootstrap_ci(means) if means else (None, None)  # null in scores.json, never NaN (invalid JSON)
    return {"judge": judge, "tasks": tasks_name, "prompt_hash": prompt_hash,
            "mean": statistics.fmean(means) if means else None, "ci_low": low, "ci_high": high,
            "scored": len(means), "unscored": len(items) - len(means),
            "samples": max((len(judgments[i.task_id]) for i in items), default=0), "per_task": per_task}


def judge_predictions(predictions: Path, tasks_name: str, config: JudgeConfig, out_dir: Path | None = None,
                      backend: JudgeBackend | None = None, progress: bool = True) -> ScoreReport:
    tasks = load_tasks(tasks_name)
    items = build_items(read_predictions(predictions, tasks), tasks_name, tasks)
    has_reference = all(i.reference for i in items)
    rubric = load_rubric(config.prompt_file, has_reference)
    backend = backend or make_backend(config)
    out_dir = out_dir or predictions.parent
    runner = JudgeRunner(backend, rubric, out_dir / JUDGMENTS, samples=config.samples,
                         temperature=config.temperature, concurrency=config.concurrency,
                         requests_per_minute=config.requests_per_minute, max_retries=config.max_retries,
                         backoff_s=config.backoff_s, max_wait_s=config.max_wait_s)
    strict = config.language_gate and config.language_gate_strict
    judgments = runner.judge_all([i for i in items if not (strict and fails_gate(i.output, config.language_threshold))],
                                 progress)
    if config.language_gate:
        judgments = apply_language_gate(items, judgments, config.language_threshold, strict)
    report = aggregate(items, judgments, backend.name, tasks_name, runner.prompt_hash)
    report["lengths"] = length_stats([i.output for i in items])
    report["language"] = {**language_summary(items, config.language_threshold), "gate": config.language_gate,
                          "strict": strict}
    report["rubric"] = "reference" if has_reference else "reference-free"
    report["interrupted"] = runner.interrupted
    write_json_atomic(out_dir / SCORES, report)
    if runner.interrupted:  # what finished is written; the CLI says so and exits 130
        log.warning("judging interrupted: %d of %d task(s) scored, written to %s", report["scored"], len(items),
                    out_dir / SCORES)
        raise KeyboardInterrupt
    return ScoreReport(report)
