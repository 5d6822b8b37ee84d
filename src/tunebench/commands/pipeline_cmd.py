"""`tunebench run`, `tunebench quickstart`, `tunebench report`, `tunebench runs`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tunebench.commands.options import add_config_args, add_overrides_arg
from tunebench.config import load_config
from tunebench.runs import CONFIG

log = logging.getLogger(__name__)


def register(sub) -> None:
    run = sub.add_parser(
        "run", help="the whole pipeline: prepare → train → generate → validate → judge → report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every stage; a stage whose output is complete is skipped, so rerunning after a crash continues. "
                    "A rerun whose settings would change finished work (adapter, checkpoints, predictions, NLL) is "
                    "refused with the differing keys named; judge settings may change. Exit status 1 when the "
                    "predictions fail validation.",
        epilog="examples:\n  tunebench run configs/llm-jp-3-13b-qlora.yaml\n"
               "  tunebench run configs/quickstart.yaml --set train.max_steps=100 --run-dir runs/try2")
    add_config_args(run)
    run.add_argument("--allow-contamination", action="store_true")
    run.set_defaults(func=run_run)

    quick = sub.add_parser(
        "quickstart", help="the whole pipeline on the embedded Gemma 3 270M and the shipped data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune the embedded Gemma 3 270M on the shipped megagon data, answer ELYZA-tasks-100-TV, "
                    "judge when a judge is configured in the environment, and write a report. Sized for a CPU; a GPU "
                    "is used automatically.",
        epilog="examples:\n  tunebench quickstart\n  GEMINI_API_KEY=... tunebench quickstart\n"
               "  tunebench quickstart --set train.max_steps=100 --run-dir runs/quickstart-100")
    add_overrides_arg(quick, "train.max_steps=20")
    quick.add_argument("--run-dir", default="runs/quickstart")
    quick.add_argument("--judge", help="BACKEND:MODEL (default: from GEMINI_API_KEY / OPENAI_API_KEY / OPENAI_BASE_URL)")
    quick.set_defaults(func=run_quickstart)

    report = sub.add_parser("report", help="HTML + Markdown report of one run or a comparison of several",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="examples:\n  tunebench report runs/quickstart\n"
                                   "  tunebench report runs/try1 runs/try2 --out reports/try2-vs-try1")
    report.add_argument("runs", nargs="+", help="run directories (the first is the baseline of a comparison)")
    report.add_argument("--out", help="output folder (default: the run itself, or ./report for several)")
    report.add_argument("--compare", metavar="COMPARE_JSON",
                        help="put this `tunebench compare` result at the top, verdicts beside the answers")
    report.set_defaults(func=run_report)

    runs = sub.add_parser("runs", help="leaderboard of the runs in a folder",
                          epilog="example: tunebench runs runs/")
    runs.add_argument("folder", nargs="?", default="runs")
    runs.set_defaults(func=run_runs)


def print_result(result) -> None:
    for stage, status in result.stages.items():
        print(f"  {stage:<9} {status}")
    run = result.run
    print(f"submission: {run.predictions}")
    print(f"report:     {run.root / 'report.html'}")
    if result.judge_mean is not None:
        print(f"judge mean: {result.judge_mean:.3f} (details in {run.scores})")
    print(f"reference NLL (ELYZA-tasks-100 answers, lower is better): {result.nll:.4f}")


def run_run(args) -> int:
    from tunebench.pipeline import run_pipeline
    from tunebench.runs import RunDir

    config = load_config(args.config, args.overrides)
    result = run_pipeline(config, RunDir.for_config(config, args.run_dir), args.allow_contamination)
    print_result(result)
    return validation_exit_code(result)


def validation_exit_code(result) -> int:
    """1 when the submission failed validation (a script must not take it for a good run), else 0."""
    if result.stages.get("validate") == "ok":
        return 0
    print(f"error: {result.run.predictions} failed validation ({result.stages.get('validate')}); "
          f"details in {result.run.root / 'validation.json'}", file=sys.stderr)
    return 1


def run_quickstart(args) -> int:
    from tunebench.errors import DataError
    from tunebench.pipeline import judge_from_environment, preset, run_pipeline
    from tunebench.runs import RunDir
    from tunebench.tasksets import resolve_task_file

    config = load_config(preset("quickstart"), args.overrides)
    try:
        resolve_task_file(config.generate.tasks)
    except DataError as exc:
        log.warning("%s — answering the shipped ELYZA-tasks-100 instead", exc)
        config.generate.tasks = "elyza-tasks-100"
    spec, base_url, source = (args.judge, config.judge.base_url, "--judge") if args.judge else judge_from_environment()
    if spec:
        config.judge.judge, config.judge.base_url = spec, base_url
        print(f"judge: {spec} (from {source})")
    result = run_pipeline(config, RunDir.for_config(config, args.run_dir))
    print_result(result)
    if not spec:
        print("no judge configured: set GEMINI_API_KEY (Gemini), OPENAI_API_KEY (OpenAI), or OPENAI_BASE_URL "
              "(any OpenAI-compatible server, e.g. `tunebench serve`), or pass --judge BACKEND:MODEL, "
              f"then: tunebench judge {result.run.predictions} --judge gemini:gemini-2.5-flash")
    return validation_exit_code(result)


def run_report(args) -> int:
    from tunebench.report.build import write_report

    roots = [Path(r) for r in args.runs]
    for root in roots:
        if not (root / CONFIG).exists():
            from tunebench.errors import ConfigError

            raise ConfigError(f"{root}: not a run directory (no config.yaml)")
    out = Path(args.out) if args.out else (roots[0] if len(roots) == 1 else Path("report"))
    pairwise = None
    if args.compare:
        from tunebench.report.collect import read_json

        pairwise = read_json(Path(args.compare))
        if pairwise is None:
            from tunebench.errors import ConfigError

            raise ConfigError(f"{args.compare}: no such file; run `tunebench compare` first")
    html, md = write_report(roots, out, pairwise)
    print(f"wrote {html} and {md}")
    return 0


def run_runs(args) -> int:
    from tunebench.report.leaderboard import find_runs, leaderboard

    runs = find_runs(Path(args.folder))
    if not runs:
        print(f"no runs in {args.folder}")
        return 0
    print(leaderboard(runs))
    return 0
