"""Plan tables: simulate every schedule and micro-batch count from per-stage costs.

Predicted (simulator, from measured per-stage costs, :mod:`pipeline.perf.measure`) over
measured (profiled actions of a real step, :mod:`pipeline.perf.trace`)::

    1f1b, K=2, M=4
    predicted 0.41 s  device 0: |F0-F1-   B0---F2-B1---F3-B2---   B3---|
                      device 1: |   F0-B0---F1-B1---F2-B2---F3-B3---   |
    measured  0.43 s  device 0: |F0-F1--    B0---F2-B1----F3-B2---  B3---|
                      device 1: |    F0-B0---F1--B1---F2-B2----F3-B3--   |
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from pipeline.core import schedule as sched
from pipeline.errors import SettingError
from pipeline.perf import simulate as sim

DEFAULT_MICROBATCHES = (1, 2, 4, 8, 16)
SCHEDULES = sched.NAMES


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
            raise SettingError(f"--costs entry {i} is {item!r}; give FORWARD,BACKWARD seconds (>= 0), e.g. 0.01,0.02")
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
    return lambda m: [sim.StageCost(c.forward * at_m / m, c.backward * at_m / m, c.weight) for c in costs]
