"""``pipeline plan``: measure stage costs, predict step time and bubble per schedule and M, draw the schedule."""

from __future__ import annotations

import argparse
import json
import tempfile
from typing import Any

from pipeline.core import schedule as sched
from pipeline.errors import SettingError
from pipeline.perf import autoplan, autoplan_measure, measure, planner, plot, trace
from pipeline.perf import simulate as sim
from pipeline.train import runner
from pipeline.train.config import load_config


def _from_config(args: argparse.Namespace) -> dict[str, Any]:
    
    cfg = load_config(args.config, args.set)
    built = runner.build(cfg, tempfile.mkdtemp(prefix="pipeline-plan-"))
    if getattr(built.pipeline, "auto_choice", None) is not None:  # schedule/microbatches/recompute: auto
        print("auto: every candidate, best first (stage costs measured once; pipeline.perf.autoplan)\n"
              + autoplan.format_table(built.pipeline.auto_choice) + "\n" + built.pipeline.auto_choice.summary() + "\n")
    import tensorflow as tf

    from pipeline.core import microbatch as mb_lib

    batch = next(iter(built.data.train.batch(cfg.data.batch_size, drop_remainder=True)))
    x, y = batch[0], batch[1]
    size = int(mb_lib.batch_size(x))
    ms = [m for m in args.ms if m <= size]
    stages = built.pipeline.stages
    cache: dict[tuple[int, bool], list[sim.StageCost]] = {}

    def timed(m: int, under_load: bool) -> list[sim.StageCost]:
        if (m, under_load) not in cache:
            cache[m, under_load] = measure.measure_stage_costs(stages, mb_lib.split(x, m)[0], repeats=args.repeats,
                                                               under_load=under_load)
        return cache[m, under_load]

    def costs_for(m: int) -> list[sim.StageCost]:
        # M=1 runs one stage at a time; with M > 1 the other stages are busy meanwhile.
        return timed(m, m > 1 and not args.stages_alone)

    shared = not args.stages_alone and autoplan_measure.shares_compute([stage.device for stage in stages])
    if shared:
        print("the devices share this machine's cores: stages are also timed alone, and the simulation runs each "
              "action between its alone and its loaded speed, by how many other devices are busy")

    overhead = args.overhead
    if overhead is None:
        from pipeline.perf.overhead import measure_step_overhead

        overhead = measure_step_overhead(built.pipeline, x, y, steps=args.steps)
        print(f"step overhead {overhead:.4f} s: a real M=1 fit step minus the same step's stage actions alone "
              "(optimizer, loss, metrics, Keras); added to every predicted step")

    loss = built.pipeline.loss if not isinstance(built.pipeline.loss, str) else tf.keras.losses.get(cfg.loss)
    devices = len({stage.device for stage in stages})  # several stages per device: interleaved placement
    return {"stages": stages, "x": x, "y": y, "loss": loss, "ms": ms, "costs_for": costs_for,
            "alone_for": (lambda m: timed(m, False)) if shared else None,
            "microbatches": args.microbatches or built.pipeline.microbatches,  # resolved when "auto"
            "schedule": args.schedule or built.pipeline.executor.schedule_name, "overhead": overhead,
            "devices": devices if devices < len(stages) else None}


