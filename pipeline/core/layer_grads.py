"""Zero-bubble's W from saved activation gradients: one tape per layer call, so W never walks the chain again.

A split backward (ZB-H1) gives the input gradient first (B) and the weight
gradients later (W). Asking one tape twice makes W walk every layer's backward
again, input-gradient matmuls included, because the weight gradients of layer l
need dL/dy_l, which only the chain from the stage output gives::

    two calls of one tape:   B = dL/dx   (chain L..1)     W = dL/dW  (chain L..2 again + weight matmuls)
    per-layer tapes (here):  B = dL/dx, dL/dy_1..dL/dy_L  (chain L..1, once)
                             W = sum over calls l of tape_l.gradient(y_l, W_l, dL/dy_l)   (weight matmuls)

B asks the stage tape for the gradients of every top-level layer call's
outputs as well as the input (one walk); each layer call ran under its own
tape, which holds only that call's ops, so W is the layer-local part. The
result is the joint backward's to float rounding: dL/dW_l = (dy_l/dW_l)^T dL/dy_l
summed over the calls of l, with dL/dy_l the total gradient. It applies when
every trainable variable is read inside the recorded calls (a functional or
Sequential stage) and the stage has no call-time loss (an ``add_loss`` term can
depend on weights other than through the call's outputs); otherwise
:meth:`~pipeline.core.stage.Stage.backward_weight` asks the stage tape again.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import keras
import tensorflow as tf

from pipeline.core import _compat
from pipeline.core import traced


class LayerFunctions:
    """A stage's layer calls, each traced once as an inlined ``tf.function`` and called per micro-batch.

    Keeps the build cost of a split stage O(layers), not O(M * layers), as
    :mod:`pipeline.core.traced` does for a whole stage. A call is run plainly
    instead where a Keras mask would cross the function's boundary (masks travel
    as tensor attributes, which a function call drops), where the layer's call is
    patched on the instance (a per-call Python side effect), where a layer is not
    Keras' own or has an activity regularizer (a call-time loss made inside a
    function could not leave it), and eagerly.
    """

    def __init__(self) -> None:
        self.functions: dict[tuple, Any] = {}
        self.plain: set[int] = set()
        """Layers (``id``) called plainly from now on (their outputs carry a mask, or they are not traceable)."""

    def __len__(self) -> int:
        return len(self.functions)

    def call(self, operation: Any, context: dict, call: Any, args: tuple, kwargs: dict) -> Any:
        """``call(*args, **kwargs)``, through the layer call's traced function where that is exact."""
        if tf.executing_eagerly() or id(operation) in self.plain or _masked((args, kwargs)):
            return call(*args, **kwargs)
        if not _traceable(operation):
            self.plain.add(id(operation))
            return call(*args, **kwargs)
        key = (id(operation), repr(sorted(context.items())))
        function = self.functions.get(key)
        if function is None:
            masks: list[bool] = []

            def body(*a: Any, **k: Any) -> Any:
                with traced.root_scope(operation):
                    out = call(*a, **k)
                masks.append(_masked(out))
                return out
            function = tf.function(body, autograph=False, reduce_retracing=True)
            function.get_concrete_function(*args, **kwargs)  # trace only: no call op before the check
            if any(masks):
                self.plain.add(id(operation))
                return call(*args, **kwargs)
            self.functions[key] = function
        return function(*args, **kwargs)


class LayerCalls:
    """The top-level layer calls of one forward, each with the tape that recorded only its ops."""

    def __init__(self, functions: LayerFunctions | None = None) -> None:
        self.calls: list[tuple[tf.GradientTape, list[tf.Tensor]]] = []
        """Per call: its tape and its flat floating outputs."""
        self.functions = functions

    def record(self, operation: Any, context: dict, call: Any, args: tuple, kwargs: dict) -> Any:
        """Runs one layer call under its own tape; keeps the tape and the call's floating outputs."""
        with tf.GradientTape() as tape:  # watches the trainable variables the call reads
            if self.functions is None:
                out = call(*args, **kwargs)
            else:
                out = self.functions.call(operation, context, call, args, kwargs)
        floating = [t for t in tf.nest.flatten(out) if isinstance(t, tf.Tensor) and t.dtype.is_floating]
        self.calls.append((tape, floating))
        return out

    def covers(self, variables: Sequence[Any]) -> bool:
        """Whether every variable of ``variables`` was read inside a recorded call."""
        read = {id(_handle(v)) for tape, _ in self.calls for v in tape.watched_variables()}
        return all(id(_handle(v)) in read for v in variables)

    def outputs(self) -> list[tf.Tensor]:
        """Every recorded call's floating outputs, in call order (the extra sources of B)."""
        return [t for _, outs in self.calls for t in outs]

    def weight_gradients(self, output_grads: Sequence[tf.Tensor | None],
                         variables: Sequence[Any]) -> list[tf.Tensor | None]:
        """W: the gradient of each of ``variables`` from the calls' output gradients (B's extra results).

        Args:
            output_grads: dL/d(output) for :meth:`outputs`, in that order (``None``: not connected).
            variables: the stage's trainable variables.

        Returns:
            One gradient per variable, summed over the calls that read it (``None``: none did).
        """
        index = {id(_handle(v)): i for i, v in enumerate(variables)}
        grads: list[tf.Tensor | None] = [None] * len(variables)
        pos = 0
        for tape, outs in self.calls:
            seeds = list(output_grads[pos:pos + len(outs)])
            pos += len(outs)
            read = [v for v in tape.watched_variables() if id(_handle(v)) in index]
            live = [(t, g) for t, g in zip(outs, seeds) if g is not None]
            if not read or not live:
                continue
            got = tape.gradient([t for t, _ in live], read, output_gradients=[g for _, g in live])
            for v, g in zip(read, got):
                if g is None:
                    continue
                i = index[id(_handle(v))]
                grads[i] = g if grads[i] is None else grads[i] + g
        return grads


