"""Real action timelines: build each action under a name scope, profile a step, read when each action ran.

An action's ops are named ``act<stage><op><microbatch>/...`` and the VJP ops of
a forward ``gradient_tape/act<stage>F<j>/...`` (TensorFlow prefixes gradient ops
with the forward op's scope), so one profiler trace gives every action's span
on its device and how long both devices' threads were busy at once::

    trace (per thread):  |act0F0 ops|act0F1 ops|grad/act0F0 ops| ...
    timeline:            0F0 [0.0, 1.1]  0F1 [1.1, 2.0]  0B0 [2.0, 3.9] ...
"""

from __future__ import annotations

import glob
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

from pipeline.core import schedule as sched
from pipeline.perf import simulate as sim
from pipeline.perf.measure import median_time, wait_for

from pipeline.errors import MeasureError


_ACT = re.compile(r"^(gradient_tape/)?(?:.*/)?act(\d+)([FBW])(\d+)/")


def _action_of(op_name: str) -> str | None:
    """``act1B0/...`` -> ``"1B0"``; ``gradient_tape/act1F0/...`` (the VJP of 1F0's ops) -> ``"1B0"``."""
    match = _ACT.match(op_name)
    if not match:
        return None
    op = "B" if match.group(1) and match.group(3) == "F" else match.group(3)
    return f"{match.group(2)}{op}{match.group(4)}"


def trace_actions(logdir: str, schedule: sched.Schedule | None = None) -> tuple[list[sim.Interval], dict[str, Any]]:
    """Reads the newest profiler trace under ``logdir``: when each action's ops ran.

    Args:
        logdir: the profiler's log folder.
        schedule: the step's rows (devices), if known: an action then also waits for the action before it in
            its row (the executor chains each device's actions).

    Returns:
        The intervals (each action from its first op, or from when the action
        its prerequisites ended if that is later, to its last op; seconds from the
        first action's start) and per-thread busy seconds plus the
        seconds during which two or more threads ran ops at once (``overlap``).
    """
    from pipeline.core import _compat

    paths = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))
    if not paths:
        raise MeasureError(f"no profiler trace under {logdir!r}")
    space = _compat.read_xspace(paths[-1])
    spans: dict[str, list[float]] = {}
    per_thread: dict[str, list[tuple[float, float]]] = {}
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                full = plane.event_metadata[event.metadata_id].name
                name = _action_of(full)
                if name is None:
                    continue
                start = line.timestamp_ns * 1e-9 + event.offset_ps * 1e-12
                end = start + event.duration_ps * 1e-12
                per_thread.setdefault(line.name, []).append((start, end))
                if full.rsplit(":", 1)[-1] in _COPY_TYPES:  # a copy to the next device runs when the runtime
                    continue  # gets to it: the transfer's time, not the action's
                span = spans.setdefault(name, [start, end])
                span[0], span[1] = min(span[0], start), max(span[1], end)
    if not spans:
        raise MeasureError(f"the trace under {logdir!r} has no action ops (act<stage><op><microbatch>/...)")
    ends = {sched.Action.parse(a): e for a, (_, e) in spans.items()}
    num_stages = 1 + max(a.stage for a in ends)
    before = {a: row[i - 1] for row in schedule or [] for i, a in enumerate(row) if i}
    timeline = []
    for name, (start, end) in spans.items():
        action = sched.Action.parse(name)
        # Ops that need no input (variable reads, label casts, the micro-batch's slice of the input) run early;
        # the action starts when its prerequisites (the input, and for B its own F, for W its B) and the
        # action before it on its device have finished.
        waits = sched.prerequisites(action, num_stages) + ([before[action]] if action in before else [])
        ready = max([start] + [ends[d] for d in waits if d in ends])
        timeline.append(sim.Interval(action, min(ready, end), end))
    origin = min(iv.start for iv in timeline)
    timeline = sorted((sim.Interval(iv.action, iv.start - origin, iv.end - origin) for iv in timeline),
                      key=lambda iv: (iv.start, iv.action.stage))
    merged = {name: _union(intervals) for name, intervals in per_thread.items()}
    busy = {name: sum(e - s for s, e in ivs) for name, ivs in merged.items()}
    edges = sorted((when, delta) for ivs in merged.values() for s, e in ivs for when, delta in ((s, 1), (e, -1)))
    overlap, running, last = 0.0, 0, 0.0
    for when, delta in edges:
        if running >= 2:
            overlap += when - last
        running, last = running + delta, when
    return timeline, {"threads": busy, "overlap": overlap}


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def executor_step(stages: Sequence[Any], x: Any, y: Any, loss: Any, schedule: str,
                  num_microbatches: int) -> Callable[[], Any]:
    """A compiled pipelined step without the optimizer: every micro-batch forward and back, as ``fit`` runs it.


    Returns:
        A function of no arguments running one step (traced on its first call),
        returning the loss and the accumulated gradients.
    """
    return _executor_and_step(stages, x, y, loss, schedule, num_microbatches)[1]


