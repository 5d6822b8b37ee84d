"""`tunebench pairs make`: preference pairs from a run's own answers (for train.objective dpo/orpo/simpo)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tunebench.commands.options import add_overrides_arg


def register(sub) -> None:
    pairs = sub.add_parser("pairs", help="build preference pairs from a run's own answers",
                           description="Build {prompt, chosen, rejected} pairs for DPO/ORPO/SimPO.")
    pairs_sub = pairs.add_subparsers(dest="pairs_command", metavar="SUBCOMMAND", required=True)
    make = pairs_sub.add_parser(
        "make", help="pairs from a run's answers: vs the data's reference, or best vs worst by a judge",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="--mode reference: chosen = the data's answer, rejected = the run's greedy answer (offline);\n"
                    "--mode judge: k sampled answers per prompt scored by judge.judge, chosen = best, rejected = "
                    "worst.\nBatched and resumable (OUT.answers.jsonl; judge calls cached in OUT.judgments.jsonl); "
                    "writes OUT and OUT.summary.json.",
        epilog="examples:\n  tunebench pairs make runs/quickstart --prompts builtin:ja-instruct-megagon "
               "--out runs/pairs.jsonl\n  tunebench pairs make runs/quickstart --prompts data.jsonl --out pairs.jsonl "
               "--mode judge --samples 4 --set judge.judge=openai:gpt-4o-mini")
    make.add_argument("run", help="a run directory (or a model folder / hub id) whose answers become the pairs")
    make.add_argument("--prompts", required=True, help="instruction data with reference answers (any SFT format)")
    make.add_argument("--format", default="auto", choices=["auto", "ichikara", "alpaca", "messages"])
    make.add_argument("--out", required=True, help="the pairs file to write (JSONL)")
    make.add_argument("--mode", default="reference", choices=["reference", "judge"])
    make.add_argument("--samples", type=int, default=4, help="judge mode: answers sampled per prompt (default 4)")
    make.add_argument("--temperature", type=float, default=1.0, help="judge mode: sampling temperature")
    make.add_argument("--limit", type=int, help="use only the first N prompts (quick runs)")
    make.add_argument("--config", help="generate/judge settings from this config (default: the run's own)")
    add_overrides_arg(make, "generate.max_new_tokens=256")
    make.set_defaults(func=run_make)


def run_make(args) -> int:
    from tunebench.commands.generate_cmd import settings_for
    from tunebench.generate.pairs import make_pairs

    config = settings_for(args.run, args.config, args.overrides)
    summary = make_pairs(args.run, args.prompts, Path(args.out), args.mode, config.generate, config.judge,
                         samples=args.samples, temperature=args.temperature, fmt=args.format,
                         limit=args.limit)
    print(summary.line())
    print(f"pairs: {args.out} (summary: {args.out}.summary.json)")
    return 0
