"""The measured side of ``"auto"``: a :class:`~pipeline.perf.autoplan.Profile` of real stages, and resolving a model.

Stage costs come from :func:`pipeline.perf.measure.measure_stage_costs` at the micro-batch size of every
candidate M (under load for M > 1, as ``pipeline plan`` does); activation bytes per sample from the stage's
forward graph (every tensor with a batch axis it makes: an upper estimate of what its tape keeps); static
bytes from the variables and the optimizer's slots per variable.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
from typing import Any, Sequence

from pipeline.core import autohook
from pipeline.core import schedule as sched
from pipeline.errors import SettingError, invalid
from pipeline.perf import autoplan, autoplan_refine, measure

SLOTS = {"adam": 2, "adamw": 2, "nadam": 2, "adamax": 2, "adadelta": 2, "ftrl": 2, "adafactor": 2, "lamb": 2,
         "lion": 1, "adagrad": 1, "rmsprop": 1, "sgd": 0}
"""Optimizer slot variables per trained variable (plus momentum/centered/amsgrad where set)."""
PLAN_FILE = "plan.json"
MEASURE = {"repeats": 5, "calls": 3, "rounds": 2}
"""How :func:`choose_for` times the stages (see :func:`measure_profile`); tests make it quicker."""
REFINE = dict(autoplan_refine.REFINE)
"""How :func:`choose_for` times the top predicted plans (:func:`pipeline.perf.autoplan_refine.refine`)."""


def optimizer_slots(optimizer: Any) -> int:
    """How many variables of a weight's size ``optimizer`` keeps per trained variable (2 when unknown)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    if inner is None:
        return 2
    name = type(inner).__name__.lower()
    slots = SLOTS.get(name, 2)
    slots += bool(getattr(inner, "momentum", 0)) if name in ("sgd", "rmsprop") else 0
    slots += bool(getattr(inner, "centered", False)) + bool(getattr(inner, "amsgrad", False))
    return slots


def _nbytes(tensors: Any) -> int:
    import tensorflow as tf

    return int(sum(int(tf.size(t)) * tf.as_dtype(t.dtype).size for t in tf.nest.flatten(tensors)))


def _batch_axis_bytes(layer: Any, inp: Any) -> int:
    """Bytes per sample of every tensor with an unknown batch axis that ``layer``'s training forward makes."""
    import tensorflow as tf

    from pipeline.core import traced

    graph = tf.function(lambda t: layer(t, training=True)).get_concrete_function(traced.open_batch_spec(inp)).graph
    return sum(_per_sample_bytes(out) for op in graph.get_operations()
               if op.type not in ("Placeholder", "Const", "ReadVariableOp", "Shape") for out in op.outputs)


def _held_bytes(layer: Any, inp: Any) -> int:
    """Bytes per sample that a split backward holds from B to W: the layer calls' output gradients
    (:mod:`pipeline.core.layer_grads`), 0 where W asks the tape again instead."""
    import tensorflow as tf

    from pipeline.core import layer_grads, traced

    held: list[int] = []

    def forward(t: Any) -> Any:
        with layer_grads.recording(layer) as calls:
            y, extra = traced.plain_call(layer, t, True, recompute=False)
        calls = layer_grads.usable(calls, list(layer.trainable_variables), extra)
        held.append(0 if calls is None else sum(_per_sample_bytes(o) for o in calls.outputs()))
        return y

    tf.function(forward).get_concrete_function(traced.open_batch_spec(inp))
    return held[-1]


def _per_sample_bytes(t: Any) -> int:
    """Bytes of one row of ``t`` when its first axis is the (unknown) batch axis, else 0."""
    shape = t.shape
    if shape.rank and shape[0] is None and all(d is not None for d in shape[1:]):
        return int(shape[1:].num_elements()) * t.dtype.size
    return 0


