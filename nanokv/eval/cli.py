"""The `nanokv eval` subcommand (placeholder until the suites land)."""

from __future__ import annotations

import argparse


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    """Adds `nanokv eval` to the command line."""
    parser = commands.add_parser("eval", help="evaluate policies (niah, fidelity, code)")
    parser.set_defaults(run=_not_yet)


def _not_yet(args: argparse.Namespace) -> int:
    raise RuntimeError("nanokv eval is not implemented yet")
