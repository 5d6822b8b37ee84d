"""Options shared by the command modules (the config file, --set overrides, --run-dir)."""

from __future__ import annotations

import argparse


def add_config_args(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    if config_required:
        parser.add_argument("config", help="YAML config file (see configs/)")
    else:
        parser.add_argument("--config", help="YAML config file (see configs/)")
    add_overrides_arg(parser)
    parser.add_argument("--run-dir", help="run directory (default: runs/<config name>)")


def add_overrides_arg(parser: argparse.ArgumentParser, example: str = "train.learning_rate=1e-4") -> None:
    """The repeatable --set KEY=VALUE option every config-reading command takes."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")
