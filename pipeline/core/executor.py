"""Turn a schedule into TensorFlow ops: forwards, chained VJPs and accumulated gradients.

The actions are built in ``schedule.execution_order`` (every dependency before
its user). Inside a ``tf.function`` each action's ops carry a control
dependency on the previous action of the same device (stages sharing a device
share one chain), so every device follows its row of the schedule while
different devices overlap::

    device 0:  0F0 -> 0F1 -> 0B0 -> 0B1          ("->": control dependency)
                 \\      \\     ^      ^
    device 1:     1F0 -> 1B0 -> 1F1 -> 1B1       (arrows across: data, a device copy)

Eagerly (``run_eagerly=True``) the same actions simply run one by one in that order.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import tensorflow as tf

from pipeline.core import looped
from pipeline.core import microbatch as mb_lib
from pipeline.core import schedule as sched
from pipeline.core.stage import LossFn, Stage

ActionHook = Callable[[sched.Action], None]


@dataclasses.dataclass
class StepResult:
    """What one training mini-batch produced."""

    y_preds: list[Any]
    """The last stage's output, one entry per micro-batch."""
    loss: tf.Tensor
    """The mini-batch loss: micro-batch losses plus call-time and regularization losses."""
    gradients: list[list[tf.Tensor | None]]
    """Per stage, the float32 gradient of each trainable variable, summed over micro-batches."""

    def pairs(self, stages: Sequence[Stage]) -> list[tuple[tf.Tensor, Any]]:
        """``(gradient, variable)`` pairs over all stages, skipping unused variables."""
        return [
            (g, v)
            for stage, grads in zip(stages, self.gradients)
            for g, v in zip(grads, stage.trainable_variables)
            if g is not None
        ]


