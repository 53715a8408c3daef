"""Stages on other hosts: cluster resolvers, TF servers, connecting, and dead-worker timeouts."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import tensorflow as tf

from pipeline.core import _compat
from pipeline.dist.addresses import (  # noqa: F401 - re-exported: cluster.is_wildcard, cluster.check_addresses
    ADDRESS_ENV, WILDCARD_HOSTS, _is_local_host, _reachable, _split_address, check_addresses, is_wildcard,
    trainer_address)
from pipeline.errors import ClusterError

DEFAULT_JOB = "worker"
DEFAULT_TIMEOUT = 60.0
"""Seconds a task may stay silent before the trainer fails naming it."""

Resolver = tf.distribute.cluster_resolver.ClusterResolver


CLUSTER_ENV = "PIPELINE_CLUSTER"
"""Environment variable: the cluster the trainer connects to (see :func:`connect_from_env`)."""
TIMEOUT_ENV = "PIPELINE_CLUSTER_TIMEOUT"


# --------------------------------------------------------------------------- resolvers


def parse_hosts(hosts: str | list[str], job: str = DEFAULT_JOB) -> tf.train.ClusterSpec:
    """A cluster spec from an explicit host list.

    Args:
        hosts: ``"host0:port,host1:port"`` (task i is the i-th entry), or a list of them.
        job: the job name of every task.

    Returns:
        The cluster spec ``{job: [host0:port, ...]}``.

    Raises:
        ClusterError: an entry without a ``host:port`` form.
    """
    entries = [h.strip() for h in (hosts.split(",") if isinstance(hosts, str) else hosts) if h.strip()]
    if not entries:
        raise ClusterError("the host list is empty; give host:port[,host:port...]")
    for entry in entries:
        _split_address(entry)
    return tf.train.ClusterSpec({job: entries})


def resolver_from(cluster: str | Resolver | Mapping[str, Any] | None, job: str = DEFAULT_JOB,
                  port_base: int = 8888) -> Resolver:
    """Chooses a cluster resolver.

    Args:
        cluster: a resolver (returned as is); a dict cluster spec; ``"tf_config"``
            (the ``TF_CONFIG`` variable); ``"slurm"`` (``SlurmClusterResolver``: one
            task per SLURM task, ports from ``port_base``); an explicit host list
            ``"h0:p0,h1:p1"``; or ``None``/``"auto"``: ``TF_CONFIG`` if set, else SLURM
            if inside a SLURM step.
        job: job name for host lists and SLURM.
        port_base: first port SLURM tasks listen on.

    Returns:
        A ``tf.distribute.cluster_resolver.ClusterResolver``.

    Raises:
        ClusterError: nothing names a cluster, or the value is not understood.
    """
    resolvers = tf.distribute.cluster_resolver
    if isinstance(cluster, Resolver):
        return cluster
    if isinstance(cluster, Mapping):
        return resolvers.SimpleClusterResolver(tf.train.ClusterSpec(dict(cluster)))
    mode = (cluster or "auto").strip()
    if mode.lower() == "auto":
        if os.environ.get("TF_CONFIG"):
            mode = "tf_config"
        elif os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST"):
            mode = "slurm"
        else:
            raise ClusterError(
                "no cluster given: pass --cluster host0:port,host1:port, --cluster tf_config "
                "(with TF_CONFIG set) or --cluster slurm (inside srun)"
            )
    if mode.lower() == "tf_config":
        if not os.environ.get("TF_CONFIG"):
            raise ClusterError("--cluster tf_config, but the TF_CONFIG environment variable is not set")
        return resolvers.TFConfigClusterResolver()
    if mode.lower() == "slurm":
        return resolvers.SlurmClusterResolver(jobs={job: _slurm_task_count()}, port_base=port_base,
                                              auto_set_gpu=False)
    return resolvers.SimpleClusterResolver(parse_hosts(mode, job))


def _slurm_task_count() -> int:
    for var in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NNODES"):
        if os.environ.get(var):
            return int(os.environ[var])
    raise ClusterError("--cluster slurm, but no SLURM_NTASKS/SLURM_NNODES: run inside sbatch/srun")


# --------------------------------------------------------------------------- server side


def start_server(cluster: str | Resolver | Mapping[str, Any] | None, task: int | None = None,
                 job: str = DEFAULT_JOB, allow_wildcard: bool = False,
                 config: Any = None) -> tf.distribute.Server:
    """Starts the TensorFlow gRPC server of one task of the cluster.

    Args:
        cluster: anything :func:`resolver_from` accepts.
        task: this process's task index (default: the resolver's, e.g. ``SLURM_PROCID``).
        job: this process's job name.
        allow_wildcard: accept a wildcard address for this task.
        config: optional ``tf.compat.v1.ConfigProto`` for the server.

    Returns:
        The started ``tf.distribute.Server`` (call ``join()`` to serve forever).

    Raises:
        ClusterError: unknown task, wildcard address, or an address not of this host.
    """
    resolver = resolver_from(cluster, job)
    spec = resolver.cluster_spec()
    if job not in spec.jobs:
        raise ClusterError(f"the cluster has no job {job!r}; it has {spec.jobs}")
    if task is None:
        task = resolver.task_id
    if task is None:
        task = int(os.environ.get("SLURM_PROCID", "0"))
    tasks = spec.job_tasks(job)
    if not 0 <= task < len(tasks):
        raise ClusterError(f"--task {task} is not a task of job {job!r} (it has tasks 0..{len(tasks) - 1})")
    check_addresses(spec, allow_wildcard)
    host, port = _split_address(tasks[task])
    if not is_wildcard(host) and not _is_local_host(host):
        raise ClusterError(
            f"task /job:{job}/task:{task} is {tasks[task]!r} in the cluster spec, but {host!r} is not "
            "an address of this machine; start each task on the host the spec names"
        )
    try:
        return tf.distribute.Server(spec, job_name=job, task_index=task, protocol="grpc",
                                    config=config, start=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the task named
        raise ClusterError(f"could not start /job:{job}/task:{task} on port {port}: {err}") from err


# --------------------------------------------------------------------------- client side


def set_grpc_options(timeout: float = DEFAULT_TIMEOUT) -> None:
    """Makes TF's gRPC channels fail instead of waiting forever for a dead peer.

    Sets ``GRPC_FAIL_FAST`` (RPCs to an unreachable task fail instead of waiting
    for it to come back) and keepalive pings via ``TF_GRPC_DEFAULT_OPTIONS`` (a
    silent peer is declared dead after about ``timeout`` seconds). Must run before
    the first channel is created (before connecting). Existing values are kept.
    """
    os.environ.setdefault("GRPC_FAIL_FAST", "true")
    ping_ms = max(1000, int(timeout * 1000 / 4))
    os.environ.setdefault(
        "TF_GRPC_DEFAULT_OPTIONS",
        f"grpc.keepalive_time_ms={ping_ms},grpc.keepalive_timeout_ms={ping_ms},"
        "grpc.keepalive_permit_without_calls=1,grpc.http2.max_pings_without_data=0",
    )


def task_device(job: str, task: int, device: str = "CPU:0") -> str:
    """The full name of a device of a cluster task, e.g. ``/job:worker/replica:0/task:1/device:CPU:0``."""
    return f"/job:{job}/replica:0/task:{task}/device:{device}"


def _call_with_deadline(fn: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
    """Runs ``fn`` in a daemon thread; ``(finished, result_or_exception)`` after at most ``timeout``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the caller
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True, name="pipeline-probe")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, None
    return True, box.get("error", box.get("result"))


