"""``Stage``: one part of the model on one device, with a tape per micro-batch.

Backward is one vector-Jacobian product per micro-batch::

    input_grad, *var_grads = tape.gradient(stage_output, [stage_input, *variables],
                                           output_gradients=cut_layer_grad)

never a Jacobian: one backward pass, exact, memory of one activation set.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import keras
import tensorflow as tf

from pipeline.core import _compat
from pipeline.core import layer_grads
from pipeline.core import microbatch as mb_lib
from pipeline.core import numerics
from pipeline.core import recompute as recompute_lib
from pipeline.core import traced

LossFn = Callable[[int, Any], tf.Tensor]
"""``loss_fn(microbatch, y_pred) -> scalar``: the last stage's loss for one micro-batch."""


class _Saved:
    """What one forward keeps until its backward: the tape and its endpoints."""

    __slots__ = ("inputs", "targets", "tape", "input_grads", "layer_calls", "layer_grads")

    def __init__(self, inputs: list[tf.Tensor], targets: list[tf.Tensor], tape: tf.GradientTape,
                 layer_calls: layer_grads.LayerCalls | None = None):
        self.inputs = inputs
        self.targets = targets
        self.tape = tape
        self.input_grads: list[tf.Tensor] | None = None
        self.layer_calls = layer_calls
        """Split backward: the layer calls W takes its gradients from (:mod:`pipeline.core.layer_grads`)."""
        self.layer_grads: list[tf.Tensor | None] = []
        """Split backward: B's gradients of the layer calls' outputs, kept for W."""