class Executor:
    """Runs training and inference schedules over a list of stages.

    Args:
        stages: the K stages, in pipeline order.
        schedule: a schedule name (``"1f1b"``, ``"gpipe"``) or generator.
        num_microbatches: M.
    """

    def __init__(self, stages: Sequence[Stage], schedule: str | Callable = "1f1b",
                 num_microbatches: int = 1):
        self.stages = list(stages)
        self.num_microbatches = mb_lib.check_count(num_microbatches)
        self.generator = schedule if callable(schedule) else sched.get(schedule)
        self.schedule_name = schedule if isinstance(schedule, str) else getattr(schedule, "__name__", "custom")
        self.num_devices = shared_devices(self.stages)
        """D when the stages sit round-robin on D < K devices (virtual stages), else ``None``."""
        self.train_schedule = generate(self.generator, len(self.stages), self.num_microbatches, self.num_devices)
        sched.validate(self.train_schedule, self.num_microbatches)
        split = {a.stage for row in self.train_schedule for a in row if a.op is sched.W}
        self.split_backward = [s in split for s in range(len(self.stages))]
        """Per stage: whether its backward is split into B (input gradient) and W (weight gradient)."""
        self.infer_schedule = sched.forward_only(len(self.stages), self.num_microbatches)
        self.action_hook: ActionHook | None = None
        self.loop = False
        """True: a GPipe step with every stage recomputed runs as tick loops (:mod:`pipeline.core.looped`,
        ``PipelineModel(loop=True)``; call :meth:`prepare` after setting it); False: the 2*K*M actions
        are built one by one."""

    def prepare(self) -> None:
        """Makes what the step's trace must not create (the looped step's gradient buffers), once built."""
        if self.loop:
            looped.prepare(self.stages, self.generator is sched.gpipe)

    def runs_looped(self) -> bool:
        """Whether :meth:`train` builds the step as tick loops (graph size independent of M)."""
        return self.loop and looped.applies(self.stages, self.generator is sched.gpipe,
                                                    tf.executing_eagerly(), self.num_microbatches)

    def run_actions(self, schedule: sched.Schedule, step: Callable[[sched.Action], list[tf.Tensor]]) -> None:
        """Builds (or, eagerly, runs) the actions, chaining each device's actions."""
        last: dict[str, list[tf.Tensor]] = {}  # per device: what its latest action produced
        for action in sched.execution_order(schedule):
            if self.action_hook is not None:
                self.action_hook(action)
            device = self.stages[action.stage].device
            deps = last.get(device, [])
            ctx = tf.control_dependencies(deps) if deps else contextlib.nullcontext()
            with ctx, tf.name_scope(f"act{action}"):  # ops named act1F0/...: readable in profiles
                produced = [t for t in step(action) if t is not None]
                if produced and not tf.executing_eagerly():
                    last[device] = [done_marker(produced, device)]
                elif produced:
                    last[device] = produced

    @tf.autograph.experimental.do_not_convert  # plain Python building ops: AutoGraph would only slow it
    def train(self, x: Any, loss_fn: LossFn, training: bool = True, regularize: bool = True) -> StepResult:
        """One mini-batch of forward and backward over all micro-batches.

        Args:
            x: the mini-batch input (nested tensors).
            loss_fn: ``loss_fn(j, y_pred_j)``, the scalar loss of micro-batch j,
                already scaled so that the sum over j is the mini-batch loss.
            training: passed to the layers.
            regularize: add the weight regularization (loss and gradient); False
                when one mini-batch is run as several calls, all but one.

        Returns:
            The step's outputs, total loss and accumulated gradients.
        """
        num_stages, m = len(self.stages), self.num_microbatches
        xs = mb_lib.split(x, m)
        for stage, split in zip(self.stages, self.split_backward):
            stage.reset()
            stage.split_backward = split
        if self.runs_looped():
            return self.train_looped(x, loss_fn, training, regularize)
        outputs: dict[tuple[int, int], Any] = {}
        input_grads: dict[tuple[int, int], Any] = {}

        def step(action: sched.Action) -> list[tf.Tensor]:
            s, j = action.stage, action.microbatch
            stage = self.stages[s]
            if action.op is sched.F:
                inp = xs[j] if s == 0 else outputs.pop((s - 1, j))
                before = len(stage.step_losses)
                y = stage.forward(j, inp, training=training,
                                  loss_fn=loss_fn if stage.is_last else None)
                outputs[(s, j)] = y
                # the losses too: nothing downstream waits for their values, they are computed in F's turn
                return tf.nest.flatten(y) + stage.step_losses[before:]
            if action.op is sched.W:
                stage.backward_weight(j)
                return [a for a in stage.gradients() if a is not None]
            upstream = None if stage.is_last else input_grads.pop((s + 1, j))
            if not self.split_backward[s]:
                g = stage.backward(j, upstream)
                produced = list(g or []) + [a for a in stage.gradients() if a is not None]
            else:
                g = stage.backward_input(j, upstream)
                produced = list(g or []) + stage.held_gradients(j)
            if g is not None:
                input_grads[(s, j)] = g
            return produced

        # Call-time losses are scaled by each micro-batch's share of this batch, unless the
        # caller runs one batch as several calls and set the whole batch size (anybatch).
        unset = [stage for stage in self.stages if stage.batch_total is None]
        for stage in unset:
            stage.batch_total = mb_lib.batch_size(x)
        try:
            self.run_actions(self.train_schedule, step)
        finally:
            for stage in unset:
                stage.batch_total = None
        for stage in self.stages:
            if regularize:
                stage.add_regularization()
        y_preds = [outputs.pop((num_stages - 1, j)) for j in range(m)]
        losses = [loss for stage in self.stages for loss in stage.step_losses]
        return StepResult(
            y_preds=y_preds,
            loss=tf.add_n(losses),
            gradients=[stage.gradients() for stage in self.stages],
        )

    def train_looped(self, x: Any, loss_fn: LossFn, training: bool, regularize: bool) -> StepResult:
        """:meth:`train` as tick loops (:class:`pipeline.core.looped.LoopedGPipe`)."""
        unset = [stage for stage in self.stages if stage.batch_total is None]
        for stage in unset:
            stage.batch_total = mb_lib.batch_size(x)
        try:
            loss, gradients, y_pred = looped.LoopedGPipe(self.stages, self.num_microbatches).train(
                x, loss_fn, training)
        finally:
            for stage in unset:
                stage.batch_total = None
        losses = [loss]
        for stage, grads in zip(self.stages, gradients):
            stage.grad_sums = list(grads)
            stage.peak_in_flight = max(stage.peak_in_flight, self.num_microbatches)
            if regularize and stage.add_regularization() is not None:
                losses.append(stage.step_losses[-1])
        return StepResult(y_preds=[y_pred], loss=tf.add_n(losses), gradients=[stage.gradients() for stage in self.stages])

    @tf.autograph.experimental.do_not_convert  # plain Python building ops: AutoGraph would only slow it
    def infer(self, x: Any) -> Any:
        """Forward only, micro-batch by micro-batch; returns the merged outputs."""
        num_stages, m = len(self.stages), self.num_microbatches
        xs = mb_lib.split(x, m)
        outputs: dict[tuple[int, int], Any] = {}

        def step(action: sched.Action) -> list[tf.Tensor]:
            s, j = action.stage, action.microbatch
            inp = xs[j] if s == 0 else outputs.pop((s - 1, j))
            y = self.stages[s].forward(j, inp, training=False, record=False)
            outputs[(s, j)] = y
            return tf.nest.flatten(y)

        self.run_actions(self.infer_schedule, step)
        with tf.device(self.stages[-1].device):
            return mb_lib.merge([outputs.pop((num_stages - 1, j)) for j in range(m)])


def done_marker(produced: list[tf.Tensor], device: str) -> tf.Tensor:
    """A tensor that exists when every tensor in ``produced`` exists: what the device's next action waits for.

    A control dependency on a function call op waits only for the function's stateful
    ops once the runtime inlines the body; a data input waits for the value itself::

        0F0 body ops --data--> IdentityN --ctrl--> 0F1
    """
    with tf.device(device):
        return tf.raw_ops.IdentityN(input=produced)[0]


def shared_devices(stages: Sequence[Stage]) -> int | None:
    """D when stage s runs on the (s % D)-th of D < K distinct devices (interleaved placement), else ``None``."""
    devices = [stage.device for stage in stages]
    distinct = list(dict.fromkeys(devices))
    d = len(distinct)
    if d < len(devices) and len(devices) % d == 0 and all(dev == distinct[s % d] for s, dev in enumerate(devices)):
        return d
    return None


def generate(generator: Callable[..., sched.Schedule], num_stages: int, num_microbatches: int,
             num_devices: int | None) -> sched.Schedule:
    """The training schedule: with ``num_devices`` for schedules that place several stages per device row.

    A generator marked ``several_stages_per_device`` (interleaved_1f1b; a custom one may set it
    too) gets D. Schedules with one row per stage (gpipe, 1f1b, zb_h1) still run on shared
    devices: the executor chains the actions of all stages of a device in execution order.
    """
    if num_devices is not None and getattr(generator, "several_stages_per_device", False):
        return generator(num_stages, num_microbatches, num_devices)
    return generator(num_stages, num_microbatches)

