"""Split a nested mini-batch into micro-batches and merge per-micro-batch outputs back.

Policy for a batch size B that M does not divide: the first ``B mod M``
micro-batches get one sample more than the others (``numpy.array_split``).
Every micro-batch's loss is its sum of per-sample losses divided by the whole
batch size B, so uneven micro-batches still add up to the unsplit model's mean.
"""

from __future__ import annotations

from typing import Any, Callable

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


def microbatch_loss(loss: Callable[..., Any], y: Any, sample_weight: Any, num_microbatches: int,
                    total: tf.Tensor | int) -> Callable[[int, Any], tf.Tensor]:
    """The executor's loss for micro-batch j: its mean loss times its share n_j / B of the batch.

    The sum over micro-batches is then the unsplit model's mean loss, for uneven
    micro-batches too.

    Args:
        loss: ``loss(y_true, y_pred[, sample_weight])``; a per-sample result is averaged.
        y: the mini-batch targets (split here).
        sample_weight: per-sample weights or ``None`` (split here).
        num_microbatches: M.
        total: B, the mini-batch size.

    Returns:
        ``loss_fn(j, y_pred_j) -> scalar`` for :meth:`pipeline.executor.Executor.train`.
    """
    ys, weights = split(y, num_microbatches), split(sample_weight, num_microbatches)
    total = tf.cast(total, tf.float32)

    def loss_fn(j: int, y_pred: Any) -> tf.Tensor:
        value = loss(ys[j], y_pred) if weights[j] is None else loss(ys[j], y_pred, weights[j])
        value = tf.reduce_mean(tf.cast(value, tf.float32))
        size = tf.cast(tf.shape(tf.nest.flatten(y_pred)[0])[0], tf.float32)
        return value * (size / total)

    return loss_fn


def merge(microbatches: list[Any]) -> Any:
    """Concatenates per-micro-batch outputs (same nested structure) along axis 0."""
    if len(microbatches) == 1:
        return microbatches[0]
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *microbatches)
