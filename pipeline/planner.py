"""``pipeline plan``: measure stage costs, predict step time and bubble per schedule and M, draw the schedule.

Predicted (simulator, from measured per-stage costs) over measured (timestamps
of every action of real steps, ``--measure``)::

    predicted 0.41 s  device 0: |F0-F1-F2-F3-   B0---F4-B1---...|
                      device 1: |   F0-F1-B0---F1-B1---F2-...   |
    measured  0.43 s  device 0: |F0-F1--F2-F3-   B0----F4-...   |
                      device 1: |    F0-F1-B0----F1-B1---...    |
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

from pipeline import schedule as sched
from pipeline import simulate as sim

DEFAULT_MICROBATCHES = (1, 2, 4, 8, 16)
SCHEDULES = ("gpipe", "1f1b")


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # trace and warm up
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = fn()
        _wait(out)
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def _wait(out: Any) -> None:
    import tensorflow as tf

    flat = [t for t in tf.nest.flatten(out) if isinstance(t, tf.Tensor)]
    if flat:
        flat[0].numpy()


def _stage_loops(stages: Sequence[Any], x: Any, repeats: int) -> list[tuple[Any, Callable, Callable]]:
    """Per stage: its micro-batch input and two loop bodies (forward; forward+backward) of ``repeats`` runs.

    Each run's input depends on the previous run's outputs by a data edge, so
    grappler can neither drop a run (results used only by control edges become
    NoOps) nor merge two runs.
    """
    import tensorflow as tf

    def nudged(inp: Any, carry: Any) -> Any:
        return tf.nest.map_structure(lambda t: t + tf.cast(carry, t.dtype) if t.dtype.is_floating else t, inp)

    def probe(outs: list[Any]) -> Any:
        return tf.add_n([tf.cast(tf.reshape(o, [-1])[0], tf.float32) for o in outs]) * 1e-30

    loops = []
    for stage in stages:
        layer, device = stage.layer, stage.device
        variables = list(layer.trainable_variables)
        watch = stage.index > 0

        def forward(inp, layer=layer):
            return tf.nest.flatten(layer(inp, training=True))

        def forward_backward(inp, layer=layer, variables=variables, watch=watch):
            sources = [t for t in tf.nest.flatten(inp) if t.dtype.is_floating] if watch else []
            with tf.GradientTape() as tape:
                tape.watch(sources)
                outs = tf.nest.flatten(layer(inp, training=True))
            return tape.gradient(outs, sources + variables, output_gradients=[tf.ones_like(o) for o in outs])

        def loop(body: Callable, device: str = device) -> Callable[[Any], Any]:
            def run(inp):
                with tf.device(device):
                    carry = tf.constant(0.0)
                    for _ in range(repeats):
                        carry = probe([o for o in body(nudged(inp, carry)) if o is not None])
                    return carry
            return run

        with tf.device(device):
            x = tf.nest.map_structure(tf.identity, x)
        loops.append((x, loop(forward), loop(forward_backward)))
        with tf.device(device):
            x = layer(x, training=True)
    return loops


def measure_stage_costs(stages: Sequence[Any], x: Any, repeats: int = 10, calls: int = 3) -> list[sim.StageCost]:
    """Forward and backward seconds of each stage on its device for one micro-batch ``x``, one stage at a time.

    Inside one ``tf.function`` the stage runs ``repeats`` times back to back,
    as its actions run inside a pipelined step: the Python call overhead is
    paid once, not per action. The median of ``calls`` calls is divided by
    ``repeats``. The backward is the VJP of the stage output (input and weight
    gradients), timed as forward+backward minus forward.

    Args:
        stages: :class:`pipeline.stage.Stage` objects (layer and device), built.
        x: one micro-batch of the pipeline's input.
        repeats: stage runs per timed call.
        calls: timed calls; the median is kept.

    Returns:
        One :class:`pipeline.simulate.StageCost` per stage.
    """
    import tensorflow as tf

    costs = []
    for inp, forward, forward_backward in _stage_loops(stages, x, repeats):
        run_f, run_fb = tf.function(forward), tf.function(forward_backward)
        f = _median_time(lambda: run_f(inp), calls) / repeats
        fb = _median_time(lambda: run_fb(inp), calls) / repeats
        costs.append(sim.StageCost(f, max(fb - f, 0.0)))
    return costs


def contention_factor(stages: Sequence[Any], x: Any, repeats: int = 10, calls: int = 3) -> float:
    """How much slower the stages run all at once than the slowest one alone (1.0: no interference).

    Devices that share hardware (logical CPU devices on the same cores, a busy
    machine) slow each other down when the pipeline keeps them all busy; GPUs
    normally do not. Multiply stage costs by this factor to predict steady-state
    pipelined steps on such devices.
    """
    import tensorflow as tf

    loops = _stage_loops(stages, x, repeats)
    alone = []
    for inp, _, forward_backward in loops:
        run = tf.function(forward_backward)
        alone.append(_median_time(lambda: run(inp), calls))
    together = tf.function(lambda inputs: [body(i) for (_, _, body), i in zip(loops, inputs)])
    inputs = [inp for inp, _, _ in loops]
    both = _median_time(lambda: together(inputs), calls)
    return max(1.0, both / max(alone))


def named_executor(stages: Sequence[Any], schedule: str | Callable, num_microbatches: int) -> Any:
    """An :class:`pipeline.executor.Executor` that builds each action under ``tf.name_scope("act<action>")``.

    The ops of action ``1F0`` are then named ``act1F0/...``, so a profiler
    trace tells when each action really ran on which thread (no extra ops).
    """
    import tensorflow as tf

    from pipeline.executor import Executor

    class NamedExecutor(Executor):
        def _run(self, schedule_rows, step):
            def named(action: sched.Action) -> list[Any]:
                with tf.name_scope(f"act{action}"):
                    return step(action)

            return super()._run(schedule_rows, named)

    return NamedExecutor(stages, schedule, num_microbatches)


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
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))
    if not paths:
        raise FileNotFoundError(f"no profiler trace under {logdir!r}")
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as f:
        space.ParseFromString(f.read())
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
        raise ValueError(f"the trace under {logdir!r} has no action ops (act<stage><op><microbatch>/...)")
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


def run_measured(stages: Sequence[Any], x: Any, y: Any, loss: Any, schedule: str, num_microbatches: int,
                 steps: int = 5) -> tuple[float, list[sim.Interval], dict[str, Any]]:
    """Runs real pipelined steps (forward and backward, no optimizer update), then one under the profiler.

    Returns:
        The median step time (seconds, wall clock around the ``tf.function``
        call, unprofiled), the timeline of the profiled step (see
        :func:`trace_actions`) and its thread statistics.
    """
    import keras
    import tensorflow as tf

    from pipeline import microbatch as mb_lib

    executor = named_executor(stages, schedule, num_microbatches)
    loss_obj = keras.losses.get(loss) if isinstance(loss, str) else loss
    total = float(mb_lib.batch_size(x))
    ys = mb_lib.split(tf.convert_to_tensor(y), num_microbatches)

    @tf.function
    def step(inp):
        def loss_fn(j, y_pred):
            size = tf.cast(tf.shape(tf.nest.flatten(y_pred)[0])[0], tf.float32)
            return tf.cast(loss_obj(ys[j], y_pred), tf.float32) * (size / total)

        result = executor.train(inp, loss_fn)
        return result.loss, result.gradients

    elapsed = _median_time(lambda: step(x), steps)
    logdir = tempfile.mkdtemp(prefix="pipeline-trace-")
    tf.profiler.experimental.start(logdir)
    try:
        _wait(step(x))
    finally:
        tf.profiler.experimental.stop()
    timeline, threads = trace_actions(logdir)
    return elapsed, timeline, threads


def plan_table(costs_for: Callable[[int], Sequence[sim.StageCost]], microbatches: Sequence[int],
               schedules: Sequence[str] = SCHEDULES, transfer: float = 0.0) -> list[dict[str, Any]]:
    """Simulates every schedule for every M.

    Args:
        costs_for: ``costs_for(M)``, the per-stage costs of one micro-batch when the batch is split in M.
        microbatches: the values of M.
        schedules: schedule names.
        transfer: time added to every cross-stage dependency.

    Returns:
        One row per (schedule, M): predicted step time, bubble, speedup over
        running all stages on one device on the whole batch, the ideal
        ``K*M/(M+K-1)``, and peak in-flight micro-batches per stage.
    """
    base = costs_for(1)
    single = sum(c.forward + c.backward for c in base)
    rows = []
    for name in schedules:
        for m in microbatches:
            costs = list(costs_for(m))
            result = sim.simulate(sched.get(name)(len(costs), m), costs, transfer=transfer)
            rows.append({
                "schedule": name, "microbatches": m, "step": result.makespan, "bubble": result.bubble,
                "speedup": single / result.makespan if result.makespan else 0.0,
                "ideal": sim.ideal_speedup(len(costs), m), "peak_in_flight": result.peak_in_flight,
                "deadlock": result.deadlock or None,
            })
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`plan_table` as a text table."""
    lines = [f"{'schedule':<8} {'M':>3} {'step (s)':>10} {'bubble':>7} {'speedup':>8} {'ideal':>6}  in-flight"]
    for r in rows:
        lines.append(f"{r['schedule']:<8} {r['microbatches']:>3} {r['step']:>10.4f} {r['bubble']:>7.1%} "
                     f"{r['speedup']:>8.2f} {r['ideal']:>6.2f}  {r['peak_in_flight']}"
                     + (f"  DEADLOCK {r['deadlock']}" if r["deadlock"] else ""))
    return "\n".join(lines)


