"""`tunebench data inspect` and `tunebench data prepare`."""

from __future__ import annotations

import argparse
import sys

from tunebench.commands.options import add_config_args, add_overrides_arg
from tunebench.config import load_config
from tunebench.data.templates import TEMPLATE_NAMES
from tunebench.errors import DataError

FORMAT_CHOICES = ["auto", "ichikara", "alpaca", "messages"]


def register(sub) -> None:
    data = sub.add_parser("data", help="inspect and prepare training data",
                          description="Inspect instruction data files, or prepare a config's data into tokens.")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda args: data.print_help())

    inspect = data_sub.add_parser(
        "inspect", help="formats, counts, lengths, problems and rendered examples of data files",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  tunebench data inspect ichikara.json --tokenizer embedded:gemma-3-270m --strict")
    inspect.add_argument("files", nargs="+", help="JSON/JSONL/CSV/Parquet files, dataset folders or builtin:NAME")
    inspect.add_argument("--format", default="auto", choices=FORMAT_CHOICES, help="skip format detection")
    inspect.add_argument("--config", help="take template, max_seq_length and tokenizer from this config")
    add_overrides_arg(inspect, "data.max_seq_length=1024")
    inspect.add_argument("--tokenizer", help="count tokens with this tokenizer (hub id, folder, embedded:gemma-3-270m);"
                         " without one, lengths are in characters")
    inspect.add_argument("--template", choices=TEMPLATE_NAMES, help="prompt template")
    inspect.add_argument("--strict", action="store_true", help="exit non-zero if any record has a problem")
    inspect.set_defaults(func=run_inspect)

    prepare = data_sub.add_parser(
        "prepare", help="validate, render, tokenise (and pack) a config's data into the run directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  tunebench data prepare configs/quickstart.yaml --set data.packing=true")
    add_config_args(prepare)
    prepare.add_argument("--strict", action="store_true", help="any bad record is an error")
    prepare.add_argument("--allow-contamination", action="store_true",
                         help="keep training records that overlap evaluation inputs (not recommended)")
    prepare.set_defaults(func=run_prepare)


def run_inspect(args) -> int:
    from tunebench.data.inspect import format_inspection, inspect_source
    from tunebench.models.tokenizer import load_tokenizer

    config = load_config(args.config, args.overrides)
    template = args.template or config.data.template
    tokenizer = None
    if args.tokenizer or args.config:
        model = config.model
        if args.tokenizer:
            model.tokenizer = args.tokenizer
        tokenizer = load_tokenizer(model)
    failed = False
    for path in args.files:
        report = inspect_source(path, args.format, template, config.data.max_seq_length, tokenizer,
                                config.data.contamination_sets)
        print(format_inspection(report, config.data.max_seq_length))
        failed |= bool(report.problems)
    if failed and args.strict:
        print("error: problems found (--strict)", file=sys.stderr)
        return 1
    return 0


def run_prepare(args) -> int:
    from tunebench.data.prepare import prepare
    from tunebench.models.tokenizer import load_tokenizer
    from tunebench.runs import RunDir

    config = load_config(args.config, args.overrides)
    run = RunDir.for_config(config, args.run_dir)
    run.save_config(config)
    tokenizer = load_tokenizer(config.model)
    summary = prepare(config, run, tokenizer, config.model.tokenizer or config.model.name_or_path,
                      strict=args.strict, allow_contamination=args.allow_contamination)
    for line in summary.lines():
        print(line)
    print(f"wrote {run.data_dir}")
    if not summary.kept:
        raise DataError("nothing to train on")
    return 0
