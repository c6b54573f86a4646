"""The `hf-plugin` command line (also `python -m hf_plugin`): the parser and the entry point.

Each command lives in its own module of `hf_plugin.commands`, its flags beside its handler.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-plugin", description="Adapt a frozen language model with a reweighter.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Runs one command. The library's `ValueError`/`FileNotFoundError` (bad data, arguments or files, a mismatched
    reweighter) end the command with their one-line message, not a traceback; other exceptions are bugs and keep
    theirs."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
