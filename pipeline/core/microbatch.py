"""Split a nested mini-batch into micro-batches and merge per-micro-batch outputs back.

Policy for a batch size B that M does not divide: the first ``B mod M``
micro-batches get one sample more than the others (``numpy.array_split``).
Every micro-batch's loss is its sum of per-sample losses divided by the whole
batch size B, so uneven micro-batches still add up to the unsplit model's mean.
How each Keras loss reduction is combined exactly is in :data:`REDUCTIONS`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import tensorflow as tf

from pipeline.errors import SettingError
from pipeline.errors import check_count as _check_count


def check_count(num_microbatches: Any) -> int:
    """Validates the micro-batch count M (an int >= 1) and returns it.

    Raises:
        ValueError: naming the setting, the value received and what is allowed.
    """
    return _check_count("microbatches", num_microbatches,
                        hint="Pass e.g. microbatches=4 (1 disables micro-batching).")


def batch_size(batch: Any) -> tf.Tensor | int:
    """The leading dimension of the first tensor of a nested batch (static if known)."""
    first = next(t for t in tf.nest.flatten(batch) if t is not None)
    shape = tf.TensorShape(first.shape)
    static = shape[0] if shape.rank else None
    return int(static) if static is not None else tf.shape(first)[0]


def sizes(total: tf.Tensor | int, num_microbatches: int) -> list[int] | tf.Tensor:
    """Micro-batch sizes under the array_split policy (a list when ``total`` is static)."""
    if isinstance(total, int):
        if num_microbatches > total:
            raise SettingError(
                f"microbatches={num_microbatches} is larger than the batch size {total}; "
                f"use at most {total} micro-batches or a larger batch"
            )
        base, extra = divmod(total, num_microbatches)
        return [base + (1 if j < extra else 0) for j in range(num_microbatches)]
    base = total // num_microbatches
    extra = total % num_microbatches
    return base + tf.cast(tf.range(num_microbatches) < extra, total.dtype)


def split(batch: Any, num_microbatches: int) -> list[Any]:
    """Splits every tensor of a nested batch along axis 0 into M micro-batches.

    Args:
        batch: a tensor or nested structure of tensors (``None`` leaves stay ``None``).
        num_microbatches: M.

    Returns:
        A list of M structures like ``batch``.
    """
    if batch is None:
        return [None] * num_microbatches
    if num_microbatches == 1:
        return [batch]
    split_sizes = sizes(batch_size(batch), num_microbatches)
    flat = tf.nest.flatten(batch)
    pieces = [
        [None] * num_microbatches if t is None else tf.split(t, split_sizes, num=num_microbatches, axis=0)
        for t in flat
    ]
    return [
        tf.nest.pack_sequence_as(batch, [p[j] for p in pieces]) for j in range(num_microbatches)
    ]


REDUCTIONS = {
    "sum_over_batch_size": "share",
    "mean": "share",
    "mean_with_sample_weight": "weight_share",
    "sum": "sum",
}
"""Keras loss reduction -> how a micro-batch's loss enters the batch loss (all exact).

- ``share``: a mean over the micro-batch's n_j samples, times n_j / B.
- ``weight_share``: a mean weighted by sample weights, times sum(w_j) / sum(w)
  (n_j / B without sample weights).
- ``sum``: a sum over the micro-batch, added as is.

``"none"`` (per-sample losses, no reduction) has no batch loss to split and is refused.
"""


def share(size: tf.Tensor | int, total: tf.Tensor | int) -> tf.Tensor:
    """``size / total`` in float32: a micro-batch's share of the batch."""
    return tf.cast(size, tf.float32) / tf.cast(total, tf.float32)


def check_reduction(reduction: Any) -> str:
    """Returns how a loss with Keras ``reduction`` is combined (a value of :data:`REDUCTIONS`).

    Raises:
        SettingError: for ``"none"``/``None`` or an unknown reduction.
    """
    if reduction in REDUCTIONS:
        return REDUCTIONS[reduction]
    raise SettingError(
        f"loss reduction={reduction!r} is not supported by PipelineModel: a per-sample loss without "
        f"reduction has no batch loss to split into micro-batches. Use one of {sorted(REDUCTIONS)} "
        "(e.g. keras.losses.MeanSquaredError(reduction='sum_over_batch_size'), the default)."
    )


