"""Data parallelism across pipeline replicas: Horovod (or none), broadcast of state, one all-reduce per step."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

import keras
import tensorflow as tf

from pipeline.dist.addresses import interface_of, route_source
from pipeline.errors import PipelineError, ReplicaError, SettingError, check_count

BACKENDS = ("auto", "horovod", "none")
STALL_CHECK_SECONDS = 60
"""Default ``HOROVOD_STALL_CHECK_TIME_SECONDS``: warn when a rank has not joined a collective for this long."""
STALL_SHUTDOWN_SECONDS = 300
"""Default ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS``: stop the job (instead of hanging) after this long."""

_LAUNCHER_RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")

_state: dict[str, Any] = {"backend": None, "hvd": None}


def launched_by_horovod() -> bool:
    """Whether this process was started by ``horovodrun`` (Gloo or MPI) or ``mpirun``."""
    return any(os.environ.get(v) for v in _LAUNCHER_RANK_VARS)


def _import_horovod() -> Any:
    try:
        import horovod.tensorflow as hvd  # noqa: PLC0415 - optional dependency
    except ImportError as err:
        raise ReplicaError(
            "Horovod is not importable in this Python "
            f"({err}); install it with `bash launch/install_horovod.sh {sys.executable}`"
        ) from err
    return hvd


def init(backend: str | None = None, stall_check_seconds: int | None = None,
         stall_shutdown_seconds: int | None = None) -> str:
    """Chooses and starts the replica backend (idempotent).

    Args:
        backend: default ``$PIPELINE_REPLICAS`` or ``"auto"``. ``"auto"`` (Horovod when started by ``horovodrun``/``mpirun``,
            else ``"none"``), ``"horovod"`` (required; fails if not importable),
            or ``"none"`` (a single replica).
        stall_check_seconds: Horovod stall warning after this many seconds
            (default: ``HOROVOD_STALL_CHECK_TIME_SECONDS`` or 60).
        stall_shutdown_seconds: Horovod stops the job when a rank stalls this long
            (default: ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`` or 300), so a dead
            rank ends the run with an error rather than a hang.

    Returns:
        The backend in use: ``"horovod"`` or ``"none"``.

    Raises:
        ReplicaError: an unknown backend, or Horovod asked for but not importable.
    """
    backend = backend or os.environ.get("PIPELINE_REPLICAS", "auto")
    if backend not in BACKENDS:
        raise ReplicaError(f"replicas backend {backend!r} is not one of {BACKENDS}")
    if _state["backend"] is not None:
        return _state["backend"]
    if backend == "none" or (backend == "auto" and not launched_by_horovod()):
        _state["backend"] = "none"
        return "none"
    hvd = _import_horovod()
    if not launched_by_horovod() and os.environ.get("SLURM_PROCID") is not None:
        _slurm_gloo_rendezvous()
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS",
                          str(stall_check_seconds or STALL_CHECK_SECONDS))
    os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
                          str(stall_shutdown_seconds or STALL_SHUTDOWN_SECONDS))
    hvd.init()
    _state.update(backend="horovod", hvd=hvd)
    return "horovod"


RENDEZVOUS_PORT = 29400


def _slurm_gloo_rendezvous() -> None:
    """Plain ``srun`` + Gloo: Horovod's environment from SLURM's; rank 0 serves the rendezvous.

    Ranks are SLURM tasks in block order (``SLURM_PROCID``; the same number of tasks on
    every node). Rank 0 serves Horovod's HTTP rendezvous at
    ``$PIPELINE_RENDEZVOUS_ADDR:$PIPELINE_RENDEZVOUS_PORT`` (the first node's address,
    default 127.0.0.1 for one node; port 29400), bound to that address only.
    """
    from horovod.runner.common.util.hosts import SlotInfo  # noqa: PLC0415
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer  # noqa: PLC0415

    env = os.environ
    rank, world = int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", "1"))
    nodes = int(env.get("SLURM_NNODES", "1"))
    if world % nodes:
        raise ReplicaError(f"srun started {world} tasks on {nodes} nodes; use the same number per node")
    per_node = world // nodes
    addr = env.get("PIPELINE_RENDEZVOUS_ADDR") or ("127.0.0.1" if nodes == 1 else "")
    if not addr:
        raise ReplicaError("srun with Gloo on several nodes: set PIPELINE_RENDEZVOUS_ADDR to the first "
                           "node's address (slurm/replicas.sbatch does)")
    port = int(env.get("PIPELINE_RENDEZVOUS_PORT", RENDEZVOUS_PORT))
    names = _slurm_node_names(nodes)
    plan = [SlotInfo(hostname=names[r // per_node], rank=r, local_rank=r % per_node,
                     cross_rank=r // per_node, size=world, local_size=per_node, cross_size=nodes)
            for r in range(world)]
    mine = plan[rank]
    env.update({
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": addr, "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_HOSTNAME": mine.hostname,
        "HOROVOD_RANK": str(rank), "HOROVOD_SIZE": str(world), "HOROVOD_LOCAL_RANK": str(mine.local_rank),
        "HOROVOD_LOCAL_SIZE": str(per_node), "HOROVOD_CROSS_RANK": str(mine.cross_rank),
        "HOROVOD_CROSS_SIZE": str(nodes),
    })
    if _is_loopback(addr):
        env.setdefault("HOROVOD_GLOO_IFACE", "lo")
    elif not env.get("HOROVOD_GLOO_IFACE"):  # else Gloo may advertise the host name's address (often loopback)
        try:
            source = route_source(addr, port)
        except PipelineError as err:
            raise ReplicaError(f"rank {rank}: the Gloo rendezvous {addr}:{port} is not reachable: {err}") from err
        iface = interface_of(source)
        if iface is None:
            raise ReplicaError(f"rank {rank}: no network interface holds {source}, this host's address towards "
                               f"the rendezvous {addr}:{port}; set HOROVOD_GLOO_IFACE to the cluster interface")
        env["HOROVOD_GLOO_IFACE"] = iface
    if not _is_loopback(addr) and _is_loopback(socket.gethostname()):
        # Horovod 0.28.1 builds the Gloo context of its process sets (every collective uses one) without
        # HOROVOD_GLOO_IFACE, on the address the host name resolves to: loopback can't reach other nodes.
        raise ReplicaError(f"rank {rank}: this node's host name {socket.gethostname()!r} resolves to a loopback "
                           "address, so Horovod's Gloo (0.28.1) would offer 127.0.0.1 to the other nodes; make the "
                           "host name resolve to the node's cluster-network address (/etc/hosts or DNS)")
    if rank == 0:
        try:
            server = RendezvousHTTPServer((addr, port), RendezvousHandler, 0)
        except OSError as err:
            raise ReplicaError(f"rank 0 cannot serve the Gloo rendezvous on {addr}:{port}: {err}; "
                               "set PIPELINE_RENDEZVOUS_ADDR/PIPELINE_RENDEZVOUS_PORT") from err
        server.init(plan)
        threading.Thread(target=server.serve_forever, daemon=True, name="gloo-rendezvous").start()
        _state["rendezvous"] = server
    else:
        deadline = time.monotonic() + float(env.get("HOROVOD_GLOO_TIMEOUT_SECONDS", "60"))
        while True:
            try:
                socket.create_connection((addr, port), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise ReplicaError(f"rank {rank}: the Gloo rendezvous at {addr}:{port} (served by rank 0) "
                                       "did not answer; is rank 0 running?") from None
                time.sleep(0.2)


def _is_loopback(host: str) -> bool:
    try:
        return all(info[4][0].startswith("127.") or info[4][0] == "::1"
                   for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except socket.gaierror:
        return False


def _slurm_node_names(nodes: int) -> list[str]:
    """The step's node names in SLURM order (Gloo resolves them; rank r runs on node r // per_node)."""
    own = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    if nodes == 1:
        return [own]
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if nodelist and "[" not in nodelist:  # a plain list ("n1,n2") needs no expansion
        out = [name.strip() for name in nodelist.split(",") if name.strip()]
        if len(out) != nodes:
            raise ReplicaError(f"SLURM node list {nodelist!r} has {len(out)} nodes, SLURM_NNODES says {nodes}")
        return out
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        raise ReplicaError(f"cannot expand the SLURM node list {nodelist!r} with scontrol: {err}") from err
    if len(out) != nodes:
        raise ReplicaError(f"SLURM node list {nodelist!r} has {len(out)} nodes, SLURM_NNODES says {nodes}")
    return out