def _executor_and_step(stages: Sequence[Any], x: Any, y: Any, loss: Any, schedule: str,
                       num_microbatches: int) -> tuple[Any, Callable[[], Any]]:
    """The :class:`~pipeline.core.executor.Executor` of :func:`executor_step` and its compiled step."""
    import keras
    import tensorflow as tf

    from pipeline.core import microbatch as mb_lib
    from pipeline.core.executor import Executor

    executor = Executor(stages, schedule, num_microbatches)  # names each action's ops act<action>/...
    loss_obj = keras.losses.get(loss) if isinstance(loss, str) else loss
    loss_fn = mb_lib.microbatch_loss(loss_obj, tf.convert_to_tensor(y), None, num_microbatches,
                                     mb_lib.batch_size(x))
    return executor, compiled_step(executor, x, loss_fn)


def compiled_step(executor: Any, x: Any, loss_fn: Callable[[int, Any], Any],
                  regularize: bool = True) -> Callable[[], Any]:
    """``executor.train(x, loss_fn)`` as one ``tf.function`` (no optimizer): a function of no arguments
    running one step (traced on its first call) and returning the loss and the accumulated gradients."""
    import tensorflow as tf

    @tf.function
    def step(inp):
        result = executor.train(inp, loss_fn, regularize=regularize)
        return result.loss, result.gradients

    return lambda: step(x)


def run_measured(stages: Sequence[Any], x: Any, y: Any, loss: Any, schedule: str, num_microbatches: int,
                 steps: int = 5) -> tuple[float, list[sim.Interval], dict[str, Any]]:
    """Runs real pipelined steps (forward and backward, no optimizer update), then one under the profiler.

    Returns:
        The median step time (seconds, wall clock around the ``tf.function``
        call, unprofiled), the timeline of the profiled step (see
        :func:`trace_actions`) and its thread statistics.
    """
    import tensorflow as tf

    from pipeline.core import traced

    with traced.inlined():  # the stages' ops keep their action scopes in the trace
        executor, step = _executor_and_step(stages, x, y, loss, schedule, num_microbatches)
        elapsed = median_time(step, steps)
        logdir = tempfile.mkdtemp(prefix="pipeline-trace-")
        tf.profiler.experimental.start(logdir)
        try:
            wait_for(step())
        finally:
            tf.profiler.experimental.stop()
    timeline, threads = trace_actions(logdir, executor.train_schedule)
    return elapsed, timeline, threads


# ----------------------------------------------------------------------------- where a step's time goes

_CALL_EVENTS = ("PartitionedCallOp", "FunctionRun", "ExecutorDoneCallback")
_COPY_TYPES = ("_Send", "_Recv", "_HostSend", "_HostRecv", "Send", "Recv")
_ACT_SCOPE = re.compile(r"(?:^|/)act(\d+)([FBW])\d+/")
_ACCUMULATE = re.compile(r"(?:^|/)act\d+[BW]\d+/add(_\d+)?$")
_PLAIN_ADD = re.compile(r"(?:^|/)add(_\d+)?$")
CATEGORIES = ("forward", "backward", "loss", "accumulate", "copy", "optimizer", "other")
"""Op categories of :func:`profile_categories`, in table order."""


def op_category(name: str, op_type: str, stage_pattern: re.Pattern | None = None) -> tuple[str, int | None]:
    """(category, stage or None) of one profiled op (``name`` without the ``:Type`` suffix).

    The stage comes from the action scope ``act<stage><op><j>/`` or, for ops of a stage's own layers (the
    executor may run a stage as a traced function, whose ops lose the caller's scope), from
    ``stage_pattern``'s first group matched on a layer name.
    """
    act = _ACT_SCOPE.search(name)
    stage = int(act.group(1)) if act else None
    if stage is None and stage_pattern is not None:
        layer = stage_pattern.search(name)
        stage = int(layer.group(1)) if layer else None
    lower = name.lower()
    if op_type in _COPY_TYPES or "memcpy" in op_type.lower():
        return "copy", stage
    if op_type in ("AddV2", "Add", "AddN") and (_ACCUMULATE.search(name) or (
            stage is None and _PLAIN_ADD.search(name))):  # gradient sums: in a backward, or a traced add_all
        return "accumulate", stage
    if "/sgd/" in lower or "optimizer" in lower or op_type.startswith("ResourceApply") or (
            op_type in ("AssignSubVariableOp", "AssignAddVariableOp") and stage is None):
        return "optimizer", stage
    if "compile_loss" in lower or "/loss/" in lower:
        return "loss", stage
    if stage is not None:
        backward = ("gradients/" in lower or "_grad/" in lower or "gradient_tape" in lower
                    or bool(act and act.group(2) != "F"))
        return ("backward" if backward else "forward"), stage
    return "other", None


