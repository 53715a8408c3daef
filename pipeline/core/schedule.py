"""Pipeline schedules as pure data: generators (gpipe, 1f1b, interleaved_1f1b, zb_h1) and their registry.

The IR (actions in device rows, validation, the dependency walk) lives in
:mod:`pipeline.core.schedule_ir` and is re-exported here: ``schedule.validate``, ``schedule.walk``, ...
"""

from __future__ import annotations

from typing import Callable

from pipeline.core.schedule_ir import (  # noqa: F401  (re-exported: the schedule API is one module)
    Action, B, F, Op, Schedule, W, dependencies, deadlock_message, execution_order, num_stages,
    parse_table, peak_in_flight, prerequisites, render, split_stages, stage_peak_in_flight, stage_rows,
    uses_weight_split, validate, walk,
)
from pipeline.errors import ScheduleError, SettingError, check_count  # noqa: F401


def _check_sizes(num_stages: int, num_microbatches: int) -> None:
    check_count("num_stages", num_stages)
    check_count("num_microbatches", num_microbatches)


def _one_per_device(name: str, num_stages: int, num_devices: int | None) -> None:
    if num_devices is None:
        return
    check_count("num_devices", num_devices)
    if num_devices != num_stages:
        raise SettingError(
            f"schedule {name!r} runs one stage per device: num_devices must equal num_stages ({num_stages}), "
            f"got num_devices={num_devices}. To run several stages per device use schedule='interleaved_1f1b' "
            "(num_stages a multiple of num_devices), or give as many devices as stages"
        )


def gpipe(num_stages: int, num_microbatches: int, num_devices: int | None = None) -> Schedule:
    """GPipe: every stage runs all forwards, then all backwards.

    K=3 stages, M=4 micro-batches (time flows right; B waits for the stage after it)::

        time:     0  1  2  3  4  5  6  7  8  9  10 11
        device 0: F0 F1 F2 F3 .  .  .  .  B0 B1 B2 B3
        device 1: .  F0 F1 F2 F3 .  .  B0 B1 B2 B3
        device 2: .  .  F0 F1 F2 F3 B0 B1 B2 B3

    Activations of all M micro-batches are alive on every stage at the turn.
    ``num_devices`` must be None or ``num_stages`` (one stage per device).
    """
    _check_sizes(num_stages, num_microbatches)
    _one_per_device("gpipe", num_stages, num_devices)
    return [
        [Action(s, F, j) for j in range(num_microbatches)]
        + [Action(s, B, j) for j in range(num_microbatches)]
        for s in range(num_stages)
    ]


def one_f_one_b(num_stages: int, num_microbatches: int, num_devices: int | None = None) -> Schedule:
    """1F1B (PipeDream-flush): warm up, then alternate one forward and one backward.

    Stage i runs min(K-1-i, M) warm-up forwards, then pairs F/B, then drains the
    remaining backwards, so at most K-i micro-batches are in flight on stage i.
    K=3, M=4::

        time:     0  1  2  3  4  5  6  7  8  9  10 11
        device 0: F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3
        device 1: .  F0 F1 .  B0 F2 B1 F3 B2 .  B3
        device 2: .  .  F0 B0 F1 B1 F2 B2 F3 B3

    ``num_devices`` must be None or ``num_stages`` (one stage per device).
    """
    _check_sizes(num_stages, num_microbatches)
    _one_per_device("1f1b", num_stages, num_devices)
    schedule: Schedule = []
    for s in range(num_stages):
        warmup = min(num_stages - 1 - s, num_microbatches)
        actions = [Action(s, F, j) for j in range(warmup)]
        for j in range(warmup, num_microbatches):
            actions += [Action(s, F, j), Action(s, B, j - warmup)]
        actions += [Action(s, B, j) for j in range(num_microbatches - warmup, num_microbatches)]
        schedule.append(actions)
    return schedule


