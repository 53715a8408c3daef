"""Schedule IR: actions in device rows, stage placement, validation, dependency walk, in-flight counts."""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Iterator, Sequence

from pipeline.errors import ScheduleError, SettingError

Schedule = list[list["Action"]]
"""One ordered list of actions per device: row ``r`` is what device (pipeline rank) ``r`` runs, in order.

An action names its stage; a device may run several stages (interleaved schedules put stage ``s`` on
device ``s % D``). Every stage's actions sit in exactly one row (:func:`stage_rows`). With one stage per
device (gpipe, 1f1b, zb_h1 and interleaved_1f1b without ``num_devices``) row ``r`` runs stage ``r``.
"""


class Op(str, enum.Enum):
    """What an action does to one micro-batch on one stage."""

    FORWARD = "F"
    """Run the stage forward, record its tape."""
    BACKWARD = "B"
    """Backward: input gradient and (unless the stage has W actions) the weight gradients."""
    WEIGHT = "W"
    """Weight-gradient half of a split backward (zero-bubble schedules); frees the micro-batch's tape."""


F, B, W = Op.FORWARD, Op.BACKWARD, Op.WEIGHT

_ACTION_RE = re.compile(r"^(\d+)([FBW])(\d+)$")


@dataclasses.dataclass(frozen=True, order=True)
class Action:
    """One unit of work: ``stage`` runs ``op`` on ``microbatch``; prints as ``"1F0"``."""

    stage: int
    op: Op
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.op.value}{self.microbatch}"

    def __repr__(self) -> str:
        return f"Action({str(self)!r})"

    @classmethod
    def parse(cls, text: str) -> "Action":
        """Parses ``"1F0"`` back into ``Action(1, Op.FORWARD, 0)``.

        Raises:
            SettingError: if ``text`` is not ``<stage><F|B|W><microbatch>``.
        """
        match = _ACTION_RE.match(text.strip())
        if not match:
            raise SettingError(
                f"cannot parse action {text!r}: expected <stage><F|B|W><microbatch>, e.g. '1F0'"
            )
        return cls(int(match.group(1)), Op(match.group(2)), int(match.group(3)))


def num_stages(schedule: Schedule) -> int:
    """The number of stages: 1 + the largest stage index of any action (0 for an empty schedule)."""
    return 1 + max((a.stage for row in schedule for a in row), default=-1)


def stage_rows(schedule: Schedule) -> list[int]:
    """For each stage ``0..S-1``, the row (device) that runs it.

    Raises:
        ScheduleError: if a stage has actions in two rows, or no actions at all.
    """
    rows: dict[int, int] = {}
    for r, actions in enumerate(schedule):
        for a in actions:
            if rows.setdefault(a.stage, r) != r:
                raise _fail(schedule, a, f"stage {a.stage} has actions on device {rows[a.stage]} and device {r}; "
                                         "every stage runs on exactly one device")
    missing = [s for s in range(num_stages(schedule)) if s not in rows]
    if missing:
        raise _fail(schedule, None, f"stage {missing[0]} has no actions (stages are numbered 0..S-1 without gaps)")
    return [rows[s] for s in range(len(rows))]


def uses_weight_split(schedule: Schedule, stage: int) -> bool:
    """Whether ``stage`` splits its backward: its B computes the input gradient only and a W follows."""
    return any(a.stage == stage and a.op is W for row in schedule for a in row)


def split_stages(schedule: Schedule) -> list[bool]:
    """:func:`uses_weight_split` for every stage, in stage order."""
    split = [False] * num_stages(schedule)
    for row in schedule:
        for a in row:
            split[a.stage] = split[a.stage] or a.op is W
    return split


def render(schedule: Schedule, mark: Action | None = None) -> str:
    """Draws the schedule as a grid, one row per device; ``mark`` is bracketed."""
    rows = []
    for r, actions in enumerate(schedule):
        cells = [f"[{a}]" if a == mark else f" {a} " for a in actions]
        rows.append(f"device {r}: " + "".join(cells))
    return "\n".join(rows)


def _fail(schedule: Schedule, action: Action | None, reason: str) -> ScheduleError:
    return ScheduleError(f"invalid schedule: {reason}\n{render(schedule, action)}")


def validate(schedule: Schedule, num_microbatches: int | None = None) -> None:
    """Checks that a schedule is complete, ordered and free of deadlock.

    Rules: every stage runs on one device (:func:`stage_rows`); every stage runs F exactly
    once for every micro-batch, and B exactly once (unless the schedule is forward-only); a
    stage with any W runs W once per micro-batch, after its B; a stage's B of micro-batch j
    comes after its F of j; and the prerequisites (:func:`prerequisites`) can be met
    without deadlock when every device runs its row in order.

    Raises:
        ScheduleError: with the grid drawn and the offending action bracketed.
    """
    if not schedule or not any(schedule):
        raise ScheduleError("invalid schedule: it has no actions")
    if num_microbatches is None:
        num_microbatches = 1 + max((a.microbatch for row in schedule for a in row), default=-1)
    stage_rows(schedule)
    split = split_stages(schedule)
    needed = [F, B] if any(a.op is B for row in schedule for a in row) else [F]
    seen: dict[int, set[tuple[Op, int]]] = {s: set() for s in range(len(split))}
    for r, row in enumerate(schedule):
        for a in row:
            done = seen[a.stage]
            if not 0 <= a.microbatch < num_microbatches:
                raise _fail(schedule, a, f"action {a} names micro-batch {a.microbatch}, "
                                         f"outside 0..{num_microbatches - 1}")
            if (a.op, a.microbatch) in done:
                raise _fail(schedule, a, f"action {a} is repeated on device {r}")
            if a.op is B and (F, a.microbatch) not in done:
                raise _fail(schedule, a, f"backward {a} comes before its forward on device {r}")
            if a.op is W and (B, a.microbatch) not in done:
                raise _fail(schedule, a, f"weight step {a} comes before its backward on device {r}")
            done.add((a.op, a.microbatch))
    for s, done in seen.items():
        for j in range(num_microbatches):
            for op in needed + ([W] if split[s] else []):
                if (op, j) not in done:
                    raise _fail(schedule, None, f"stage {s} never runs {Action(s, op, j)} "
                                                f"(micro-batch {j} is missing)")
    for _ in execution_order(schedule):
        pass


