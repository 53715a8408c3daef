"""``pipeline worker``: serve one task of a TensorFlow cluster (stages of a trainer on this host)."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.dist import worker


def _run(args: argparse.Namespace) -> int:
    worker.serve(args.cluster, args.task, args.job, args.allow_wildcard, args.cpu_devices)
    return 0


def register(subparsers: Any) -> None:
    """Adds ``pipeline worker`` to the CLI."""
    parser = subparsers.add_parser(
        "worker", help="serve one task of a TensorFlow cluster (stages on other hosts)",
        description="Start a tf.distribute.Server for one task; a trainer connected to the same "
                    "cluster places stages on its devices (/job:worker/task:N/device:...). "
                    "The gRPC server has no authentication: use it on a private network only.",
    )
    parser.add_argument("--cluster", required=True,
                        help="host0:port,host1:port,... (task i is entry i), 'tf_config' or 'slurm'")
    parser.add_argument("--task", type=int, default=None,
                        help="this task's index (default: TF_CONFIG's task, or SLURM_PROCID)")
    parser.add_argument("--job", default="worker", help="job name (default: worker)")
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="split this host's CPU into N logical devices (CPU-only stages)")
    parser.add_argument("--allow-wildcard", action="store_true",
                        help="accept a wildcard address (0.0.0.0) for this task; unsafe, no auth")
    parser.set_defaults(func=_run)