def _groups(num_microbatches: int, num_devices: int) -> list[int]:
    """Micro-batch group sizes of the interleaved order: ``floor(M/D)`` groups (one when M < D) as
    equal as possible, the larger ones first, so every group has at least D micro-batches when M >= D."""
    rounds = max(1, num_microbatches // num_devices)
    base, extra = divmod(num_microbatches, rounds)
    return [base + 1] * extra + [base] * (rounds - extra)


def _chunk_order(num_microbatches: int, chunks: int, num_devices: int) -> list[tuple[int, int]]:
    """``(microbatch, chunk)`` pairs in Megatron's order: each group of :func:`_groups` through
    chunk 0, then chunk 1, ..."""
    order: list[tuple[int, int]] = []
    lo = 0
    for size in _groups(num_microbatches, num_devices):
        order += [(j, c) for c in range(chunks) for j in range(lo, lo + size)]
        lo += size
    return order


def _virtual(name: str, num_stages: int, num_devices: int) -> int:
    check_count("num_devices", num_devices)
    if num_stages % num_devices:
        raise SettingError(
            f"schedule {name!r} places stage s on device s % num_devices and needs num_stages a multiple of "
            f"num_devices: got num_stages={num_stages}, num_devices={num_devices}. Cut the model into "
            f"{num_devices * max(1, round(num_stages / num_devices))} stages, or change the number of devices"
        )
    return num_stages // num_devices


def interleaved_1f1b(num_stages: int, num_microbatches: int, num_devices: int | None = None) -> Schedule:
    """Interleaved 1F1B (Megatron-LM): V = num_stages / num_devices stages ("chunks") per device.

    Stage s runs on device s % D, so device r holds the non-adjacent stages r, r+D, r+2D, ...
    Each device walks micro-batches in groups through its chunks (forwards: chunk 0 of the group's
    micro-batches, then chunk 1 of the same group, ...; backwards in the same order with the chunks
    reversed), runs ``min(M*V, 2(D-1-r) + (V-1)G)`` warm-up forwards (G: the first group's size),
    then alternates one forward and one backward, then drains the backwards. Megatron's groups
    have D micro-batches; for any M we cut M into ``floor(M/D)`` groups as equal as possible, larger
    first (all of D when D divides M; one group of M when M < D, as PyTorch's rounds generalised).
    With uniform stages and M >= D the bubble is 1F1B's divided by V: makespan
    ``M(f+b) + (D-1)(f+b)/V`` for per-device costs f and b (checked for D <= 6, V <= 4, M <= 24),
    at the price of V times as many (smaller) cross-device copies. D=2 devices, S=4 stages
    (V=2), M=4, one time unit per stage action::

        time:     0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17
        device 0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 .   2B2 .   2B3 0B2 0B3
        device 1: .   1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3 .

    18 units against 1F1B's 20 on the same 2 devices (2 stages of 2 units each way): idle
    2 units per device instead of 4. Peak in flight on device r: the warm-up count + 1 chunks
    (``min(M*V, 2(D-1-r) + (V-1)G + 1)``; 5 and 3 above), each 1/V of the device's layers.
    ``num_devices=None`` (or ``num_stages``) gives plain 1F1B.

    Raises:
        SettingError: num_stages not a multiple of num_devices.
    """
    _check_sizes(num_stages, num_microbatches)
    if num_devices is None or num_devices == num_stages:
        return one_f_one_b(num_stages, num_microbatches)
    chunks, d, m = _virtual("interleaved_1f1b", num_stages, num_devices), num_devices, num_microbatches
    order, first_group = _chunk_order(m, chunks, d), _groups(m, d)[0]
    schedule: Schedule = []
    for r in range(d):
        forwards = [Action(c * d + r, F, j) for j, c in order]
        backwards = [Action((chunks - 1 - c) * d + r, B, j) for j, c in order]
        total = m * chunks
        warmup = min(total, 2 * (d - 1 - r) + (chunks - 1) * first_group)
        actions = forwards[:warmup]
        for k in range(total - warmup):
            actions += [forwards[warmup + k], backwards[k]]
        schedule.append(actions + backwards[total - warmup:])
    return schedule


interleaved_1f1b.several_stages_per_device = True  # type: ignore[attr-defined]
"""Read by the executor: this generator takes ``num_devices`` and places stage s on row s % D."""


def zb_h1(num_stages: int, num_microbatches: int, num_devices: int | None = None) -> Schedule:
    """ZB-H1 (zero bubble, Qi et al. 2023, handcrafted schedule 1): 1F1B with backward split in B and W.

    B computes only the input gradient (the critical path to the previous stage); W, the weight
    gradient, is deferred: stage i keeps the 1F1B order of F and B (min(K-1-i, M) warm-up forwards)
    and runs W of micro-batch j once B of j+i is done, the rest at the end, where W fills the
    drain bubble. A micro-batch is in flight from F until W, so every stage holds at most
    ``min(K, M)`` micro-batches: 1F1B's peak (stage 0's), now reached on every stage (stage i: up to
    i more than under 1F1B). With uniform costs f (F), b (B, the input half) and w (W), M >= K and
    w <= min(f, b), the makespan is ``M(f+b+w) + (K-1)(f+b-w)``: the idle time per device is 1F1B's
    ``(K-1)(f+b+w)`` times ``(f+b-w)/(f+b+w)``, a third when f = b = w. K=3, M=4, one unit per action::

        time:     0  1  2  3  4  5  6  7  8  9  10 11 12 13
        device 0: F0 F1 F2 .  .  B0 W0 F3 B1 W1 B2 W2 B3 W3
        device 1: .  F0 F1 .  B0 F2 B1 W0 F3 B2 W1 B3 W2 W3
        device 2: .  .  F0 B0 F1 B1 F2 B2 W0 F3 B3 W1 W2 W3

    14 units against 18 for 1F1B with its unsplit backward of 2 units: idle 2 units per
    device instead of 6.

    ``num_devices`` must be None or ``num_stages`` (one stage per device).
    """
    _check_sizes(num_stages, num_microbatches)
    _one_per_device("zb_h1", num_stages, num_devices)
    schedule: Schedule = []
    for s in range(num_stages):
        warmup = min(num_stages - 1 - s, num_microbatches)
        actions = [Action(s, F, j) for j in range(warmup)]
        # Step j runs B of micro-batch j, after the next forward while forwards remain (1F1B).
        steps = [[Action(s, F, j)] for j in range(warmup, num_microbatches)] + [[]] * warmup
        weights = 0  # W actions emitted so far: W of micro-batch j follows B of j + s
        for j, step in enumerate(steps):
            actions += step + [Action(s, B, j)]
            if j + 1 - weights > s:
                actions.append(Action(s, W, weights))
                weights += 1
        schedule.append(actions + [Action(s, W, j) for j in range(weights, num_microbatches)])
    return schedule


def forward_only(num_stages: int, num_microbatches: int, num_devices: int | None = None) -> Schedule:
    """Inference: every stage runs F0..F(M-1); used by ``predict`` and ``evaluate``.

    With ``num_devices`` (a divisor of ``num_stages``) stage s runs on device s % D, in the forward
    order of :func:`interleaved_1f1b` (groups of micro-batches through each device's chunks).
    """
    _check_sizes(num_stages, num_microbatches)
    if num_devices is None or num_devices == num_stages:
        return [[Action(s, F, j) for j in range(num_microbatches)] for s in range(num_stages)]
    chunks = _virtual("forward_only", num_stages, num_devices)
    order = _chunk_order(num_microbatches, chunks, num_devices)
    return [[Action(c * num_devices + r, F, j) for j, c in order] for r in range(num_devices)]


GENERATORS: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
    "zb_h1": zb_h1,
}
"""Training schedules by name; each is ``gen(num_stages, num_microbatches, num_devices=None)``."""

NAMES: tuple[str, ...] = tuple(GENERATORS)
"""The training schedules by name, in the order tables list them."""

ALIASES: dict[str, str] = {
    "one_f_one_b": "1f1b", "1f_1b": "1f1b", "interleaved": "interleaved_1f1b",
    "zbh1": "zb_h1", "zero_bubble": "zb_h1",
}
"""Other accepted spellings (``-`` is read as ``_``, case ignored): ``interleaved-1f1b``, ``zb-h1``, ..."""


def canonical_name(name: str) -> str:
    """The canonical schedule name of ``name`` or an alias (``"ZB-H1"`` -> ``"zb_h1"``).

    Raises:
        SettingError: naming the unknown schedule and listing the known ones.
    """
    key = str(name).lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in GENERATORS:
        raise SettingError(
            f"unknown schedule {name!r}; known schedules: {', '.join(sorted(GENERATORS))}. "
            "Pass one of them as schedule=..."
        )
    return key


def get(name: str) -> Callable[..., Schedule]:
    """Looks a training schedule generator up by name or alias (``"1f1b"``, ``"interleaved"``, ``"zb-h1"``).

    Raises:
        SettingError: naming the unknown schedule and listing the known ones.
    """
    return GENERATORS[canonical_name(name)]


