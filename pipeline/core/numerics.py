"""Loss scaling across stages (mixed_float16) and the ``check_numerics`` debugging aid."""

from __future__ import annotations

import functools
import re
import sys
from typing import Any, Callable, Sequence

import keras
import tensorflow as tf

from pipeline.core import _compat
from pipeline.errors import NumericsError, SettingError, invalid

MARK = "[pipeline-numerics]"
"""Prefix of every check's message; :func:`translate_errors` recognises a failed check by it."""

_FOUND = re.compile(re.escape(MARK) + r" stage (\d+), micro-batch (\d+): (.*?) : Tensor had (.*?) values")

RAISE, REPORT = "raise", "report"
"""Check modes: raise :class:`NumericsError`; or (under loss scaling) print the location and go on."""


def loss_scale_optimizer(optimizer: Any) -> keras.optimizers.LossScaleOptimizer | None:
    """The optimizer if it is Keras' ``LossScaleOptimizer`` (mixed_float16), else ``None``.

    Raises:
        SettingError: for a ``LossScaleOptimizer`` subclass that overrides how gradients are
            scaled, checked or applied: the pipeline unscales each stage's gradients itself
            and could not honour the override.
    """
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return None
    changed = [name for name in _compat.LOSS_SCALE_OPTIMIZER_METHODS
               if getattr(type(optimizer), name, None) is not getattr(keras.optimizers.LossScaleOptimizer, name)]
    if changed:
        raise SettingError(
            f"optimizer: got {type(optimizer).__name__}, a LossScaleOptimizer subclass overriding "
            f"{', '.join(changed)}; PipelineModel scales the loss at the last stage and unscales each "
            "stage's gradients itself, so it supports keras.optimizers.LossScaleOptimizer as Keras "
            "defines it. Use keras.optimizers.LossScaleOptimizer(inner_optimizer, ...) or a plain optimizer."
        )
    return optimizer


def begin_step(stages: Sequence[Any], optimizer: Any, check_numerics: bool) -> None:
    """Sets, for one training step, each stage's loss scale and check mode.

    With a ``LossScaleOptimizer`` the last stage's backward starts from
    ``scale * loss`` (Keras' ``optimizer.scale_loss``); checks then only report,
    because a non-finite scaled gradient is what the optimizer skips a step for.
    """
    lso = loss_scale_optimizer(optimizer)
    scale = tf.convert_to_tensor(lso.dynamic_scale) if lso is not None else None
    mode = (REPORT if lso is not None else RAISE) if check_numerics else None
    for stage in stages:
        stage.loss_scale = scale
        stage.numerics = mode


def apply_gradients(optimizer: Any, stages: Sequence[Any], gradients: list[list[tf.Tensor | None]],
                    reducer: Callable[[list[tf.Tensor], list[Any]], list[tf.Tensor]] | None = None) -> None:
    """One optimizer update from the per-stage accumulated (possibly scaled) gradients.

    Without loss scaling: ``optimizer.apply`` (after ``reducer``). With a
    ``LossScaleOptimizer``: each stage divides its gradients by the scale on its
    own device, ``reducer`` runs on the unscaled gradients, each stage reduces its
    gradients to one finite flag on its device, and one flag over all stages
    decides for every stage: apply with the inner optimizer and maybe grow the
    scale, or skip and halve it (:func:`pipeline.core._compat.loss_scale_step`).
    """
    lso = loss_scale_optimizer(optimizer)
    scale = stages[-1].loss_scale if stages else None
    for stage in stages:  # the step's graph tensors stop here: no stage keeps one past its trace
        stage.loss_scale, stage.numerics = None, None
    per_stage = [[(g, v) for g, v in zip(grads, stage.trainable_variables) if g is not None]
                 for stage, grads in zip(stages, gradients)]
    if lso is not None and scale is not None:  # None: begin_step was not called, nothing was scaled
        unscaled = []
        for stage, pairs in zip(stages, per_stage):
            with tf.device(stage.device):
                unscaled.append([(g if getattr(v, "overwrite_with_gradient", False) else g / scale, v)
                                 for g, v in pairs])
        per_stage = unscaled
    sizes = [len(pairs) for pairs in per_stage]
    flat = [pair for pairs in per_stage for pair in pairs]
    if not flat:
        return
    grads, variables = [g for g, _ in flat], [v for _, v in flat]
    if reducer is not None:
        grads = list(reducer(grads, variables))
    if lso is None:
        optimizer.apply(grads, variables)
        return
    flags, start = [], 0
    for stage, size in zip(stages, sizes):
        if size:
            with tf.device(stage.device):
                flags.append(tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads[start:start + size]]))
        start += size
    finite = tf.reduce_all(tf.stack(flags))
    _compat.loss_scale_step(lso, finite, grads, variables)


