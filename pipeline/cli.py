"""The ``pipeline`` command (also ``python -m pipeline``): sub-commands from :mod:`pipeline.commands`, one exit path."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

COMMAND_MODULES = (
    "pipeline.commands.demo",     # pipeline demo
    "pipeline.commands.train",    # pipeline train | evaluate | predict
    "pipeline.commands.plan",     # pipeline plan
    "pipeline.commands.bench",    # pipeline bench
    "pipeline.commands.worker",   # pipeline worker
    "pipeline.commands.resume_check",  # pipeline resume-check
)
"""Each module defines ``register(subparsers)``, adding its sub-commands with ``func=`` defaults."""

EXIT_OK, EXIT_USAGE = 0, 2
"""Exit codes: 0 done; 2 bad input (config, arguments, setup), printed as one line without a traceback.
A command may return another code of its own (75: preempted after a checkpoint, rerun to resume)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="pipeline", description="Pipeline-parallel training for TensorFlow 2 / Keras 3."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pipeline`` console script; returns the exit code.

    Every :class:`pipeline.errors.PipelineError` (bad config, setting, data, device, cluster...) ends here
    as one line ``pipeline <command>: <kind>: <message>`` on stderr and exit code 2.
    """
    from pipeline.core import runtime
    from pipeline.errors import ConfigError, PipelineError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        runtime.start_tensorflow_quietly()  # before any command imports it: no C++ start-up noise
        runtime.cpu_devices_from_env()
        return int(args.func(args) or EXIT_OK)
    except PipelineError as err:
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"pipeline {args.command}: {kind}: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
