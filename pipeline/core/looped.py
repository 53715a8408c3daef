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
whatever M is (the executor loops only for M >= K + :data:`MIN_LOOP_TICKS`). Values cross ticks through
resource TensorArrays on the device that reads them (the input and targets
split once, stage inputs, cut-layer gradients, outputs); the weight gradients
are summed into float32 buffer variables per stage; the loop variables are
scalars (array flows, per-device tick counters, per-stage tokens, the loss).
A loop that spans devices routes its loop variables through one device every
tick: keeping them scalars keeps that cost to a few small copies per tick.

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

from pipeline.core import loop_values
from pipeline.core import microbatch as mb_lib
from pipeline.core import recompute as recompute_lib
from pipeline.core import traced
from pipeline.core.stage import LossFn, Stage


MIN_LOOP_TICKS = 4
"""Loop only when M - K >= this: a few ticks unrolled cost less than the loops' fixed overhead."""


def applies(stages: Sequence[Stage], gpipe: bool, eager: bool, num_microbatches: int) -> bool:
    """Whether a training step runs looped: GPipe, every stage recomputed, M - K >= :data:`MIN_LOOP_TICKS`,
    graph mode, nothing patched.

    The unrolled executor runs the other cases: ``check_numerics`` (per-action labels),
    BatchNorm modes that patch layer calls (Python side effects per call), eager mode, and
    small M (a step of a few unrolled actions builds fast and runs without the loops' overhead).
    """
    return (gpipe and not eager and num_microbatches - len(stages) >= MIN_LOOP_TICKS
            and all(stage.recompute for stage in stages)
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
        from pipeline.core.executor import done_marker  # noqa: PLC0415 - the executor imports this module

        with tf.device(self.devices[s]):
            seed = tf.constant(0) if self.tokens[s] is None else self.tokens[s]
        self.tokens[s] = done_marker([seed] + [t for t in produced if t is not None], self.devices[s])


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
        if m - k < 1:
            return list(range(total)), 0, []
        return list(range(k)), m - k, list(range(m, total))

    def train(self, x: Any, loss_fn: LossFn, training: bool = True) -> tuple[tf.Tensor, list[list[Any]], Any]:
        """Forward and backward over all micro-batches.

        Args:
            x: the mini-batch input.
            loss_fn: :func:`pipeline.core.microbatch.microbatch_loss`'s function (the loop uses its
                ``targets`` and ``of``).
            training: passed to the layers.

        Returns:
            ``(loss, gradients per stage, merged y_pred)``: the summed micro-batch losses (the caller
            adds regularization; a recomputed stage has no call-time losses).

        Raises:
            RecomputeError: if a stage adds losses during its call.
        """
        forward = _Forward(self, x, loss_fn, training)
        forward.run()
        backward = _Backward(self, forward)
        backward.run()
        return forward.loss, backward.gradients(), forward.outputs.concat_all()


class _Phase:
    """The ticks of one direction: the unrolled fill, the loop, the unrolled drain (subclasses say which
    micro-batch a stage runs at a tick, in what order a tick's actions are built, and what one does)."""

    owner: LoopedGPipe

    def index(self, s: int, t: int) -> int:
        raise NotImplementedError

    def order(self, active: Sequence[int]) -> list[int]:
        raise NotImplementedError

    def action(self, s: int, j: Any) -> None:
        raise NotImplementedError

    def loop_state(self) -> Any:
        raise NotImplementedError

    def writers(self) -> Any:
        raise NotImplementedError

    def run(self) -> None:
        k, m = len(self.owner.stages), self.owner.num_microbatches
        fill, loop_count, drain = self.owner.ticks()
        for t in fill:
            self.tick(t)
        if loop_count:
            _loop(self, len(fill), loop_count, list(range(k)))
        for t in drain:
            self.tick(t)

    def tick(self, t: int) -> None:
        """One unrolled tick: the stages with a micro-batch at tick t."""
        k, m = len(self.owner.stages), self.owner.num_microbatches
        for s in self.order([s for s in range(k) if 0 <= self.index(s, t) < m]):
            self.action(s, self.index(s, t))


class _Forward(_Phase):
    """The forward ticks: stage inputs, state snapshots and outputs into TensorArrays, losses summed."""

    def __init__(self, owner: LoopedGPipe, x: Any, loss_fn: LossFn, training: bool):
        self.owner, self.loss_fn, self.training = owner, loss_fn, training
        k, m = len(owner.stages), owner.num_microbatches
        self.chain = _Chain([stage.device for stage in owner.stages])
        self.inputs = [loop_values.Arrays(m) for _ in range(k)]  # stage s >= 1: its input per micro-batch
        self.snapshots = [loop_values.Arrays(m, batched=False) for _ in range(k)]  # non-trainable state before each F
        self.outputs = loop_values.Arrays(m)  # the last stage's output per micro-batch
        with tf.device(owner.stages[-1].device):
            self.loss = tf.constant(0.0, tf.float32)
        self.states = [recompute_lib.state_of(stage.layer) for stage in owner.stages]
        # The input and the targets split once, outside the loops, into arrays on the stage that reads them:
        # a loop would send every tensor it captures through its control device at every tick.
        sizes = tf.cast(tf.convert_to_tensor(mb_lib.sizes(mb_lib.batch_size(x), m)), tf.int64)
        self.x_parts, self.target_parts = loop_values.Arrays(m), loop_values.Arrays(m)
        self.x_parts.split(x, sizes, owner.stages[0].device)
        self.target_parts.split(loss_fn.targets, sizes, owner.stages[-1].device)

    def loss_of(self, j: tf.Tensor, y_pred: Any) -> tf.Tensor:
        """The loss of micro-batch j (its share of the batch loss)."""
        y_true, weight = self.target_parts.read(j, self.owner.stages[-1].device)
        return self.loss_fn.of(y_true, y_pred, weight)

    def stage_input(self, s: int, j: Any) -> Any:
        if s == 0:
            return self.x_parts.read(j, self.owner.stages[0].device)
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
            scalars = [self.loss_of(j, y)] if stage.is_last else []
        produced = tf.nest.flatten(y) + scalars
        if scalars:
            with tf.device(stage.device):
                self.loss = self.loss + tf.add_n(scalars)
        if stage.is_last:
            self.outputs.write(j, y, stage.device)
        else:
            self.inputs[s + 1].write(j, y, stages[s + 1].device)
        self.chain.done(s, produced)

    def index(self, s: int, t: int) -> int:
        """The micro-batch stage s runs at forward tick t."""
        return t - s

    def order(self, active: Sequence[int]) -> list[int]:
        """The stages of one tick in the order their actions are built: the consumer before its producer.

        Stage s reads the value stage s-1 wrote in the *previous* tick. Built after stage s-1's write
        of this tick, its read would take the array flow that write returns, and wait for it: the
        stages of a tick would run one after the other. Built first, it reads with the previous
        tick's flow and runs beside stage s-1::

            tick t:  stage 1 reads inputs[1][t-1]  (flow of tick t-1)   } side by side
                     stage 0 writes inputs[1][t]   (flow -> tick t+1)   }
        """
        return list(reversed(active))

    def loop_state(self) -> Any:
        return (self.chain.tokens, [a.flows for a in self.inputs], [a.flows for a in self.snapshots],
                self.outputs.flows, self.loss)

    def writers(self) -> Any:
        """:meth:`loop_state`'s structure with, per leaf, the device of the stage whose action updates it."""
        devices = [stage.device for stage in self.owner.stages]
        k = len(devices)
        return (devices, [_each(a.flows, devices[max(s - 1, 0)]) for s, a in enumerate(self.inputs)],
                [_each(a.flows, devices[s]) for s, a in enumerate(self.snapshots)],
                _each(self.outputs.flows, devices[k - 1]), devices[k - 1])

    def set_loop_state(self, state: Any) -> None:
        tokens, inputs, snapshots, outputs, self.loss = state
        self.chain.tokens = list(tokens)
        for arrays, value in zip(self.inputs + self.snapshots, list(inputs) + list(snapshots)):
            arrays.flows = None if value is None else list(value)
        self.outputs.flows = list(outputs)


class _Backward(_Phase):
    """The backward ticks: per stage and micro-batch one VJP of the recomputed stage."""

    def __init__(self, owner: LoopedGPipe, forward: _Forward):
        self.owner, self.forward = owner, forward
        k, m = len(owner.stages), owner.num_microbatches
        self.chain = forward.chain  # each device's row goes on: all F, then all B
        self.cut_grads = [loop_values.Arrays(m) for _ in range(k)]  # stage s < K-1: gradient of its output per micro-batch
        self.connected: list[list[bool] | None] = [None] * k
        """Per stage, per trainable variable: whether it has a gradient (known after the stage's first B)."""

    def vjp(self, s: int, j: tf.Tensor, inp: Any, snapshot: list[tf.Tensor], upstream: Any) -> list[Any]:
        """Stage s's backward of micro-batch j: the stage recomputed from ``inp`` under the state
        ``snapshot`` saved before its forward, and one VJP; returns input then weight gradients."""
        stage, fwd = self.owner.stages[s], self.forward
        flat_in = [] if s == 0 else tf.nest.flatten(inp)
        with keras.StatelessScope(state_mapping=list(zip(fwd.states[s], snapshot))):
            with tf.GradientTape() as tape:
                tape.watch([t for t in flat_in if t.dtype.is_floating])
                y = stage.layer(inp, training=fwd.training)
                targets = [fwd.loss_of(j, y)] if stage.is_last else tf.nest.flatten(y)
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
            updates = self.accumulate(s, grads[num_in:])
        if s > 0:
            self.cut_grads[s - 1].write(j, grads[:num_in], stages[s - 1].device)
        with tf.control_dependencies(updates):
            self.chain.done(s, [g for g in grads[:num_in] if g is not None])

    def accumulate(self, s: int, grads: list[Any]) -> list[Any]:
        """Adds one micro-batch's weight gradients into stage s's float32 buffers (the first B assigns).

        The sums live in variables, not in loop variables: a loop variable per weight costs
        control-flow ops in every tick."""
        buffers = gradient_buffers(self.owner.stages[s])
        first = self.connected[s] is None
        if first:
            self.connected[s] = [g is not None for g in grads]
        updates = []
        for buffer, g in zip(buffers, grads):
            if g is not None:
                value = tf.cast(tf.convert_to_tensor(g), tf.float32)
                updates.append(buffer.assign(value, read_value=False) if first
                               else buffer.assign_add(value, read_value=False))
        return updates

    def index(self, s: int, u: int) -> int:
        """The micro-batch stage s runs at backward tick u (the last stage starts)."""
        return u - (len(self.owner.stages) - 1 - s)

    def order(self, active: Sequence[int]) -> list[int]:
        """The consumer before its producer, as in the forward: stage s-1 reads the cut-layer gradient
        stage s wrote in the previous tick."""
        return list(active)

    def loop_state(self) -> Any:
        return (self.chain.tokens, [a.flows for a in self.cut_grads])

    def writers(self) -> Any:
        """:meth:`loop_state`'s structure with, per leaf, the device of the stage whose action updates it."""
        devices = [stage.device for stage in self.owner.stages]
        k = len(devices)
        return (devices, [_each(a.flows, devices[min(s + 1, k - 1)]) for s, a in enumerate(self.cut_grads)])

    def set_loop_state(self, state: Any) -> None:
        tokens, cut_grads = state
        self.chain.tokens = list(tokens)
        for arrays, value in zip(self.cut_grads, cut_grads):
            arrays.flows = None if value is None else list(value)

    def gradients(self) -> list[list[Any]]:
        """Per stage, the summed float32 gradient of each trainable variable (``None``: unconnected)."""
        rows = []
        for s, stage in enumerate(self.owner.stages):
            with self.chain.wait(s), tf.device(stage.device):
                rows.append([buffer.read_value() if connected else None
                             for buffer, connected in zip(gradient_buffers(stage), self.connected[s])])
        return rows


def gradient_buffers(stage: Stage) -> list[tf.Variable]:
    """Stage's float32 gradient-sum variables, one per trainable variable, made once on its device.

    :func:`prepare` makes them before the step is traced (a variable made while tracing makes
    ``tf.function`` trace the step twice)."""
    buffers = getattr(stage, "looped_gradient_buffers", None)
    if buffers is None or len(buffers) != len(stage.trainable_variables):
        with tf.init_scope(), tf.device(stage.device):
            buffers = [tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False,
                                   name=f"gradient_sum_{i}") for i, v in enumerate(stage.trainable_variables)]
        stage.looped_gradient_buffers = buffers
    return buffers


