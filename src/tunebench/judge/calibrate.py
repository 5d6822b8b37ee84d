"""`tunebench judge calibrate`: how far a judge agrees with published GPT-4-class ELYZA scores.

Re-scores a seeded sample of published ELYZA-tasks-100 answers (shipped, gzip-compressed, in
builtin/judge-calibration; sources and licences in its PROVENANCE.md) with the user's judge and the
reference rubric, and compares with a reference judge's scores.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from tunebench.config import JudgeConfig
from tunebench.errors import DataError
from tunebench.judge.backends import JudgeBackend, make_backend
from tunebench.judge.rubric import load_rubric
from tunebench.judge.runner import Item, JudgeRunner
from tunebench.judge.stats import agreement
from tunebench.runs import JUDGMENTS, write_json_atomic
from tunebench.tasksets import BUILTIN_DIR, load_tasks

SHIPPED_DIR = BUILTIN_DIR / "judge-calibration"
DEFAULT_FILES = ("shaberi_elyza100.jsonl", "bench_elyza_gpt-4o-mini.jsonl", "nss_gpt4-autoeval_command-r-plus.jsonl")


def find_calibration_dir(explicit: str | None) -> Path:
    """--data DIR if given, else the published scores shipped with tunebench."""
    if explicit is None:
        return SHIPPED_DIR
    path = Path(explicit)
    if not path.is_dir():
        raise DataError(f"{explicit}: calibration folder not found (leave out --data to use the shipped data)")
    return path


def open_calibration_file(folder: Path, name: str):
    """The text of NAME or NAME.gz in `folder` (the shipped files are compressed), or None."""
    if (folder / name).exists():
        return (folder / name).open(encoding="utf-8")
    if (folder / f"{name}.gz").exists():
        return gzip.open(folder / f"{name}.gz", "rt", encoding="utf-8")
    return None


def load_calibration_rows(folder: Path, reference_judge: str) -> list[dict]:
    """Rows whose `scores` carry the reference judge's score."""
    rows = []
    for name in DEFAULT_FILES:
        handle = open_calibration_file(folder, name)
        if handle is None:
            continue
        with handle:
            for line_no, line in enumerate(handle, start=1):
                row = json.loads(line)
                if row.get("scores", {}).get(reference_judge) is not None:
                    rows.append({**row, "origin": f"{folder / name}:{line_no}"})
    if not rows:
        raise DataError(f"{folder}: no rows scored by '{reference_judge}' (see PROVENANCE.md for judge names)")
    return rows


def calibrate(config: JudgeConfig, n: int, out_dir: Path, data_dir: str | None = None,
              reference_judge: str = "gpt-4-turbo-preview", seed: int = 0,
              backend: JudgeBackend | None = None, progress: bool = True) -> dict:
    rows = load_calibration_rows(find_calibration_dir(data_dir), reference_judge)
    sample = random.Random(seed).sample(rows, min(n, len(rows)))
    tasks = {t.task_id: t for t in load_tasks("elyza-tasks-100")}
    items = [Item(i, tasks[r["task_id"]].input, r["output"], tasks[r["task_id"]].reference,
                  tasks[r["task_id"]].eval_aspect) for i, r in enumerate(sample)]
    backend = backend or make_backend(config)
    runner = JudgeRunner(backend, load_rubric(config.prompt_file, True), out_dir / JUDGMENTS,
                         samples=1, temperature=config.temperature, concurrency=config.concurrency,
                         requests_per_minute=config.requests_per_minute, max_retries=config.max_retries,
                         backoff_s=config.backoff_s, max_wait_s=config.max_wait_s)
    judgments = runner.judge_all(items, progress)
    if runner.interrupted:  # finished judgments are cached; a rerun continues
        raise KeyboardInterrupt
    ours, theirs, errors = [], [], []
    for item, row in zip(items, sample):
        record = judgments[item.task_id][0]
        if record["score"] is not None:
            ours.append(record["score"])
            theirs.append(row["scores"][reference_judge])
        else:
            errors.append(record["error"])
    if not ours:
        raise DataError(f"the judge scored none of the {len(items)} calibration answers "
                        f"(first error: {errors[0] if errors else 'none'}); a rerun asks again")
    result = {"judge": backend.name, "reference_judge": reference_judge, "sampled": len(items),
              "unscored": len(items) - len(ours), **agreement(ours, theirs)}
    write_json_atomic(out_dir / "calibration.json", result)
    return result


def format_calibration(result: dict) -> str:
    return (f"{result['judge']} vs {result['reference_judge']} on {result['n']} answers "
            f"({result['unscored']} unscored of {result['sampled']}):\n"
            f"  pearson {result['pearson']:.3f}  spearman {result['spearman']:.3f}  exact {result['exact']:.1%}  "
            f"within ±1 {result['within_1']:.1%}  mean bias {result['mean_bias']:+.2f}")
