"""Cost-weighted dry run of a schedule: makespan, idle time, bubble, in-flight peak, deadlocks, Gantt chart.

Pure Python (no TensorFlow). Each device runs its row of the schedule in order, with one
clock per device (a device running several stages runs their actions one at a time); an
action starts when its device is free and the actions it depends on (on the neighbouring
stages, see :func:`pipeline.core.schedule.dependencies`) have finished, plus an optional
transfer time when they ran on another device. With uniform costs ``f`` and ``b`` this gives
GPipe's makespan ``(M+K-1)(f+b)`` and bubble ``(K-1)/(M+K-1)``::

    K=2, M=4, f=1, b=2 (GPipe): makespan (4+2-1)*3 = 15, bubble 1/5
    time:     0  1  2  3  4  5  6  7  8  9  10 11 12 13 14
    device 0: F0 F1 F2 F3 .  .  .  B0 B0 B1 B1 B2 B2 B3 B3
    device 1: .  F0 F1 F2 F3 B0 B0 B1 B1 B2 B2 B3 B3 .  .

Devices that share compute (logical CPU devices on one machine's cores) are modelled with
``simulate(..., alone=...)``: an action runs faster while the other devices are idle
(:func:`shared_timeline`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence, Union

from pipeline.core import schedule as sched

from pipeline.errors import SettingError


@dataclasses.dataclass(frozen=True)
class StageCost:
    """Seconds (or any unit) one action of a stage takes.

    Attributes:
        forward: one forward of one micro-batch.
        backward: one full backward (input and weight gradients together).
        weight: the weight-gradient half, when a schedule splits backward into
            B and W; then B costs ``backward - weight``. ``None`` means half.
    """

    forward: float
    backward: float
    weight: float | None = None

    def of(self, op: sched.Op, split: bool) -> float:
        """The cost of ``op`` on this stage (``split``: the stage's schedule has W actions)."""
        if op is sched.F:
            return float(self.forward)
        weight = self.backward / 2 if self.weight is None else self.weight
        if op is sched.W:
            return float(weight)
        return float(self.backward - weight) if split else float(self.backward)


CostLike = Union[StageCost, Sequence[float], Mapping[str, float]]
Costs = Union[Sequence[CostLike], Callable[[sched.Action], float]]


@dataclasses.dataclass(frozen=True)
class Interval:
    """One action on its device, from ``start`` to ``end``."""

    action: sched.Action
    start: float
    end: float
    device: int | None = None
    """The row (device) it ran on; ``None`` means the row of its stage's index (one stage per device)."""

    @property
    def row(self) -> int:
        """``device``, or the action's stage when ``device`` is None."""
        return self.action.stage if self.device is None else self.device

    @property
    def duration(self) -> float:
        """``end - start``."""
        return self.end - self.start


@dataclasses.dataclass
class Simulation:
    """The outcome of a dry run."""

    num_stages: int
    num_microbatches: int
    timeline: list[Interval]
    """Every action that ran, sorted by start time."""
    makespan: float
    """When the last action ends (the predicted step time)."""
    busy: list[float]
    """Per device, time spent running actions."""
    peak_in_flight: list[int]
    """Per device, the most (stage, micro-batch) activations alive at once
    (:func:`pipeline.core.schedule.peak_in_flight`)."""
    blocked: list[sched.Action] = dataclasses.field(default_factory=list)
    """On deadlock, the actions that could never start (empty otherwise)."""
    deadlock: str = ""
    """On deadlock, a message naming what each blocked action waits for."""
    stage_rows: list[int] = dataclasses.field(default_factory=list)
    """Per stage, the device that runs it (empty: stage ``i`` on device ``i``)."""

    @property
    def num_devices(self) -> int:
        """D, the number of devices (rows); equals ``num_stages`` with one stage per device."""
        return len(self.busy)

    @property
    def idle(self) -> list[float]:
        """Per device, ``makespan - busy``."""
        return [self.makespan - b for b in self.busy]

    @property
    def bubble(self) -> float:
        """Fraction of device-time idle: ``sum(idle) / (D * makespan)`` over the D devices."""
        if self.makespan <= 0:
            return 0.0
        return sum(self.idle) / (self.num_devices * self.makespan)

    @property
    def ok(self) -> bool:
        """Whether every action ran (no deadlock)."""
        return not self.blocked

    def summary(self) -> dict[str, object]:
        """A JSON-friendly dictionary of the figures."""
        return {
            "makespan": self.makespan,
            "bubble": self.bubble,
            "idle": self.idle,
            "busy": self.busy,
            "peak_in_flight": self.peak_in_flight,
            "stage_rows": self.stage_rows or list(range(self.num_devices)),
            "deadlock": self.deadlock or None,
        }


def _as_cost(value: CostLike, stage: int) -> StageCost:
    if isinstance(value, StageCost):
        return value
    if isinstance(value, Mapping):
        try:
            return StageCost(float(value["forward"]), float(value["backward"]),
                             None if value.get("weight") is None else float(value["weight"]))
        except KeyError as err:
            raise SettingError(f"cost of stage {stage} {dict(value)!r} needs keys 'forward' and 'backward'") from err
    values = list(value)
    if len(values) not in (2, 3):
        raise SettingError(
            f"cost of stage {stage} is {value!r}; give (forward, backward) or (forward, backward, weight)"
        )
    return StageCost(*(float(v) for v in values))


def cost_function(costs: Costs, schedule: sched.Schedule) -> Callable[[sched.Action], float]:
    """Turns per-stage costs (or a callable) into ``cost(action) -> duration``.

    Costs are per stage (``action.stage``), whatever device runs it.

    Raises:
        SettingError: if the number of stage costs differs from the number of stages,
            or a cost is negative.
    """
    if callable(costs):
        return costs
    stage_costs = [_as_cost(c, i) for i, c in enumerate(costs)]
    num_stages = sched.num_stages(schedule)
    if len(stage_costs) != num_stages:
        raise SettingError(
            f"got costs for {len(stage_costs)} stage(s) but the schedule has {num_stages}; "
            "give one (forward, backward) pair per stage"
        )
    for i, c in enumerate(stage_costs):
        if min(c.forward, c.backward, c.weight or 0.0) < 0:
            raise SettingError(f"cost of stage {i} is negative: {c}")
    split = sched.split_stages(schedule)
    return lambda a: stage_costs[a.stage].of(a.op, split[a.stage])


def simulate(schedule: sched.Schedule, costs: Costs, transfer: float = 0.0, alone: Costs | None = None) -> Simulation:
    """Runs the schedule on paper with the given costs.

    Args:
        schedule: one row of actions per device (:mod:`pipeline.core.schedule` generators).
        costs: one ``StageCost`` / ``(forward, backward[, weight])`` / mapping per
            stage, or a callable ``cost(action) -> duration``.
        transfer: time added between an action and a dependent action on another
            device (the activation or gradient copy; none between stages of one device).
        alone: for devices that share compute (logical CPU devices on one machine's cores), the
            costs timed with the other devices idle; ``costs`` are then the costs timed with every
            other device busy. An action runs at its ``alone`` speed while no other device is busy,
            at its ``costs`` speed while all are, and in proportion between (:func:`shared_timeline`).
            ``None`` (separate GPUs): every action takes its ``costs``.

    Returns:
        A :class:`Simulation`, with busy/idle time per device. A deadlock does not raise:
        ``blocked`` and ``deadlock`` say which actions never ran and what they wait for.

    Raises:
        ScheduleError: if a stage's actions are on two devices.
    """
    cost = cost_function(costs, schedule)
    rows = sched.stage_rows(schedule)
    num_stages = len(rows)
    m = 1 + max((a.microbatch for row in schedule for a in row), default=-1)
    order, blocked = sched.walk(schedule)
    if alone is None:
        timeline = _own_compute_timeline(order, rows, cost, transfer)
    else:
        timeline = shared_timeline(schedule, order, rows, cost, cost_function(alone, schedule), transfer)
    busy = [0.0] * len(schedule)
    for iv in timeline:
        busy[iv.row] += iv.duration
    message = sched.deadlock_message(schedule, order, blocked) if blocked else ""
    timeline.sort(key=lambda iv: (iv.start, iv.row))
    return Simulation(
        num_stages=num_stages,
        num_microbatches=m,
        timeline=timeline,
        makespan=max((iv.end for iv in timeline), default=0.0),
        busy=busy,
        peak_in_flight=sched.peak_in_flight(schedule),
        blocked=blocked,
        deadlock=message,
        stage_rows=rows,
    )


def _own_compute_timeline(order: Sequence[sched.Action], rows: Sequence[int],
                          cost: Callable[[sched.Action], float], transfer: float) -> list[Interval]:
    """Every device computes alone: each action starts when its device is free and its inputs have arrived."""
    end: dict[sched.Action, float] = {}
    free = [0.0] * (1 + max(rows, default=0))
    timeline = []
    for action in order:  # a walk: every dependency has ended already
        r = rows[action.stage]
        start = max(free[r], _inputs_arrive(action, end, rows, transfer))
        end[action] = free[r] = start + float(cost(action))
        timeline.append(Interval(action, start, end[action], r))
    return timeline


def shared_timeline(schedule: sched.Schedule, order: Sequence[sched.Action], rows: Sequence[int],
                    loaded: Callable[[sched.Action], float], alone: Callable[[sched.Action], float],
                    transfer: float = 0.0) -> list[Interval]:
    """Devices that share compute, stepped from event to event (an action starts or ends).

    Between two events, an action with ``n`` of the other ``D - 1`` devices busy takes
    ``alone + (loaded - alone) * n / (D - 1)`` in total; it completes that share of its work per unit of
    time. Two devices, F 1 alone and 2 loaded (GPipe, K=2, M=2)::

        time:     0    1         3
        device 0: F0---F1--------|      F0 alone; F1 and stage 1's F0 together, each at half speed
        device 1:      F0--------F1---

    Each device runs its row in order (``order``: only the actions that can run); an action starts
    once its device is free and its inputs have arrived (``transfer`` after their end on another device).
    """
    num_devices = len(schedule)
    runnable = set(order)
    queues = [[a for a in row if a in runnable] for row in schedule]
    position = [0] * num_devices
    end: dict[sched.Action, float] = {}
    running: dict[int, list] = {}  # device -> [action, start, share of its work done]
    timeline: list[Interval] = []
    now = 0.0

    while True:
        waiting = []
        for r in range(num_devices):
            if r in running or position[r] >= len(queues[r]):
                continue
            at = _inputs_arrive(queues[r][position[r]], end, rows, transfer)
            if at is not None and at <= now:
                running[r] = [queues[r][position[r]], now, 0.0]
                position[r] += 1
            elif at is not None:
                waiting.append(at)
        if not running:
            if not waiting:
                return timeline
            now = min(waiting)
            continue
        others = (len(running) - 1) / max(num_devices - 1, 1)
        total = {r: float(alone(a)) + (float(loaded(a)) - float(alone(a))) * others
                 for r, (a, _, _) in running.items()}
        step = min([(1.0 - done) * total[r] for r, (_, _, done) in running.items()] + [w - now for w in waiting])
        now += step
        for r in list(running):
            action, start, done = running[r]
            done = 1.0 if total[r] <= 0 else done + step / total[r]
            if done >= 1.0 - 1e-12:
                end[action] = now
                timeline.append(Interval(action, start, now, r))
                del running[r]
            else:
                running[r][2] = done


def _inputs_arrive(action: sched.Action, end: Mapping[sched.Action, float], rows: Sequence[int],
                   transfer: float) -> float | None:
    """When ``action``'s inputs are on its device: its dependencies' ends, plus ``transfer`` from another
    device (0 without dependencies); ``None`` while one of them has not ended."""
    deps = sched.dependencies(action, len(rows))
    if any(d not in end for d in deps):
        return None
    here = rows[action.stage]
    return max([0.0] + [end[d] + (transfer if rows[d.stage] != here else 0.0) for d in deps])


def ideal_speedup(num_stages: int, num_microbatches: int) -> float:
    """Speedup of K balanced stages over one device: ``K*M / (M+K-1)``."""
    return num_stages * num_microbatches / (num_microbatches + num_stages - 1)


def gpipe_bubble(num_stages: int, num_microbatches: int) -> float:
    """GPipe's bubble fraction with uniform stages: ``(K-1) / (M+K-1)``."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def ascii_gantt(timeline: Sequence[Interval], num_devices: int, width: int = 72) -> str:
    """A text Gantt chart: one row per device, each action drawn as its op letter.

    Each bar starts with its label (``F3``: forward of micro-batch 3; just the
    op letter where the bar is too narrow) and is filled with ``-``; idle is blank.
    With several stages per device, the bars of a device's second, fourth, ... stage
    (chunk 1, 3, ... of interleaved schedules) are lowercase and filled with ``=``.
    """
    span = max((iv.end for iv in timeline), default=0.0) or 1.0
    placed = sorted({(iv.row, iv.action.stage) for iv in timeline})
    chunk = {stage: [s for r, s in placed if r == row].index(stage) for row, stage in placed}
    rows = []
    for s in range(num_devices):
        cells = [" "] * width
        for iv in timeline:
            if iv.row != s:
                continue
            a = int(round(iv.start / span * width))
            b = max(a + 1, int(round(iv.end / span * width)))
            odd = chunk[iv.action.stage] % 2 == 1
            label = f"{iv.action.op.value.lower() if odd else iv.action.op.value}{iv.action.microbatch}"
            if b - a < len(label):
                label = label[0]
            fill = "=" if odd else "-"
            for k in range(a, min(b, width)):
                cells[k] = label[k - a] if k - a < len(label) else fill
        rows.append(f"device {s}: |{''.join(cells)}|")
    return "\n".join(rows)
