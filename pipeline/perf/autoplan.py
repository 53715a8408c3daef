"""The ``"auto"`` plan (schedule, M, recompute): simulate every candidate on measured costs, pick the fastest that fits.

Pure Python (no TensorFlow): :func:`choose` works on a :class:`Profile` (stage costs per M, activation and
static bytes per stage), measured once by :mod:`pipeline.perf.autoplan_measure`. Every candidate

    schedule (pipeline.core.schedule.NAMES) x M (1, 2, 4, ... <= batch) x recompute (False, True)

is simulated (:func:`pipeline.perf.simulate.simulate`); its peak memory per device is the device's static
bytes (parameters, float32 gradient sums, optimizer slots) plus the most activation bytes its schedule row
keeps alive at once. Candidates over the budget are dropped; the fastest predicted step wins; ties go to
fewer micro-batches, then no recompute, then less memory, then the schedule listed first. Importing this module
registers the resolver that ``PipelineModel(..., schedule="auto")`` calls on its first batch
(:mod:`pipeline.core.autohook`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from pipeline.core import autohook
from pipeline.core import schedule as sched
from pipeline.errors import ScheduleError, SettingError, invalid
from pipeline.perf import simulate as sim

AUTO = autohook.AUTO
parse_budget = autohook.parse_budget
DEFAULT_MICROBATCHES = (1, 2, 4, 8, 16, 32)
"""The values of M tried by ``microbatches="auto"`` (those <= the batch size)."""
DEFAULT_BUDGET = autohook.DEFAULT_BUDGET


@dataclasses.dataclass(frozen=True)
class Profile:
    """What the choice needs to know about a pipeline, measured once.

    Attributes:
        batch_size: B, rows of one mini-batch.
        costs: per candidate M, one :class:`~pipeline.perf.simulate.StageCost` per stage for one
            micro-batch of ``ceil(B/M)`` rows (without recomputation).
        activation_bytes: per stage, bytes one sample's forward keeps for backward.
        input_bytes: per stage, bytes of one sample's stage input (all a recomputed stage keeps).
        static_bytes: per stage, parameters + float32 gradient sums + optimizer slots.
        stage_devices: per stage, the index of its device (default: one device per stage).
    """

    batch_size: int
    costs: Mapping[int, Sequence[sim.StageCost]]
    activation_bytes: Sequence[int]
    input_bytes: Sequence[int]
    static_bytes: Sequence[int]
    stage_devices: Sequence[int] | None = None
    split_costs: Mapping[int, Sequence[sim.StageCost]] | None = None
    """Per M, the costs of a split backward (``StageCost(F, B + W, W)``) for schedules with W actions;
    None: those schedules use ``costs`` (W = half of the backward)."""
    held_bytes: Sequence[int] | None = None
    """Per stage, bytes per sample that a split backward holds from B to W beside the activations: the layer
    calls' output gradients (:mod:`pipeline.core.layer_grads`; 0 where W asks the tape again). None: 0."""
    alone_costs: Mapping[int, Sequence[sim.StageCost]] | None = None
    """Per M, ``costs`` timed with the other devices idle, for devices that share compute (logical CPU
    devices on one machine's cores): the simulator then runs an action faster while fewer devices are busy
    (:func:`pipeline.perf.simulate.shared_timeline`). None: the devices compute apart (GPUs)."""
    alone_split_costs: Mapping[int, Sequence[sim.StageCost]] | None = None
    """Per M, ``split_costs`` timed alone (see ``alone_costs``)."""

    @property
    def num_stages(self) -> int:
        """K."""
        return len(self.activation_bytes)

    @property
    def num_devices(self) -> int:
        """How many distinct devices the stages run on."""
        return len(set(self.devices()))

    def devices(self) -> list[int]:
        """Per stage, its device index."""
        return list(self.stage_devices) if self.stage_devices is not None else list(range(self.num_stages))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One simulated (schedule, M, recompute) plan."""

    schedule: str
    microbatches: int
    recompute: bool
    step: float
    """Predicted seconds per step (simulated makespan + the profile's overhead)."""
    peak_bytes: int
    """The largest predicted peak over devices."""
    device_bytes: tuple[int, ...]
    bubble: float
    fits: bool = True
    measured: float | None = None
    """Seconds per step timed on the real stages (:mod:`pipeline.perf.autoplan_refine`; the finalists only)."""

    def label(self) -> str:
        """``"1f1b M=8 recompute"``."""
        return f"{self.schedule} M={self.microbatches}" + (" recompute" if self.recompute else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chosen plan, the runner-up and every candidate simulated."""

    best: Candidate
    runner_up: Candidate | None
    table: tuple[Candidate, ...]
    budget: int | None
    budget_note: str
    skipped: tuple[str, ...] = ()

    @property
    def schedule(self) -> str:
        """The chosen schedule name."""
        return self.best.schedule

    @property
    def microbatches(self) -> int:
        """The chosen M."""
        return self.best.microbatches

    @property
    def recompute(self) -> bool:
        """Whether the chosen plan recomputes activations (all stages)."""
        return self.best.recompute

    @property
    def step(self) -> float:
        """The chosen plan's predicted step time (s)."""
        return self.best.step

    @property
    def peak_bytes(self) -> int:
        """The chosen plan's predicted peak bytes on its fullest device."""
        return self.best.peak_bytes

    def summary(self) -> str:
        """Two lines: the choice and the runner-up with predicted step times and peaks."""
        best = self.best
        text = f"auto plan: {best.label()}, predicted step {best.step:.4f} s{_timed(best)}, peak {_mb(best.peak_bytes)}"
        if self.runner_up is not None:
            r = self.runner_up
            text += (f"\n  runner-up: {r.label()}, predicted step {r.step:.4f} s{_timed(r)}, "
                     f"peak {_mb(r.peak_bytes)}")
        return text + f"\n  memory budget: {self.budget_note}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: the choice, runner-up, budget and the whole table (what ``plan.json`` records)."""
        return {"schedule": self.schedule, "microbatches": self.microbatches, "recompute": self.recompute,
                "predicted_step": self.step, "peak_bytes": self.peak_bytes, "best": self.best.to_dict(),
                "runner_up": self.runner_up.to_dict() if self.runner_up else None,
                "budget_bytes": self.budget, "budget": self.budget_note, "skipped": list(self.skipped),
                "table": [c.to_dict() for c in self.table]}


def _timed(c: Candidate) -> str:
    return "" if c.measured is None else f" (measured {c.measured:.4f} s)"


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MB"


def candidate_microbatches(batch_size: int, fixed: int | None = None, values: Sequence[int] | None = None,
                           divisible: bool = False) -> list[int]:
    """The values of M to try: ``fixed`` alone, else ``values`` (:data:`DEFAULT_MICROBATCHES`) up to
    ``batch_size`` (divisors of it only, if asked)."""
    if fixed is not None:
        return [fixed]
    values = DEFAULT_MICROBATCHES if values is None else values
    ms = [m for m in values if m <= batch_size and (not divisible or batch_size % m == 0)]
    return ms or [1]


def check_settings(schedule: Any, microbatches: Any, recompute: Any, memory_budget: Any = DEFAULT_BUDGET) -> None:
    """Refuses a bad ``auto`` setting (before any compute), naming the setting, value and what is allowed.

    Raises:
        SettingError: with ``setting`` set to the argument name.
    """
    if isinstance(schedule, str) and not autohook.is_auto(schedule):
        sched.get(schedule)
    autohook.settings(AUTO, microbatches, recompute, memory_budget)


def splits_backward(name: str) -> bool:
    """Whether schedule ``name`` splits backward into B and W (zero-bubble schedules)."""
    try:
        return any(a.op is sched.W for row in sched.get(name)(2, 2) for a in row)
    except (SettingError, ScheduleError):
        return False


def _schedule_for(name: str, k: int, m: int, stage_devices: Sequence[int]) -> sched.Schedule:
    """The schedule of ``name`` for K stages placed on ``stage_devices`` (several stages may share one)."""
    generator = sched.get(name)
    devices = len(set(stage_devices))
    if devices == k:
        if "interleaved" in name:
            raise SettingError("interleaved schedules apply only when there are more stages than devices")
        return generator(k, m)
    try:
        schedule = generator(k, m, devices)  # type: ignore[call-arg]  # the generators take num_devices
    except SettingError:  # one row per stage: the executor chains a device's stages in execution order
        merged: dict[int, list[sched.Action]] = {}
        for action in sched.walk(generator(k, m))[0]:
            merged.setdefault(stage_devices[action.stage], []).append(action)
        return [merged[d] for d in sorted(merged)]
    rows = sched.stage_rows(schedule) if hasattr(sched, "stage_rows") else list(range(k))
    if list(rows) != [list(dict.fromkeys(stage_devices)).index(d) for d in stage_devices]:
        raise SettingError(f"it places stage s on device row {list(rows)}, the model on {list(stage_devices)}")
    return schedule


def _rows(schedule: sched.Schedule, stage_devices: Sequence[int]) -> list[list[sched.Action]]:
    """The schedule's actions grouped by the device of their stage, in row order."""
    merged: dict[int, list[sched.Action]] = {}
    for row in schedule:
        for action in row:
            merged.setdefault(stage_devices[action.stage], []).append(action)
    return [merged[d] for d in sorted(merged)]


def device_peaks(schedule: sched.Schedule, profile: Profile, rows_per_mb: int, recompute: bool) -> list[int]:
    """Per device: static bytes of its stages + the most activation bytes its row keeps alive at once.

    A micro-batch of stage s is alive from its F until its B (its W where the stage splits backward); it
    keeps ``input + activations`` bytes, or only the input when recomputed, plus one recomputation's
    activations while a backward of that device runs. A split, not recomputed stage also holds its layer
    calls' output gradients from B to W (``profile.held_bytes``)::

        stage row:   F0 ........ B0 ...... W0          alive: input + activations  F0 -> W0
                                 |<-held->|             + held output gradients    B0 -> W0
    """
    stage_devices = profile.devices()
    split = {a.stage for row in schedule for a in row if a.op is sched.W}
    held = list(profile.held_bytes or [0] * profile.num_stages)
    peaks = []
    for row in _rows(schedule, stage_devices):
        stages = sorted({a.stage for a in row})
        static = sum(profile.static_bytes[s] for s in stages)
        live = peak = 0
        for a in row:
            activations = 0 if recompute else profile.activation_bytes[a.stage]
            keep = rows_per_mb * (profile.input_bytes[a.stage] + activations)
            between = 0 if recompute or a.stage not in split else rows_per_mb * held[a.stage]
            if a.op is sched.F:
                live += keep
            elif a.op is sched.B:
                live += between - (0 if a.stage in split else keep)
            elif a.op is sched.W:
                live -= keep + between
            peak = max(peak, live)
        transient = rows_per_mb * max(profile.activation_bytes[s] for s in stages) if recompute and stages else 0
        peaks.append(int(static + peak + transient))
    return peaks


def simulate_candidates(profile: Profile, schedules: Sequence[str] | None = None, ms: Sequence[int] | None = None,
                        recompute: Sequence[bool] = (False, True),
                        overhead: float = 0.0) -> tuple[list[Candidate], list[str]]:
    """Simulates every schedule x M x recompute; returns the candidates and why others were skipped."""
    k = profile.num_stages
    names = list(schedules) if schedules is not None else list(sched.NAMES)
    table, skipped = [], []
    for name in names:
        for m in (sorted(ms) if ms is not None else sorted(profile.costs)):
            if m not in profile.costs:
                raise SettingError(f"no measured stage costs for M={m}; measured: {sorted(profile.costs)}")
            try:
                schedule = _schedule_for(name, k, m, profile.devices())
            except (SettingError, ScheduleError) as err:
                skipped.append(f"{name} M={m}: {err}")
                continue
            rows = math.ceil(profile.batch_size / m)
            splits = any(a.op is sched.W for row in schedule for a in row)
            costs_m = _costs_for(profile.costs, profile.split_costs, m, splits)
            alone_m = _costs_for(profile.alone_costs or {}, profile.alone_split_costs, m, splits)
            for flag in recompute:
                result = sim.simulate(schedule, _recomputed(costs_m, flag), alone=_recomputed(alone_m, flag))
                if result.deadlock:
                    skipped.append(f"{name} M={m}: {result.deadlock}")
                    continue
                peaks = device_peaks(schedule, profile, rows, flag)
                table.append(Candidate(name, m, bool(flag), result.makespan + overhead, max(peaks), tuple(peaks),
                                       result.bubble))
    return table, skipped


def _costs_for(costs: Mapping[int, Sequence[sim.StageCost]], split: Mapping[int, Sequence[sim.StageCost]] | None,
               m: int, splits: bool) -> Sequence[sim.StageCost] | None:
    """The stage costs at M=``m``: of the split backward where the schedule splits it and they were measured."""
    return ((split or {}).get(m) if splits else None) or costs.get(m)


def _recomputed(costs: Sequence[sim.StageCost] | None, recompute: bool) -> list[sim.StageCost] | None:
    """``costs`` of stages that run their forward again in their (input-gradient) backward when ``recompute``."""
    if costs is None:
        return None
    return [sim.StageCost(c.forward, c.backward + (c.forward if recompute else 0.0), c.weight) for c in costs]


def _order(candidate: Candidate, names: Sequence[str]) -> tuple:
    rank = names.index(candidate.schedule) if candidate.schedule in names else len(names)
    return (round(candidate.step, 9), candidate.microbatches, candidate.recompute, candidate.peak_bytes, rank)


def choose(profile: Profile, budget: int | None = None, schedules: Sequence[str] | None = None,
           ms: Sequence[int] | None = None, recompute: Sequence[bool] = (False, True), overhead: float = 0.0,
           budget_note: str | None = None) -> Choice:
    """The fastest predicted candidate whose peak bytes on every device fit ``budget``.

    Args:
        profile: measured costs and bytes.
        budget: bytes per device (None: no limit).
        schedules: schedule names to try (default: every training schedule).
        ms: values of M to try (default: every M the profile has costs for).
        recompute: the recompute settings to try.
        overhead: seconds per step outside the stage actions, added to every prediction.
        budget_note: how the budget was found (printed and recorded).

    Returns:
        A :class:`Choice`; ``table`` lists every candidate, fitting or not, in order of preference.

    Raises:
        SettingError: when no candidate fits (naming the smallest need), or none can be simulated.
    """
    names = list(schedules) if schedules is not None else list(sched.NAMES)
    table, skipped = simulate_candidates(profile, names, ms, recompute, overhead)
    if not table:
        raise SettingError("schedule='auto': no candidate plan can run: " + "; ".join(skipped))
    table = [dataclasses.replace(c, fits=budget is None or c.peak_bytes <= budget) for c in table]
    table.sort(key=lambda c: (not c.fits, *_order(c, names)))
    note = budget_note or ("no limit" if budget is None else f"{_mb(budget)} per device")
    fitting = [c for c in table if c.fits]
    if not fitting:
        least = min(table, key=lambda c: (c.peak_bytes, *_order(c, names)))
        err = invalid("memory_budget", note,
                      f"no plan fits: the smallest need is {_mb(least.peak_bytes)} ({least.peak_bytes} bytes) on one "
                      f"device, by {least.label()}. Raise memory_budget to at least that, or cut the model into "
                      "more stages, or use a smaller batch")
        raise err
    return Choice(fitting[0], fitting[1] if len(fitting) > 1 else None, tuple(table), budget, note, tuple(skipped))


def format_table(choice: Choice) -> str:
    """The candidates as a text table, best first, the choice and the runner-up marked."""
    lines = [f"{'schedule':<17} {'M':>3} {'recompute':>9} {'step (s)':>10} {'measured':>9} {'bubble':>7} "
             f"{'peak/device':>12}  fits"]
    for c in choice.table:
        mark = " <- chosen" if c is choice.best else (" <- runner-up" if c is choice.runner_up else "")
        timed = "-" if c.measured is None else f"{c.measured:.4f}"
        lines.append(f"{c.schedule:<17} {c.microbatches:>3} {str(c.recompute):>9} {c.step:>10.4f} {timed:>9} "
                     f"{c.bubble:>7.1%} {_mb(c.peak_bytes):>12}  {'yes' if c.fits else 'NO'}{mark}")
    return "\n".join(lines)


def budget_bytes(value: Any, device_total: Any) -> tuple[int | None, str]:
    """The budget in bytes per device and a note saying how it was found.

    Args:
        value: the ``memory_budget`` setting (see :func:`parse_budget`).
        device_total: ``device_total() -> (bytes, where)``, called only for a share such as ``"80%"``.
    """
    parsed = parse_budget(value)
    if parsed is None:
        return None, "no limit"
    kind, number = parsed
    if kind == "bytes":
        return int(number), f"{_mb(int(number))} per device"
    total, where = device_total()
    budget = int(total * number / 100)
    return budget, f"{number:g}% of {_mb(total)} = {_mb(budget)} per device ({where})"


def _resolve(model: Any, data: Any, batch_size: Any, in_step: bool) -> None:
    """The resolver :mod:`pipeline.core.autohook` calls (the TensorFlow side is imported on first use)."""
    from pipeline.perf import autoplan_measure  # noqa: PLC0415 - TensorFlow only when a model resolves

    autoplan_measure.resolve_model(model, data, batch_size, in_step)


autohook.set_resolver(_resolve)
__all__ = ["AUTO", "Candidate", "Choice", "Profile", "budget_bytes", "check_settings", "choose",
           "format_table", "parse_budget"]