def profile_categories(logdir: str, steps: int, stage_pattern: re.Pattern | None = None) -> dict[str, Any]:
    """Reads the newest profiler trace under ``logdir``: ms per step in each op category, per stage, per thread.

    Args:
        logdir: where ``tf.profiler.experimental`` wrote the trace of ``steps`` steps.
        steps: how many steps the trace holds (every figure is divided by it).
        stage_pattern: see :func:`op_category`.

    Returns:
        ``{"categories": {category: {stage or "-": ms}}, "threads": {thread: {"kernels", "executor",
        "idle"}: ms}, "span": ms, "ops": ops per step, "function_calls": nested function calls per step,
        "function_call_ms": {runtime event: ms}}``: kernel time by category (thread time: ops of both
        devices run on the shared inter-op threads), and per executor thread the time in op kernels, in the
        executor's own bookkeeping around them (``ExecutorState::Process`` minus its ops: op dispatch) and idle.
    """
    from pipeline.core import _compat

    paths = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))
    if not paths:
        raise MeasureError(f"no profiler trace under {logdir!r}")
    space = _compat.read_xspace(paths[-1])
    cats: dict[str, dict[str, float]] = {c: {} for c in CATEGORIES}
    threads: dict[str, dict[str, list[tuple[float, float]]]] = {}
    ops, count = 0, 0
    calls: dict[str, float] = {}
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            spans = threads.setdefault(line.name, {"ops": [], "process": []})
            for event in line.events:
                full = plane.event_metadata[event.metadata_id].name
                start = line.timestamp_ns * 1e-9 + event.offset_ps * 1e-12
                end = start + event.duration_ps * 1e-12
                if full.startswith("ExecutorState::Process"):
                    spans["process"].append((start, end))
                    continue
                if full in _CALL_EVENTS:  # the runtime's work to call a nested function (one per traced call)
                    calls[full] = calls.get(full, 0.0) + (end - start) * 1e3 / steps
                    count += full == "PartitionedCallOp"
                    continue
                if ":" not in full or "::" in full:
                    continue
                name, op_type = full.rsplit(":", 1)
                category, stage = op_category(name, op_type, stage_pattern)
                key = "-" if stage is None else str(stage)
                cats[category][key] = cats[category].get(key, 0.0) + (end - start) * 1e3 / steps
                spans["ops"].append((start, end))
                ops += 1
    every = [iv for spans in threads.values() for ivs in spans.values() for iv in ivs]
    if not every:
        raise MeasureError(f"the trace under {logdir!r} has no TensorFlow executor events")
    span = max(e for _, e in every) - min(s for s, _ in every)
    per_thread = {}
    for name, spans in threads.items():
        kernels = sum(e - s for s, e in _union(spans["ops"]))
        process = sum(e - s for s, e in _union(spans["process"] + spans["ops"]))
        per_thread[name] = {"kernels": kernels * 1e3 / steps, "executor": (process - kernels) * 1e3 / steps,
                            "idle": (span - process) * 1e3 / steps}
    return {"categories": cats, "threads": per_thread, "span": span * 1e3 / steps, "ops": ops / steps,
            "function_calls": count / steps, "function_call_ms": calls}


def profile_fit(model: Any, x: Any, y: Any, steps: int = 3, stage_pattern: re.Pattern | None = None) -> dict[str, Any]:
    """Profiles ``steps`` real ``fit`` steps of a compiled (and already traced) model: :func:`profile_categories`."""
    import tensorflow as tf

    data = tf.data.Dataset.from_tensors((x, y))
    model.fit(data.repeat(2), epochs=1, verbose=0, shuffle=False)  # traced and warm
    logdir = tempfile.mkdtemp(prefix="pipeline-trace-")
    tf.profiler.experimental.start(logdir)
    try:
        model.fit(data.repeat(steps), epochs=1, verbose=0, shuffle=False)
    finally:
        tf.profiler.experimental.stop()
    return profile_categories(logdir, steps, stage_pattern)
