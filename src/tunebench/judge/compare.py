"""`tunebench compare`: run B (the candidate) against run A (the baseline), task by task.

Reads both predictions files, pairs the answers to the tasks both runs answered, has each judge
compare every pair in both orders (judge/pairwise.py), combines a panel by majority
(judge/panel.py), and writes compare.json: counts, win rate with CI, position consistency,
length control, language flags and per-task verdicts with reasons.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from tunebench.config import JudgeConfig
from tunebench.errors import DataError
from tunebench.judge.backends import JudgeBackend, make_backend
from tunebench.judge.pairwise import Pair, answer_facts, judge_pairs, summarize
from tunebench.judge.panel import majority, panel_configs, verdict_agreement
from tunebench.judge.score import build_items, read_predictions
from tunebench.runs import CONFIG, PREDICTIONS, write_json_atomic
from tunebench.tasksets import load_tasks

log = logging.getLogger(__name__)


def predictions_path(run_or_predictions: Path) -> Path:
    path = run_or_predictions / PREDICTIONS if run_or_predictions.is_dir() else run_or_predictions
    if not path.exists():
        raise DataError(f"{path}: no predictions file; run `tunebench generate` first")
    return path


def side_name(run_or_predictions: Path) -> str:
    """The run's name as `tunebench report` shows it: config.yaml's `name`, else the folder's."""
    folder = run_or_predictions if run_or_predictions.is_dir() else run_or_predictions.parent
    config = folder / CONFIG
    if config.exists():
        name = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("name")
        if name:
            return str(name)
    return folder.name


def build_pairs(path_a: Path, path_b: Path, tasks_name: str) -> list[Pair]:
    """Pairs for the tasks both files answer, in A's order; tasks only one side answered are logged."""
    tasks = load_tasks(tasks_name)
    items_a = build_items(read_predictions(path_a, tasks), tasks_name, tasks)
    items_b = {i.task_id: i for i in build_items(read_predictions(path_b, tasks), tasks_name, tasks)}
    pairs = [Pair(a.task_id, a.input, a.output, items_b[a.task_id].output, a.reference, a.eval_aspect)
             for a in items_a if a.task_id in items_b]
    only = len(items_a) + len(items_b) - 2 * len(pairs)
    if only:
        log.warning("%d task(s) answered by only one side are left out of the comparison", only)
    if not pairs:
        raise DataError(f"{path_a} and {path_b} answer no task in common: compare answers to the same task set")
    return pairs


