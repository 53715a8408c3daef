"""The ``pipeline`` command: one sub-command per module (demo, train, evaluate, predict, plan, bench, worker)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from pipeline.errors import PipelineError

COMMAND_MODULES = (
    "pipeline.demo",      # pipeline demo
    "pipeline.runner",    # pipeline train | evaluate | predict
    "pipeline.planner",   # pipeline plan
    "pipeline.bench",     # pipeline bench
    "pipeline.worker",    # pipeline worker
)
"""Each module defines ``register(subparsers)``, adding its sub-commands with ``func=`` defaults."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="pipeline", description="Pipeline-parallel training for TensorFlow 2 / Keras 3."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue  # that command is not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pipeline`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PipelineError as err:
        print(f"pipeline {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
