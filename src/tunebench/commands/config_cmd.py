"""`tunebench config keys` and `tunebench config show`: the config documented and checked from its fields."""

from __future__ import annotations

import argparse
import sys

import yaml

from tunebench.commands.options import add_overrides_arg
from tunebench.config import KeyDoc, describe_keys, load_config, to_dict


def register(sub) -> None:
    config = sub.add_parser("config", help="every config key with its meaning, or a config checked and resolved",
                            description="The config keys (type, default, allowed range, meaning), or one config "
                                        "with every default filled in after checking it whole.")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    config.set_defaults(func=lambda args: config.print_help())

    keys = config_sub.add_parser("keys", help="every key: type, default, allowed range, meaning",
                                 epilog="example: tunebench config keys train")
    keys.add_argument("section", nargs="?", help="only keys starting with this, e.g. train or generate.top")
    keys.add_argument("--markdown", action="store_true", help="as the README's table (to regenerate it)")
    keys.set_defaults(func=run_keys)

    show = config_sub.add_parser(
        "show", help="check a config (every problem at once) and print it with every default filled in",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  tunebench config show configs/quickstart.yaml --set train.save_steps=50")
    show.add_argument("config", nargs="?", help="YAML config file (default: the defaults alone)")
    add_overrides_arg(show, "train.save_steps=50")
    show.set_defaults(func=run_show)


def format_default(value) -> str:
    return "null" if value is None else yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def markdown_table(docs: list[KeyDoc]) -> str:
    """The README's config table: key, type, default, allowed range, meaning."""
    lines = ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]
    for doc in docs:
        meaning = doc.help.replace("|", "\\|")
        lines.append(f"| `{doc.key}` | {doc.type} | `{format_default(doc.default)}` | {doc.range or ''} | {meaning} |")
    return "\n".join(lines) + "\n"


def run_keys(args) -> int:
    docs = [d for d in describe_keys() if not args.section or d.key.startswith(args.section)]
    if args.markdown:
        print(markdown_table(docs), end="")
        return 0
    for doc in docs:
        allowed = f", {doc.range}" if doc.range else ""
        print(f"{doc.key}  ({doc.type}{allowed}; default {format_default(doc.default)})\n    {doc.help}")
    if not docs:
        print(f"no key starts with {args.section!r}", file=sys.stderr)
        return 1
    return 0


def run_show(args) -> int:
    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(config), allow_unicode=True, sort_keys=False), end="")
    return 0