def wait_for_tasks(spec: tf.train.ClusterSpec, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Waits until every task's port accepts connections (workers may still be starting).

    Raises:
        ClusterError: naming the first task whose port stayed closed for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    for job in [j for j in spec.jobs if j != "localhost"]:
        for task, address in enumerate(spec.job_tasks(job)):
            while not _reachable(address, 1.0):
                if time.monotonic() >= deadline:
                    raise ClusterError(
                        f"task /job:{job}/task:{task} at {address} did not accept connections within "
                        f"{timeout:g} s; start `pipeline worker --cluster ... --task {task}` there "
                        "(and check the host and port)"
                    )
                time.sleep(0.2)


def probe(spec: tf.train.ClusterSpec, timeout: float = DEFAULT_TIMEOUT, jobs: list[str] | None = None) -> None:
    """Runs a tiny op on every task; fails naming the first task that does not answer in time.

    Raises:
        ClusterError: ``/job:worker/task:1 at host:port did not answer within 30 s``.
    """
    for job in jobs or [j for j in spec.jobs if j != "localhost"]:
        for task, address in enumerate(spec.job_tasks(job)):
            def op(job: str = job, task: int = task) -> Any:
                with tf.device(task_device(job, task)):
                    return (tf.constant(1.0) + 1.0).numpy()

            done, value = _call_with_deadline(op, timeout)
            if not done:
                raise ClusterError(
                    f"task /job:{job}/task:{task} at {address} did not answer within {timeout:g} s; "
                    "is `pipeline worker` running there and the port reachable?"
                )
            if isinstance(value, BaseException):
                raise ClusterError(
                    f"task /job:{job}/task:{task} at {address} is not reachable: "
                    f"{str(value).splitlines()[0] if str(value) else type(value).__name__}"
                ) from value


def connect(cluster: str | Resolver | Mapping[str, Any] | None = None, job: str = DEFAULT_JOB,
            timeout: float = DEFAULT_TIMEOUT, allow_wildcard: bool = False,
            watchdog: bool = True, address: str | None = None) -> tf.train.ClusterSpec:
    """Connects this (trainer) process to the cluster and checks every task answers.

    After it returns, devices such as ``/job:worker/task:1/device:CPU:0`` can hold
    stages. The trainer itself joins as ``/job:localhost``, serving at ``address``:
    the workers fetch its tensors (inputs, variables) from there.

    Args:
        cluster: anything :func:`resolver_from` accepts.
        job: the job whose tasks hold stages (for host lists and SLURM).
        timeout: seconds a task may stay silent before failing (probe and watchdog).
        allow_wildcard: accept wildcard addresses in the spec.
        watchdog: start a :class:`Watchdog` that aborts the process when a task dies.
        address: ``host`` or ``host:port`` the workers reach this trainer at (default
            ``$PIPELINE_CLUSTER_ADDRESS``, else this host's address on the route to the first
            task and a free port; see :func:`pipeline.dist.addresses.trainer_address`).

    Returns:
        The cluster spec connected to (without the trainer's ``localhost`` job).

    Raises:
        ClusterError: a wildcard address, or a task that does not answer within ``timeout``.
    """
    resolver = resolver_from(cluster, job)
    spec = resolver.cluster_spec()
    check_addresses(spec, allow_wildcard)
    wait_for_tasks(spec, timeout)
    set_grpc_options(timeout)
    tf.config.experimental.set_synchronous_execution(True)  # errors surface at the failing op
    # TF's default for its own job, localhost:<port>, is unreachable from workers on other hosts.
    _state["trainer"] = trainer_address(spec, address)
    full = tf.train.ClusterSpec({**spec.as_dict(), "localhost": [_state["trainer"]]})
    tf.config.experimental_connect_to_cluster(full, job_name="localhost", protocol="grpc")
    probe(spec, timeout)
    if watchdog:
        Watchdog(spec, timeout).start()
    return spec


_TASK_RE = re.compile(r"/job:([\w-]+)/replica:\d+/task:(\d+)")
_PEER_RE = re.compile(r"ipv[46]:(\[[^\]]+\]|[\d.]+):(\d+)")
_state: dict[str, str] = {}
"""``trainer``: the address this process serves the cluster at (set by :func:`connect`)."""
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                tf.errors.CancelledError, tf.errors.InternalError, tf.errors.NotFoundError)


