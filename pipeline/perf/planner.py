"""Plan tables: simulate every schedule and micro-batch count on D devices from per-stage costs.

Predicted (simulator, from measured per-stage costs, :mod:`pipeline.perf.measure`) over
measured (profiled actions of a real step, :mod:`pipeline.perf.trace`)::

    1f1b, K=2, M=4
    predicted 0.41 s  device 0: |F0-F1-   B0---F2-B1---F3-B2---   B3---|
                      device 1: |   F0-B0---F1-B1---F2-B2---F3-B3---   |
    measured  0.43 s  device 0: |F0-F1--    B0---F2-B1----F3-B2---  B3---|
                      device 1: |    F0-B0---F1--B1---F2-B2----F3-B3--   |

Every row runs the same K stage costs on the same D devices: ``interleaved_1f1b`` places stage s on
device s % D (only when D < K; with D = K it is 1F1B and is left out), the one-stage-per-device
schedules (gpipe, 1f1b, zb_h1) then run the V = K/D consecutive stages of each device as one stage.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from pipeline.core import schedule as sched
from pipeline.errors import SettingError, check_count
from pipeline.perf import simulate as sim

DEFAULT_MICROBATCHES = (1, 2, 4, 8, 16)
SCHEDULES = sched.NAMES
INTERLEAVED = "interleaved_1f1b"
IDEAL_NOTE = ("ideal: the speedup of the same schedule with balanced stages (every stage costing the mean), "
              "no copies, no overhead; K*M/(M+K-1) for gpipe and 1f1b, which zb_h1 and interleaved_1f1b can exceed")
W_NOTE = ("zb_h1: W (weight-gradient) cost not given, taken as half of each stage's backward "
          "(StageCost.weight; give F,B,W per stage in --costs)")


def check_devices(num_stages: int, num_devices: int | None) -> int:
    """D for ``num_stages`` stages: ``num_devices``, or one device per stage when None.

    Raises:
        SettingError: D is not a count, exceeds the stages, or does not divide them.
    """
    if num_devices is None:
        return num_stages
    check_count("num_devices", num_devices)
    if num_devices > num_stages or num_stages % num_devices:
        raise SettingError(
            f"num_devices (--devices) is {num_devices} for {num_stages} stage(s); give a divisor of the number of "
            f"stages (stage s runs on device s % D), e.g. {num_stages} (one stage per device)")
    return num_devices


def merge_stages(costs: Sequence[sim.StageCost], num_devices: int) -> list[sim.StageCost]:
    """The costs of ``num_devices`` stages, each the sum of V = K/D consecutive stages (one per device).

    ``weight`` stays None only when every merged stage's is None (the simulator then halves the backward).
    """
    v = len(costs) // num_devices
    merged = []
    for d in range(num_devices):
        part = costs[d * v:(d + 1) * v]
        known = any(c.weight is not None for c in part)
        weight = sum(c.backward / 2 if c.weight is None else c.weight for c in part) if known else None
        merged.append(sim.StageCost(sum(c.forward for c in part), sum(c.backward for c in part), weight))
    return merged


def schedules_for(num_stages: int, num_devices: int | None,
                  schedules: Sequence[str] = SCHEDULES) -> tuple[list[str], list[str]]:
    """The canonical schedule names the table runs for K stages on D devices, and why any was left out.

    Raises:
        SettingError: an unknown schedule name, or a bad ``num_devices`` (:func:`check_devices`).
    """
    d = check_devices(num_stages, num_devices)
    names = list(dict.fromkeys(sched.canonical_name(s) for s in schedules))
    if INTERLEAVED in names and d == num_stages:
        names.remove(INTERLEAVED)
        return names, [f"{INTERLEAVED}: left out, K={num_stages} stages on {d} devices is 1f1b "
                       "(give fewer devices than stages, e.g. --devices D, to interleave)"]
    others = [n for n in names if n != INTERLEAVED]
    if d < num_stages and others:
        return names, [f"{', '.join(others)}: one stage per device, so the model cut into {d} stages "
                       f"({num_stages // d} consecutive stages' costs summed per device)"]
    return names, []


def placed(name: str, costs: Sequence[sim.StageCost], m: int,
           num_devices: int | None = None) -> tuple[sched.Schedule, list[sim.StageCost]]:
    """Schedule ``name`` for M=``m`` on D devices as the table runs it, with the stage costs it runs.

    interleaved_1f1b places the K stages on D devices; the other schedules run one stage per device,
    so with D < K they get :func:`merge_stages` (the model cut into D stages).

    Raises:
        SettingError: an unknown schedule, or a bad ``num_devices`` (:func:`check_devices`).
    """
    name, costs = sched.canonical_name(name), list(costs)
    d = check_devices(len(costs), num_devices)
    if name == INTERLEAVED:
        return sched.get(name)(len(costs), m, d), costs
    merged = merge_stages(costs, d) if d < len(costs) else costs
    return sched.get(name)(len(merged), m), merged


def placed_alone(name: str, alone_for: Callable[[int], Sequence[sim.StageCost]] | None, m: int,
                 num_devices: int | None = None) -> list[sim.StageCost] | None:
    """The costs alone that go with :func:`placed`'s, for ``simulate(..., alone=...)``.

    None without ``alone_for`` (devices that share nothing) and at M=1, whose costs are timed alone already.
    """
    return None if alone_for is None or m == 1 else placed(name, alone_for(m), m, num_devices)[1]


def _ideal(rows: sched.Schedule, costs: Sequence[sim.StageCost], m: int) -> float:
    """Speedup of ``rows`` on balanced stages: the work of one device over the simulated makespan."""
    n = len(costs)
    weight = sum(c.backward / 2 if c.weight is None else c.weight for c in costs) / n
    mean = sim.StageCost(sum(c.forward for c in costs) / n, sum(c.backward for c in costs) / n, weight)
    span = sim.simulate(rows, [mean] * n).makespan
    return m * n * (mean.forward + mean.backward) / span if span else 0.0


def plan_table(costs_for: Callable[[int], Sequence[sim.StageCost]], microbatches: Sequence[int],
               schedules: Sequence[str] = SCHEDULES, transfer: float = 0.0,
               overhead: float = 0.0, num_devices: int | None = None,
               alone_for: Callable[[int], Sequence[sim.StageCost]] | None = None) -> list[dict[str, Any]]:
    """Simulates every schedule for every M, on the same D devices.

    Args:
        costs_for: ``costs_for(M)``, the per-stage costs of one micro-batch when the batch is split in M.
        microbatches: the values of M.
        schedules: schedule names or aliases (:func:`schedules_for` leaves interleaved out when D = K).
        transfer: time added to every cross-device dependency.
        overhead: seconds per step outside the stage actions (optimizer, loss,
            Keras; :mod:`pipeline.perf.overhead`), added to every step.
        num_devices: D, a divisor of the K stages (None: K). With D < K, interleaved_1f1b runs
            stage s on device s % D and the other schedules run V = K/D merged stages per device.
        alone_for: for devices that share compute (logical CPU devices on one machine's cores),
            ``alone_for(M)``: the same costs timed with the other devices idle. Each action then runs
            between its alone and its loaded speed, by how many other devices are busy
            (:func:`pipeline.perf.simulate.shared_timeline`). None: devices that share nothing.

    Returns:
        One row per (schedule, M): stages and devices, predicted step time, bubble, speedup over
        running all stages on one device on the whole batch, the schedule's ideal speedup
        (:data:`IDEAL_NOTE`), peak in-flight micro-batches per device, whether W costs were
        assumed (``weight_assumed``: zb_h1 with a stage whose ``weight`` is None).

    Raises:
        SettingError: before any simulation, on a bad schedule name or ``num_devices``.
    """
    base = list(costs_for(1))
    names, _ = schedules_for(len(base), num_devices, schedules)
    d = check_devices(len(base), num_devices)
    single = sum(c.forward + c.backward for c in base) + overhead
    rows = []
    for name in names:
        for m in microbatches:
            layout, costs = placed(name, costs_for(m), m, d)
            result = sim.simulate(layout, costs, transfer=transfer, alone=placed_alone(name, alone_for, m, d))
            step = result.makespan + overhead
            rows.append({
                "schedule": name, "stages": len(costs), "devices": result.num_devices, "microbatches": m,
                "step": step, "bubble": result.bubble, "speedup": single / step if step else 0.0,
                "ideal": _ideal(layout, costs, m), "peak_in_flight": result.peak_in_flight,
                "weight_assumed": any(split and c.weight is None
                                      for split, c in zip(sched.split_stages(layout), costs)),
                "deadlock": result.deadlock or None,
            })
    return rows


def format_table(rows: Sequence[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    """The rows of :func:`plan_table` as a text table, then its notes (ideal, assumed W costs, ``notes``)."""
    width = max([len("schedule")] + [len(r["schedule"]) for r in rows])
    lines = [f"{'schedule':<{width}} {'K/D':>5} {'M':>3} {'step (s)':>10} {'bubble':>7} {'speedup':>8} "
             f"{'ideal':>6}  in-flight per device"]
    for r in rows:
        layout = f"{r.get('stages', len(r['peak_in_flight']))}/{r.get('devices', len(r['peak_in_flight']))}"
        lines.append(f"{r['schedule']:<{width}} {layout:>5} {r['microbatches']:>3} {r['step']:>10.4f} "
                     f"{r['bubble']:>7.1%} {r['speedup']:>8.2f} {r['ideal']:>6.2f}  {r['peak_in_flight']}"
                     + (f"  DEADLOCK {r['deadlock']}" if r["deadlock"] else ""))
    lines.append("K/D: stages/devices. " + IDEAL_NOTE)
    if any(r.get("weight_assumed") for r in rows):
        lines.append(W_NOTE)
    return "\n".join(lines + list(notes))


def parse_costs(text: Sequence[str]) -> list[sim.StageCost]:
    """Parses ``["F,B", "F,B,W", ...]`` (seconds per micro-batch, one entry per stage; W: zb_h1's weight half).

    Raises:
        SettingError: naming the bad entry.
    """
    costs = []
    for i, item in enumerate(text):
        parts = item.split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (2, 3) or min(values) < 0:
            raise SettingError(f"--costs entry {i} is {item!r}; give FORWARD,BACKWARD seconds (>= 0), e.g. 0.01,0.02 "
                               "(or FORWARD,BACKWARD,WEIGHT with the weight-gradient part of the backward)")
        if len(values) == 3 and values[2] > values[1]:
            raise SettingError(f"--costs entry {i} is {item!r}: WEIGHT {values[2]} exceeds BACKWARD {values[1]}; "
                               "WEIGHT is the weight-gradient part of the backward, give at most BACKWARD")
        costs.append(sim.StageCost(*values))
    return costs


def boundary_bytes(stages: Sequence[Any], microbatch: Any) -> list[int]:
    """Bytes each boundary sends for one micro-batch: the stages run forward once, outputs measured.

    Args:
        stages: the K stage models (or :class:`pipeline.core.stage.Stage` objects).
        microbatch: one micro-batch of the pipeline input.

    Returns:
        K-1 byte counts, every tensor crossing the boundary (skips, masks, pass-throughs) included.
    """
    import tensorflow as tf  # noqa: PLC0415 - the tables above need no TensorFlow

    sent, x = [], microbatch
    layers = [getattr(s, "layer", s) for s in stages]
    for layer in layers[:-1]:
        x = layer(x, training=False)
        sent.append(int(sum(int(tf.size(t)) * tf.as_dtype(t.dtype).size for t in tf.nest.flatten(x))))
    return sent


def scaled_costs(costs: Sequence[sim.StageCost], at_m: int) -> Callable[[int], list[sim.StageCost]]:
    """``costs`` measured at M=``at_m``, scaled by ``at_m / m`` for another M (work per micro-batch ~ 1/M)."""
    return lambda m: [sim.StageCost(c.forward * at_m / m, c.backward * at_m / m,
                                    None if c.weight is None else c.weight * at_m / m) for c in costs]
