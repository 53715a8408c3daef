"""Serve one task of a TensorFlow cluster so a trainer can place stages on it (``pipeline worker``)."""

from __future__ import annotations

import os
import sys
from typing import Any


def serve(cluster: Any, task: int | None = None, job: str = "worker", allow_wildcard: bool = False,
          cpu_devices: int | None = None, join: bool = True) -> Any:
    """Starts the task's ``tf.distribute.Server`` and (by default) serves until killed.

    Importable and picklable, so tests can start workers with ``multiprocessing``
    in spawn mode.

    Args:
        cluster: host list ``"h0:p0,h1:p1"``, ``"tf_config"``, ``"slurm"`` or a dict spec.
        task: this task's index in ``job`` (default: from TF_CONFIG / SLURM_PROCID).
        job: the job name.
        allow_wildcard: accept a wildcard address for this task.
        cpu_devices: split the CPU into this many logical devices first (CPU stages).
        join: block serving forever; otherwise return the server.

    Returns:
        The server (only when ``join`` is false).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipeline.dist import cluster as cluster_lib  # noqa: PLC0415 - TF starts here, after env setup
    from pipeline.core import devices  # noqa: PLC0415

    if cpu_devices:
        devices.setup_cpu_devices(cpu_devices)
    server = cluster_lib.start_server(cluster, task, job, allow_wildcard)
    spec = cluster_lib.resolver_from(cluster, job).cluster_spec()
    index = task if task is not None else server.server_def.task_index
    print(f"pipeline worker: serving /job:{job}/task:{index} at {spec.task_address(job, index)} "
          "(no authentication: keep this port on a private network)", file=sys.stderr, flush=True)
    if not join:
        return server
    server.join()
    return None