def _split_loops(stages: Sequence[Any], x: Any, repeats: int) -> list[tuple[Any, Any, Any]]:
    """Per stage: its micro-batch input, a loop of forward + input gradient (B), and of forward + B + W.

    As :meth:`pipeline.core.stage.Stage.backward_input` / ``backward_weight`` do: B takes the input
    gradient and the layer calls' output gradients in one walk, W the weight gradients from those
    (:mod:`pipeline.core.layer_grads`; or a second walk of the tape where that does not apply), summed
    over runs.
    """
    import tensorflow as tf

    from pipeline.core import layer_grads, traced

    loops = []
    for stage in stages:
        layer, device, watch = stage.layer, stage.device, stage.index > 0
        variables = list(layer.trainable_variables)

        def loop(weights: bool, layer=layer, device=device, variables=variables, watch=watch) -> Any:
            def run(inp: Any) -> Any:
                with tf.device(device):
                    carry, acc = tf.constant(0.0), None
                    for _ in range(repeats):
                        nudged = tf.nest.map_structure(
                            lambda t: t + tf.cast(carry, t.dtype) if t.dtype.is_floating else t, inp)
                        sources = [t for t in tf.nest.flatten(nudged) if t.dtype.is_floating] if watch else []
                        with layer_grads.split_tape() as tape:
                            tape.watch(sources)
                            with layer_grads.recording(layer) as calls:
                                y, extra = traced.plain_call(layer, nudged, True, recompute=False)
                            outs = tf.nest.flatten(y)
                        calls = layer_grads.usable(calls, variables, extra)
                        seeds = [tf.ones_like(o) for o in outs]
                        got, held = layer_grads.input_gradients(tape, outs, sources, calls, seeds)
                        got = [g for g in got + held if g is not None]
                        if weights:
                            grads = layer_grads.weight_gradients(tape, outs, variables, calls, held, seeds)
                            grads = [g for g in grads if g is not None]
                            acc = grads if acc is None else [a + g for a, g in zip(acc, grads)]
                            got += acc
                        carry = tf.add_n([tf.cast(tf.reshape(o, [-1])[0], tf.float32) for o in got or outs]) * 1e-30
                    return carry
            return tf.function(run)

        with tf.device(device):
            x = tf.nest.map_structure(tf.identity, x)
        loops.append((x, loop(False), loop(True)))
        with tf.device(device):
            x = layer(x, training=True)
    return loops


@measure.timing_loops()
def measure_split_costs(stages: Sequence[Any], x: Any, full: Sequence[Any], repeats: int = 5, calls: int = 3,
                        under_load: bool = True) -> list[Any]:
    """Costs of a split backward (zero-bubble schedules): ``StageCost(F, B + W, W)`` per stage, measured.

    Splitting one VJP into two gradient calls costs more than the full backward of ``full`` (the
    per-op work of walking the tape twice); the simulator then gets B and W as they run.
    """
    from pipeline.perf import simulate as sim

    loops = _split_loops(stages, x, repeats)
    for inp, run_b, run_bw in loops:  # trace every loop before any timing
        measure.wait_for(run_b(inp))
        measure.wait_for(run_bw(inp))
    costs = []
    for i, ((inp, run_b, run_bw), cost) in enumerate(zip(loops, full)):
        others = ([(lambda fn=loops[j][2], a=loops[j][0]: fn(a)) for j in measure.loaders(stages, i)]
                  if under_load else [])
        with measure.StageLoad(others):
            with_b = measure.median_time(lambda: run_b(inp), calls) / repeats
            with_bw = measure.median_time(lambda: run_bw(inp), calls) / repeats
        b, w = max(with_b - cost.forward, 0.0), max(with_bw - with_b, 0.0)
        costs.append(sim.StageCost(cost.forward, b + w, w))
    return costs


