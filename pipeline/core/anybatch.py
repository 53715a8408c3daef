"""Run a pipelined step on any batch size: never an empty micro-batch.

A batch of B >= M samples runs as M micro-batches. A batch of n < M samples runs
as n micro-batches of one sample each (DESIGN: "a micro-batch is never empty"),
so a missing micro-batch contributes nothing at all: no NaN mean loss, no
BatchNorm statistics of an empty batch, no moving-statistics update.

- Static batch size (eager mode, fixed shapes): an executor built for
  ``min(B, M)`` micro-batches runs, picked in Python.
- Batch size known only at run time (inside Keras' ``tf.function``, e.g. the last
  partial batch of a dataset): ``tf.cond(B >= M)`` chooses between the
  M-micro-batch schedule and a ``tf.while_loop`` over the n samples, each one
  micro-batch through all stages (same per-stage order of micro-batches, same
  order of gradient sums as n micro-batches). Tracing stays O(K): the loop body
  is one micro-batch, traced once (plus once for the first sample, which fixes
  the output structure).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import tensorflow as tf

from pipeline.core import microbatch as mb_lib
from pipeline.core.executor import Executor

Gradients = list[list[tf.Tensor | None]]
"""Per stage, one float32 gradient (or ``None``) per trainable variable."""


class SizedExecutors:
    """The model's executor for M micro-batches plus, made on demand, executors for fewer.

    Args:
        full: the executor for M micro-batches (the model's own).
    """

    def __init__(self, full: Executor):
        self.full = full
        self.small_executors: dict[int, Executor] = {}

    @property
    def num_microbatches(self) -> int:
        """M."""
        return self.full.num_microbatches

    def get(self, count: int) -> Executor:
        """The executor running ``count`` micro-batches (the full one for ``count >= M``)."""
        if count >= self.num_microbatches:
            return self.full
        if count not in self.small_executors:
            self.small_executors[count] = Executor(self.full.stages, self.full.generator, count)
            self.small_executors[count].loop = self.full.loop
        executor = self.small_executors[count]
        executor.action_hook = self.full.action_hook
        return executor

    @tf.autograph.experimental.do_not_convert  # plain Python building ops: AutoGraph would only slow it
    def train(self, x: Any, y: Any, sample_weight: Any, loss: Callable[..., Any],
              training: bool = True) -> tuple[tf.Tensor, Gradients, Any]:
        """One training mini-batch on any batch size.

        Args:
            x: the mini-batch input.
            y: the targets.
            sample_weight: per-sample weights or ``None``.
            loss: ``loss(y_true, y_pred[, sample_weight])`` (see :func:`microbatch.microbatch_loss`).
            training: passed to the layers.

        Returns:
            ``(loss, gradients per stage, merged y_pred)``.
        """
        size = mb_lib.batch_size(x)
        m = self.num_microbatches
        # Executor.train scales call-time losses by each micro-batch's share of the x it is given;
        # only the one-sample loop runs one batch as several calls and must name the whole batch.
        if isinstance(size, int) or m == 1:
            count = min(size, m) if isinstance(size, int) else m
            result = self.get(count).train(
                x, mb_lib.microbatch_loss(loss, y, sample_weight, count, size), training=training)
            return result.loss, result.gradients, self.merge(result.y_preds)
        structure: list[Gradients] = []  # the gradient pattern (None or not) of the full branch

        def full() -> Any:
            result = self.full.train(x, mb_lib.microbatch_loss(loss, y, sample_weight, m, size),
                                     training=training)
            structure.append(result.gradients)
            return result.loss, _flat(result.gradients), self.merge(result.y_preds)

        def small() -> Any:
            with self.batch_total(size):
                return self.one_by_one(x, y, sample_weight, loss, size, training, structure[0])

        total, flat, y_pred = tf.cond(size >= m, full, small)
        return total, _unflat(flat, structure[0]), y_pred

    @contextlib.contextmanager
    def batch_total(self, size: tf.Tensor | int) -> Iterator[None]:
        """Tells every stage the mini-batch size B (scales call-time losses), for one step."""
        for stage in self.full.stages:
            stage.batch_total = size
        try:
            yield
        finally:
            for stage in self.full.stages:
                stage.batch_total = None

    def one_by_one(self, x: Any, y: Any, sample_weight: Any, loss: Callable[..., Any],
                   size: tf.Tensor, training: bool, pattern: Gradients) -> Any:
        """The n < M samples as n one-sample micro-batches, in order, in a ``tf.while_loop``."""
        single = self.get(1)

        def run(i: tf.Tensor, first: bool) -> tuple[tf.Tensor, list[tf.Tensor], Any]:
            part = [_take(t, i) for t in (x, y, sample_weight)]
            loss_fn = mb_lib.microbatch_loss(loss, part[1], part[2], 1, size, batch_sample_weight=sample_weight)
            result = single.train(part[0], loss_fn, training=training, regularize=first)
            grads = [g if g is not None else tf.zeros(v.shape, tf.float32)
                     for row, stage, wants in zip(result.gradients, single.stages, pattern)
                     for g, v, want in zip(row, stage.trainable_variables, wants) if want is not None]
            return result.loss, grads, result.y_preds[0]

        loss0, grads0, y0 = run(tf.constant(0), first=True)
        flat_y0 = tf.nest.flatten(y0)

        def body(i, total, grads, outs):
            value, new_grads, y_i = run(i, first=False)
            outs = [tf.concat([a, b], axis=0) for a, b in zip(outs, tf.nest.flatten(y_i))]
            return i + 1, total + value, [a + b for a, b in zip(grads, new_grads)], outs

        _, total, grads, outs = tf.while_loop(
            lambda i, *_: i < size, body, (tf.constant(1), loss0, grads0, flat_y0),
            shape_invariants=(tf.TensorShape([]), loss0.shape, [g.shape for g in grads0],
                              [tf.TensorShape([None, *t.shape[1:]]) for t in flat_y0]),
            parallel_iterations=1,  # one sample after the other: layer state (BatchNorm) updates in order
        )
        with tf.device(self.full.stages[-1].device):
            y_pred = tf.nest.pack_sequence_as(y0, [tf.identity(t) for t in outs])
        return total, grads, y_pred

    @tf.autograph.experimental.do_not_convert  # plain Python building ops: AutoGraph would only slow it
    def infer_with_losses(self, x: Any) -> tuple[Any, tf.Tensor]:
        """Forward only, plus the call-time losses (``add_loss``, activity regularizers) of the batch.

        Returns:
            ``(merged outputs, float32 scalar)``: the call-time losses of every
            micro-batch, each scaled by its share of the batch (as in training).
        """
        size = mb_lib.batch_size(x)
        m = self.num_microbatches

        def run(executor: Executor) -> tuple[Any, tf.Tensor]:
            for stage in self.full.stages:
                stage.infer_losses = []
            try:
                y_pred = executor.infer(x)
                losses = [t for stage in self.full.stages for t in stage.infer_losses]
            finally:
                for stage in self.full.stages:
                    stage.infer_losses = None
            return y_pred, (tf.add_n(losses) if losses else tf.zeros([], tf.float32))

        with self.batch_total(size):
            if isinstance(size, int) or m == 1:
                return run(self.get(min(size, m) if isinstance(size, int) else m))
            return tf.cond(size >= m, lambda: run(self.full), lambda: run(self.get(1)))

    @tf.autograph.experimental.do_not_convert  # plain Python building ops: AutoGraph would only slow it
    def infer(self, x: Any) -> Any:
        """Forward only on any batch size; returns the merged outputs."""
        size = mb_lib.batch_size(x)
        m = self.num_microbatches
        if isinstance(size, int) or m == 1:
            return self.get(min(size, m) if isinstance(size, int) else m).infer(x)
        # Forward only has no batch statistics to protect: one micro-batch of all n samples.
        return tf.cond(size >= m, lambda: self.full.infer(x), lambda: self.get(1).infer(x))

    def merge(self, y_preds: list[Any]) -> Any:
        with tf.device(self.full.stages[-1].device):
            return mb_lib.merge(y_preds)


def _take(batch: Any, i: tf.Tensor) -> Any:
    """Sample i of a nested batch, keeping the batch axis (``None`` leaves stay ``None``)."""
    if batch is None:
        return None
    return tf.nest.map_structure(lambda t: None if t is None else t[i:i + 1], batch)


def _flat(gradients: Gradients) -> list[tf.Tensor]:
    return [g for row in gradients for g in row if g is not None]


def _unflat(flat: list[tf.Tensor], pattern: Gradients) -> Gradients:
    it = iter(flat)
    return [[None if g is None else next(it) for g in row] for row in pattern]
