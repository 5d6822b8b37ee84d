"""`tunebench judge calibrate --pairwise`: does the judge pick the clearly better of two answers?

From the shipped judge-calibration data (read through calibrate.py's loader), pairs of published
answers to the same ELYZA-tasks-100 task whose reference-judge scores differ by at least 2 points:
a pair a competent judge should not get wrong. Each pair is judged in both orders (judge/pairwise.py);
we report how often the judge's verdict names the higher-scored answer, how often it ties or picks
the lower one, and its position consistency.
"""

from __future__ import annotations

import random
from collections import defaultdict
from itertools import combinations
from pathlib import Path

from tunebench.config import JudgeConfig
from tunebench.errors import DataError
from tunebench.judge.backends import JudgeBackend, make_backend
from tunebench.judge.calibrate import find_calibration_dir, load_calibration_rows
from tunebench.judge.pairwise import Pair, judge_pairs
from tunebench.runs import write_json_atomic
from tunebench.tasksets import load_tasks

MIN_GAP = 2


def clear_pairs(rows: list[dict], reference_judge: str, min_gap: int = MIN_GAP) -> list[tuple[dict, dict]]:
    """(x, y) pairs of answers to the same task whose reference scores differ by ≥ min_gap."""
    by_task = defaultdict(list)
    for row in rows:
        by_task[row["task_id"]].append(row)
    pairs = []
    for task_rows in by_task.values():
        for x, y in combinations(task_rows, 2):
            gap = abs(x["scores"][reference_judge] - y["scores"][reference_judge])
            if gap >= min_gap and x["output"] != y["output"]:
                pairs.append((x, y))
    return pairs


def calibrate_pairwise(config: JudgeConfig, n: int, out_dir: Path, data_dir: str | None = None,
                       reference_judge: str = "gpt-4-turbo-preview", seed: int = 0,
                       backend: JudgeBackend | None = None, progress: bool = True) -> dict:
    rows = load_calibration_rows(find_calibration_dir(data_dir), reference_judge)
    candidates = clear_pairs(rows, reference_judge)
    if not candidates:
        raise DataError(f"no two answers to one task differ by ≥{MIN_GAP} points under '{reference_judge}'")
    sample = random.Random(seed).sample(candidates, min(n, len(candidates)))
    tasks = {t.task_id: t for t in load_tasks("elyza-tasks-100")}
    pairs = [Pair(i, tasks[x["task_id"]].input, x["output"], y["output"], tasks[x["task_id"]].reference,
                  tasks[x["task_id"]].eval_aspect) for i, (x, y) in enumerate(sample)]
    higher = ["A" if x["scores"][reference_judge] > y["scores"][reference_judge] else "B" for x, y in sample]
    backend = backend or make_backend(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    verdicts = judge_pairs(pairs, config, backend, out_dir / "pairwise_judgments.jsonl", progress)
    scored = [(v, h) for v, h in zip(verdicts, higher) if v["winner"] is not None]
    if not scored:
        raise DataError("the judge gave no parsable verdict on any calibration pair; see the warnings above")
    n_scored = len(scored)
    result = {"judge": backend.name, "reference_judge": reference_judge, "min_gap": MIN_GAP,
              "candidate_pairs": len(candidates), "sampled": len(pairs), "n": n_scored,
              "unscored": len(pairs) - n_scored,
              "picked_higher": sum(v["winner"] == h for v, h in scored) / n_scored,
              "tied": sum(v["winner"] == "tie" for v, _ in scored) / n_scored,
              "picked_lower": sum(v["winner"] not in (h, "tie") for v, h in scored) / n_scored,
              "position_consistency": sum(bool(v["consistent"]) for v, _ in scored) / n_scored,
              "pairs": [{"task_id": x["task_id"], "models": [x.get("model"), y.get("model")],
                         "reference_scores": [x["scores"][reference_judge], y["scores"][reference_judge]],
                         "higher": h, "winner": v["winner"], "orders": v["orders"]}
                        for (x, y), h, v in zip(sample, higher, verdicts)]}
    write_json_atomic(out_dir / "calibration_pairwise.json", result)
    return result


def format_pairwise_calibration(result: dict) -> str:
    return (f"{result['judge']} on {result['n']} pairs scored ≥{result['min_gap']} apart by {result['reference_judge']} "
            f"({result['unscored']} unscored of {result['sampled']}):\n"
            f"  picked the higher-scored answer {result['picked_higher']:.1%}, tie {result['tied']:.1%}, "
            f"picked the lower {result['picked_lower']:.1%}; position consistency {result['position_consistency']:.1%}")