@contextlib.contextmanager
def recording(layer: keras.layers.Layer, functions: LayerFunctions | None = None) -> Iterator[LayerCalls | None]:
    """Within the block, a call of ``layer`` records its top-level layer calls (``None``: not a graph model).

    Args:
        layer: the stage's model.
        functions: run each layer call through these traced functions (``None``: plainly).
    """
    if not _compat.is_graph_model(layer):
        yield None
        return
    calls = LayerCalls(functions)
    with _compat.each_layer_call(calls.record):
        yield calls


@contextlib.contextmanager
def split_tape() -> Iterator[tf.GradientTape]:
    """The persistent tape a split backward's forward records on (B, then W, ask it), with traced calls
    recorded for first-order gradients (:func:`pipeline.core._compat.first_order_function_calls`: under a
    persistent tape TensorFlow would feed each backward weight-shaped zeros, kept per call site)."""
    with tf.GradientTape(persistent=True) as tape, _compat.first_order_function_calls():
        yield tape


_DISABLED = [False]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, split backwards traced here ask the tape twice (the reference ``pipeline bench`` times)."""
    _DISABLED.append(True)
    try:
        yield
    finally:
        _DISABLED.pop()


def usable(calls: LayerCalls | None, variables: Sequence[Any], call_losses: Sequence[Any]) -> LayerCalls | None:
    """``calls`` when W can be taken from them exactly (every variable read in a call, no call-time loss)."""
    if _DISABLED[-1] or calls is None or call_losses or not calls.calls or not calls.covers(variables):
        return None
    return calls


def input_gradients(tape: tf.GradientTape, targets: list[tf.Tensor], inputs: list[tf.Tensor],
                    calls: LayerCalls | None, seeds: list[tf.Tensor] | None) -> tuple[list[Any], list[Any]]:
    """B: ``(dL/d inputs, held)`` in one walk of ``tape``; ``held`` is what W needs (``[]`` without ``calls``).

    Args:
        tape: the stage's tape (persistent when ``calls`` is ``None``: W asks it again).
        targets: what the backward starts from; ``seeds``: their output gradients.
        inputs: the stage inputs whose gradient the previous stage needs.
        calls: the forward's usable layer calls (:func:`usable`), or ``None``.
    """
    extra = [] if calls is None else calls.outputs()
    if not inputs and not extra:
        return [], []
    grads = tape.gradient(targets, inputs + extra, output_gradients=seeds)
    return list(grads[:len(inputs)]), list(grads[len(inputs):])


def weight_gradients(tape: tf.GradientTape, targets: list[tf.Tensor], variables: Sequence[Any],
                     calls: LayerCalls | None, held: list[Any], seeds: list[tf.Tensor] | None) -> list[Any]:
    """W: the gradients of ``variables``, from the layer calls and B's ``held`` gradients when there are
    calls, else from a second walk of the persistent ``tape`` (``targets``, ``seeds`` as in B)."""
    if calls is not None:
        return calls.weight_gradients(held, variables)
    return tape.gradient(targets, list(variables), output_gradients=seeds)


def _traceable(operation: Any) -> bool:
    """Whether ``operation`` is made of Keras' own layers only, unpatched and without activity regularizers."""
    if not isinstance(operation, keras.layers.Layer) or traced.has_patched_calls(operation):
        return False
    return all(type(sub).__module__.startswith("keras.") and getattr(sub, "activity_regularizer", None) is None
               for sub in _compat.sublayers(operation))


def _masked(values: Any) -> bool:
    """Whether a tensor in the nest ``values`` carries a Keras mask."""
    return any(isinstance(t, tf.Tensor) and _compat.keras_mask(t) is not None for t in tf.nest.flatten(values))


def _handle(variable: Any) -> Any:
    """The ``tf.Variable`` behind a Keras variable (tapes report the TF variables they watched)."""
    return getattr(variable, "value", variable) if isinstance(variable, keras.Variable) else variable