def measure_profile(stages: Sequence[Any], x: Any, ms: Sequence[int], optimizer: Any = None, repeats: int = 5,
                    calls: int = 3, rounds: int = 1, with_split: bool = True, shared: bool = False) -> autoplan.Profile:
    """Measures what :func:`pipeline.perf.autoplan.choose` needs, once, on the built stages.

    Args:
        stages: the :class:`~pipeline.core.stage.Stage` objects (built, placed).
        x: one mini-batch of inputs (concrete tensors).
        ms: the values of M whose micro-batch size is timed.
        optimizer: the model's optimizer (its slots count as static bytes), or None.
        repeats: stage runs per timed call; calls: timed calls (median kept).
        with_split: also time the split backward (B, then W) that zero-bubble schedules run.
        rounds: passes over ``ms``, interleaved; per stage the smallest forward and backward are kept
            (other work on the machine only ever adds time).
        shared: the devices share compute (:func:`shares_compute`): for M > 1 also time every stage alone
            (``Profile.alone_costs``), so that the simulator models the shared cores.
    """
    from pipeline.core import microbatch as mb_lib

    def timed(values: Sequence[int], under_load: bool) -> tuple[dict[int, list[Any]], dict[int, list[Any]]]:
        costs: dict[int, list[Any]] = {}
        split: dict[int, list[Any]] = {}
        for _ in range(max(1, rounds)):  # interleaved rounds, the least disturbed (smallest) time kept
            for m in values:
                part = mb_lib.split(x, m)[0]
                loaded = under_load and m > 1  # one micro-batch never overlaps another device's work
                new = measure.measure_stage_costs(stages, part, repeats=repeats, calls=calls, under_load=loaded)
                costs[m] = [_least(a, b) for a, b in zip(costs.get(m, new), new)]
                if with_split:
                    new = measure_split_costs(stages, part, costs[m], repeats, calls, under_load=loaded)
                    split[m] = [_least(a, b) for a, b in zip(split.get(m, new), new)]
        return costs, split

    costs, split = timed(ms, True)
    profile = dataclasses.replace(memory_profile(stages, x, optimizer, with_split), costs=costs,
                                  split_costs=split or None)
    if not shared:
        return profile
    alone, alone_split = timed([m for m in ms if m > 1], False)
    alone.update({m: costs[m] for m in ms if m == 1})  # M=1 was timed alone already
    alone_split.update({m: split[m] for m in ms if m == 1 and m in split})
    return dataclasses.replace(profile, alone_costs=alone, alone_split_costs=alone_split or None)


def shares_compute(devices: Sequence[str]) -> bool:
    """Whether ``devices`` are several logical CPU devices of this process's task (one machine's cores)."""
    import tensorflow as tf

    specs = [tf.DeviceSpec.from_string(d) for d in dict.fromkeys(devices)]
    tasks = {(s.job or "localhost", s.replica or 0, s.task or 0) for s in specs}
    return len(specs) > 1 and len(tasks) == 1 and all((s.device_type or "").upper() == "CPU" for s in specs)


def memory_profile(stages: Sequence[Any], x: Any, optimizer: Any = None, with_split: bool = True) -> autoplan.Profile:
    """The byte counts of :class:`~pipeline.perf.autoplan.Profile` (no timing: ``costs`` is empty).

    Args:
        stages: the built, placed stages; x: one mini-batch of inputs.
        optimizer: the model's optimizer (its slots count as static bytes), or None.
        with_split: also measure what a split backward holds from B to W (``held_bytes``).
    """
    import tensorflow as tf

    from pipeline.core import microbatch as mb_lib

    size = int(mb_lib.batch_size(x))
    activation, inputs, static, held = [], [], [], []
    slots = optimizer_slots(optimizer)
    h = x
    for stage in stages:
        inputs.append(_nbytes(h) // size)
        activation.append(_batch_axis_bytes(stage.layer, h))
        held.append(_held_bytes(stage.layer, h) if with_split else 0)
        trained = sum(int(v.numpy().nbytes) for v in stage.layer.trainable_variables)
        count = sum(int(tf.size(v)) for v in stage.layer.trainable_variables)
        every = sum(int(v.numpy().nbytes) for v in stage.layer.variables)
        static.append(every + 4 * count + slots * trained)
        with tf.device(stage.device):
            h = stage.layer(h, training=False)
    names = list(dict.fromkeys(stage.device for stage in stages))
    return autoplan.Profile(size, {}, activation, inputs, static, [names.index(s.device) for s in stages],
                            None, held)


def _least(a: Any, b: Any) -> Any:
    """The smaller of two measurements of one stage, field by field."""
    weight = None if a.weight is None else min(a.weight, b.weight)
    return type(a)(min(a.forward, b.forward), min(a.backward, b.backward), weight)


def device_total(devices: Sequence[str]) -> tuple[int, str]:
    """Memory of one device: a GPU's total (``nvidia-smi``), or on the CPU fallback the RAM shared among devices.

    Raises:
        SettingError: when a GPU's memory cannot be read (give ``memory_budget`` in bytes then).
    """
    names = list(dict.fromkeys(devices))
    if any("GPU" in d.upper() for d in names):
        smi = shutil.which("nvidia-smi")
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=30) if smi else None
        if out is None or out.returncode or not out.stdout.strip():
            raise invalid("memory_budget", "a share", "this process cannot read the GPUs' memory size "
                                   "(no nvidia-smi); give memory_budget in bytes or as a size such as '12GB'")
        return min(int(v) for v in out.stdout.split()) * 2**20, "the smallest GPU's memory, from nvidia-smi"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // len(names), (f"CPU fallback: the machine's {ram / 2**30:.1f} GiB of RAM divided among "
                               f"{len(names)} logical device(s)")