def prepare(stages: Sequence[Stage], gpipe: bool) -> None:
    """Makes the gradient buffers of a looped step ahead of tracing, once every stage is built."""
    if gpipe and all(stage.recompute for stage in stages) and all(stage.layer.built for stage in stages):
        for stage in stages:
            gradient_buffers(stage)


def _loop(phase: Any, first: int, count: int, active: list[int]) -> None:
    """Runs the ticks first .. first + count - 1 of ``phase`` in a ``tf.while_loop``.

    Each stage counts its own micro-batch index on its own device. The loop's scalars (counters,
    array flows, tokens, the loss) travel packed, one float32 vector per device and writer: TensorFlow
    routes every loop variable through the loop's control device each tick, so one vector costs one
    round trip instead of one per scalar, and a flow another stage writes does not hold back the
    device's own counter and token (:class:`pipeline.core.loop_values.Packing`)::

        device 1 scalars (j, token, flows, loss) --stack--> [v] --tick--> [v'] --unstack--> ...
    """
    like = phase.loop_state()
    order = phase.order(active)
    devices = [phase.owner.stages[s].device for s in order]
    starts = []
    for s, device in zip(order, devices):
        with tf.device(device):
            starts.append(tf.constant(phase.index(s, first), tf.int32))
    initial = starts + _no_nones(like)
    writers = devices + [w for v, w in zip(tf.nest.flatten(like), tf.nest.flatten(phase.writers())) if v is not None]
    packing = loop_values.Packing(initial, writers)

    def body(i: tf.Tensor, *packed: tf.Tensor) -> tuple[Any, ...]:
        flat = packing.unpack(packed)
        indices, values = flat[:len(order)], flat[len(order):]
        phase.set_loop_state(_with_nones(values, like))
        following = []
        for s, j, device in zip(order, indices, devices):
            phase.action(s, j)
            with tf.device(device):
                following.append(j + 1)
        return (i + 1, *packing.pack(following + _no_nones(phase.loop_state())))

    _, *final = tf.while_loop(lambda i, *_: i < count, body, (tf.constant(0), *packing.pack(initial)),
                              maximum_iterations=count)
    phase.set_loop_state(_with_nones(packing.unpack(final)[len(order):], like))


def _each(flows: list[Any] | None, writer: str) -> Any:
    """``writer`` for each flow of an array's ``flows`` (``None`` where there is none)."""
    return None if flows is None else [None if f is None else writer for f in flows]


def _no_nones(state: Any) -> list[Any]:
    """The leaves of ``state`` that are not ``None`` (``tf.while_loop`` carries tensors and arrays only)."""
    return [v for v in tf.nest.flatten(state) if v is not None]


def _with_nones(values: Sequence[Any], like: Any) -> Any:
    """``like``'s structure with its non-``None`` leaves replaced by ``values`` in order."""
    it = iter(values)
    return tf.nest.pack_sequence_as(like, [None if v is None else next(it) for v in tf.nest.flatten(like)])