def check(tensors: Sequence[Any], labels: Sequence[str], stage: int, microbatch: int, mode: str) -> list[Any]:
    """``tensors`` passed through a NaN/Inf check each, in order (one check after the other).

    Each check is named ``"[pipeline-numerics] stage s, micro-batch j: <label>"``.
    ``mode`` :data:`RAISE` uses ``tf.debugging.check_numerics`` (an
    ``InvalidArgumentError``, turned into :class:`NumericsError` by
    :func:`translate_errors`); :data:`REPORT` prints the location to stderr and
    goes on. Non-float tensors and ``None`` pass unchecked.
    """
    out, deps = [], []
    for t, label in zip(tensors, labels):
        if t is None or not t.dtype.is_floating:
            out.append(t)
            continue
        text = f"{MARK} stage {stage}, micro-batch {microbatch}: {label}"
        with tf.control_dependencies(deps):
            if mode == RAISE:
                t = tf.debugging.check_numerics(t, text)
            else:
                t = _report(t, text)
        out.append(t)
        deps = [t]
    return out


def _report(t: tf.Tensor, text: str) -> tf.Tensor:
    def warn() -> tf.Tensor:
        with tf.control_dependencies([tf.print(text, ": non-finite values (the loss-scale optimizer skips "
                                                     "this step if they reach a gradient)", output_stream=sys.stderr)]):
            return tf.identity(t)

    return tf.cond(tf.reduce_all(tf.math.is_finite(t)), lambda: tf.identity(t), warn)


def translate_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps Keras' train function so a failed check raises :class:`NumericsError` naming the location.

    In graph mode a check fails inside TensorFlow's runtime, so the error reaches
    Python only where Keras calls its compiled function (``fit``,
    ``train_on_batch``); this thin wrapper is that place. Other errors pass through.
    """
    if getattr(fn, "pipeline_numerics", False):
        return fn

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except tf.errors.InvalidArgumentError as err:
            found = _FOUND.search(err.message or "")
            if found is None:
                raise
            stage, microbatch, tensor, kind = found.groups()
            error = NumericsError(
                f"check_numerics: {kind} values first appeared at stage {stage}, micro-batch {microbatch}, "
                f"in the {tensor} (checks run in pipeline order: forward outputs, then backward "
                "gradients). Inspect that stage's layers for this micro-batch's data (e.g. log, sqrt, "
                "division, exploding activations) or lower the learning rate; check_numerics=False "
                "turns the checks off."
            )
            error.stage, error.microbatch, error.tensor, error.kind = int(stage), int(microbatch), tensor, kind
            raise error from err

    wrapped.pipeline_numerics = True  # type: ignore[attr-defined]
    return wrapped


def check_flag(value: Any) -> bool:
    """Returns ``value`` if it is a bool (the ``check_numerics`` setting).

    Raises:
        SettingError: naming the setting and the value otherwise.
    """
    if not isinstance(value, bool):
        raise invalid("check_numerics", value, "must be True or False (True checks every activation and "
                      "gradient for NaN/Inf and names the stage, micro-batch and tensor where one first appears)")
    return value
