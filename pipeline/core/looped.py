"""GPipe with re-materialization as loops over clock ticks: the step's graph does not grow with M.

GPipe with ``recompute`` on every stage keeps only each stage's input per
micro-batch, so a stage's backward needs nothing from its forward but that
input (and the layer state the forward saw). That lets the step run as two
loops over clock ticks instead of 2*K*M unrolled actions. At forward tick t,
stage s runs F of micro-batch t - s; at backward tick u, stage s runs B of
micro-batch u - (K-1-s)::

    forward ticks (K=3, M=5):   0    1    2  | 3    4  |  5    6
        stage 0:                F0   F1   F2 | F3   F4 |  .    .
        stage 1:                .    F0   F1 | F2   F3 |  F4   .
        stage 2:                .    .    F0 | F1   F2 |  F3   F4
                                 unrolled     tf.while_loop  unrolled
                                 (fill, K ticks) (M-K ticks) (drain, K-1 ticks)

The backward ticks mirror it (B0 starts on the last stage). Python traces the
K fill ticks, one loop tick and the K-1 drain ticks: O(K^2) stage calls
whatever M is (M <= K: every tick is unrolled). Values cross ticks through
``TensorArray`` s (stage inputs, cut-layer gradients, outputs); gradient sums
and the loss are loop variables.

Exactness: the same micro-batches, the same order per stage (F0..F(M-1), then
B0..B(M-1), as :func:`pipeline.core.schedule.gpipe`), the same float32 gradient
sums. Each B is one VJP of the stage recomputed from its saved input, under the
non-trainable state (BatchNorm statistics, dropout seeds) saved before its F
(:mod:`pipeline.core.recompute`'s rule), so dropout masks match and state is
updated once. Each stage's actions are chained as in the unrolled executor
(a per-stage token), so layer state is updated in micro-batch order.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import tensorflow as tf

from pipeline.core import microbatch as mb_lib
from pipeline.core import recompute as recompute_lib
from pipeline.core import traced
from pipeline.core.stage import LossFn, Stage


def applies(stages: Sequence[Stage], gpipe: bool, eager: bool) -> bool:
    """Whether a training step runs looped: GPipe, every stage recomputed, graph mode, nothing patched.

    The unrolled executor runs the other cases: ``check_numerics`` (per-action labels),
    BatchNorm modes that patch layer calls (Python side effects per call), eager mode.
    """
    return (gpipe and not eager and all(stage.recompute for stage in stages)
            and not any(stage.numerics for stage in stages)
            and not any(traced.has_patched_calls(stage.layer) for stage in stages))


class _Chain:
    """Per stage: a token tensor that the stage's next action waits for (the device row's order)."""

    def __init__(self, devices: Sequence[str]):
        self.devices = list(devices)
        self.tokens: list[tf.Tensor | None] = [None] * len(devices)

    def wait(self, s: int) -> Any:
        token = self.tokens[s]
        return tf.control_dependencies([token] if token is not None else [])

    def done(self, s: int, produced: list[tf.Tensor]) -> None:
        with tf.device(self.devices[s]):
            seed = tf.constant(0) if self.tokens[s] is None else self.tokens[s]
            self.tokens[s] = tf.raw_ops.IdentityN(input=[seed] + [t for t in produced if t is not None])[0]


def _array(value: tf.Tensor, size: int, batched: bool) -> tf.TensorArray:
    """A TensorArray of ``size`` values like ``value`` (batch dimension open when ``batched``)."""
    shape = value.shape
    element = (shape if not batched or shape.rank is None or shape.rank == 0
               else tf.TensorShape([None, *shape[1:]]))
    return tf.TensorArray(value.dtype, size=size, element_shape=element, infer_shape=False)


class LoopedGPipe:
    """One training step of GPipe with re-materialization, as forward and backward tick loops.

    Args:
        stages: the K stages (each with ``recompute`` on).
        num_microbatches: M.
    """

    def __init__(self, stages: Sequence[Stage], num_microbatches: int):
        self.stages = list(stages)
        self.num_microbatches = num_microbatches

    def ticks(self) -> tuple[list[int], int, list[int]]:
        """``(fill, loop_ticks, drain)``: unrolled ticks before the loop, looped ticks, unrolled ticks after."""
        k, m = len(self.stages), self.num_microbatches
        total = m + k - 1
        if m - k < 2:  # a loop of one tick saves nothing
            return list(range(total)), 0, []
        return list(range(k)), m - k, list(range(m, total))

    def train(self, x: Any, loss_fn: LossFn, training: bool = True) -> tuple[tf.Tensor, list[list[Any]], Any]:
        """Forward and backward over all micro-batches.

        Args:
            x: the mini-batch input.
            loss_fn: :func:`pipeline.core.microbatch.microbatch_loss`'s function (its ``at``
                takes a tensor micro-batch index).
            training: passed to the layers.

        Returns:
            ``(loss, gradients per stage, merged y_pred)``; the loss holds micro-batch and
            call-time losses (the caller adds regularization).
        """
        forward = _Forward(self, x, loss_fn, training)
        forward.run()
        backward = _Backward(self, forward)
        backward.run()
        return forward.loss, backward.gradients(), forward.outputs.concat_all()


class _Arrays:
    """A flat list of TensorArrays (one per leaf of a nest), created on the first write."""

    def __init__(self, size: int, batched: bool = True):
        self.size = size
        self.batched = batched
        self.arrays: list[tf.TensorArray | None] | None = None
        self.structure: Any = None

    def write(self, j: Any, value: Any, device: str) -> None:
        flat = tf.nest.flatten(value)
        if self.arrays is None:
            self.structure = value
            self.arrays = [None if t is None else _array(t, self.size, self.batched) for t in flat]
        with tf.device(device):
            self.arrays = [a if t is None else a.write(j, t) for a, t in zip(self.arrays, flat)]

    def read(self, j: Any, device: str) -> Any:
        with tf.device(device):
            flat = [None if a is None else a.read(j) for a in self.arrays]
        return tf.nest.pack_sequence_as(self.structure, flat)

    def concat_all(self) -> Any:
        return tf.nest.pack_sequence_as(self.structure, [None if a is None else a.concat() for a in self.arrays])


class _Forward:
    """The forward ticks: stage inputs, state snapshots and outputs into TensorArrays, losses summed."""

    def __init__(self, owner: LoopedGPipe, x: Any, loss_fn: LossFn, training: bool):
        self.owner, self.x, self.loss_fn, self.training = owner, x, loss_fn, training
        k, m = len(owner.stages), owner.num_microbatches
        self.chain = _Chain([stage.device for stage in owner.stages])
        self.inputs = [_Arrays(m) for _ in range(k)]  # stage s >= 1: its input per micro-batch
        self.snapshots = [_Arrays(m, batched=False) for _ in range(k)]  # non-trainable state before each F
        self.outputs = _Arrays(m)  # the last stage's output per micro-batch
        self.loss = tf.constant(0.0, tf.float32)
        self.states = [recompute_lib.state_of(stage.layer) for stage in owner.stages]

    def stage_input(self, s: int, j: Any) -> Any:
        if s == 0:
            return mb_lib.take(self.x, j, self.owner.num_microbatches)
        return self.inputs[s].read(j, self.owner.stages[s].device)

    def action(self, s: int, j: Any) -> None:
        stage, stages = self.owner.stages[s], self.owner.stages
        j = tf.convert_to_tensor(j, tf.int32)  # one shape for every tick: each traced function traced once
        inp = self.stage_input(s, j)
        with self.chain.wait(s), tf.device(stage.device):
            if self.states[s]:
                self.snapshots[s].write(j, [tf.identity(v.value) for v in self.states[s]], stage.device)
            y, extra = stage.traced_calls.get(inp, self.training, recompute=False)(inp)
            if extra:
                recompute_lib.refuse_call_losses(stage.layer)
            scalars = [self.loss_fn.at(j, y)] if stage.is_last else []
        produced = tf.nest.flatten(y) + scalars
        if scalars:
            with tf.device(stage.device):
                self.loss = self.loss + tf.add_n(scalars)
        if stage.is_last:
            self.outputs.write(j, y, stage.device)
        else:
            self.inputs[s + 1].write(j, y, stages[s + 1].device)
        self.chain.done(s, produced)

    def tick(self, t: Any, active: Sequence[int]) -> None:
        for s in active:
            self.action(s, t - s)

    def run(self) -> None:
        k, m = len(self.owner.stages), self.owner.num_microbatches
        fill, loop_count, drain = self.owner.ticks()
        for t in fill:
            self.tick(t, [s for s in range(k) if 0 <= t - s < m])
        if loop_count:
            _loop(self, len(fill), loop_count, list(range(k)))
        for t in drain:
            self.tick(t, [s for s in range(k) if 0 <= t - s < m])

    def loop_state(self) -> Any:
        return (self.chain.tokens, [a.arrays for a in self.inputs], [a.arrays for a in self.snapshots],
                self.outputs.arrays, self.loss)

    def set_loop_state(self, state: Any) -> None:
        tokens, inputs, snapshots, outputs, self.loss = state
        self.chain.tokens = list(tokens)
        for arrays, value in zip(self.inputs + self.snapshots, list(inputs) + list(snapshots)):
            arrays.arrays = None if value is None else list(value)
        self.outputs.arrays = list(outputs)


class _Backward:
    """The backward ticks: per stage and micro-batch one VJP of the recomputed stage."""

    def __init__(self, owner: LoopedGPipe, forward: _Forward):
        self.owner, self.forward = owner, forward
        k, m = len(owner.stages), owner.num_microbatches
        self.chain = forward.chain  # each device's row goes on: all F, then all B
        self.cut_grads = [_Arrays(m) for _ in range(k)]  # stage s < K-1: gradient of its output per micro-batch
        self.sums: list[list[tf.Tensor | None] | None] = [None] * k

    def vjp(self, s: int, j: tf.Tensor, inp: Any, snapshot: list[tf.Tensor], upstream: Any) -> list[Any]:
        """Stage s's backward of micro-batch j: the stage recomputed from ``inp`` under the state
        ``snapshot`` saved before its forward, and one VJP; returns input then weight gradients."""
        stage, fwd = self.owner.stages[s], self.forward
        flat_in = [] if s == 0 else tf.nest.flatten(inp)
        with keras.StatelessScope(state_mapping=list(zip(fwd.states[s], snapshot))):
            with tf.GradientTape() as tape:
                tape.watch([t for t in flat_in if t.dtype.is_floating])
                y = stage.layer(inp, training=fwd.training)
                targets = [fwd.loss_fn.at(j, y)] if stage.is_last else tf.nest.flatten(y)
        out_grads = [] if upstream is None else list(tf.nest.flatten(upstream))
        scale = stage.loss_scale  # the loss starts from the loss scale under mixed_float16
        out_grads += [tf.ones_like(t) if scale is None else tf.cast(scale, t.dtype) * tf.ones_like(t)
                      for t in targets[len(out_grads):]]
        return tape.gradient(targets, flat_in + stage.trainable_variables, output_gradients=out_grads)

    def action(self, s: int, j: Any) -> None:
        stages, fwd = self.owner.stages, self.forward
        stage = stages[s]
        j = tf.convert_to_tensor(j, tf.int32)
        inp = fwd.stage_input(s, j)
        upstream = None if stage.is_last else self.cut_grads[s].read(j, stage.device)
        num_in = 0 if s == 0 else len(tf.nest.flatten(inp))
        with self.chain.wait(s), tf.device(stage.device):
            snapshot = fwd.snapshots[s].read(j, stage.device) if fwd.states[s] else []
            grads = self.vjp(s, j, inp, snapshot, upstream)
            sums = self.sums[s] if self.sums[s] is not None else [None] * len(stage.trainable_variables)
            self.sums[s] = stage.accumulator(sums, grads[num_in:])
        if s > 0:
            self.cut_grads[s - 1].write(j, grads[:num_in], stages[s - 1].device)
        self.chain.done(s, [g for g in grads if g is not None])

    def tick(self, u: Any, active: Sequence[int]) -> None:
        k = len(self.owner.stages)
        for s in reversed(active):
            self.action(s, u - (k - 1 - s))

    def run(self) -> None:
        k, m = len(self.owner.stages), self.owner.num_microbatches
        fill, loop_count, drain = self.owner.ticks()
        active = lambda u: [s for s in range(k) if 0 <= u - (k - 1 - s) < m]  # noqa: E731
        for u in fill:
            self.tick(u, active(u))
        if loop_count:
            _loop(self, len(fill), loop_count, list(range(k)))
        for u in drain:
            self.tick(u, active(u))

    def loop_state(self) -> Any:
        return (self.chain.tokens, [a.arrays for a in self.cut_grads], self.sums)

    def set_loop_state(self, state: Any) -> None:
        tokens, cut_grads, self.sums = state
        self.chain.tokens = list(tokens)
        for arrays, value in zip(self.cut_grads, cut_grads):
            arrays.arrays = None if value is None else list(value)
        self.sums = [None if row is None else list(row) for row in self.sums]

    def gradients(self) -> list[list[Any]]:
        return [row if row is not None else [None] * len(stage.trainable_variables)
                for row, stage in zip(self.sums, self.owner.stages)]


def _loop(phase: Any, first: int, count: int, active: list[int]) -> None:
    """Runs ``phase.tick(t, active)`` for t = first .. first + count - 1 in a ``tf.while_loop``."""

    like = phase.loop_state()

    def body(t: tf.Tensor, *values: Any) -> tuple[Any, ...]:
        phase.set_loop_state(_with_nones(values, like))
        phase.tick(t, active)
        return (t + 1, *_no_nones(phase.loop_state()))

    _, *final = tf.while_loop(lambda t, *_: t < first + count, body,
                              (tf.constant(first), *_no_nones(like)), maximum_iterations=count)
    phase.set_loop_state(_with_nones(final, like))


def _no_nones(state: Any) -> list[Any]:
    """The leaves of ``state`` that are not ``None`` (``tf.while_loop`` carries tensors and arrays only)."""
    return [v for v in tf.nest.flatten(state) if v is not None]


def _with_nones(values: Sequence[Any], like: Any) -> Any:
    """``like``'s structure with its non-``None`` leaves replaced by ``values`` in order."""
    it = iter(values)
    return tf.nest.pack_sequence_as(like, [None if v is None else next(it) for v in tf.nest.flatten(like)])