def choose_for(stages: Sequence[Any], x: Any, pending: autohook.AutoSettings, optimizer: Any = None,
               divisible: bool = False, overhead: float = 0.0) -> autoplan.Choice:
    """Measures the stages on ``x``, simulates, and times the top predicted plans: the ``"auto"`` settings of
    ``pending`` (the others stay fixed)."""
    from pipeline.core import microbatch as mb_lib

    size = int(mb_lib.batch_size(x))
    fixed_m = None if autohook.is_auto(pending.microbatches) else int(pending.microbatches)
    ms = autoplan.candidate_microbatches(size, fixed_m, divisible=divisible)
    schedules = list(sched.NAMES) if autohook.is_auto(pending.schedule) else [str(pending.schedule)]
    flags = pending.recompute
    recompute = (False, True) if autohook.is_auto(flags) else (bool(flags if isinstance(flags, bool) else any(flags)),)
    budget, note = autoplan.budget_bytes(pending.memory_budget, lambda: device_total([s.device for s in stages]))
    with_split = any(autoplan.splits_backward(name) for name in schedules)
    with measure.variables_kept(stages):  # the timing runs train nothing: BN statistics, dropout seeds restored
        profile = measure_profile(stages, x, ms, optimizer, with_split=with_split,
                                  shared=shares_compute([s.device for s in stages]), **MEASURE)
        choice = autoplan.choose(profile, budget, schedules, ms, recompute, overhead=overhead, budget_note=note)
        return autoplan_refine.refine(choice, stages, x, **REFINE)