def plan_command(args: argparse.Namespace) -> int:
    """``pipeline plan [CONFIG] [--costs F,B ...] [--microbatches M] [--schedule S] [--measure]``."""
    if args.config:
        ctx = _from_config(args)
    elif args.costs:
        costs = planner.parse_costs(args.costs)
        m0 = args.microbatches or 1
        fewer = args.devices is not None and args.devices < len(costs)  # default: interleave on fewer devices
        ctx = {"costs_for": planner.scaled_costs(costs, m0), "ms": list(args.ms), "microbatches": m0,
               "schedule": args.schedule or ("interleaved_1f1b" if fewer else "1f1b"), "stages": None,
               "overhead": args.overhead or 0.0, "alone_for": None}
        if args.measure:
            raise SettingError("--measure needs a CONFIG (a model to run), e.g. pipeline plan configs/digits_cnn.yaml "
                               "--measure")
    else:
        raise SettingError("give a CONFIG (e.g. configs/digits_cnn.yaml) or --costs F,B per stage")
    m, name = ctx["microbatches"], sched.canonical_name(ctx["schedule"])
    ms = sorted(set(ctx["ms"]) | {m})
    overhead = ctx["overhead"]
    costs = list(ctx["costs_for"](m))
    devices = args.devices or ctx.get("devices")  # None: one device per stage
    names, notes = planner.schedules_for(len(costs), devices)  # bad --devices: an error before any simulation
    layout, plan_costs = planner.placed(name, costs, m, devices)
    if len(plan_costs) < len(costs) and args.measure:
        raise SettingError(f"--measure runs the {len(costs)} stages as they are, but --schedule {name} on {devices} "
                           f"devices predicts them cut into {len(plan_costs)} stages; measure with --schedule "
                           "interleaved_1f1b, or give as many devices as stages")
    alone_for = ctx["alone_for"]
    rows = planner.plan_table(ctx["costs_for"], ms, names, transfer=args.transfer, overhead=overhead,
                              num_devices=devices, alone_for=alone_for)
    alone = planner.placed_alone(name, alone_for, m, devices)
    print(f"stage costs per micro-batch at M={m} (s): {_format_costs(costs)}")
    if alone is not None:
        print(f"  the same, each stage alone (s): {_format_costs(alone_for(m))}")
    print(planner.format_table(rows, notes))
    predicted = sim.simulate(layout, plan_costs, transfer=args.transfer, alone=alone)
    lanes = len(costs) if args.measure else predicted.num_devices  # measured timelines have a row per stage
    step = predicted.makespan + overhead
    print(f"\n{name}, M={m}: predicted step {step:.4f} s (stage actions {predicted.makespan:.4f} s + overhead "
          f"{overhead:.4f} s), bubble {predicted.bubble:.1%}")
    print(sim.ascii_gantt(predicted.timeline, predicted.num_devices))
    panels = [(f"predicted\n{predicted.makespan:.3f} s", predicted.timeline)]
    report: dict[str, Any] = {"schedule": name, "microbatches": m, "rows": rows, "overhead": overhead,
                              "costs": [vars(c) for c in costs], "predicted": predicted.summary(),
                              "alone_costs": None if alone is None else [vars(c) for c in alone_for(m)]}
    if ctx["stages"] is not None and len(ctx["stages"]) > 1:
        report["boundary_bytes"] = _print_boundaries(ctx["stages"], ctx["x"], m)
    if args.measure:
        elapsed, timeline, threads = trace.run_measured(ctx["stages"], ctx["x"], ctx["y"], ctx["loss"], name, m,
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
    plot.gantt(png, panels, lanes,
               title=f"{name}, K={len(plan_costs)} stages on {predicted.num_devices} devices, M={m}")
    print(f"\nGantt chart: {png}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"JSON: {args.json}")
    return 0


def _format_costs(costs: list[sim.StageCost]) -> str:
    return ", ".join(f"[{i}] F {c.forward:.5f} B {c.backward:.5f}" + ("" if c.weight is None else f" W {c.weight:.5f}")
                     for i, c in enumerate(costs))


def _print_boundaries(stages: list, x: Any, m: int) -> list[int]:
    """Prints what crosses each boundary and the bytes it sends per micro-batch at M=``m``; returns the bytes."""
    from pipeline.core import microbatch as mb_lib
    from pipeline.core import partition

    sent = planner.boundary_bytes(stages, mb_lib.split(x, m)[0])
    for boundary, size in zip(partition.boundaries([s.layer for s in stages]), sent):
        print(f"boundary {boundary.index}->{boundary.index + 1}: {size} bytes per micro-batch at M={m}; "
              + ", ".join(f"{t.producer} {t.shape} {t.dtype}" for t in boundary.tensors))
    return sent


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: micro-batch counts must be integers >= 1")
    return values


def _schedule(text: str) -> str:
    try:
        return sched.canonical_name(text)
    except SettingError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def register(subparsers: Any) -> None:
    """Adds ``plan`` to the ``pipeline`` command."""
    help_text = "predict step time and bubble per schedule and micro-batch count; draw a Gantt chart"
    p = subparsers.add_parser("plan", help=help_text, description=help_text)
    p.add_argument("config", nargs="?", help="YAML run config: its model is built and each stage timed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--costs", nargs="+", metavar="F,B[,W]",
                   help="instead of a config: forward,backward seconds of one micro-batch per stage "
                        "(at --microbatches; scaled by 1/M for the other rows); an optional third value is the "
                        "weight-gradient part W of the backward (zb_h1; default half the backward)")
    p.add_argument("--microbatches", type=int, help="M of the chosen plan (default: the config's)")
    p.add_argument("--schedule", type=_schedule, metavar="S",
                   help=f"schedule of the chosen plan: {', '.join(planner.SCHEDULES)} or an alias, e.g. zb-h1, "
                        "interleaved (default: the config's; with --costs 1f1b, interleaved_1f1b with --devices D < K)")
    p.add_argument("--devices", type=int, metavar="D",
                   help="devices D of the table and the chosen plan (default: the config's, or one per stage), a "
                        "divisor of the stages; with fewer devices than stages interleaved_1f1b runs stage s on "
                        "device s %% D, the other schedules the model cut into D stages")
    p.add_argument("--ms", type=_ints, default=list(planner.DEFAULT_MICROBATCHES),
                   help="micro-batch counts of the table, e.g. 1,2,4,8,16")
    p.add_argument("--stages-alone", action="store_true",
                   help="time each stage alone instead of while the other stages run, and do not model shared "
                        "cores (faster; the same on devices that share no hardware, e.g. separate GPUs)")
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
