"""`tunebench compare`: is run B better than run A? Pairwise judging with position swap."""

from __future__ import annotations

import argparse
from pathlib import Path

from tunebench.commands.options import add_overrides_arg
from tunebench.config import load_config
from tunebench.errors import ConfigError
from tunebench.runs import CONFIG

COMPARE_EPILOG = """examples:
  tunebench compare runs/try1 runs/try2 --judge gemini:gemini-2.5-flash
  tunebench compare runs/try1 runs/try2 --judge openai:gpt-4o-mini --judge gemini:gemini-2.5-flash   # a panel
  tunebench compare a/predictions.jsonl b/predictions.jsonl --tasks elyza-tasks-100 \\
      --judge openai:tiny --base-url http://127.0.0.1:8000/v1                       # tunebench serve as judge

Each task is judged twice (A shown first, then B shown first); a run wins a task only when both
orders agree, otherwise it is a tie. Unparsable or blocked replies are unscored, never counted.
Judgments are cached in OUT/pairwise_judgments.jsonl: a rerun pays only for what changed.
Writes OUT/compare.json and OUT/report.html (the pairwise result at the top)."""


def register(sub) -> None:
    compare = sub.add_parser("compare", help="pairwise-judge run B against run A (win rate, position swap)",
                             formatter_class=argparse.RawDescriptionHelpFormatter, epilog=COMPARE_EPILOG,
                             description="Compare two runs task by task with an LLM judge: win/tie/loss of B against "
                                         "A, win rate with a 95% CI, the judge's position consistency, a "
                                         "length-controlled win rate and per-task verdicts with reasons.")
    compare.add_argument("run_a", metavar="RUN_OR_PREDICTIONS_A", help="the baseline: a run directory or predictions JSONL")
    compare.add_argument("run_b", metavar="RUN_OR_PREDICTIONS_B", help="the candidate: a run directory or predictions JSONL")
    compare.add_argument("--judge", action="append", default=[],
                         help="BACKEND:MODEL (repeat for a panel of judges; default: judge.judge of the config)")
    compare.add_argument("--tasks", help="task set both answered (default: A's generate.tasks)")
    compare.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    compare.add_argument("--api-key-env", help="environment variable holding the API key")
    compare.add_argument("--concurrency", type=int)
    compare.add_argument("--rpm", type=int, help="requests-per-minute cap")
    compare.add_argument("--config", help="take judge settings from this config (default: A's own)")
    compare.add_argument("--out", help="output folder (default: runs/compare/<A>-vs-<B>)")
    add_overrides_arg(compare, "judge.language_gate=true")
    compare.set_defaults(func=run_compare)


def run_compare(args) -> int:
    from tunebench.commands.judge_cmd import user_backends
    from tunebench.judge.backends import parse_judge_spec
    from tunebench.judge.compare import compare_runs, format_result, side_name
    from tunebench.report.build import write_report

    run_a, run_b = Path(args.run_a), Path(args.run_b)
    own_config = (run_a if run_a.is_dir() else run_a.parent) / CONFIG
    config = load_config(args.config or (str(own_config) if own_config.exists() else None), args.overrides)
    j = config.judge
    for field, value in (("base_url", args.base_url), ("api_key_env", args.api_key_env),
                         ("concurrency", args.concurrency), ("requests_per_minute", args.rpm)):
        if value is not None:
            setattr(j, field, value)
    specs = args.judge or ([j.judge] if j.judge else [])
    if not specs:
        raise ConfigError("no judge configured: pass --judge BACKEND:MODEL (repeatable) or set judge.judge in the config")
    for spec in specs:
        parse_judge_spec(spec)  # a malformed spec fails before any data is read
    out = Path(args.out) if args.out else Path("runs") / "compare" / f"{side_name(run_a)}-vs-{side_name(run_b)}"
    result = compare_runs(run_a, run_b, args.tasks or config.generate.tasks, j, specs, out,
                          backends=user_backends(args, j, specs))
    print(format_result(result))
    roots = [p if p.is_dir() else p.parent for p in (run_a, run_b)]
    html, _ = write_report(roots, out, pairwise=result)
    print(f"wrote {out / 'compare.json'} and {html}")
    return 0
