"""``pipeline plan``: measure stage costs, predict step time and bubble per schedule and M, draw the schedule.

Predicted (simulator, from measured per-stage costs) over measured (profiled
actions of a real step, ``--measure``, see :mod:`pipeline.trace`)::

    1f1b, K=2, M=4
    predicted 0.41 s  device 0: |F0-F1-   B0---F2-B1---F3-B2---   B3---|
                      device 1: |   F0-B0---F1-B1---F2-B2---F3-B3---   |
    measured  0.43 s  device 0: |F0-F1--    B0---F2-B1----F3-B2---  B3---|
                      device 1: |    F0-B0---F1--B1---F2-B2----F3-B3--   |
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Any, Callable, Sequence

from pipeline import schedule as sched
from pipeline import simulate as sim
from pipeline.trace import _median_time, run_measured, trace_actions  # noqa: F401 - re-exported

DEFAULT_MICROBATCHES = (1, 2, 4, 8, 16)
SCHEDULES = ("gpipe", "1f1b")


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

        def loop(body: Callable, device: str = device, accumulate: int = 0) -> Callable[[Any], Any]:
            """``accumulate``: how many trailing outputs are weight gradients summed over runs, as a stage does."""
            def run(inp):
                with tf.device(device):
                    carry = tf.constant(0.0)
                    acc: list[Any] = []
                    for _ in range(repeats):
                        outs = [o for o in body(nudged(inp, carry)) if o is not None]
                        if accumulate:
                            grads = outs[len(outs) - accumulate:]
                            acc = grads if not acc else [a + g for a, g in zip(acc, grads)]
                            outs = outs[:len(outs) - accumulate] + acc
                        carry = probe(outs)
                    return carry
            return run

        with tf.device(device):
            x = tf.nest.map_structure(tf.identity, x)
        loops.append((x, loop(forward), loop(forward_backward, accumulate=len(variables))))
        with tf.device(device):
            x = layer(x, training=True)
    return loops


def measure_stage_costs(stages: Sequence[Any], x: Any, repeats: int = 10, calls: int = 3) -> list[sim.StageCost]:
    """Forward and backward seconds of each stage on its device for one micro-batch ``x``, one stage at a time.

    Inside one ``tf.function`` the stage runs ``repeats`` times back to back,
    as its actions run inside a pipelined step: the Python call overhead is
    paid once, not per action. The median of ``calls`` calls is divided by
    ``repeats``. The backward is the VJP of the stage output (input and weight
    gradients) plus the accumulation of the weight gradients over micro-batches,
    timed as forward+backward minus forward.

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
