"""``verify``: compare the pipelined gradients with the unsplit model's, variable by variable."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from pipeline.core import _compat
from pipeline.core import batchnorm as bn_lib
from pipeline.core import microbatch as mb_lib
from pipeline.core.executor import Executor
from pipeline.core.model import PipelineModel


@dataclasses.dataclass(frozen=True)
class VariableCheck:
    """One variable's comparison."""

    stage: int
    name: str
    shape: tuple[int, ...]
    max_abs: float
    """max |pipelined - unsplit| over the variable's elements."""
    max_rel: float
    """max_abs divided by max |unsplit| of this variable (0 when both are 0); shown, not judged."""
    close: bool
    """``max_abs <= atol + rtol * scale``, ``scale`` being the model's largest unsplit gradient
    (:attr:`VerifyReport.scale`): a per-variable relative error explodes on gradients near 0."""


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify`: per-variable differences, as data and as a table."""

    schedule: str
    num_stages: int
    num_microbatches: int
    rtol: float
    atol: float
    loss_pipelined: float
    loss_unsplit: float
    variables: list[VariableCheck]
    scale: float = 0.0
    """The largest |unsplit gradient| over all variables: the tolerance is ``atol + rtol * scale``."""
    notes: tuple[str, ...] = ()
    """Known semantic differences between the two runs (e.g. random layers), for the reader."""
    reference: str = "reference: the unsplit model on the whole batch"
    """What the pipelined step is compared with (for BatchNorm models: the same ``batchnorm`` semantics)."""

    @property
    def ok(self) -> bool:
        """Whether every variable's gradient matches within ``rtol``/``atol``."""
        return all(v.close for v in self.variables)

    @property
    def max_abs(self) -> float:
        """The largest absolute difference over all variables."""
        return max((v.max_abs for v in self.variables), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data (JSON-serializable)."""
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        return data

    def __str__(self) -> str:
        header = (
            f"verify: {self.num_stages} stage(s), {self.num_microbatches} micro-batch(es), "
            f"schedule {self.schedule}: pipelined vs unsplit gradients "
            f"(tolerance atol + rtol * largest gradient = {self.atol:g} + {self.rtol:g} * {self.scale:.3e})"
        )
        width = max([len(v.name) for v in self.variables] + [8])
        lines = [header, f"  {self.reference}", f"  loss: pipelined {self.loss_pipelined:.8g}, unsplit {self.loss_unsplit:.8g}",
                 f"  {'stage':>5}  {'variable':<{width}}  {'shape':<14} {'max abs diff':>12} {'max rel diff':>12}  ok"]
        for v in self.variables:
            lines.append(
                f"  {v.stage:>5}  {v.name:<{width}}  {str(v.shape):<14} {v.max_abs:>12.3e} "
                f"{v.max_rel:>12.3e}  {'yes' if v.close else 'NO'}"
            )
        lines += [f"  note: {note}" for note in self.notes]
        verdict = "PASS" if self.ok else "FAIL"
        lines.append(f"  {verdict}: {len(self.variables)} variables, largest abs diff {self.max_abs:.3e}")
        return "\n".join(lines)


def verify(stages_or_model: PipelineModel | Sequence[keras.layers.Layer], x: Any, y: Any,
           loss: str | keras.losses.Loss | Callable, microbatches: int | None = None,
           schedule: str | None = None, devices: Sequence[str] | str | None = None,
           rtol: float = 1e-5, atol: float = 1e-6, batchnorm: str | None = None) -> VerifyReport:
    """Checks that a pipelined step computes the unsplit model's gradients.

    The pipelined gradients come from the real executor (micro-batches,
    schedule, per-stage tapes and chained VJPs inside one ``tf.function``);
    the reference is one tape over the stages run back to back on the whole
    batch. Nothing is applied: the weights do not change.

    Args:
        stages_or_model: a :class:`PipelineModel`, or the list of stage models.
        x: an input batch.
        y: its targets.
        loss: a Keras loss (name, object or function) with mean reduction.
        microbatches: M (default: the model's, else 1).
        schedule: schedule name (default: the model's, else ``"1f1b"``).
        devices: with a list of stages, where to place them (default: auto).
        rtol: tolerance relative to the model's largest unsplit gradient: a variable passes when
            its max |pipelined - unsplit| <= atol + rtol * that largest gradient. Random layers
            (Dropout) start both runs from the same seed-generator states, so at M=1 they draw
            the same masks; at M>1 they cannot, and the report says so in a note.
        atol: absolute tolerance of the per-variable check.
        batchnorm: the BatchNorm mode (default: the model's, else ``"microbatch"``). A model with
            BatchNormalization layers is compared with the unsplit model run with the same semantics:
            ``"microbatch"``: on the same ghost batches (each micro-batch separately, gradients summed
            with the same loss shares); ``"deferred"``: the same, with the moving statistics updated
            once from the concatenated inputs of each layer; ``"frozen"``: BatchNorm in inference mode.
            The moving statistics after both runs are compared too; both are restored afterwards.

    Returns:
        A :class:`VerifyReport`; ``str(report)`` is a readable table.
    """
    if batchnorm is not None:
        bn_lib.check_mode(batchnorm)  # before any compute
    model = stages_or_model
    if not isinstance(model, PipelineModel):
        model = PipelineModel(list(stages_or_model), devices=devices, microbatches=microbatches or 1,
                              schedule=schedule or "1f1b", batchnorm=batchnorm or "microbatch")
    stages = model.stages
    m = microbatches or model.microbatches
    schedule_name = schedule or model.executor.schedule_name
    executor = Executor(stages, schedule or model.executor.generator, m)
    executor.loop = model.executor.loop
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    y = tf.nest.map_structure(tf.convert_to_tensor, y)
    if not model.built:
        # TensorShapes, not tuples: tf.nest would walk into a tuple shape of a list/dict input
        # and hand PipelineModel.build single ints ("'int' object is not iterable").
        model.build(tf.nest.map_structure(lambda t: t.shape, x))
    loss_obj = keras.losses.get(loss)
    size = mb_lib.batch_size(x)
    loss_fn = mb_lib.microbatch_loss(loss_obj, y, None, m, size)
    mode = bn_lib.check_mode(batchnorm or model.batchnorm_control.mode)
    control = bn_lib.BatchNormControl(stages, mode, warn=False)
    bns = [bn for _, bn in control.layers()]
    variables = [v for stage in stages for v in stage.trainable_variables]

    @tf.function
    def pipelined():
        with control.step(size, m):
            result = executor.train(x, loss_fn)
        return result.loss, result.gradients

    @tf.function
    def unsplit():
        if bns and mode != "frozen":
            return _ghost_reference(stages, bns, mode, x, loss_fn, m, variables)
        with control.step(size, m):  # "frozen": BatchNorm in inference mode, as in the pipeline
            with tf.GradientTape() as tape:
                out = x
                extra = []
                for stage in stages:
                    with tf.device(stage.device):
                        out = stage.layer(out, training=True)
                    extra += stage.layer.losses
                value = tf.reduce_mean(tf.cast(loss_obj(y, out), tf.float32))
                if extra:
                    value += tf.add_n([tf.cast(e, tf.float32) for e in extra])
        return value, tape.gradient(value, variables)

    # Random layers (Dropout, GaussianNoise...) draw from Keras seed generators: both runs start from
    # the same generator states, so at M=1 they draw the same masks. BatchNorm moving statistics also
    # start equal in both runs; verify leaves them as they were.
    seeds = _seed_states(stages)
    stats = [v for bn in bns for v in (bn.moving_mean, bn.moving_variance)]
    saved = [v.numpy() for v in seeds]
    saved_stats = [v.numpy() for v in stats]
    loss_p, grads_p = pipelined()
    after = [v.numpy() for v in seeds]
    stats_p = [v.numpy() for v in stats]
    for v, value in zip(seeds + stats, saved + saved_stats):
        v.assign(value)
    loss_u, grads_u = unsplit()
    stats_u = [v.numpy() for v in stats]
    for v, value in zip(seeds + stats, after + saved_stats):
        v.assign(value)
    notes = []
    if seeds and m > 1:
        notes.append(
            f"the model has random layers (e.g. Dropout): at M={m} each micro-batch draws its own mask, "
            "so the runs differ by design; compare at microbatches=1 (same seeded draws) or without them"
        )
    elif seeds:
        notes.append("random layers (e.g. Dropout) drew the same seeded masks in both runs")
    reference = "reference: the unsplit model on the whole batch"
    if bns:
        reference, note = _batchnorm_reference(mode, bns, size, m)
        notes.append(note)
    flat_p = [None if g is None else np.asarray(tf.convert_to_tensor(g))
              for stage_grads in grads_p for g in stage_grads]
    flat_u = [None if g is None else np.asarray(tf.convert_to_tensor(g)) for g in grads_u]
    scale = max((float(np.max(np.abs(g))) for g in flat_u if g is not None and g.size), default=0.0)
    checks = []
    k = 0
    for stage in stages:
        for var in stage.trainable_variables:
            checks.append(_compare(stage.index, var, flat_p[k], flat_u[k], rtol * scale + atol))
            k += 1
    owner = {id(bn): stage.index for stage, bn in control.layers()}
    for i, var in enumerate(stats):  # moving statistics: relative to their own size
        stat_scale = float(np.max(np.abs(stats_u[i]))) if stats_u[i].size else 0.0
        checks.append(_compare(owner[id(bns[i // 2])], var, stats_p[i], stats_u[i], rtol * stat_scale + atol))
    notes += _float_noise_note(checks, scale)
    return VerifyReport(schedule_name, len(stages), m, rtol, atol, float(loss_p), float(loss_u), checks,
                        scale, tuple(notes), reference)


FLOAT_NOISE = 1e-4
"""Differences up to this fraction of the largest gradient are float32 rounding in deep models."""


def _float_noise_note(checks: list[VariableCheck], scale: float) -> list[str]:
    """Names float rounding as the cause when the only failures are that small."""
    failed = [c for c in checks if not c.close]
    if not failed or scale <= 0:
        return []
    worst = max(c.max_abs for c in failed) / scale
    if worst > FLOAT_NOISE:
        return []
    return [f"the {len(failed)} failing variable(s) differ by at most {worst:.1e} of the largest gradient: float32 "
            "rounding (micro-batch gradients are summed in another order than one whole-batch backward, and "
            f"deep models add up many such errors); differences this small are float noise, rerun with "
            f"rtol={FLOAT_NOISE:g} to check at that level"]


def _ghost_reference(stages: Sequence[Any], bns: list[Any], mode: str, x: Any, loss_fn: Callable,
                     m: int, variables: list[Any]) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """The unsplit model run on each micro-batch separately (ghost batches), gradients summed.

    For ``"deferred"`` the moving statistics are then set to one Keras update from the
    concatenated inputs each BatchNorm layer saw (replacing its M per-micro-batch updates).
    """
    old = [(tf.identity(bn.moving_mean), tf.identity(bn.moving_variance)) for bn in bns]
    total, grads = [], [None] * len(variables)
    with bn_lib.capture_inputs(bns) as seen:
        for j, xj in enumerate(mb_lib.split(x, m)):
            with tf.GradientTape() as tape:
                out, extra = xj, []
                for stage in stages:
                    with tf.device(stage.device):
                        out = stage.layer(out, training=True)
                    extra += _compat.call_losses(stage.layer)
                value = loss_fn(j, out)
                if extra:  # call-time losses count by the micro-batch's share, as in the pipeline
                    value += tf.add_n([tf.cast(e, tf.float32) for e in extra]) * mb_lib.share(
                        mb_lib.batch_size(xj), mb_lib.batch_size(x))
            total.append(value)
            grads = [_add(a, b) for a, b in zip(grads, tape.gradient(value, variables))]
    with tf.GradientTape() as tape:
        reg = [tf.cast(r, tf.float32) for stage in stages for r in _compat.regularization_losses(stage.layer)]
        value = tf.add_n(reg) if reg else None
    if value is not None:
        total.append(value)
        grads = [_add(a, b) for a, b in zip(grads, tape.gradient(value, variables))]
    if mode == "deferred":
        for bn, (mean, variance) in zip(bns, old):
            if seen[id(bn)]:
                new_mean, new_variance = bn_lib.full_batch_update(bn, seen[id(bn)], mean, variance)
                bn.moving_mean.assign(tf.cast(new_mean, bn.moving_mean.dtype))
                bn.moving_variance.assign(tf.cast(new_variance, bn.moving_variance.dtype))
    return tf.add_n(total), grads


def _add(a: Any, b: Any) -> Any:
    return b if a is None else (a if b is None else a + b)


def _batchnorm_reference(mode: str, bns: list[Any], size: Any, m: int) -> tuple[str, str]:
    """The report's reference line and the note naming why BatchNorm differs from one whole-batch step."""
    names = ", ".join(bn.name for bn in bns)
    if isinstance(size, int):
        pieces = sorted(set(mb_lib.sizes(size, m)))
        ghost = "-".join(str(p) for p in pieces)
    else:
        ghost, size = "about B/M", "B"
    if mode == "frozen":
        return ("reference: the unsplit model with BatchNorm in inference mode, because batchnorm='frozen'",
                f"BatchNorm ({names}): batchnorm='frozen' normalizes with the moving statistics and does not "
                "update them; Keras' training mode would use batch statistics (cause of any difference from fit "
                "of the unsplit model)")
    reference = f"reference: ghost batches of {ghost} samples, because batchnorm={mode!r}"
    if mode == "deferred":
        reference += f"; moving statistics updated once from the whole batch of {size}"
        update = "updates the moving statistics once per step from the whole mini-batch"
    else:
        update = f"updates the moving statistics {m} times per step (momentum applied {m} times)"
    return reference, (
        f"BatchNorm ({names}): batchnorm={mode!r} normalizes each micro-batch with its own statistics "
        f"(ghost batches of {ghost}) and {update}: a whole-batch step of the unsplit model differs by design, "
        "so the reference runs the same semantics; rows for moving_mean/moving_variance compare the moving "
        "statistics after both runs")


def _seed_states(stages: Sequence[Any]) -> list[Any]:
    """The state variables of the Keras seed generators of every stage (public: ``SeedGenerator.state``)."""
    states = []
    for stage in stages:
        for gen in _compat.seed_generators(stage.layer):
            if all(gen.state is not s for s in states):
                states.append(gen.state)
    return states


def _compare(stage: int, var: Any, got: Any, want: Any, tolerance: float) -> VariableCheck:
    got = np.zeros(var.shape, np.float32) if got is None else got
    want = np.zeros(var.shape, np.float32) if want is None else want
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    return VariableCheck(stage, var.path, tuple(var.shape), diff, rel, bool(diff <= tolerance))
