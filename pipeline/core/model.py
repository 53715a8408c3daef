"""``PipelineModel``: a Keras model whose steps run the stages as a pipeline.

``compile``/``fit``/``evaluate``/``predict``, callbacks, metrics, TensorBoard
and progress bars all come from Keras; only ``train_step``, ``test_step`` and
``predict_step`` differ: they split the batch into micro-batches and run the
schedule through :class:`pipeline.executor.Executor`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import keras
import tensorflow as tf

from pipeline.core import _compat
from pipeline.core import anybatch
from pipeline.core import devices as devices_lib
from pipeline.core import microbatch as mb_lib
from pipeline.errors import CompatError, SettingError
from pipeline.core.executor import Executor
from pipeline.core.stage import Stage

GradientReducer = Callable[[list[tf.Tensor], list[Any]], list[tf.Tensor]]
"""``reducer(grads, variables) -> grads``, e.g. an all-reduce across pipeline replicas."""


def _check_layers(stages: Any) -> list[keras.layers.Layer]:
    if isinstance(stages, keras.layers.Layer):
        raise TypeError(
            "stages must be a list of Keras models or layers, one per stage; got a single "
            f"{type(stages).__name__}. Use pipeline.split(model, cuts=[...]) to cut one model."
        )
    layers = list(stages)
    if not layers:
        raise SettingError("stages is empty: pass at least one Keras model or layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                f"stage {i} is a {type(layer).__name__}, not a Keras model or layer; "
                "stages must be Keras models/layers such as [model_0, model_1]"
            )
    return layers


class PipelineModel(keras.Model):
    """Trains a list of Keras models/layers as one model, pipelined over devices.

    Args:
        stages: the parts, in order: ``[model_0, model_1, ...]``; stage i+1 takes
            stage i's output. Their variables are placed on their devices; the
            user's model objects are the ones trained.
        devices: ``None``/``"auto"`` (GPUs, or the CPU fallback when there are
            none), ``"cpu"``, or one device string per stage.
        microbatches: M, how many micro-batches each batch is split into.
        schedule: ``"1f1b"`` (bounded memory) or ``"gpipe"``.
        gradient_reducer: optional ``reducer(grads, variables) -> grads`` applied to
            the accumulated gradients before the optimizer step (data-parallel
            replicas all-reduce here, see :mod:`pipeline.replicas`).
        recompute: ``True`` (every stage), or one bool per stage: recompute the
            stage's activations in backward instead of keeping them
            (:mod:`pipeline.recompute`); saves memory, costs one extra forward.
        **kwargs: passed to ``keras.Model`` (e.g. ``name``).
    """

    def __init__(self, stages: Sequence[keras.layers.Layer], devices: Sequence[str] | str | None = None,
                 microbatches: int = 1, schedule: str | Callable = "1f1b",
                 gradient_reducer: GradientReducer | None = None,
                 recompute: bool | Sequence[bool] = False, **kwargs: Any):
        layers = _check_layers(stages)
        mb_lib.check_count(microbatches)
        super().__init__(**kwargs)
        device_names = devices_lib.resolve(len(layers), devices)
        self.stage_layers = layers
        flags = [recompute] * len(layers) if isinstance(recompute, bool) else list(recompute)
        if len(flags) != len(layers):
            raise SettingError(f"recompute lists {len(flags)} flag(s) for {len(layers)} stage(s); "
                               "give True/False, or one bool per stage")
        self.pipeline_stages = [
            Stage(layer, device, i, len(layers), recompute=flag)
            for i, (layer, device, flag) in enumerate(zip(layers, device_names, flags))
        ]
        """The :class:`Stage` objects, in pipeline order (:attr:`stages` gives a copy)."""
        self.executor = Executor(self.pipeline_stages, schedule, microbatches)
        self.sized_executors = anybatch.SizedExecutors(self.executor)
        self.gradient_reducer = gradient_reducer
        _check_known_shapes(self.pipeline_stages)
        for stage in self.pipeline_stages:
            if stage.layer.built:
                stage.place()
        if all(stage.layer.built for stage in self.pipeline_stages):
            self.built = True  # Keras' save/load/count_params need it; the stages hold the variables

    @property
    def stages(self) -> list[Stage]:
        """The :class:`Stage` objects (layer + device), in pipeline order."""
        return list(self.pipeline_stages)

    @property
    def microbatches(self) -> int:
        """M, the number of micro-batches per batch."""
        return self.executor.num_microbatches

    def build(self, input_shape: Any) -> None:
        """Builds every stage on its device, checking that each stage takes the previous output."""
        first = self.stage_layers[0]
        dtype = _input_dtype(first)
        # a shape is a tuple of ints: map_shape_structure keeps it a leaf (tf.nest would walk into it)
        spec = keras.tree.map_shape_structure(lambda shape: keras.KerasTensor(tuple(shape), dtype=dtype),
                                              input_shape)
        for stage in self.pipeline_stages:
            spec = _build_stage(stage, spec, self.pipeline_stages)
        self.built = True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        """Runs the stages one after another on the whole batch (no micro-batching)."""
        x = inputs
        for stage in self.pipeline_stages:
            with tf.device(stage.device):
                x = stage.layer(x, training=training)
        return x

    def compile(self, *args: Any, jit_compile: bool | str = "auto", **kwargs: Any) -> None:
        """Keras ``compile``; XLA is off: one XLA cluster would pull every stage onto one device.

        Raises:
            SettingError: for ``jit_compile=True``.
        """
        _check_jit(jit_compile)
        super().compile(*args, jit_compile=False, **kwargs)

    @property
    def jit_compile(self) -> bool:
        """Always False for a PipelineModel (see :meth:`compile`); setting True is refused."""
        return False

    @jit_compile.setter
    def jit_compile(self, value: bool | str) -> None:
        _check_jit(value)
        keras.Model.jit_compile.fset(self, False)

    def train_step(self, data: Any) -> dict[str, Any]:
        """One pipelined step: micro-batches forward and back, one optimizer update."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        _ensure_built(self, x, training=True)
        compiled_loss = _compat.compiled_loss(self)
        if compiled_loss is None:
            raise SettingError("PipelineModel has no loss: call compile(loss=...) before fit/evaluate")
        size = mb_lib.batch_size(x)
        loss, gradients, y_pred = self.sized_executors.train(x, y, sample_weight, compiled_loss, training=True)
        grads_and_vars = [(g, v) for stage, grads in zip(self.pipeline_stages, gradients)
                          for g, v in zip(grads, stage.trainable_variables) if g is not None]
        if grads_and_vars:
            grads, variables = (list(t) for t in zip(*grads_and_vars))
            if self.gradient_reducer is not None:
                grads = self.gradient_reducer(grads, variables)
            self.optimizer.apply(list(grads), list(variables))
        _compat.loss_metric(self).update_state(loss, sample_weight=size)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def test_step(self, data: Any) -> dict[str, Any]:
        """Evaluation: a forward-only pipeline, then Keras' loss and metrics on the merged output."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        _ensure_built(self, x, training=False)
        y_pred = self.sized_executors.infer(x)
        # compute_loss takes `training` since Keras 3.3; an override may still lack it.
        training = {"training": False} if "training" in inspect.signature(self.compute_loss).parameters else {}
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, **training)
        _compat.loss_metric(self).update_state(loss, sample_weight=mb_lib.batch_size(x))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def predict_step(self, data: Any) -> Any:
        """Prediction: a forward-only pipeline over micro-batches."""
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        _ensure_built(self, x, training=False)
        return self.sized_executors.infer(x)

    def get_config(self) -> dict[str, Any]:
        """Stages are user objects; a PipelineModel is rebuilt in code, not from config."""
        return {"name": self.name}


def _check_jit(value: Any) -> None:
    """Refuses ``jit_compile=True`` (in ``compile`` or set on the model) with the reason."""
    if value is True:
        raise SettingError(
            "jit_compile=True is not supported by PipelineModel: XLA compiles the whole step "
            "into one cluster on one device, undoing the stage placement. Leave jit_compile at "
            "its default ('auto', which PipelineModel turns off)."
        )


def _ensure_built(model: PipelineModel, x: Any, training: bool) -> None:
    """Builds unbuilt stages on their devices, and the optimizer beside them, eagerly.

    Keras' TensorFlow trainer builds lazily while tracing the step; variables
    made there would land on the default device, so this lifts both builds
    out of the trace.
    """
    if not all(stage.layer.built for stage in model.pipeline_stages):
        model.build(tf.nest.map_structure(lambda t: tuple(t.shape), x))
    model.built = True
    if training and isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        raise SettingError(
            "optimizer: LossScaleOptimizer (mixed_float16 loss scaling) is not supported by "
            "PipelineModel yet; train in float32 or with the 'mixed_bfloat16' policy, which needs "
            "no loss scaling"
        )
    if training and model.optimizer is not None and not model.optimizer.built:
        with tf.init_scope():
            model.optimizer.build(model.trainable_variables)


def _input_dtype(layer: keras.layers.Layer) -> str:
    inputs = getattr(layer, "inputs", None) if layer.built else None
    if inputs:
        return tf.nest.flatten(inputs)[0].dtype
    return keras.config.floatx()


def _shape_of(spec: Any) -> Any:
    return tf.nest.map_structure(lambda t: tuple(t.shape), spec)


def _known_shape(layer: keras.layers.Layer, attr: str) -> tuple | None:
    tensors = getattr(layer, attr, None) if layer.built and isinstance(layer, keras.Model) else None
    try:
        flat = tf.nest.flatten(tensors) if tensors else []
    except (AttributeError, ValueError):
        return None
    return tuple(flat[0].shape) if len(flat) == 1 else None


def _check_known_shapes(stages: list[Stage]) -> None:
    """Rejects, before any compute, a stage whose known input shape differs from the previous output."""
    for prev, stage in zip(stages, stages[1:]):
        out, inp = _known_shape(prev.layer, "outputs"), _known_shape(stage.layer, "inputs")
        if out is None or inp is None:
            continue
        if len(out) != len(inp) or any(a is not None and b is not None and a != b
                                       for a, b in zip(out[1:], inp[1:])):
            raise SettingError(
                f"stage {stage.index} ({stage.layer.name!r}) expects input shape {inp}, but stage "
                f"{prev.index} ({prev.layer.name!r}) outputs shape {out}. Make stage {prev.index}'s "
                f"output match stage {stage.index}'s input (check where the model was cut)."
            )


def _build_stage(stage: Stage, spec: Any, stages: list[Stage]) -> Any:
    """Builds one stage; a failure on stage i > 0 names both stages and shapes."""
    try:
        return stage.build(spec)
    except CompatError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the stages named
        if stage.index == 0:
            raise
        prev = stages[stage.index - 1]
        expected = getattr(stage.layer, "input_shape", None) if stage.layer.built else None
        wanted = f" (it expects input shape {expected})" if expected is not None else ""
        raise SettingError(
            f"stage {stage.index} ({stage.layer.name!r}) does not accept the output of stage "
            f"{prev.index} ({prev.layer.name!r}): stage {prev.index} outputs shape {_shape_of(spec)}"
            f"{wanted}. Make stage {prev.index}'s output match stage {stage.index}'s input. "
            f"Keras said: {err}"
        ) from err