def backend() -> str:
    """The backend in use (starting ``"auto"`` if :func:`init` was not called)."""
    return init()


def _hvd() -> Any:
    init()
    return _state["hvd"]


def rank() -> int:
    """This replica's index, 0 .. size()-1."""
    hvd = _hvd()
    return int(hvd.rank()) if hvd else 0


def size() -> int:
    """How many pipeline replicas train together."""
    hvd = _hvd()
    return int(hvd.size()) if hvd else 1


def local_rank() -> int:
    """This replica's index among the replicas of its host."""
    hvd = _hvd()
    return int(hvd.local_rank()) if hvd else 0


def is_chief() -> bool:
    """Whether this replica writes checkpoints, logs and metrics (rank 0)."""
    return rank() == 0


# --------------------------------------------------------------------------- gradients


def allreduce_gradients(grads: Sequence[tf.Tensor], variables: Sequence[Any]) -> list[tf.Tensor]:
    """Averages the accumulated gradients over all replicas.

    One grouped all-reduce per stage device, issued on that device, so each
    stage's gradients are reduced where they live. With one replica it returns
    the gradients unchanged.

    Args:
        grads: accumulated float32 gradients, one per variable.
        variables: the matching variables (their device picks the group).

    Returns:
        The averaged gradients, in the same order.
    """
    hvd = _hvd()
    if hvd is None or hvd.size() == 1:
        return list(grads)
    groups: dict[str, list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault(g.device or "", []).append(i)
    out: list[tf.Tensor | None] = [None] * len(grads)
    for k, (device, idx) in enumerate(sorted(groups.items())):
        with tf.device(device or None):
            reduced = hvd.grouped_allreduce([grads[i] for i in idx], op=hvd.Average,
                                            name=f"pipeline_grads_{k}")
        for i, r in zip(idx, reduced):
            out[i] = r
    return out  # type: ignore[return-value]


def reducer() -> Any:
    """The ``gradient_reducer`` for :class:`pipeline.PipelineModel`, or ``None`` for one replica.

    Example::

        replicas.init()
        model = PipelineModel(stages, gradient_reducer=replicas.reducer())
    """
    return allreduce_gradients if size() > 1 else None


# --------------------------------------------------------------------------- state


def state_variables(model: keras.Model) -> list[Any]:
    """Every variable a replica must share: model weights (trainable or not) and optimizer state."""
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        variables += list(optimizer.variables)
    return variables


def broadcast_state(model: keras.Model, root: int = 0) -> None:
    """Copies rank ``root``'s weights and optimizer state to every replica.

    Keras 3 variables are broadcast by value and assigned (Horovod's
    ``broadcast_variables`` expects TF variables). Call after building and
    compiling the model (and after restoring a checkpoint), before training.
    """
    hvd = _hvd()
    if hvd is None or hvd.size() == 1:
        return
    for i, variable in enumerate(state_variables(model)):
        value = variable.value if hasattr(variable, "value") else variable
        with tf.device(value.device or None):
            shared = hvd.broadcast(tf.convert_to_tensor(value), root_rank=root, name=f"pipeline_state_{i}")
        variable.assign(shared)


def agree(flag: bool) -> bool:
    """True on every replica when ``flag`` is true on any (e.g. "stop now")."""
    hvd = _hvd()
    if hvd is None or hvd.size() == 1:
        return bool(flag)
    total = hvd.allreduce(tf.constant([1 if flag else 0], tf.int32), op=hvd.Sum, name="pipeline_agree")
    return bool(int(total.numpy()[0]) > 0)


def barrier() -> None:
    """Waits until every replica reaches this point."""
    hvd = _hvd()
    if hvd is not None and hvd.size() > 1:
        hvd.allreduce(tf.constant([0], tf.int32), op=hvd.Sum, name="pipeline_barrier")


# --------------------------------------------------------------------------- data


def shard(data: Any, index: int | None = None, count: int | None = None) -> Any:
    """This replica's share of the data (the one sharding rule: example ``i`` goes to replica ``i mod count``).

    A ``tf.data.Dataset`` is sharded element-wise (``dataset.shard(count, index)``)
    before batching, so replica r of R sees elements r, r+R, ...: batching each
    shard with batch size B gives, step by step, the same global batches of R*B
    elements as one process batching the whole dataset by R*B. Arrays (or nests
    of arrays) take every R-th row.

    Args:
        data: an unbatched ``tf.data.Dataset``, or an array / nest of arrays.
        index: shard index (default: :func:`rank`).
        count: number of shards (default: :func:`size`).

    Raises:
        SettingError: ``count`` is not an integer >= 1, or ``index`` is not in ``[0, count)``.
    """
    index = rank() if index is None else index
    count = check_count("count", size() if count is None else count)
    if not 0 <= index < count:
        raise SettingError(f"shard index {index} must be in [0, {count})")
    if count == 1:
        return data
    if isinstance(data, tf.data.Dataset):
        return data.shard(count, index)
    return tf.nest.map_structure(lambda a: a[index::count], data)


def shard_size(total: int, index: int, count: int) -> int:
    """How many of ``total`` examples :func:`shard` gives to replica ``index`` of ``count``."""
    return len(range(index, total, count))


# --------------------------------------------------------------------------- callbacks


class BroadcastState(keras.callbacks.Callback):
    """Broadcasts rank 0's weights and optimizer state when training begins."""

    def on_train_begin(self, logs: dict | None = None) -> None:  # noqa: D102
        broadcast_state(self.model)


class AgreeToStop(keras.callbacks.Callback):
    """Makes every replica stop when any one wants to (``model.stop_training`` or a signal).

    Put it before callbacks that act on the stop (e.g. the checkpoint callback).

    Args:
        should_stop: optional ``() -> bool`` checked each batch (e.g. a preemption flag).
        on_stop: optional ``() -> None`` called on every replica once they agree to stop
            (e.g. mark the preemption as requested, so every rank checkpoints and exits alike).
        every: check every this many batches (one tiny all-reduce each time).
    """

    def __init__(self, should_stop: Any = None, on_stop: Any = None, every: int = 1):
        super().__init__()
        self.should_stop = should_stop
        self.on_stop = on_stop
        self.every = max(1, int(every))
        self.stopped_by_peer = False

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:  # noqa: D102
        if (batch + 1) % self.every:
            return
        local = bool(self.model.stop_training) or bool(self.should_stop and self.should_stop())
        if agree(local):
            self.stopped_by_peer = not local
            if self.on_stop is not None:
                self.on_stop()
            self.model.stop_training = True


class AverageMetrics(keras.callbacks.Callback):
    """Averages the epoch's logged metrics over replicas, so rank 0 logs global figures.

    Keras metrics are per replica; with equal per-replica batches the average of
    the replicas' means is the mean over the global batch. Updates ``logs`` in
    place, so callbacks after it (History, CSV/metrics writers) see the averages.
    """

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        if logs:
            logs.update(average_logs(logs))


def average_logs(logs: dict) -> dict:
    """``logs`` with every numeric value averaged over the replicas (one all-reduce)."""
    hvd = _hvd()
    keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float)) or hasattr(v, "__float__"))
    if hvd is None or hvd.size() == 1 or not keys:
        return dict(logs)
    values = tf.constant([float(logs[k]) for k in keys], tf.float64)
    averaged = hvd.allreduce(values, op=hvd.Average, name="pipeline_logs").numpy()
    return {**logs, **{k: float(v) for k, v in zip(keys, averaged)}}


def callbacks(should_stop: Any = None, on_stop: Any = None) -> list[keras.callbacks.Callback]:
    """The callbacks replicas need in ``fit``: state broadcast, agreement on stopping, metric averages.

    Put them first in the callback list, so writers and checkpointers that follow
    see averaged logs and the agreed stop. Empty for a single replica.
    """
    if size() == 1:
        return []
    return [BroadcastState(), AgreeToStop(should_stop, on_stop), AverageMetrics()]


class ChiefWriter:
    """Wraps a checkpointer so only rank 0 writes; other ranks count steps but skip ``save``.

    Every attribute but ``save`` is the wrapped object's (restore reads the shared
    run folder on every rank).
    """

    def __init__(self, checkpointer: Any):
        self.inner = checkpointer

    def save(self, *args: Any, **kwargs: Any) -> str:
        """Saves on rank 0; on other ranks a no-op returning ``""``."""
        return self.inner.save(*args, **kwargs) if is_chief() else ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