@contextlib.contextmanager
def guard(spec: tf.train.ClusterSpec) -> Iterator[None]:
    """Turns TF errors caused by a lost task into a :class:`ClusterError` that names it.

    Example::

        with cluster.guard(spec):
            model.fit(...)

    Raises:
        ClusterError: ``task /job:worker/task:1 at 127.0.0.1:2223 failed: ...``.
    """
    try:
        yield
    except _PEER_ERRORS as err:
        text = str(err)
        peers = {f"{host.strip('[]')}:{port}" for host, port in _PEER_RE.findall(text)}
        trainer = _state.get("trainer", "")
        if trainer and trainer.replace("[", "").replace("]", "") in peers:
            raise ClusterError(
                f"a worker could not connect back to this trainer at {trainer} ({_reason(text, err)}); set "
                f"{ADDRESS_ENV} to an address of this host that the workers reach (and open its port)") from err
        named = [(job, i) for job in spec.jobs if job != "localhost"
                 for i, addr in enumerate(spec.job_tasks(job)) if addr.replace("[", "").replace("]", "") in peers]
        named += [(m.group(1), int(m.group(2))) for m in _TASK_RE.finditer(text) if m.group(1) != "localhost"]
        if not named and not isinstance(err, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)):
            raise
        where = "a cluster task"
        if named:
            job, task = named[0]
            tasks = spec.job_tasks(job) if job in spec.jobs else []
            address = f" at {tasks[task]}" if task < len(tasks) else ""
            where = f"task /job:{job}/task:{task}{address}"
        raise ClusterError(f"{where} failed or stopped answering ({_reason(text, err)}); "
                           "check that its `pipeline worker` is alive and its host reachable") from err


