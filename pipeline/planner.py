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
import threading
from typing import Any, Callable, Sequence

from pipeline import schedule as sched
from pipeline import simulate as sim
from pipeline.trace import _median_time, _wait, run_measured, trace_actions  # noqa: F401 - re-exported

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


class _Load:
    """Keeps other stages' devices busy from background threads while one stage is timed.

    ``with _Load(runs):`` starts one thread per function of ``runs`` (each a
    compiled loop of another stage, already traced), each calling its function
    over and over until the block ends. The block starts once every thread has
    finished one call; an error in a thread is raised in the caller.
    """

    def __init__(self, runs: Sequence[Callable[[], Any]]):
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._ready = threading.Barrier(len(runs) + 1) if runs else None
        self._threads = [threading.Thread(target=self._loop, args=(run,), name=f"pipeline-stage-load-{i}",
                                          daemon=True) for i, run in enumerate(runs)]

    def _loop(self, run: Callable[[], Any]) -> None:
        first = True
        try:
            while first or not self._stop.is_set():
                _wait(run())
                if first:
                    first = False
                    self._ready.wait()
        except threading.BrokenBarrierError:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            self._errors.append(err)
            self._ready.abort()

    def __enter__(self) -> "_Load":
        for thread in self._threads:
            thread.start()
        if self._ready is not None:
            try:
                self._ready.wait()
            except threading.BrokenBarrierError:  # a load thread failed: raise its error
                self.__exit__()
            except BaseException:  # e.g. KeyboardInterrupt: release the threads, then re-raise
                self._ready.abort()
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        if self._errors:
            raise self._errors[0]


def measure_stage_costs(stages: Sequence[Any], x: Any, repeats: int = 10, calls: int = 3,
                        under_load: bool = True) -> list[sim.StageCost]:
    """Forward and backward seconds of each stage on its device for one micro-batch ``x``.

    Inside one ``tf.function`` the stage runs ``repeats`` times back to back,
    as its actions run inside a pipelined step: the Python call overhead is
    paid once, not per action. The median of ``calls`` calls is divided by
    ``repeats``. The backward is the VJP of the stage output (input and weight
    gradients) plus the accumulation of the weight gradients over micro-batches,
    timed as forward+backward minus forward.

    ``under_load`` times each stage while the other stages run their own
    forward+backward loops on their devices from background threads: the
    steady state of a pipeline, where every device is busy. Devices that share
    hardware (logical CPU devices on the same cores) are slower then than
    alone; separate GPUs are not, and both ways give the same costs::

        timed stage 0:  |F F F F ... (repeats)|FB FB FB FB ... (repeats)|
        load, stage 1:  |FB FB FB FB FB FB FB FB FB FB FB FB FB FB FB FB ...|  (one thread per other stage)

    Args:
        stages: :class:`pipeline.stage.Stage` objects (layer and device), built.
        x: one micro-batch of the pipeline's input.
        repeats: stage runs per timed call.
        calls: timed calls; the median is kept.
        under_load: time each stage while the others run (default), or alone.

    Returns:
        One :class:`pipeline.simulate.StageCost` per stage.
    """
    import tensorflow as tf

    loops = [(inp, tf.function(forward), tf.function(forward_backward))
             for inp, forward, forward_backward in _stage_loops(stages, x, repeats)]
    for inp, run_f, run_fb in loops:  # trace every loop before any timing
        _wait(run_f(inp))
        _wait(run_fb(inp))
    costs = []
    for i, (inp, run_f, run_fb) in enumerate(loops):
        others = [(lambda fb=fb, a=a: fb(a)) for j, (a, _, fb) in enumerate(loops) if j != i] if under_load else []
        with _Load(others):
            f = _median_time(lambda: run_f(inp), calls) / repeats
            fb = _median_time(lambda: run_fb(inp), calls) / repeats
        costs.append(sim.StageCost(f, max(fb - f, 0.0)))
    return costs


