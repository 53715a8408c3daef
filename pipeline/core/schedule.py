"""Pipeline schedules as pure data: actions per stage, generators and validation."""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Callable, Iterator, Sequence

from pipeline.errors import ScheduleError, SettingError, check_count

Schedule = list[list["Action"]]
"""One ordered list of actions per stage (stage ``i`` runs ``schedule[i]`` in order)."""


class Op(str, enum.Enum):
    """What an action does to one micro-batch on one stage."""

    FORWARD = "F"
    """Run the stage forward, record its tape."""
    BACKWARD = "B"
    """Backward: input gradient and (unless a W follows) the weight gradients."""
    WEIGHT = "W"
    """Weight-gradient half of a split backward (zero-bubble schedules)."""


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


def _check_sizes(num_stages: int, num_microbatches: int) -> None:
    check_count("num_stages", num_stages)
    check_count("num_microbatches", num_microbatches)


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """GPipe: every stage runs all forwards, then all backwards.

    K=3 stages, M=4 micro-batches (time flows right; B waits for the stage after it)::

        time:    0  1  2  3  4  5  6  7  8  9  10 11
        stage 0: F0 F1 F2 F3 .  .  .  .  B0 B1 B2 B3
        stage 1: .  F0 F1 F2 F3 .  .  B0 B1 B2 B3
        stage 2: .  .  F0 F1 F2 F3 B0 B1 B2 B3

    Activations of all M micro-batches are alive on every stage at the turn.
    """
    _check_sizes(num_stages, num_microbatches)
    return [
        [Action(s, F, j) for j in range(num_microbatches)]
        + [Action(s, B, j) for j in range(num_microbatches)]
        for s in range(num_stages)
    ]


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): warm up, then alternate one forward and one backward.

    Stage i runs min(K-1-i, M) warm-up forwards, then pairs F/B, then drains the
    remaining backwards, so at most K-i micro-batches are in flight on stage i.
    K=3, M=4::

        time:    0  1  2  3  4  5  6  7  8  9  10 11
        stage 0: F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3
        stage 1: .  F0 F1 .  B0 F2 B1 F3 B2 .  B3
        stage 2: .  .  F0 B0 F1 B1 F2 B2 F3 B3
    """
    _check_sizes(num_stages, num_microbatches)
    schedule: Schedule = []
    for s in range(num_stages):
        warmup = min(num_stages - 1 - s, num_microbatches)
        actions = [Action(s, F, j) for j in range(warmup)]
        for j in range(warmup, num_microbatches):
            actions += [Action(s, F, j), Action(s, B, j - warmup)]
        actions += [Action(s, B, j) for j in range(num_microbatches - warmup, num_microbatches)]
        schedule.append(actions)
    return schedule


def forward_only(num_stages: int, num_microbatches: int) -> Schedule:
    """Inference: every stage runs F0..F(M-1); used by ``predict`` and ``evaluate``."""
    _check_sizes(num_stages, num_microbatches)
    return [[Action(s, F, j) for j in range(num_microbatches)] for s in range(num_stages)]


GENERATORS: dict[str, Callable[[int, int], Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
}


NAMES: tuple[str, ...] = tuple(GENERATORS)
"""The training schedules by name, in the order tables list them."""


def get(name: str) -> Callable[[int, int], Schedule]:
    """Looks a training schedule generator up by name (``"gpipe"``, ``"1f1b"``).

    Raises:
        SettingError: naming the unknown schedule and listing the known ones.
    """
    key = str(name).lower().replace("-", "_")
    aliases = {"one_f_one_b": "1f1b", "1f_1b": "1f1b"}
    key = aliases.get(key, key)
    if key not in GENERATORS:
        raise SettingError(
            f"unknown schedule {name!r}; known schedules: {', '.join(sorted(GENERATORS))}. "
            "Pass one of them as schedule=..."
        )
    return GENERATORS[key]


def render(schedule: Schedule, mark: Action | None = None) -> str:
    """Draws the schedule as a grid, one row per stage; ``mark`` is bracketed."""
    rows = []
    for s, actions in enumerate(schedule):
        cells = [f"[{a}]" if a == mark else f" {a} " for a in actions]
        rows.append(f"stage {s}: " + "".join(cells))
    return "\n".join(rows)


def _fail(schedule: Schedule, action: Action | None, reason: str) -> ScheduleError:
    return ScheduleError(f"invalid schedule: {reason}\n{render(schedule, action)}")


def validate(schedule: Schedule, num_microbatches: int | None = None) -> None:
    """Checks that a schedule is complete, ordered and free of deadlock.

    Rules: every stage runs F exactly once for every micro-batch, and B exactly
    once (unless the schedule is forward-only); W, where present, once and after
    its B; a stage's B of micro-batch j comes after its F of j; actions sit in
    their own stage's row; and the cross-stage dependencies (F of stage i needs
    F of stage i-1, B of stage i needs B of stage i+1) can be met without
    deadlock.

    Raises:
        ScheduleError: with the grid drawn and the offending action bracketed.
    """
    if not schedule:
        raise ScheduleError("invalid schedule: it has no stages")
    if num_microbatches is None:
        num_microbatches = 1 + max(
            (a.microbatch for row in schedule for a in row), default=-1
        )
    has_backward = any(a.op is B for row in schedule for a in row)
    for s, row in enumerate(schedule):
        seen: set[tuple[Op, int]] = set()
        for a in row:
            if a.stage != s:
                raise _fail(schedule, a, f"action {a} is in the row of stage {s}")
            if not 0 <= a.microbatch < num_microbatches:
                raise _fail(
                    schedule, a,
                    f"action {a} names micro-batch {a.microbatch}, outside 0..{num_microbatches - 1}",
                )
            if (a.op, a.microbatch) in seen:
                raise _fail(schedule, a, f"action {a} is repeated on stage {s}")
            if a.op is B and (F, a.microbatch) not in seen:
                raise _fail(schedule, a, f"backward {a} comes before its forward on stage {s}")
            if a.op is W and (B, a.microbatch) not in seen:
                raise _fail(schedule, a, f"weight step {a} comes before its backward on stage {s}")
            seen.add((a.op, a.microbatch))
        for j in range(num_microbatches):
            needed = [F, B] if has_backward else [F]
            for op in needed:
                if (op, j) not in seen:
                    raise _fail(
                        schedule, None,
                        f"stage {s} never runs {Action(s, op, j)} (micro-batch {j} is missing)",
                    )
    for _ in execution_order(schedule):
        pass


def dependencies(action: Action, num_stages: int) -> list[Action]:
    """The actions of other stages that must finish before ``action`` can start."""
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
    """One order of all actions that respects every stage's order and every prerequisite.

    Stages are visited round-robin; each runs its next actions while their
    prerequisites are done. The one dependency walk of the project: the executor
    builds ops in this order, ``run_eagerly`` runs them in it, the simulator
    times them in it.

    Returns:
        ``(order, blocked)``: the actions that can run, in order, and the first
        action of every stage that never could (empty unless the schedule deadlocks).
    """
    num_stages = len(schedule)
    position = [0] * num_stages
    done: set[Action] = set()
    order: list[Action] = []
    progressed = True
    while progressed:
        progressed = False
        for s in range(num_stages):
            while position[s] < len(schedule[s]):
                action = schedule[s][position[s]]
                if not all(d in done for d in prerequisites(action, num_stages)):
                    break
                done.add(action)
                order.append(action)
                position[s] += 1
                progressed = True
    blocked = [schedule[s][position[s]] for s in range(num_stages) if position[s] < len(schedule[s])]
    return order, blocked


def deadlock_message(schedule: Schedule, order: Sequence[Action], blocked: Sequence[Action]) -> str:
    """``"deadlock: 0B1 waits for 1B1; ..."``, naming what each blocked action still waits for."""
    done = set(order)
    return "deadlock: " + "; ".join(
        f"{a} waits for {', '.join(str(d) for d in prerequisites(a, len(schedule)) if d not in done)}"
        for a in blocked)


def execution_order(schedule: Schedule) -> Iterator[Action]:
    """Yields all actions in the order of :func:`walk`.

    Raises:
        ScheduleError: if no stage can make progress (a deadlock), before yielding anything.
    """
    order, blocked = walk(schedule)
    if blocked:
        raise _fail(schedule, blocked[0], deadlock_message(schedule, order, blocked))
    yield from order


def peak_in_flight(schedule: Schedule) -> list[int]:
    """Per stage, the most micro-batches whose activations are alive at once.

    A micro-batch is alive from its F until its B frees the tape, or until its W
    on a row that splits backward into B and W.
    """
    peaks = []
    for row in schedule:
        release = W if any(a.op is W for a in row) else B
        live = peak = 0
        for a in row:
            live += 1 if a.op is F else (-1 if a.op is release else 0)
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


def parse_table(rows: Sequence[str]) -> Schedule:
    """Builds a schedule from literal rows such as ``["0F0 0F1 0B0 0B1", ...]``."""
    return [[Action.parse(tok) for tok in row.split()] for row in rows]
