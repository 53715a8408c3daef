"""``verify``: compare the pipelined gradients with the unsplit model's, variable by variable."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from pipeline.core import _compat
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
        lines = [header, f"  loss: pipelined {self.loss_pipelined:.8g}, unsplit {self.loss_unsplit:.8g}",
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
           rtol: float = 1e-5, atol: float = 1e-6) -> VerifyReport:
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

    Returns:
        A :class:`VerifyReport`; ``str(report)`` is a readable table.
    """
    model = stages_or_model
    if not isinstance(model, PipelineModel):
        model = PipelineModel(list(stages_or_model), devices=devices,
                              microbatches=microbatches or 1, schedule=schedule or "1f1b")
    stages = model.stages
    m = microbatches or model.microbatches
    schedule_name = schedule or model.executor.schedule_name
    executor = Executor(stages, schedule or model.executor.generator, m)
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    y = tf.nest.map_structure(tf.convert_to_tensor, y)
    if not model.built:
        # TensorShapes, not tuples: tf.nest would walk into a tuple shape of a list/dict input
        # and hand PipelineModel.build single ints ("'int' object is not iterable").
        model.build(tf.nest.map_structure(lambda t: t.shape, x))
    loss_obj = keras.losses.get(loss)
    loss_fn = mb_lib.microbatch_loss(loss_obj, y, None, m, mb_lib.batch_size(x))

    @tf.function
    def pipelined():
        result = executor.train(x, loss_fn)
        return result.loss, result.gradients

    @tf.function
    def unsplit():
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
        variables = [v for stage in stages for v in stage.trainable_variables]
        return value, tape.gradient(value, variables)

    # Random layers (Dropout, GaussianNoise...) draw from Keras seed generators: both runs start from
    # the same generator states, so at M=1 they draw the same masks.
    seeds = _seed_states(stages)
    saved = [v.numpy() for v in seeds]
    loss_p, grads_p = pipelined()
    after = [v.numpy() for v in seeds]
    for v, value in zip(seeds, saved):
        v.assign(value)
    loss_u, grads_u = unsplit()
    for v, value in zip(seeds, after):
        v.assign(value)
    notes = []
    if seeds and m > 1:
        notes.append(
            f"the model has random layers (e.g. Dropout): at M={m} each micro-batch draws its own mask, "
            "so the runs differ by design; compare at microbatches=1 (same seeded draws) or without them"
        )
    elif seeds:
        notes.append("random layers (e.g. Dropout) drew the same seeded masks in both runs")
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
    return VerifyReport(schedule_name, len(stages), m, rtol, atol, float(loss_p), float(loss_u), checks,
                        scale, tuple(notes))


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