def _reason(text: str, err: BaseException) -> str:
    """The most telling line of a TF/gRPC error (the connection failure, not "Graph execution error")."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for key in ("failed to connect", "Connection reset", "Socket closed", "UNAVAILABLE", "DEADLINE", "rror"):
        for line in lines:
            if key in line and not line.startswith("Graph execution error"):
                return f"{type(err).__name__}: {line[:300]}"
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def connect_from_env() -> tf.train.ClusterSpec | None:
    """Connects when ``$PIPELINE_CLUSTER`` names a cluster (host list, ``tf_config`` or ``slurm``).

    ``$PIPELINE_CLUSTER_TIMEOUT`` (seconds, default 60) bounds how long a task may
    stay silent. Call before building a model whose devices name cluster tasks.

    Returns:
        The connected cluster spec, or ``None`` when the variable is not set.
    """
    value = os.environ.get(CLUSTER_ENV)
    if not value:
        return None
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        raise ClusterError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} must be a number of seconds") from None
    return connect(value, timeout=timeout)


class Watchdog(threading.Thread):
    """Aborts the process, naming the task, when a cluster task stops accepting connections.

    A TF op waiting on a dead remote task can block inside C++ where no Python
    exception reaches it; this thread checks each task's port every few seconds
    and, once one has been unreachable for ``timeout`` seconds, prints which task
    and exits the process with status ``exit_code``.

    Args:
        spec: the cluster spec to watch (``localhost`` job excluded).
        timeout: seconds of unreachability before aborting.
        interval: seconds between checks.
        exit_code: process exit status on abort (69, EX_UNAVAILABLE; 75 means "preempted").
    """

    def __init__(self, spec: tf.train.ClusterSpec, timeout: float = DEFAULT_TIMEOUT,
                 interval: float | None = None, exit_code: int = 69):
        super().__init__(daemon=True, name="pipeline-cluster-watchdog")
        self.tasks = [(job, i, addr) for job in spec.jobs if job != "localhost"
                      for i, addr in enumerate(spec.job_tasks(job))]
        self.timeout = timeout
        self.interval = interval or max(0.5, min(5.0, timeout / 4))
        self.exit_code = exit_code
        self.stop_event = threading.Event()

    def stop(self) -> None:
        """Stops watching (e.g. before shutting the workers down on purpose)."""
        self.stop_event.set()

    def run(self) -> None:  # noqa: D102 - thread body
        down_since: dict[int, float] = {}
        while not self.stop_event.wait(self.interval):
            for k, (job, task, address) in enumerate(self.tasks):
                if _reachable(address, self.interval):
                    down_since.pop(k, None)
                    continue
                first = down_since.setdefault(k, time.monotonic())
                if time.monotonic() - first >= self.timeout:
                    self.abort(f"task /job:{job}/task:{task} at {address} stopped answering "
                                f"(unreachable for {self.timeout:g} s); aborting the run")

    def abort(self, message: str) -> None:
        if self.stop_event.is_set():
            return
        print(f"pipeline: ClusterError: {message}", file=sys.stderr, flush=True)
        _compat.hard_exit(self.exit_code)  # the main thread may be blocked inside TF
