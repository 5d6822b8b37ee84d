"""The command line: parse arguments, call one stage, print results.

User mistakes (TunebenchError) print one clear line and exit 2; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from tunebench.errors import TunebenchError

EPILOG = textwrap.dedent("""\
    the pipeline:  data → train → generate → validate → judge → report
    examples:
      tunebench quickstart                                  # the whole pipeline on the embedded model
      tunebench data inspect train.jsonl --tokenizer embedded:gemma-3-270m
      tunebench run configs/llm-jp-3-13b-qlora.yaml --set train.max_steps=50
      tunebench generate runs/my-run --tasks elyza-tasks-100-tv
      tunebench judge runs/my-run/predictions.jsonl --judge gemini:gemini-2.5-flash
      tunebench compare runs/try1 runs/try2 --judge gemini:gemini-2.5-flash   # pairwise: did try 2 win?
    """)


def build_parser() -> argparse.ArgumentParser:
    from tunebench import commands

    parser = argparse.ArgumentParser(
        prog="tunebench", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Fine-tune an open LLM on Japanese instruction data, answer ELYZA-tasks-100(-TV), "
                    "and grade the answers with an LLM judge — one config, one CLI.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in commands.REGISTRY:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except TunebenchError as exc:
        if args.debug:
            raise
        for line in str(exc).splitlines() or [""]:  # a config's problems come several at once, one a line
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # A command whose resume needs more than a rerun sets args.interrupt_hint (train: --resume).
        hint = getattr(args, "interrupt_hint", None) or "rerun the same command to resume"
        print(f"interrupted: finished work is saved; {hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
