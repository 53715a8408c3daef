"""BatchNorm in a pipelined step: ghost batches (``microbatch``), ``deferred`` moving statistics, or ``frozen``.

A pipelined step runs each BatchNormalization layer once per micro-batch. The
``batchnorm`` setting of :class:`pipeline.PipelineModel` says what that means:

- ``"microbatch"`` (default, ghost batches): each micro-batch is normalized with its
  own mean/variance (the statistics of M smaller batches), and the moving mean and
  variance are updated M times per step, momentum applied M times.
- ``"deferred"`` (torchgpipe's DeferredBatchNorm): each micro-batch is still normalized
  with its own statistics (so gradients equal ghost batches), but the moving mean and
  variance are updated once per step, from the statistics of the whole mini-batch the
  layer saw: per-micro-batch (count, mean, squared deviations) are combined with the
  exact parallel formula (Chan et al.), so the moving statistics equal Keras' update
  on the concatenated micro-batch inputs (biased variance, masks with Keras' epsilon,
  any ``axis``). All calls of a layer in one step are pooled into that one update.
- ``"frozen"``: BatchNorm layers run in inference mode (moving statistics used, not
  updated) while gamma/beta still train. Keras' ``layer.trainable = False`` on a
  BatchNormalization does both: inference mode and frozen gamma/beta; set it on the
  layer for that.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Sequence

import keras
import tensorflow as tf

from pipeline.core import _compat
from pipeline.errors import SettingError, invalid

MODES = ("microbatch", "deferred", "frozen")
SMALL_MICROBATCH = 16
"""Micro-batches below this many samples get a warning in the ``microbatch``/``deferred`` modes."""


def check_mode(value: Any) -> str:
    """Returns ``value`` if it is one of :data:`MODES`, else raises :class:`SettingError` naming the choices."""
    if not isinstance(value, str) or value not in MODES:
        raise invalid("batchnorm", value, "allowed: 'microbatch' (ghost batches: each micro-batch uses its own "
                      "statistics and updates the moving ones), 'deferred' (moving statistics updated once "
                      "per step from the whole mini-batch), 'frozen' (inference mode: moving statistics used, "
                      "not updated). Pass e.g. batchnorm='deferred'.")
    return value


def find(layer: keras.layers.Layer) -> list[keras.layers.BatchNormalization]:
    """The BatchNormalization layers in ``layer`` (itself and nested models/layers), each once."""
    return [sub for sub in _compat.sublayers(layer) if isinstance(sub, keras.layers.BatchNormalization)]


def _reduction_axes(layer: keras.layers.BatchNormalization, ndim: int) -> list[int]:
    axes = list(range(ndim))
    del axes[layer.axis]
    return axes


def moments(layer: keras.layers.BatchNormalization, inputs: tf.Tensor,
            mask: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(mean, variance, weight)`` of one call, each of shape ``(channels,)``, as Keras computes them.

    ``weight`` is the number of values per channel (the mask's sum when masked).
    """
    dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
    inputs = tf.cast(inputs, dtype)
    mean, variance = _compat.batchnorm_moments(layer, inputs, mask)
    channels = layer.moving_mean.shape
    axes = _reduction_axes(layer, len(inputs.shape))
    if mask is None:
        count = tf.cast(tf.size(inputs) // tf.shape(inputs)[layer.axis], dtype)
        weight = tf.fill(channels, count)
    else:
        full = tf.broadcast_to(tf.expand_dims(tf.cast(tf.cast(mask, tf.bool), dtype), -1), tf.shape(inputs))
        weight = tf.reshape(tf.reduce_sum(full, axis=axes), channels)
    return tf.reshape(mean, channels), tf.reshape(variance, channels), weight


class _Sums:
    """Running (weight, sum, squared deviations about the mean) of one layer's calls in a step."""

    def __init__(self, layer: keras.layers.BatchNormalization, device: str):
        self.layer, self.device = layer, device
        self.eps = 0.0  # Keras divides masked sums by (weight + epsilon); unmasked by weight
        with tf.init_scope(), tf.device(device):
            zeros = tf.zeros(layer.moving_mean.shape, layer.moving_mean.dtype)
            self.vars = [tf.Variable(zeros, trainable=False, name=f"deferred_{n}_{layer.name}")
                         for n in ("weight", "sum", "sqdev")]

    def reset(self) -> None:
        for v in self.vars:
            v.assign(tf.zeros_like(v))

    def add(self, mean: tf.Tensor, variance: tf.Tensor, weight: tf.Tensor, masked: bool) -> None:
        """Combines one call's statistics into the running sums (exact parallel formula)."""
        self.eps = keras.config.epsilon() if masked else 0.0
        w_b, m_b, v_b = (tf.stop_gradient(tf.cast(t, self.vars[0].dtype)) for t in (weight, mean, variance))
        s_b, d_b = m_b * (w_b + self.eps), v_b * (w_b + self.eps)
        w_a, s_a, d_a = (v.read_value() for v in self.vars)
        m_a = tf.math.divide_no_nan(s_a, w_a + self.eps)
        w, s = w_a + w_b, s_a + s_b
        m = tf.math.divide_no_nan(s, w + self.eps)
        d = d_a + d_b + w_a * tf.square(m_a - m) + w_b * tf.square(m_b - m)
        if masked:  # sum(x - mean_j) over a masked group is mean_j * epsilon, not 0
            d += 2.0 * (m_a - m) * (s_a - w_a * m_a) + 2.0 * (m_b - m) * (s_b - w_b * m_b)
        for var, value in zip(self.vars, (w, s, d)):
            var.assign(value)

    def apply(self) -> None:
        """One Keras moving-statistics update from the pooled mean/variance (channels never seen: unchanged)."""
        layer = self.layer
        w, s, d = (v.read_value() for v in self.vars)
        mean, variance = tf.math.divide_no_nan(s, w + self.eps), tf.math.divide_no_nan(d, w + self.eps)
        seen = w > 0
        for var, stat in ((layer.moving_mean, mean), (layer.moving_variance, variance)):
            old = tf.cast(var.value, stat.dtype)
            new = old * layer.momentum + stat * (1.0 - layer.momentum)
            var.assign(tf.cast(tf.where(seen, new, old), var.dtype))


@contextlib.contextmanager
def _patched_calls(patches: list[tuple[keras.layers.Layer, Callable]]) -> Iterator[None]:
    """Replaces ``layer.call`` on the instances for the block (Keras' ``__call__`` calls ``self.call``)."""
    saved = [(layer, layer.__dict__.get("call")) for layer, _ in patches]
    try:
        for layer, make in patches:
            object.__setattr__(layer, "call", make(layer.call))
        yield
    finally:
        for layer, before in saved:
            if before is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", before)


def _frozen(original: Callable) -> Callable:
    def call(inputs: Any, training: Any = None, mask: Any = None) -> Any:
        return original(inputs, training=False, mask=mask)
    return call


def _deferred(layer: keras.layers.BatchNormalization, sums: _Sums) -> Callable[[Callable], Callable]:
    def make(original: Callable) -> Callable:
        def call(inputs: Any, training: Any = None, mask: Any = None) -> Any:
            if not (training and layer.trainable):
                return original(inputs, training=training, mask=mask)
            if not _compat.in_stateless_scope():  # a recomputation replay records nothing
                sums.add(*moments(layer, inputs, mask), masked=mask is not None)
            with keras.StatelessScope():  # Keras' own normalization; its per-call moving update is dropped
                return original(inputs, training=training, mask=mask)
        return call
    return make


class BatchNormControl:
    """Applies a BatchNorm mode to the BatchNormalization layers of a list of stages during a step.

    Args:
        stages: objects with ``.layer`` and ``.device`` (the pipeline's :class:`Stage` objects).
        mode: one of :data:`MODES`.
        warn: warn once about micro-batches under :data:`SMALL_MICROBATCH` samples.
    """

    def __init__(self, stages: Sequence[Any], mode: str = "microbatch", warn: bool = True):
        self.mode = check_mode(mode)
        self.stages = list(stages)
        self.warn = warn
        self.warned = False
        self.sums: dict[int, _Sums] = {}
        if self.mode == "deferred":
            for _, bn in self.layers():
                if bn.renorm:
                    raise SettingError(
                        f"batchnorm: got 'deferred', but layer {bn.name!r} uses renorm=True, whose "
                        "renormalization statistics cannot be deferred; use batchnorm='microbatch' or "
                        "'frozen', or renorm=False")
            self._make_sums()  # now, if built: variables made while tracing would make Keras trace the step twice

    def _make_sums(self) -> None:
        for stage, bn in self.layers():
            if id(bn) not in self.sums and bn.built:
                self.sums[id(bn)] = _Sums(bn, stage.device)

    def layers(self) -> list[tuple[Any, keras.layers.BatchNormalization]]:
        """``(stage, layer)`` for every BatchNormalization layer, in stage order, each layer once."""
        pairs: dict[int, tuple[Any, keras.layers.BatchNormalization]] = {}
        for stage in self.stages:
            for bn in find(stage.layer):
                pairs.setdefault(id(bn), (stage, bn))
        return list(pairs.values())

    @contextlib.contextmanager
    def step(self, batch_size: int | tf.Tensor, num_microbatches: int) -> Iterator[None]:
        """The block runs one training step under the mode; ``deferred`` applies its update on exit."""
        pairs = self.layers()
        if not pairs:
            yield
            return
        if self.mode != "frozen":
            self._maybe_warn(batch_size, num_microbatches, pairs)
        if self.mode == "microbatch":
            yield
            return
        if self.mode == "frozen":
            with _patched_calls([(bn, _frozen) for _, bn in pairs]):
                yield
            return
        self._make_sums()
        for stage, bn in pairs:
            with tf.device(stage.device):
                self.sums[id(bn)].reset()
        with _patched_calls([(bn, _deferred(bn, self.sums[id(bn)])) for _, bn in pairs]):
            yield
        for stage, bn in pairs:
            with tf.device(stage.device):
                self.sums[id(bn)].apply()

    def _maybe_warn(self, batch_size: int | tf.Tensor, m: int, pairs: list) -> None:
        if not self.warn or self.warned:
            return
        names = [bn.name for _, bn in pairs]
        if isinstance(batch_size, int):
            self.warn_small(batch_size, m, names)
            return
        tf.py_function(lambda n: self.warn_small(int(n), m, names), [batch_size], [])

    def warn_small(self, batch_size: int, m: int, names: Sequence[str]) -> None:
        """Warns once if a micro-batch of a batch of ``batch_size`` has fewer than 16 samples."""
        smallest = batch_size // m if batch_size >= m else 1
        if self.warned or smallest >= SMALL_MICROBATCH:
            return
        self.warned = True
        warnings.warn(
            f"batchnorm={self.mode!r}: BatchNormalization layer(s) {', '.join(names)} see micro-batches of "
            f"{smallest} sample(s) (batch {batch_size} / microbatches {m}), fewer than {SMALL_MICROBATCH}: "
            "their batch statistics are noisy. Options: a larger batch or fewer micro-batches "
            f"(>= {SMALL_MICROBATCH} samples each); batchnorm='deferred' (moving statistics from the whole "
            "mini-batch); batchnorm='frozen' (moving statistics, not updated, e.g. for fine-tuning).",
            UserWarning, stacklevel=2)


@contextlib.contextmanager
def capture_inputs(layers: Sequence[keras.layers.BatchNormalization]) -> Iterator[dict[int, list]]:
    """Records ``(inputs, mask)`` of every training call of ``layers`` in the block, by ``id(layer)``."""
    seen: dict[int, list] = {id(bn): [] for bn in layers}

    def make(bn: keras.layers.BatchNormalization) -> Callable[[Callable], Callable]:
        def wrap(original: Callable) -> Callable:
            def call(inputs: Any, training: Any = None, mask: Any = None) -> Any:
                if training and bn.trainable:
                    seen[id(bn)].append((inputs, mask))
                return original(inputs, training=training, mask=mask)
            return call
        return wrap

    with _patched_calls([(bn, make(bn)) for bn in layers]):
        yield seen


def full_batch_update(layer: keras.layers.BatchNormalization, calls: list, old_mean: tf.Tensor,
                      old_variance: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Keras' moving statistics after one update from the concatenated ``(inputs, mask)`` of ``calls``."""
    inputs = tf.concat([c[0] for c in calls], axis=0)
    masks = [c[1] for c in calls]
    mask = None if masks[0] is None else tf.concat(masks, axis=0)
    mean, variance, _ = moments(layer, inputs, mask)
    mom = layer.momentum
    return old_mean * mom + mean * (1.0 - mom), old_variance * mom + variance * (1.0 - mom)
