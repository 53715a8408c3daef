"""A stage's layer call traced once and called per micro-batch: the step's build cost is O(K), not O(K*M).

Inside Keras' step ``tf.function`` every action used to call the stage's Keras
layers again, so Python traced the model M times per stage (and its gradient M
times). Here each stage's call (layers, recompute, call-time losses) is one
``tf.function`` with the batch dimension left open, traced once per stage and
``training`` flag; every micro-batch adds one call op to the step graph::

    step graph (K=2, M=3):   0F0 0F1 0F2 ... 1F0 1F1 1F2 ...   (each: one call of
                              \\____ stage 0's function ____/     a traced function)

The functions are marked ``_noinline``: the runtime instantiates each once per
device instead of pasting M copies of its body into the step graph, and the
backward of every call is one call of the (also traced once) gradient function.
Gradients are TensorFlow's own gradients of the function, so they equal the
plain call's. A layer whose call has Python side effects per call (a BatchNorm
call patched by :mod:`pipeline.core.batchnorm`'s ``deferred`` mode or by
``verify``) is called plainly instead: tracing it once would record one call.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import keras
import tensorflow as tf

from pipeline.core import _compat
from pipeline.core import recompute as recompute_lib

Call = Callable[[Any], tuple[Any, list[tf.Tensor]]]
"""``call(x) -> (y, call_losses)``: the stage output and 0 or 1 float32 scalar (the summed call-time losses)."""


def plain_call(layer: keras.layers.Layer, x: Any, training: bool, recompute: bool) -> tuple[Any, list[tf.Tensor]]:
    """Calls ``layer`` on ``x`` (recomputed in backward when ``recompute``); returns ``(y, call_losses)``."""
    y = recompute_lib.call(layer, x, training=training) if recompute else layer(x, training=training)
    return y, plain_call_losses(layer)


def plain_call_losses(layer: keras.layers.Layer) -> list[tf.Tensor]:
    """The call-time losses of ``layer``'s last call summed into one float32 scalar (``[]`` when none)."""
    extra = _compat.call_losses(layer)
    return [tf.add_n([tf.cast(t, tf.float32) for t in extra])] if extra else []


def has_patched_calls(layer: keras.layers.Layer) -> bool:
    """Whether a sublayer's ``call`` is replaced on the instance (a per-call Python side effect may be in it)."""
    return any("call" in vars(sub) for sub in _compat.sublayers(layer))


def open_batch_spec(x: Any) -> Any:
    """``x``'s ``tf.TensorSpec`` structure with the batch dimension left open (one trace for every micro-batch size)."""
    def spec(t: Any) -> tf.TensorSpec:
        t = tf.convert_to_tensor(t)
        shape = t.shape.as_list() if t.shape.rank is not None else None
        return tf.TensorSpec(None if shape is None else [None, *shape[1:]] if shape else [], t.dtype)
    return tf.nest.map_structure(spec, x)


def root_scope(layer: Any) -> Any:
    """A name scope to call ``layer`` in at a function graph's root: TensorFlow refuses a root scope
    named like Keras names a class ``_Private`` (``"_private"``), so such a call gets one scope above it."""
    name = getattr(layer, "name", "") or ""
    return contextlib.nullcontext() if name[:1].isalnum() or name[:1] == "." else tf.name_scope("call")


_INLINE_ALL = [False]


@contextlib.contextmanager
def inlined() -> Iterator[None]:
    """Within the block, functions traced here are inlined into the step graph (their ops keep the
    executor's ``act<stage><op><j>/`` name scopes: profilers can attribute every op to its action)."""
    _INLINE_ALL.append(True)
    try:
        yield
    finally:
        _INLINE_ALL.pop()


class TracedCalls:
    """The traced functions of one stage, one per ``(training, recompute, input signature)``.

    Args:
        layer: the stage's Keras layer or model.
        device: the stage's device; the function's ops are placed there.
    """

    def __init__(self, layer: keras.layers.Layer, device: str):
        self.layer = layer
        self.device = device
        self.functions: dict[tuple, Any] = {}

    def __len__(self) -> int:
        return len(self.functions)

    def get(self, x: Any, training: bool, recompute: bool, inline: bool = False) -> Call:
        """The call to use for ``x``: the traced function inside a graph, the plain call eagerly or when patched.

        Args:
            x: the micro-batch input (its structure and dtypes select the function).
            training: passed to the layer.
            recompute: recompute the activations in backward.
            inline: let the runtime paste the function's body (and its gradient's) into the step
                graph, so that a gradient asked for only some sources computes only those; the
                default keeps one instance per device.
        """
        if tf.executing_eagerly() or has_patched_calls(self.layer):
            return lambda inp: plain_call(self.layer, inp, training, recompute)
        spec = open_batch_spec(x)
        inline = inline or _INLINE_ALL[-1]
        key = (bool(training), bool(recompute), bool(inline), repr(spec))
        function = self.functions.get(key)
        if function is None:
            def call(inp: Any) -> tuple[Any, list[tf.Tensor]]:
                with tf.device(self.device), root_scope(self.layer):
                    return plain_call(self.layer, inp, bool(training), bool(recompute))
            function = tf.function(call, input_signature=[spec], autograph=False,
                                   experimental_attributes=None if inline else {"_noinline": True})
            self.functions[key] = function
        return function


class Accumulator:
    """Adds one micro-batch's gradients into float32 sums: one traced call per backward, not two ops per variable."""

    def __init__(self) -> None:
        self.add_all = tf.function(_add_all, reduce_retracing=True, autograph=False)
        self.cast_all = tf.function(_cast_all, reduce_retracing=True, autograph=False)

    def __call__(self, sums: list[tf.Tensor | None], grads: list[Any]) -> list[tf.Tensor | None]:
        """``sums + grads`` per variable in float32 (``None`` in ``grads``: unchanged; ``None`` in ``sums``: starts)."""
        sums = list(sums)
        new = [i for i, g in enumerate(grads) if g is not None and sums[i] is None]
        add = [i for i, g in enumerate(grads) if g is not None and sums[i] is not None]
        eager = tf.executing_eagerly()
        if new:
            values = [tf.convert_to_tensor(grads[i]) for i in new]
            for i, value in zip(new, _cast_all(values) if eager else self.cast_all(values)):
                sums[i] = value
        if add:
            values = [tf.convert_to_tensor(grads[i]) for i in add]
            before = [sums[i] for i in add]
            for i, value in zip(add, _add_all(before, values) if eager else self.add_all(before, values)):
                sums[i] = value
        return sums


def _cast_all(grads: list[tf.Tensor]) -> list[tf.Tensor]:
    return [tf.cast(g, tf.float32) for g in grads]


def _add_all(sums: list[tf.Tensor], grads: list[tf.Tensor]) -> list[tf.Tensor]:
    return [s + tf.cast(g, tf.float32) for s, g in zip(sums, grads)]
