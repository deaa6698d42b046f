"""What every command module's `register` does: add the sub-parser that runs `run`, and the config arguments."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_command(
    subparsers: Any, name: str, run: Callable[[argparse.Namespace], int], help: str, description: str
) -> argparse.ArgumentParser:
    """The sub-parser of command `name`, which calls `run(args)`."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.set_defaults(func=run)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser, overrides_help: str = "dotted config overrides") -> None:
    """CONFIG (a YAML path or a bundled name such as sd15) and KEY=VALUE overrides."""
    parser.add_argument("config", help="config file or bundled config name")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)
