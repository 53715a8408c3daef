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


def trace_actions(logdir: str) -> tuple[list[sim.Interval], dict[str, Any]]:
    """Reads the newest profiler trace under ``logdir``: when each action's ops ran.

    Returns:
        The intervals (each action from its first op, or from when the action
        it depends on ended if that is later, to its last op; seconds from the
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
                name = _action_of(plane.event_metadata[event.metadata_id].name)
                if name is None:
                    continue
                start = line.timestamp_ns * 1e-9 + event.offset_ps * 1e-12
                end = start + event.duration_ps * 1e-12
                span = spans.setdefault(name, [start, end])
                span[0], span[1] = min(span[0], start), max(span[1], end)
                per_thread.setdefault(line.name, []).append((start, end))
    if not spans:
        raise MeasureError(f"the trace under {logdir!r} has no action ops (act<stage><op><microbatch>/...)")
    ends = {sched.Action.parse(a): e for a, (_, e) in spans.items()}
    num_stages = 1 + max(a.stage for a in ends)
    timeline = []
    for name, (start, end) in spans.items():
        action = sched.Action.parse(name)
        # Ops that need no input (variable reads) run early; the action starts when its input exists.
        ready = max([start] + [ends[d] for d in sched.dependencies(action, num_stages) if d in ends])
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
    import keras
    import tensorflow as tf

    from pipeline.core import microbatch as mb_lib
    from pipeline.core.executor import Executor

    executor = Executor(stages, schedule, num_microbatches)  # names each action's ops act<action>/...
    loss_obj = keras.losses.get(loss) if isinstance(loss, str) else loss
    loss_fn = mb_lib.microbatch_loss(loss_obj, tf.convert_to_tensor(y), None, num_microbatches,
                                     mb_lib.batch_size(x))

    @tf.function
    def step(inp):
        result = executor.train(inp, loss_fn)
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

    step = executor_step(stages, x, y, loss, schedule, num_microbatches)
    elapsed = median_time(step, steps)
    logdir = tempfile.mkdtemp(prefix="pipeline-trace-")
    tf.profiler.experimental.start(logdir)
    try:
        wait_for(step())
    finally:
        tf.profiler.experimental.stop()
    timeline, threads = trace_actions(logdir)
    return elapsed, timeline, threads