def sample_batch(data: Any, batch_size: Any = None) -> Any:
    """One batch of inputs from what ``fit``/``evaluate``/``predict`` take, or None where it cannot be peeked.

    Arrays/tensors (or structures of them): the first ``batch_size`` rows (Keras' default 32); a
    ``tf.data.Dataset``: its first element's inputs; a ``keras.utils.PyDataset``: item 0's inputs.
    A Python generator is not touched (it would lose a batch): None.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    if data is None:
        return None
    if isinstance(data, tf.data.Dataset):
        element = next(iter(data.take(1)))
        return keras.utils.unpack_x_y_sample_weight(element)[0] if isinstance(element, tuple) else element
    if isinstance(data, keras.utils.PyDataset):
        element = data[0]
        return keras.utils.unpack_x_y_sample_weight(element)[0] if isinstance(element, tuple) else element
    flat = tf.nest.flatten(data)
    if not flat or not all(isinstance(t, (np.ndarray, tf.Tensor)) or hasattr(t, "__array__") for t in flat):
        return None
    if any(isinstance(t, tf.Tensor) and tf.is_symbolic_tensor(t) for t in flat):
        return data
    rows = int(batch_size or 32)
    return tf.nest.map_structure(lambda t: tf.convert_to_tensor(np.asarray(t)[:rows]), data)


def _synthetic(x: Any) -> Any:
    """Concrete tensors shaped like the symbolic ``x`` (normal floats, zero integers); None when a shape is unknown."""
    import tensorflow as tf

    flat = tf.nest.flatten(x)
    if any(not t.shape.is_fully_defined() for t in flat):
        return None
    rng = tf.random.Generator.from_seed(0)
    return tf.nest.map_structure(lambda t: rng.normal(t.shape, dtype=t.dtype) if t.dtype.is_floating
                                 else tf.zeros(t.shape, t.dtype), x)


def resolve_model(model: Any, data: Any, batch_size: Any = None, in_step: bool = False,
                  divisible: bool = False) -> None:
    """Chooses and applies a ``PipelineModel``'s ``"auto"`` settings from one batch of ``data`` (the autohook).

    Raises:
        SettingError: inside a step whose batch size is unknown, when no batch could be peeked before.
    """
    import tensorflow as tf

    x = sample_batch(data, batch_size)
    if x is None:
        if in_step:
            raise SettingError("schedule/microbatches/recompute='auto': no batch to measure on. Pass fit/evaluate/"
                               "predict arrays, a tf.data.Dataset or a keras.utils.PyDataset, or call "
                               "model.resolve_auto(x_batch) first")
        return
    symbolic = any(tf.is_symbolic_tensor(t) for t in tf.nest.flatten(x))

    def choose() -> autoplan.Choice:
        sample = _synthetic(x) if symbolic else x
        if sample is None:
            raise SettingError("schedule/microbatches/recompute='auto' must be chosen before the step is traced, "
                               "and this step's batch size is unknown: call model.resolve_auto(x_batch) with "
                               "one batch first, or pass arrays / a tf.data.Dataset to fit")
        if not model.built or not all(s.layer.built for s in model.pipeline_stages):
            model.build(tf.nest.map_structure(lambda t: tuple(t.shape), sample))
        return choose_for(model.pipeline_stages, sample, pending, getattr(model, "optimizer", None), divisible)

    pending = model.auto_settings
    if symbolic or not tf.executing_eagerly():  # inside a trace: measure from a fresh thread (eager, tapes on)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            choice = pool.submit(choose).result()
    else:
        choice = choose()
    autohook.apply(model, choice.schedule, choice.microbatches,
                   choice.recompute if autohook.is_auto(pending.recompute) else None)
    model.auto_choice = choice
    print("[pipeline] " + choice.summary(), flush=True)


def resolve_for_run(model: Any, x: Any, run_dir: str, write: bool = True,
                    divisible: bool = False) -> autoplan.Choice | dict[str, Any]:
    """Resolves a run's model, reusing ``run_dir/plan.json`` when it was made for the same settings (a resume).

    Args:
        model: a ``PipelineModel`` with ``"auto"`` settings.
        x: one real mini-batch of inputs.
        run_dir: the run folder; ``plan.json`` records the choice, the runner-up and every candidate.
        write: write ``plan.json`` (only the chief replica does).
        divisible: try only values of M that divide the batch size (``uneven_microbatches: forbid``).

    Returns:
        The new :class:`~pipeline.perf.autoplan.Choice`, or the recorded choice (a dict) that was reused.
    """
    from pipeline.core import microbatch as mb_lib

    pending = model.auto_settings
    key = {"schedule": pending.schedule, "microbatches": pending.microbatches,
           "recompute": pending.recompute if isinstance(pending.recompute, (bool, str)) else list(pending.recompute),
           "memory_budget": pending.memory_budget, "batch_size": int(mb_lib.batch_size(x)),
           "devices": [s.device for s in model.pipeline_stages]}
    path = os.path.join(run_dir, PLAN_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        if recorded.get("settings") == key:
            autohook.apply(model, recorded["schedule"], recorded["microbatches"],
                           recorded["recompute"] if autohook.is_auto(pending.recompute) else None)
            print(f"[pipeline] auto plan reused from {path}: {recorded['schedule']} M={recorded['microbatches']}"
                  f"{' recompute' if recorded['recompute'] else ''}", flush=True)
            return recorded
    resolve_model(model, x, divisible=divisible)
    choice = model.auto_choice
    if write:
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**choice.to_dict(), "settings": key}, f, indent=1)
    return choice