class Stage:
    """A Keras model or layer placed on one device.

    Args:
        layer: the stage's Keras model or layer (``model_0``, ``model_1``, ...).
        device: the device its variables and ops live on, e.g. ``"/GPU:1"``.
        index: position in the pipeline, 0 for the stage that takes the input.
        num_stages: K, the pipeline length.
        recompute: keep only the stage input per micro-batch and recompute the
            activations in backward (:mod:`pipeline.recompute`).
    """

    def __init__(self, layer: keras.layers.Layer, device: str, index: int = 0, num_stages: int = 1,
                 recompute: bool = False):
        self.layer = layer
        self.recompute = bool(recompute)
        self.device = device
        self.index = index
        self.num_stages = num_stages
        self.saved_tapes: dict[int, _Saved] = {}
        """Per micro-batch in flight: the tape and endpoints its backward needs."""
        self.grad_sums: list[tf.Tensor | None] = []
        """Float32 gradient sums since :meth:`reset`, one per trainable variable (``None``: none yet)."""
        self.step_losses: list[tf.Tensor] = []
        """Scalar losses of this mini-batch: micro-batch losses, call-time losses, regularization."""
        self.in_flight = 0
        self.peak_in_flight = 0
        self.loss_scale: tf.Tensor | None = None
        """Set per training step under mixed_float16 (:func:`numerics.begin_step`): backward starts at scale*loss."""
        self.numerics: str | None = None
        """``check_numerics`` mode of this step: ``None`` (off, no ops added), ``"raise"`` or ``"report"``."""
        self.batch_total: tf.Tensor | int | None = None
        """B, the mini-batch size: call-time losses of a micro-batch of n_j samples are scaled by
        n_j / B (:func:`scaled_call_losses`); ``None``: the micro-batch is the whole batch."""
        self.infer_losses: list[tf.Tensor] | None = None
        """When a list, forward-only calls append their scaled call-time losses to it (evaluate)."""
        self.split_backward = False
        """Set by the executor when the schedule splits this stage's backward into B and W
        (zero-bubble): the tape is then kept for the second gradient call."""
        self.traced_calls = traced.TracedCalls(layer, device)
        """The layer call traced once per stage and called per micro-batch (:mod:`pipeline.core.traced`)."""
        self.layer_functions = layer_grads.LayerFunctions()
        """A split stage's layer calls, each traced once (:mod:`pipeline.core.layer_grads`)."""
        self.accumulator = traced.Accumulator()
        """Adds each micro-batch's gradients into the float32 sums (one traced call per backward)."""

    def __repr__(self) -> str:
        return f"Stage({self.index}, {self.layer.name!r}, device={self.device!r})"

    @property
    def is_first(self) -> bool:
        """Whether this stage takes the pipeline's input (no input gradient needed)."""
        return self.index == 0

    @property
    def is_last(self) -> bool:
        """Whether this stage computes the loss."""
        return self.index == self.num_stages - 1

    @property
    def trainable_variables(self) -> list[keras.Variable]:
        """The stage's trainable Keras variables, in a fixed order."""
        return list(self.layer.trainable_variables)

    def build(self, input_spec: Any) -> Any:
        """Builds the layer for ``input_spec`` with its variables created on this device.

        Runs outside any Keras symbolic scope, so variables are created (or, if
        already built, moved by :meth:`place`) on ``self.device`` before an
        optimizer makes slots beside them.

        Args:
            input_spec: ``keras.KerasTensor`` (or nest of them) the stage receives.

        Returns:
            The stage's output spec.
        """
        with _compat.outside_keras_scopes(), tf.device(self.device):
            output_spec = _compat.compute_output_spec(self.layer, input_spec)
        self.place()
        return output_spec

    def place(self) -> None:
        """Moves every variable of the (built) layer onto this stage's device.

        A variable created elsewhere is re-created on ``self.device`` with the
        same value; the Keras variable object (and so the user's model) stays
        the same, so training the stage trains the user's model.
        """
        for variable in self.layer.variables:
            current = variable.value
            if _same_device(current.device, self.device):
                continue
            with tf.device(self.device):
                _compat.recreate_variable(variable, tf.identity(current))

    def reset(self) -> None:
        """Starts a new mini-batch: clears saved tapes and gradient accumulators."""
        self.saved_tapes.clear()
        self.step_losses = []
        self.grad_sums = [None] * len(self.trainable_variables)
        self.in_flight = 0

    def forward(self, microbatch: int, x: Any, training: bool = True,
                loss_fn: LossFn | None = None, record: bool = True) -> Any:
        """Runs the stage on one micro-batch under its device, recording a tape.

        Args:
            microbatch: index j of the micro-batch.
            x: the stage input (the previous stage's output, or the data).
            training: passed to the layer.
            loss_fn: on the last stage, ``loss_fn(j, y_pred)`` gives the scalar
                loss the backward starts from.
            record: False for forward-only (inference) schedules.

        Returns:
            The stage output (``y_pred`` on the last stage).
        """
        with tf.device(self.device):
            if not record:
                y, extra = self.traced_calls.get(x, training, recompute=False)(x)
                if self.infer_losses is not None:
                    self.infer_losses.extend(_scaled(extra, x, self.batch_total))
                return y
            inputs = [] if self.is_first else [t for t in tf.nest.flatten(x)]
            per_layer = self.split_backward and not self.recompute
            with layer_grads.split_tape() if self.split_backward else tf.GradientTape() as tape:
                tape.watch([t for t in inputs if t.dtype.is_floating])  # int ids, bool masks: no gradient
                recording = (layer_grads.recording(self.layer, self.layer_functions) if per_layer
                             else contextlib.nullcontext())
                with recording as calls:
                    if calls is not None:  # W from the layer calls' own tapes (each call traced once)
                        y, extra = traced.plain_call(self.layer, x, training, recompute=False)
                    else:  # a split backward differentiates twice: inlined, each half keeps only the ops it needs
                        y, extra = self.traced_calls.get(x, training, self.recompute, inline=self.split_backward)(x)
                scalars = [loss_fn(microbatch, y)] if loss_fn is not None else []
                scalars.extend(_scaled(extra, x, self.batch_total))
                targets = (scalars if loss_fn is not None else list(tf.nest.flatten(y)) + scalars)
            if self.numerics:  # outside the tape: the checks are no part of any backward
                flat = tf.nest.flatten(y)
                names = (["loss"] if loss_fn is not None else []) + ["call-time loss (add_loss)"] * len(scalars)
                checked = numerics.check(flat + scalars, _labels("activation output", len(flat)) + names[:len(scalars)],
                                         self.index, microbatch, self.numerics)
                y, scalars = tf.nest.pack_sequence_as(y, checked[:len(flat)]), checked[len(flat):]
        self.step_losses.extend(scalars)
        self.saved_tapes[microbatch] = _Saved(inputs, targets, tape,
                                              layer_grads.usable(calls, self.trainable_variables, extra)
                                              if per_layer else None)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return y

    def backward(self, microbatch: int, grad: Any = None) -> list[tf.Tensor] | None:
        """Backward of one micro-batch: one VJP for input and weights together.

        Args:
            microbatch: index j, forwarded earlier.
            grad: the cut-layer gradient from the next stage (``None`` on the
                last stage, which starts from its loss).

        Returns:
            The gradient of the stage input (flat list), or ``None`` on the first stage.
        """
        saved = self.saved_tapes.pop(microbatch)
        variables = self.trainable_variables
        with tf.device(self.device):
            grads = saved.tape.gradient(
                saved.targets, saved.inputs + variables,
                output_gradients=_output_gradients(saved, grad, self.loss_scale),
            )
            grads = self._check_grads(microbatch, grads, len(saved.inputs), variables)
            self.accumulate(grads[len(saved.inputs):])
        self.in_flight -= 1
        return grads[: len(saved.inputs)] if saved.inputs else None

    def backward_input(self, microbatch: int, grad: Any = None) -> list[tf.Tensor] | None:
        """First half of a split backward (zero-bubble): only the input gradient.

        The tape is kept for :meth:`backward_weight` of the same micro-batch.
        """
        saved = self.saved_tapes[microbatch]
        with tf.device(self.device):
            out_grads = _output_gradients(saved, grad, self.loss_scale)
            saved.input_grads = out_grads
            # one walk: the input gradient, and every layer call's output gradient when W takes those
            grads, saved.layer_grads = layer_grads.input_gradients(saved.tape, saved.targets, saved.inputs,
                                                                   saved.layer_calls, out_grads)
            return self._check_grads(microbatch, grads, len(saved.inputs), []) if saved.inputs else None

    def held_gradients(self, microbatch: int) -> list[tf.Tensor]:
        """What B computed for W of ``microbatch`` (the layer calls' output gradients), for chaining B."""
        saved = self.saved_tapes.get(microbatch)
        return [] if saved is None else [g for g in saved.layer_grads if g is not None]

    def backward_weight(self, microbatch: int) -> None:
        """Second half of a split backward: accumulate the weight gradients."""
        saved = self.saved_tapes.pop(microbatch)
        variables = self.trainable_variables
        with tf.device(self.device):
            grads = layer_grads.weight_gradients(saved.tape, saved.targets, variables, saved.layer_calls,
                                                 saved.layer_grads, saved.input_grads)
            self.accumulate(self._check_grads(microbatch, grads, 0, variables))
        self.in_flight -= 1

    def add_regularization(self) -> tf.Tensor | None:
        """Adds the gradient of the weight regularization losses, once per mini-batch."""
        if not any(v.regularizer is not None for v in self.trainable_variables):
            return None
        with tf.device(self.device):
            with tf.GradientTape() as tape:
                reg = tf.add_n([tf.cast(r, tf.float32) for r in _compat.regularization_losses(self.layer)])
            scale = None if self.loss_scale is None else tf.cast(self.loss_scale, reg.dtype)
            self.accumulate(tape.gradient(reg, self.trainable_variables, output_gradients=scale))
        self.step_losses.append(reg)
        return reg

    def accumulate(self, grads: list[Any]) -> None:
        """Adds ``grads`` (one per trainable variable, ``None`` to skip) to :attr:`grad_sums` in float32."""
        self.grad_sums = self.accumulator(self.grad_sums, grads)

    def _check_grads(self, microbatch: int, grads: list[Any], num_inputs: int, variables: list[Any]) -> list[Any]:
        """``grads`` (input gradients, then weight gradients) through the ``check_numerics`` checks, if on."""
        if not self.numerics:
            return grads
        labels = _labels(f"cut-layer gradient (of stage {self.index}'s input)", num_inputs)
        labels += [f"weight gradient of {v.path!r}" for v in variables]
        return numerics.check(grads, labels, self.index, microbatch, self.numerics)

    def gradients(self) -> list[tf.Tensor | None]:
        """The float32 gradients accumulated since :meth:`reset`, one per trainable variable."""
        return list(self.grad_sums)