def contention_factor(stages: Sequence[Any], x: Any, repeats: int = 10, calls: int = 3) -> float:
    """How much slower the stages run all at once than the slowest one alone (1.0: no interference).

    Devices that share hardware (logical CPU devices on the same cores, a busy
    machine) slow each other down when the pipeline keeps them all busy; GPUs
    normally do not. A diagnostic of the machine (``pipeline bench`` prints it);
    :func:`measure_stage_costs` with ``under_load=True`` already times each
    stage in that busy state.
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
               schedules: Sequence[str] = SCHEDULES, transfer: float = 0.0,
               overhead: float = 0.0) -> list[dict[str, Any]]:
    """Simulates every schedule for every M.

    Args:
        costs_for: ``costs_for(M)``, the per-stage costs of one micro-batch when the batch is split in M.
        microbatches: the values of M.
        schedules: schedule names.
        transfer: time added to every cross-stage dependency.
        overhead: seconds per step outside the stage actions (optimizer, loss,
            Keras; :mod:`pipeline.overhead`), added to every step.

    Returns:
        One row per (schedule, M): predicted step time, bubble, speedup over
        running all stages on one device on the whole batch, the ideal
        ``K*M/(M+K-1)``, and peak in-flight micro-batches per stage.
    """
    base = costs_for(1)
    single = sum(c.forward + c.backward for c in base) + overhead
    rows = []
    for name in schedules:
        for m in microbatches:
            costs = list(costs_for(m))
            result = sim.simulate(sched.get(name)(len(costs), m), costs, transfer=transfer)
            step = result.makespan + overhead
            rows.append({
                "schedule": name, "microbatches": m, "step": step, "bubble": result.bubble,
                "speedup": single / step if step else 0.0,
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

    def costs_for(m: int) -> list[sim.StageCost]:
        # M=1 runs one stage at a time; with M > 1 the other stages are busy meanwhile.
        if m not in cache:
            cache[m] = measure_stage_costs(stages, mb_lib.split(x, m)[0], repeats=args.repeats,
                                           under_load=m > 1 and not args.stages_alone)
        return cache[m]

    overhead = args.overhead
    if overhead is None:
        from pipeline.overhead import measure_step_overhead

        overhead = measure_step_overhead(built.pipeline, x, y, steps=args.steps)
        print(f"step overhead {overhead:.4f} s: a real M=1 fit step minus the same step's stage actions alone "
              "(optimizer, loss, metrics, Keras); added to every predicted step")

    loss = built.pipeline.loss if not isinstance(built.pipeline.loss, str) else tf.keras.losses.get(cfg.loss)
    return {"stages": stages, "x": x, "y": y, "loss": loss, "ms": ms, "costs_for": costs_for,
            "microbatches": args.microbatches or cfg.pipeline.microbatches,
            "schedule": args.schedule or cfg.pipeline.schedule, "overhead": overhead}


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
               "schedule": args.schedule or "1f1b", "stages": None, "overhead": args.overhead or 0.0}
        if args.measure:
            print("pipeline plan: --measure needs a CONFIG (a model to run)", file=sys.stderr)
            return 2
    else:
        print("pipeline plan: give a CONFIG (e.g. configs/digits_cnn.yaml) or --costs F,B per stage",
              file=sys.stderr)
        return 2
    m, name = ctx["microbatches"], ctx["schedule"]
    ms = sorted(set(ctx["ms"]) | {m})
    overhead = ctx["overhead"]
    rows = plan_table(ctx["costs_for"], ms, SCHEDULES, transfer=args.transfer, overhead=overhead)
    costs = list(ctx["costs_for"](m))
    print("stage costs per micro-batch at M=%d (s): " % m
          + ", ".join(f"[{i}] F {c.forward:.5f} B {c.backward:.5f}" for i, c in enumerate(costs)))
    print(format_table(rows))
    predicted = sim.simulate(sched.get(name)(len(costs), m), costs, transfer=args.transfer)
    step = predicted.makespan + overhead
    print(f"\n{name}, M={m}: predicted step {step:.4f} s (stage actions {predicted.makespan:.4f} s + overhead "
          f"{overhead:.4f} s), bubble {predicted.bubble:.1%}")
    print(sim.ascii_gantt(predicted.timeline, len(costs)))
    panels = [(f"predicted\n{predicted.makespan:.3f} s", predicted.timeline)]
    report: dict[str, Any] = {"schedule": name, "microbatches": m, "rows": rows, "overhead": overhead,
                              "costs": [vars(c) for c in costs], "predicted": predicted.summary()}
    if args.measure:
        elapsed, timeline, threads = run_measured(ctx["stages"], ctx["x"], ctx["y"], ctx["loss"], name, m,
                                                  args.steps)
        span = max(iv.end for iv in timeline)
        print(f"\nmeasured stage actions {elapsed:.4f} s per step (forward and backward of every micro-batch, "
              f"no optimizer; profiled span {span:.4f} s), predicted/measured {predicted.makespan / elapsed:.2f}; "
              "threads busy "
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
    p.add_argument("--stages-alone", action="store_true",
                   help="time each stage alone instead of while the other stages run (faster to measure; "
                        "the same on devices that share no hardware, e.g. separate GPUs)")
    p.add_argument("--overhead", type=float, metavar="SECONDS",
                   help="seconds per step outside the stage actions (default: measured from a real M=1 step "
                        "with a CONFIG, 0 with --costs)")
    p.add_argument("--transfer", type=float, default=0.0, help="seconds added per cross-stage copy")
    p.add_argument("--measure", action="store_true",
                   help="also run real steps, stamp every action and draw the measured timeline")
    p.add_argument("--steps", type=int, default=5, help="measured steps (the median is shown)")
    p.add_argument("--repeats", type=int, default=10, help="stage runs per timed call when measuring costs")
    p.add_argument("--png", help="Gantt chart file (default: plan_<schedule>_M<M>.png)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=plan_command)
