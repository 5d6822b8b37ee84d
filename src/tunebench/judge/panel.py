"""Judge panels: several judges (ideally of different model families) grade the same answers.

One judge's taste is one family's taste; a panel of cheap judges from different families tracks
human preference at least as well as one large judge (Verga et al. 2024, "Replacing Judges with
Juries"). Each judge's result is kept; the panel's is the mean score (for `judge`) or the majority
verdict (for `compare`), and how often each two judges agree is reported beside it.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from itertools import combinations
from pathlib import Path

from tunebench.config import JudgeConfig
from tunebench.judge.stats import agreement, bootstrap_ci
from tunebench.runs import SCORES, write_json_atomic


def panel_configs(config: JudgeConfig, specs: list[str]) -> list[JudgeConfig]:
    """One judge config per BACKEND:MODEL, all other settings shared."""
    return [dataclasses.replace(config, judge=spec) for spec in specs]


def majority(verdicts: list[str | None]) -> str | None:
    """The verdict most scored judges gave; a tie when no verdict has more than half of them."""
    scored = [v for v in verdicts if v is not None]
    if not scored:
        return None
    verdict, count = Counter(scored).most_common(1)[0]
    return verdict if count * 2 > len(scored) else "tie"


def verdict_agreement(per_judge: dict[str, dict[object, str | None]]) -> list[dict]:
    """For each two judges: on how many tasks both gave a verdict, and the share where they match."""
    out = []
    for (x, vx), (y, vy) in combinations(per_judge.items(), 2):
        both = [t for t in vx if vx[t] is not None and vy.get(t) is not None]
        out.append({"judges": [x, y], "n": len(both),
                    "agreement": sum(vx[t] == vy[t] for t in both) / len(both) if both else None})
    return out


def score_agreement(per_judge: dict[str, dict[object, float | None]]) -> list[dict]:
    """For each two judges: correlation, exact and within-one agreement of their 1-5 scores."""
    out = []
    for (x, sx), (y, sy) in combinations(per_judge.items(), 2):
        both = [t for t in sx if sx[t] is not None and sy.get(t) is not None]
        out.append({"judges": [x, y], **(agreement([sx[t] for t in both], [sy[t] for t in both])
                                         if both else {"n": 0})})
    return out


def panel_scores(reports: list[dict]) -> dict:
    """Combine per-judge score reports (score.aggregate's shape) into the panel's: the mean of the
    judges' scores per task, and its mean with a CI over tasks."""
    per_judge = {r["judge"]: {row["task_id"]: row["score"] for row in r["per_task"]} for r in reports}
    first = reports[0]
    per_task, means = [], []
    for row in first["per_task"]:
        scores = [per_judge[j][row["task_id"]] for j in per_judge]
        scored = [s for s in scores if s is not None]
        mean = statistics.fmean(scored) if scored else None
        if mean is not None:
            means.append(mean)
        per_task.append({**row, "score": mean, "scores": scores, "judges": list(per_judge),
                         "spread": statistics.pstdev(scored) if len(scored) > 1 else 0.0 if scored else None})
    low, high = bootstrap_ci(means)
    return {**first, "judge": "panel: " + ", ".join(per_judge), "mean": statistics.fmean(means) if means else None,
            "ci_low": low, "ci_high": high, "scored": len(means), "unscored": len(per_task) - len(means),
            "per_task": per_task,
            "panel": {"judges": [{k: v for k, v in r.items() if k != "per_task"} for r in reports],
                      "agreement": score_agreement(per_judge)}}


def judge_panel(predictions: Path, tasks_name: str, config: JudgeConfig, specs: list[str], out_dir: Path | None = None,
                backends: list | None = None, progress: bool = True):
    """`tunebench judge` with several judges: each scores (sharing one cache), then the panel's scores.json."""
    from tunebench.judge.score import ScoreReport, judge_predictions

    out_dir = out_dir or predictions.parent
    reports = [judge_predictions(predictions, tasks_name, judge_config, out_dir,
                                 backends[i] if backends else None, progress).data
               for i, judge_config in enumerate(panel_configs(config, specs))]
    combined = panel_scores(reports)
    write_json_atomic(out_dir / SCORES, combined)
    return ScoreReport(combined)


def format_panel(report: dict) -> str:
    lines = []
    for judge in report["panel"]["judges"]:
        mean = "–" if judge["mean"] is None else f"{judge['mean']:.3f} ({judge['ci_low']:.3f}–{judge['ci_high']:.3f})"
        lines.append(f"  {judge['judge']}: mean {mean}, {judge['scored']} scored, {judge['unscored']} unscored")
    for pair in report["panel"]["agreement"]:
        if pair["n"]:
            lines.append(f"  agreement {pair['judges'][0]} / {pair['judges'][1]} on {pair['n']}: exact {pair['exact']:.1%}, "
                         f"within ±1 {pair['within_1']:.1%}, pearson {pair['pearson']:.3f}")
    return "\n".join(lines)