def dependencies(action: Action, num_stages: int) -> list[Action]:
    """The actions of neighbouring stages that must finish before ``action`` can start.

    F of stage s needs F of s-1; B of s needs B of s+1 (the input gradient; on a split stage
    that is its B, not its W). W has none (only its own stage's B, see :func:`prerequisites`).
    """
    if action.op is F and action.stage > 0:
        return [Action(action.stage - 1, F, action.microbatch)]
    if action.op is B and action.stage < num_stages - 1:
        return [Action(action.stage + 1, B, action.microbatch)]
    return []


def prerequisites(action: Action, num_stages: int) -> list[Action]:
    """Every action that must finish before ``action``: :func:`dependencies` plus, on its own
    stage, the F of its micro-batch (for B) or the B (for W)."""
    own = {B: F, W: B}.get(action.op)
    same_stage = [Action(action.stage, own, action.microbatch)] if own else []
    return dependencies(action, num_stages) + same_stage


def walk(schedule: Schedule) -> tuple[list[Action], list[Action]]:
    """One order of all actions that respects every device's order and every prerequisite.

    Devices (rows) are visited round-robin; each runs its next actions while their
    prerequisites are done. The one dependency walk of the project: the executor
    builds ops in this order, ``run_eagerly`` runs them in it, the simulator
    times them in it.

    Returns:
        ``(order, blocked)``: the actions that can run, in order, and the first
        action of every device that never could (empty unless the schedule deadlocks).
    """
    stages = num_stages(schedule)
    position = [0] * len(schedule)
    done: set[Action] = set()
    order: list[Action] = []
    progressed = True
    while progressed:
        progressed = False
        for r, row in enumerate(schedule):
            while position[r] < len(row):
                action = row[position[r]]
                if not all(d in done for d in prerequisites(action, stages)):
                    break
                done.add(action)
                order.append(action)
                position[r] += 1
                progressed = True
    blocked = [row[position[r]] for r, row in enumerate(schedule) if position[r] < len(row)]
    return order, blocked


def deadlock_message(schedule: Schedule, order: Sequence[Action], blocked: Sequence[Action]) -> str:
    """``"deadlock: device 0 at 0B1 waits for 1B1; ..."``, naming what each blocked action still waits for."""
    done, stages = set(order), num_stages(schedule)
    where = {a: r for r, row in enumerate(schedule) for a in row}
    return "deadlock: " + "; ".join(
        f"device {where.get(a, '?')} at {a} waits for "
        + ", ".join(str(d) for d in prerequisites(a, stages) if d not in done)
        for a in blocked)


def execution_order(schedule: Schedule) -> Iterator[Action]:
    """Yields all actions in the order of :func:`walk`.

    Raises:
        ScheduleError: if no device can make progress (a deadlock), before yielding anything.
    """
    order, blocked = walk(schedule)
    if blocked:
        raise _fail(schedule, blocked[0], deadlock_message(schedule, order, blocked))
    yield from order


def _in_flight(schedule: Schedule) -> tuple[list[int], list[int]]:
    split = split_stages(schedule)
    device_peaks, stage_live, stage_peaks = [], [0] * len(split), [0] * len(split)
    for row in schedule:
        live = peak = 0
        for a in row:
            step = 1 if a.op is F else (-1 if a.op is (W if split[a.stage] else B) else 0)
            live += step
            stage_live[a.stage] += step
            peak = max(peak, live)
            stage_peaks[a.stage] = max(stage_peaks[a.stage], stage_live[a.stage])
        device_peaks.append(peak)
    return device_peaks, stage_peaks


def peak_in_flight(schedule: Schedule) -> list[int]:
    """Per device (row), the most (stage, micro-batch) activations alive at once.

    A micro-batch of a stage is alive from its F until its B frees the tape, or until its W
    on a stage that splits backward into B and W. With one stage per device this is the
    stage's count; on interleaved schedules each unit is one chunk (1/V of the device's layers).
    """
    return _in_flight(schedule)[0]


def stage_peak_in_flight(schedule: Schedule) -> list[int]:
    """Per stage, the most micro-batches alive at once (as :func:`peak_in_flight` counts them)."""
    return _in_flight(schedule)[1]


def parse_table(rows: Sequence[str]) -> Schedule:
    """Builds a schedule from literal rows, one per device, such as ``["0F0 0F1 0B0 0B1", ...]``."""
    return [[Action.parse(tok) for tok in row.split()] for row in rows]
