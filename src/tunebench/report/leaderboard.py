"""`tunebench runs`: a leaderboard of the runs in a folder, best judge score first."""

from __future__ import annotations

from pathlib import Path

from tunebench.report.collect import RunRecord, load_run
from tunebench.runs import CONFIG


def find_runs(folder: Path) -> list[RunRecord]:
    return [load_run(p) for p in sorted(folder.iterdir()) if (p / CONFIG).exists()] if folder.is_dir() else []


def leaderboard(runs: list[RunRecord]) -> str:
    def key(run: RunRecord):
        mean = (run.scores or {}).get("mean")
        nll = (run.nll or {}).get("nll")
        return (mean is None, -(mean or 0), nll if nll is not None else float("inf"))

    head = f"{'run':<24}{'model':<28}{'method':<8}{'steps':>6}{'lr':>9}{'loss':>8}{'judge':>8}{'CI':>14}{'NLL':>8}"
    lines = [head, "-" * len(head)]
    for run in sorted(runs, key=key):
        s = run.scores or {}
        loss = run.losses[-1][1] if run.losses else None
        steps = run.losses[-1][0] if run.losses else None
        ci = f"{s['ci_low']:.2f}–{s['ci_high']:.2f}" if s.get("mean") is not None else "–"
        nll = (run.nll or {}).get("nll")
        mean = s.get("mean")
        lines.append(f"{run.name[:23]:<24}{str(run.setting('model.name_or_path'))[-27:]:<28}"
                     f"{str(run.setting('train.method')):<8}{steps if steps is not None else '–':>6}"
                     f"{run.setting('train.learning_rate') or '–':>9}{f'{loss:.3f}' if loss is not None else '–':>8}"
                     f"{f'{mean:.3f}' if mean is not None else '–':>8}"
                     f"{ci:>14}{f'{nll:.3f}' if nll is not None else '–':>8}")
    return "\n".join(lines)
