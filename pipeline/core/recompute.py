"""Activation recomputation: run a stage forward without keeping its activations, redo it in backward.

A stage called through :func:`call` keeps only its input (and output) alive
until its backward; the backward runs the forward again under a fresh tape and
takes one VJP through it. Exactness is kept: before the forward, the layer's
non-trainable state (BatchNorm moving statistics, dropout seed generators) is
snapshotted, and the recomputation runs in a ``keras.StatelessScope`` that reads
those snapshots and discards its own updates. So it sees the same dropout mask
and the state is updated once per micro-batch, as without recomputation::

    without:  F: x -> a1 -> a2 -> y  (a1, a2 kept)      B: VJP through a1, a2
    with:     F: x -> ........ -> y  (only x kept)      B: x -> a1 -> a2 -> y again, then VJP

Cost: one extra forward per micro-batch on the stage (about +1/3 of its step
time). Not supported: losses added during the call (``add_loss``, activity
regularizers) get no gradient through a recomputed stage; :func:`call` raises.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from pipeline.core import _compat
from pipeline.errors import RecomputeError


def state_of(layer: keras.layers.Layer) -> list[Any]:
    """Non-trainable Keras variables whose values a forward may read and update.

    Keras lists its dropout seed-generator states among ``non_trainable_variables``
    (contract test in tests/test_compat.py), so these include them.
    """
    seen, state = set(), []
    for v in layer.non_trainable_variables:
        if id(v) not in seen:
            seen.add(id(v))
            state.append(v)
    return state


def refuse_call_losses(layer: keras.layers.Layer) -> None:
    """Raises if ``layer``'s last call added losses: their gradients cannot pass a recomputed stage.

    Raises:
        RecomputeError: naming the layer and the ways out.
    """
    if _compat.call_losses(layer):
        raise RecomputeError(
            f"layer {layer.name!r} adds losses during its call (add_loss or an activity "
            "regularizer); their gradients cannot pass a recomputed stage. Use recompute=False "
            "for this stage or move the loss to the last stage."
        )


def call(layer: keras.layers.Layer, x: Any, training: bool | None = None) -> Any:
    """Calls ``layer(x, training=training)`` so that its activations are recomputed in backward.

    Use it inside a ``tf.GradientTape`` in place of ``layer(x, training=...)``;
    gradients with respect to ``x`` and to the layer's trainable variables
    equal those of the plain call.

    Args:
        layer: a built Keras layer or model.
        x: its input (a tensor or a nest of tensors).
        training: passed to the layer.

    Returns:
        The layer's output, with the same structure as ``layer(x)``.

    Raises:
        RecomputeError: if the call adds losses (``add_loss``/activity regularizers).
    """
    flat_x = [tf.convert_to_tensor(t) for t in tf.nest.flatten(x)]
    state = state_of(layer)
    snapshot = [tf.identity(v.value) for v in state]
    structure: list[Any] = []

    def run(inputs: list[tf.Tensor]) -> list[tf.Tensor]:
        y = layer(tf.nest.pack_sequence_as(x, inputs), training=training)
        structure[:] = [y]
        return tf.nest.flatten(y)

    @tf.custom_gradient
    def forward(*inputs: tf.Tensor):
        outputs = run(list(inputs))
        refuse_call_losses(layer)

        def grad(*upstream: tf.Tensor, variables: list[Any] | None = None):
            variables = list(variables or [])
            with keras.StatelessScope(state_mapping=list(zip(state, snapshot))):
                with tf.GradientTape() as tape:
                    tape.watch(list(inputs))
                    again = run(list(inputs))
            grads = tape.gradient(again, list(inputs) + variables, output_gradients=list(upstream),
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return grads[: len(inputs)], grads[len(inputs):]

        return outputs, grad

    outputs = forward(*flat_x)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return tf.nest.pack_sequence_as(structure[0], list(outputs))