def parse_costs(text: Sequence[str]) -> list[sim.StageCost]:
    """Parses ``["F,B", ...]`` (seconds per micro-batch, one pair per stage).

    Raises:
        ValueError: naming the bad entry.
    """
    costs = []
    for i, item in enumerate(text):
        parts = item.split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (2, 3) or min(values) < 0:
            raise ValueError(f"--costs entry {i} is {item!r}; give FORWARD,BACKWARD seconds (>= 0), e.g. 0.01,0.02")
        costs.append(sim.StageCost(*values))
    return costs


def _scaled(costs: Sequence[sim.StageCost], at_m: int) -> Callable[[int], list[sim.StageCost]]:
    return lambda m: [sim.StageCost(c.forward * at_m / m, c.backward * at_m / m, c.weight) for c in costs]


def _from_config(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.config import load_config
    from pipeline.runner import build

    cfg = load_config(args.config, args.set)
    built = build(cfg, tempfile.mkdtemp(prefix="pipeline-plan-"))
    import tensorflow as tf

    batch = next(iter(built.data.train.batch(cfg.data.batch_size, drop_remainder=True)))
    x, y = batch[0], batch[1]
    from pipeline import microbatch as mb_lib

    size = int(mb_lib.batch_size(x))
    ms = [m for m in args.ms if m <= size]
    stages = built.pipeline.stages
    cache: dict[int, list[sim.StageCost]] = {}

    factor = 1.0
    if args.contention:
        factor = contention_factor(stages, mb_lib.split(x, args.microbatches or cfg.pipeline.microbatches)[0],
                                   repeats=args.repeats)
        print(f"contention factor {factor:.2f}: all stages at once run {factor:.2f}x slower than one alone; "
              "stage costs are scaled by it")

    def costs_for(m: int) -> list[sim.StageCost]:
        if m not in cache:
            measured = measure_stage_costs(stages, mb_lib.split(x, m)[0], repeats=args.repeats)
            cache[m] = [sim.StageCost(c.forward * factor, c.backward * factor) for c in measured]
        return cache[m]

    loss = built.pipeline.loss if not isinstance(built.pipeline.loss, str) else tf.keras.losses.get(cfg.loss)
    return {"stages": stages, "x": x, "y": y, "loss": loss, "ms": ms, "costs_for": costs_for,
            "microbatches": args.microbatches or cfg.pipeline.microbatches,
            "schedule": args.schedule or cfg.pipeline.schedule}


def plan_command(args: argparse.Namespace) -> int:
    """``pipeline plan [CONFIG] [--costs F,B ...] [--microbatches M] [--schedule S] [--measure]``."""
    if args.config:
        ctx = _from_config(args)
    elif args.costs:
        try:
            costs = parse_costs(args.costs)
        except ValueError as err:
            print(f"pipeline plan: {err}", file=sys.stderr)
            return 2
        m0 = args.microbatches or 1
        ctx = {"costs_for": _scaled(costs, m0), "ms": list(args.ms), "microbatches": m0,
               "schedule": args.schedule or "1f1b", "stages": None}
        if args.measure:
            print("pipeline plan: --measure needs a CONFIG (a model to run)", file=sys.stderr)
            return 2
    else:
        print("pipeline plan: give a CONFIG (e.g. configs/digits_cnn.yaml) or --costs F,B per stage",
              file=sys.stderr)
        return 2
    m, name = ctx["microbatches"], ctx["schedule"]
    ms = sorted(set(ctx["ms"]) | {m})
    rows = plan_table(ctx["costs_for"], ms, SCHEDULES, transfer=args.transfer)
    costs = list(ctx["costs_for"](m))
    print("stage costs per micro-batch at M=%d (s): " % m
          + ", ".join(f"[{i}] F {c.forward:.5f} B {c.backward:.5f}" for i, c in enumerate(costs)))
    print(format_table(rows))
    predicted = sim.simulate(sched.get(name)(len(costs), m), costs, transfer=args.transfer)
    print(f"\n{name}, M={m}: predicted step {predicted.makespan:.4f} s, bubble {predicted.bubble:.1%}")
    print(sim.ascii_gantt(predicted.timeline, len(costs)))
    panels = [(f"predicted\n{predicted.makespan:.3f} s", predicted.timeline)]
    report: dict[str, Any] = {"schedule": name, "microbatches": m, "rows": rows,
                              "costs": [vars(c) for c in costs], "predicted": predicted.summary()}
    if args.measure:
        elapsed, timeline, threads = run_measured(ctx["stages"], ctx["x"], ctx["y"], ctx["loss"], name, m,
                                                  args.steps)
        span = max(iv.end for iv in timeline)
        print(f"\nmeasured step {elapsed:.4f} s (profiled actions span {span:.4f} s), "
              f"predicted/measured {predicted.makespan / elapsed:.2f}; threads busy "
              + ", ".join(f"{v:.4f}" for v in threads["threads"].values())
              + f" s; two or more threads at once {threads['overlap']:.4f} s")
        print(sim.ascii_gantt(timeline, len(costs)))
        panels.append((f"measured\n{elapsed:.3f} s", timeline))
        report["measured"] = {"step": elapsed, "span": span, "overlap": threads["overlap"],
                              "timeline": [[str(iv.action), iv.start, iv.end] for iv in timeline]}
    png = args.png or f"plan_{name}_M{m}.png"
    sim.gantt(png, panels, len(costs), title=f"{name}, K={len(costs)}, M={m}")
    print(f"\nGantt chart: {png}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"JSON: {args.json}")
    return 0


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: micro-batch counts must be integers >= 1")
    return values


def register(subparsers: Any) -> None:
    """Adds ``plan`` to the ``pipeline`` command."""
    help_text = "predict step time and bubble per schedule and micro-batch count; draw a Gantt chart"
    p = subparsers.add_parser("plan", help=help_text, description=help_text)
    p.add_argument("config", nargs="?", help="YAML run config: its model is built and each stage timed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--costs", nargs="+", metavar="F,B",
                   help="instead of a config: forward,backward seconds of one micro-batch per stage "
                        "(at --microbatches; scaled by 1/M for the other rows)")
    p.add_argument("--microbatches", type=int, help="M of the chosen plan (default: the config's)")
    p.add_argument("--schedule", choices=SCHEDULES, help="schedule of the chosen plan (default: the config's)")
    p.add_argument("--ms", type=_ints, default=list(DEFAULT_MICROBATCHES),
                   help="micro-batch counts of the table, e.g. 1,2,4,8,16")
    p.add_argument("--contention", action="store_true",
                   help="scale stage costs by how much the stages slow each other down when run at once "
                        "(logical CPU devices sharing cores; usually 1 on GPUs)")
    p.add_argument("--transfer", type=float, default=0.0, help="seconds added per cross-stage copy")
    p.add_argument("--measure", action="store_true",
                   help="also run real steps, stamp every action and draw the measured timeline")
    p.add_argument("--steps", type=int, default=5, help="measured steps (the median is shown)")
    p.add_argument("--repeats", type=int, default=10, help="stage runs per timed call when measuring costs")
    p.add_argument("--png", help="Gantt chart file (default: plan_<schedule>_M<M>.png)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=plan_command)