def compare_runs(run_a: Path, run_b: Path, tasks_name: str, config: JudgeConfig, specs: list[str], out_dir: Path,
                 backends: list[JudgeBackend] | None = None, progress: bool = True) -> dict:
    """Judge B against A with every judge in `specs`; write and return compare.json's content."""
    pairs = build_pairs(predictions_path(run_a), predictions_path(run_b), tasks_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "pairwise_judgments.jsonl"
    judges, rows_by_judge = [], {}
    for i, judge_config in enumerate(panel_configs(config, specs)):
        backend = (backends[i] if backends else None) or make_backend(judge_config)
        rows = judge_pairs(pairs, judge_config, backend, cache, progress)
        rows_by_judge[backend.name] = rows
        judges.append(summarize(pairs, rows, backend.name))
    panel = None
    if len(judges) > 1:
        panel_rows = [{"task_id": p.task_id, "winner": majority([rows[i]["winner"] for rows in rows_by_judge.values()]),
                       "consistent": None, "gated": False} for i, p in enumerate(pairs)]
        panel = {**summarize(pairs, panel_rows, "panel (majority)"),
                 "position_consistency": None,
                 "mean_win_rate": _mean([j["win_rate"] for j in judges]),
                 "agreement": verdict_agreement({name: {r["task_id"]: r["winner"] for r in rows}
                                                 for name, rows in rows_by_judge.items()})}
        for i, row in enumerate(panel_rows):
            row["judges"] = {name: rows[i]["winner"] for name, rows in rows_by_judge.items()}
    headline = panel or judges[0]
    facts = answer_facts(pairs, config.language_threshold)
    per_task = []
    for i, pair in enumerate(pairs):
        per_task.append({"task_id": pair.task_id, "input": pair.input, "a": pair.a, "b": pair.b,
                         "len_a": len(pair.a), "len_b": len(pair.b),
                         "japanese_share_a": facts["a"]["japanese_share"][pair.task_id],
                         "japanese_share_b": facts["b"]["japanese_share"][pair.task_id],
                         "winner": (panel_rows[i]["winner"] if panel else rows_by_judge[judges[0]["judge"]][i]["winner"]),
                         "verdicts": {name: rows[i] for name, rows in rows_by_judge.items()}})
    name_a, name_b = side_name(run_a), side_name(run_b)
    if name_a == name_b:  # two tries of one config: tell them apart by folder
        name_a, name_b = (p.parent.name if p.is_file() else p.name for p in (run_a, run_b))
    result = {"a": {"name": name_a, "path": str(run_a)}, "b": {"name": name_b, "path": str(run_b)},
              "task_set": tasks_name, "headline": headline, "judges": judges, "panel": panel,
              "lengths": {"a": facts["a"]["lengths"], "b": facts["b"]["lengths"]},
              "language_threshold": config.language_threshold,
              "language_flagged": {"a": facts["a"]["language_flagged"], "b": facts["b"]["language_flagged"]},
              "per_task": per_task}
    write_json_atomic(out_dir / "compare.json", result)
    return result


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def format_summary(summary: dict, name_a: str, name_b: str) -> str:
    if not summary["scored"]:
        return f"{summary['judge']}: no pair could be judged ({summary['unscored']} unscored)"
    lc = summary["length_control"]
    consistency = summary.get("position_consistency")
    lines = [f"{summary['judge']}: {name_b} vs {name_a}: {summary['wins']} win(s), {summary['ties']} tie(s), "
             f"{summary['losses']} loss(es) over {summary['scored']} task(s) ({summary['unscored']} unscored)",
             f"  win rate {summary['win_rate']:.3f} (95% CI {summary['ci_low']:.3f}–{summary['ci_high']:.3f})"
             + (f", length-controlled {lc['lc_win_rate']:.3f}" if lc.get("lc_win_rate") is not None else "")
             + (f", position consistency {consistency:.1%}" if consistency is not None else "")]
    if lc.get("winner_simply_longer"):
        winner = name_b if summary["win_rate"] > 0.5 else name_a
        lines.append(f"  note: the winner ({winner}) is simply longer — its edge shrinks at equal length "
                     f"(longer answer won {lc['longer_won_share']:.0%} of decisive verdicts)")
    return "\n".join(lines)


def format_result(result: dict) -> str:
    a, b = result["a"]["name"], result["b"]["name"]
    lines = [f"{'task':>6}  {'winner':<7} reason"]
    for row in result["per_task"]:
        verdict = next(iter(row["verdicts"].values()))
        reason = (verdict["reasons"].get("AB") or next(iter(verdict["errors"].values()), "")
                  or ("language gate" if verdict["gated"] else "") or "").replace("\n", " ")[:70]
        winner = {"A": a, "B": b, "tie": "tie", None: "–"}[row["winner"]]
        lines.append(f"{row['task_id']!s:>6}  {winner[:7]:<7} {reason}")
    la, lb = result["lengths"]["a"], result["lengths"]["b"]
    lines.append(f"answer length (chars): {a} mean {la.get('mean', 0):.0f}, median {la.get('median', 0):.0f}; "
                 f"{b} mean {lb.get('mean', 0):.0f}, median {lb.get('median', 0):.0f}")
    flagged = result["language_flagged"]
    if flagged["a"] or flagged["b"]:
        lines.append(f"under {result['language_threshold']:.0%} Japanese letters: {a}: {len(flagged['a'])} answer(s), "
                     f"{b}: {len(flagged['b'])} answer(s)")
    for summary in result["judges"]:
        lines.append(format_summary(summary, a, b))
    if result["panel"]:
        lines.append(format_summary(result["panel"], a, b))
        for pair in result["panel"]["agreement"]:
            share = "–" if pair["agreement"] is None else f"{pair['agreement']:.1%}"
            lines.append(f"  agreement {pair['judges'][0]} / {pair['judges'][1]}: {share} of {pair['n']} task(s)")
    return "\n".join(lines)