def scaled_call_losses(layer: keras.layers.Layer, x: Any, total: tf.Tensor | int | None) -> list[tf.Tensor]:
    """The layer's call-time losses for micro-batch ``x`` (n_j samples), summed and scaled by n_j / B.

    Keras adds each ``add_loss`` term once per call and divides an activity
    regularizer's penalty by the call's batch size, so on the whole batch that is
    penalty(batch) / B. Per micro-batch it is penalty(x_j) / n_j; times n_j / B it
    sums to the batch value exactly for penalties that add up over samples (L1,
    L2, L1L2). A generic ``add_loss`` term is treated the same way, as a batch
    mean (exact for a mean over samples; a sum over samples would come out
    divided by B).

    Returns:
        ``[]`` without call-time losses, else one float32 scalar.
    """
    return _scaled(traced.plain_call_losses(layer), x, total)


def _scaled(extra: list[tf.Tensor], x: Any, total: tf.Tensor | int | None) -> list[tf.Tensor]:
    """``extra`` (0 or 1 summed call-time loss of micro-batch ``x``) times n_j / B (unchanged when B is unknown)."""
    if not extra or total is None:
        return list(extra)
    return [extra[0] * mb_lib.share(mb_lib.batch_size(x), total)]


def _output_gradients(saved: _Saved, grad: Any, scale: tf.Tensor | None = None) -> list[tf.Tensor] | None:
    """The ``output_gradients`` of a backward: the cut-layer gradient, then ones for the extra loss scalars.

    Under loss scaling the loss scalars start from ``scale`` instead of one (Keras'
    ``optimizer.scale_loss``); a cut-layer gradient arrives already scaled.
    """
    if grad is None and len(saved.targets) == 1 and scale is None:
        return None
    grads = [] if grad is None else list(tf.nest.flatten(grad))
    if scale is None:
        grads += [tf.ones_like(t) for t in saved.targets[len(grads):]]
    else:
        grads += [tf.cast(scale, t.dtype) * tf.ones_like(t) for t in saved.targets[len(grads):]]
    return grads


def _labels(name: str, count: int) -> list[str]:
    return [name] if count == 1 else [f"{name} #{k}" for k in range(count)]


def _same_device(actual: str, wanted: str) -> bool:
    spec_a = tf.DeviceSpec.from_string(actual)
    spec_w = tf.DeviceSpec.from_string(wanted)
    return (
        (spec_a.device_type or "").upper() == (spec_w.device_type or "CPU").upper()
        and (spec_a.device_index or 0) == (spec_w.device_index or 0)
        and (spec_w.job is None or spec_a.job == spec_w.job)
        and (spec_w.task is None or spec_a.task == spec_w.task)
    )