class Term(NamedTuple):
    """One loss term of a micro-batch: its value, Keras reduction, and output path (for sample weights)."""

    value: tf.Tensor
    reduction: str
    path: tuple = ()


def _resolve(path: tuple, weights: Any) -> Any:
    """The sample weights of the output at ``path`` (Keras' CompileLoss: by path when nested)."""
    if weights is None or not tf.nest.is_nested(weights):
        return weights
    for key in path:
        weights = weights[key]
    return weights


def microbatch_loss(loss: Callable[..., Any], y: Any, sample_weight: Any, num_microbatches: int,
                    total: tf.Tensor | int, reduction: str = "sum_over_batch_size",
                    batch_sample_weight: Any = None) -> Callable[[int, Any], tf.Tensor]:
    """The executor's loss for micro-batch j, scaled so the sum over j is the batch loss.

    With the default reduction the micro-batch's mean loss is multiplied by its
    share n_j / B of the batch; the sum over micro-batches is then the unsplit
    model's mean loss, for uneven micro-batches too. Other Keras reductions are
    combined as :data:`REDUCTIONS` says.

    Args:
        loss: ``loss(y_true, y_pred[, sample_weight])``: a tensor (a per-sample
            result is averaged) or a list of :class:`Term` (one per output loss,
            each combined by its own reduction).
        y: the mini-batch targets (split here).
        sample_weight: per-sample weights or ``None`` (split here).
        num_microbatches: M.
        total: B, the mini-batch size.
        reduction: the Keras reduction of a tensor ``loss`` (a key of :data:`REDUCTIONS`).
        batch_sample_weight: the whole batch's sample weights when ``sample_weight``
            is only part of it (default: ``sample_weight``).

    Returns:
        ``loss_fn(j, y_pred_j) -> scalar`` for :meth:`pipeline.executor.Executor.train`.

    Raises:
        SettingError: for a reduction that cannot be split exactly (``"none"``).
    """
    check_reduction(reduction)
    ys, weights = split(y, num_microbatches), split(sample_weight, num_microbatches)
    whole = sample_weight if batch_sample_weight is None else batch_sample_weight

    def combine(weight: Any, y_pred: Any, term: Term) -> tf.Tensor:
        rule = check_reduction(term.reduction)
        if rule == "sum":
            return tf.reduce_sum(tf.cast(term.value, tf.float32))
        value = tf.reduce_mean(tf.cast(term.value, tf.float32))
        if rule == "weight_share" and whole is not None:
            part = tf.reduce_sum(tf.cast(_resolve(term.path, weight), tf.float32))
            return value * tf.math.divide_no_nan(part, tf.reduce_sum(tf.cast(_resolve(term.path, whole), tf.float32)))
        return value * share(tf.shape(tf.nest.flatten(y_pred)[0])[0], total)

    def compute(y_true: Any, y_pred: Any, weight: Any) -> tf.Tensor:
        value = loss(y_true, y_pred) if weight is None else loss(y_true, y_pred, weight)
        terms = value if isinstance(value, list) else [Term(value, reduction)]
        return tf.add_n([combine(weight, y_pred, term) for term in terms])

    # Inside a graph the loss is traced once and called per micro-batch (not traced M times).
    traced = tf.function(compute, autograph=False, reduce_retracing=True)

    def loss_fn(j: int, y_pred: Any) -> tf.Tensor:
        if tf.executing_eagerly():
            return compute(ys[j], y_pred, weights[j])
        # Targets and weights through identities made here: under the executor's control dependencies,
        # the inlined loss's label-only ops wait for the device's previous action like the rest.
        fresh = lambda t: tf.identity(t) if isinstance(t, tf.Tensor) else t  # noqa: E731
        return traced(tf.nest.map_structure(fresh, ys[j]), y_pred, tf.nest.map_structure(fresh, weights[j]))

    # A loop over micro-batches (pipeline.core.looped) slices the targets itself and calls the loss on them.
    loss_fn.targets = (y, sample_weight)  # type: ignore[attr-defined]
    loss_fn.of = traced  # type: ignore[attr-defined]  # (y_true_j, y_pred_j, weight_j) -> scalar
    return loss_fn


def merge(microbatches: list[Any]) -> Any:
    """Concatenates per-micro-batch outputs (same nested structure) along axis 0."""
    if len(microbatches) == 1:
        return microbatches[0]
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *microbatches)
