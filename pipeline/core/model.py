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
from pipeline.core import batchnorm as batchnorm_lib
from pipeline.core import devices as devices_lib
from pipeline.core import microbatch as mb_lib
from pipeline.core import numerics
from pipeline.core import autohook
from pipeline.core import saving
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


@keras.saving.register_keras_serializable(package="pipeline")
class PipelineModel(autohook.AutoMixin, keras.Model):
    """Trains a list of Keras models/layers as one model, pipelined over devices.

    Args:
        stages: the parts, in order: ``[model_0, model_1, ...]``; stage i+1 takes
            stage i's output. Their variables are placed on their devices; the
            user's model objects are the ones trained.
        devices: ``None``/``"auto"`` (GPUs, or the CPU fallback when there are
            none), ``"cpu"``, or one device string per stage.
        microbatches: M, how many micro-batches each batch is split into, or ``"auto"``.
        schedule: ``"1f1b"`` (bounded memory), ``"gpipe"``, another name of
            :data:`pipeline.core.schedule.NAMES`, or ``"auto"`` (see ``memory_budget``).
        gradient_reducer: optional ``reducer(grads, variables) -> grads`` applied to
            the accumulated gradients before the optimizer step (data-parallel
            replicas all-reduce here, see :mod:`pipeline.replicas`). Not saved by
            ``model.save`` (a Python callable): set it again after ``load_model``.
        recompute: ``True`` (every stage), or one bool per stage: recompute the
            stage's activations in backward instead of keeping them
            (:mod:`pipeline.recompute`); saves memory, costs one extra forward; or ``"auto"``.
        check_numerics: debugging aid: check every stage output, loss and gradient
            of every micro-batch for NaN/Inf and raise :class:`NumericsError` naming
            the first stage, micro-batch and tensor (:mod:`pipeline.core.numerics`);
            under a ``LossScaleOptimizer`` it only reports (the step is skipped).
            Off: no op added.
        batchnorm: what BatchNormalization layers do in a training step
            (:mod:`pipeline.core.batchnorm`): ``"microbatch"`` (ghost batches: statistics of each
            micro-batch, moving statistics updated M times per step), ``"deferred"`` (per-micro-batch
            normalization, moving statistics updated once from the whole mini-batch) or ``"frozen"``
            (inference mode: moving statistics used, not updated; gamma/beta still train).
        virtual_stages: V, stages per device when devices are picked automatically: K/V devices,
            stage s on device s % (K/V) (for ``schedule="interleaved_1f1b"``). An explicit
            ``devices`` list of D < K devices (D divides K) places the stages the same way.
        loop: with ``schedule="gpipe"`` and ``recompute=True``: build the training step as loops over
            clock ticks (:mod:`pipeline.core.looped`) when M >= K + 4: the step's graph and first-step
            build time do not grow with M; the steady step costs more (docs/performance.md "Build cost").
        memory_budget: with ``schedule``, ``microbatches`` or ``recompute`` set to ``"auto"``: bytes per
            device, ``"80%"`` of each device's memory (default), a size such as ``"4GB"``, or None; the plan
            is chosen by measurement and simulation before the first step (:mod:`pipeline.perf.autoplan`).
        **kwargs: passed to ``keras.Model`` (e.g. ``name``).
    """

    def __init__(self, stages: Sequence[keras.layers.Layer], devices: Sequence[str] | str | None = None,
                 microbatches: int = 1, schedule: str | Callable = "1f1b",
                 gradient_reducer: GradientReducer | None = None,
                 recompute: bool | Sequence[bool] = False, check_numerics: bool = False,
                 batchnorm: str = "microbatch", memory_budget: int | str | None = "80%",
                 virtual_stages: int = 1, loop: bool = False, **kwargs: Any):
        layers = _check_layers(stages)
        auto_settings = autohook.settings(schedule, microbatches, recompute, memory_budget)
        schedule, microbatches, recompute = autohook.placeholders(schedule, microbatches, recompute)
        numerics.check_flag(check_numerics)
        batchnorm_lib.check_mode(batchnorm)
        mb_lib.check_count(microbatches)
        super().__init__(**kwargs)
        self.auto_settings = auto_settings
        """The settings still ``"auto"`` (:mod:`pipeline.core.autohook`); None once chosen, or when none was."""
        device_names = devices_lib.resolve(len(layers), devices, virtual_stages)
        self.virtual_stages = virtual_stages
        self.device_policy = saving.device_policy(devices)
        """The ``devices`` setting as given (saved; ``None``/``"auto"``/``"cpu"`` re-resolve on load)."""
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
        _check_loop(loop, self.executor, auto_settings)
        self.executor.loop = loop
        self.executor.prepare()
        self.sized_executors = anybatch.SizedExecutors(self.executor)
        self.gradient_reducer = gradient_reducer
        self.check_numerics = check_numerics
        self.batchnorm_control = batchnorm_lib.BatchNormControl(self.pipeline_stages, batchnorm)
        """Applies the ``batchnorm`` mode to the stages' BatchNormalization layers in each training step."""
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
        self.executor.prepare()
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

        Loss and metric names follow Keras: the last stage's output names (its
        output layers, or the keys of its dict output) name the per-output losses
        and metrics, as for the unsplit model. Every Keras loss reduction but
        ``"none"`` is exact (see :data:`pipeline.core.microbatch.REDUCTIONS`).

        Raises:
            SettingError: for ``jit_compile=True``, a loss with ``reduction="none"``,
                or an overridden ``compute_loss``.
        """
        _check_jit(jit_compile)
        _check_compute_loss(self)
        _check_reductions(inspect.signature(keras.Model.compile).bind_partial(self, *args, **kwargs)
                          .arguments.get("loss"))
        names = getattr(self.stage_layers[-1], "output_names", None)
        if names:
            self.output_names = list(names)  # Keras' CompileLoss/CompileMetrics name outputs by these
        super().compile(*args, jit_compile=False, **kwargs)

    @property
    def jit_compile(self) -> bool:
        """Always False for a PipelineModel (see :meth:`compile`); setting True is refused."""
        return False

    @jit_compile.setter
    def jit_compile(self, value: bool | str) -> None:
        _check_jit(value)
        keras.Model.jit_compile.fset(self, False)

    def make_train_function(self, force: bool = False) -> Any:
        """Keras' train function; with ``check_numerics`` wrapped so a failed check raises ``NumericsError``.

        A check fails inside TensorFlow's runtime (graph mode), so its error reaches
        Python only where Keras calls the compiled step: this is that call.
        """
        super().make_train_function(force)
        if self.check_numerics:
            self.train_function = numerics.translate_errors(self.train_function)
        return self.train_function

    def train_step(self, data: Any) -> dict[str, Any]:
        """One pipelined step: micro-batches forward and back, one optimizer update."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        _ensure_built(self, x, training=True)
        numerics.begin_step(self.pipeline_stages, self.optimizer, self.check_numerics)
        compiled_loss = _compat.compiled_loss(self)
        if compiled_loss is None:
            raise SettingError("PipelineModel has no loss: call compile(loss=...) before fit/evaluate")
        size = mb_lib.batch_size(x)
        _check_compute_loss(self)
        with self.batchnorm_control.step(size, self.microbatches):
            loss, gradients, y_pred = self.sized_executors.train(x, y, sample_weight, _terms(compiled_loss),
                                                                 training=True)
        if compiled_loss.metrics:  # the per-output `<name>_loss` metrics: once on the whole batch, as in Keras
            compiled_loss(y, y_pred, sample_weight)
        numerics.apply_gradients(self.optimizer, self.pipeline_stages, gradients, self.gradient_reducer)
        _compat.loss_metric(self).update_state(loss, sample_weight=size)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def test_step(self, data: Any) -> dict[str, Any]:
        """Evaluation: a forward-only pipeline, then Keras' loss and metrics on the merged output."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        _ensure_built(self, x, training=False)
        _check_compute_loss(self)
        compiled_loss = _compat.compiled_loss(self)
        if compiled_loss is None:
            raise SettingError("PipelineModel has no loss: call compile(loss=...) before fit/evaluate")
        y_pred, call_losses = self.sized_executors.infer_with_losses(x)
        # Keras' compute_loss: the compiled loss plus model.losses (this batch's call-time losses, weight terms)
        compiled_value = compiled_loss(y, y_pred, sample_weight)  # None when every output's loss is None
        loss = call_losses if compiled_value is None else tf.cast(compiled_value, tf.float32) + call_losses
        for stage in self.pipeline_stages:
            with tf.device(stage.device):
                loss += tf.add_n([tf.zeros([])] + [tf.cast(r, tf.float32)
                                                   for r in _compat.regularization_losses(stage.layer)])
        _compat.loss_metric(self).update_state(loss, sample_weight=mb_lib.batch_size(x))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def predict_step(self, data: Any) -> Any:
        """Prediction: a forward-only pipeline over micro-batches."""
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        _ensure_built(self, x, training=False)
        return self.sized_executors.infer(x)

    def get_config(self) -> dict[str, Any]:
        """Stages (nested Keras configs), devices, microbatches, schedule, recompute (:mod:`pipeline.core.saving`).

        Raises:
            SettingError: for a custom schedule callable (a config records schedules by name).
        """
        return autohook.saved_config(self, saving.pipeline_config(self))

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None) -> "PipelineModel":
        """Rebuilds the model from :meth:`get_config`; saved explicit devices missing here fall back to "auto"."""
        return cls(**saving.init_kwargs(config, custom_objects))

    def compile_from_config(self, config: dict[str, Any]) -> None:
        """Compiles as saved (``keras.models.load_model``) and builds the optimizer so its state loads."""
        saving.compile_from_config(self, config)

    def export(self, filepath: Any, format: str = "tf_saved_model", verbose: bool | None = None,
               input_signature: Any = None, **kwargs: Any) -> None:
        """Exports the merged model (stages chained, no device pinning) as a TF SavedModel.

        ``tf.saved_model.load(filepath).serve(x)`` then equals ``predict(x)``, without this package.

        Args:
            filepath: the SavedModel directory.
            format: ``"tf_saved_model"`` (the only one).
            verbose: print what was written (default True, as Keras).
            input_signature: ``[spec structure]`` of the input; default: the first stage's inputs.
            **kwargs: passed to ``keras.export.ExportArchive.add_endpoint``.

        Raises:
            SettingError: for another format or an unknown input shape.
        """
        saving.export(self, filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)


def _check_loop(loop: Any, executor: Executor, auto_settings: Any) -> None:
    """``loop=True`` needs GPipe with every stage recomputed (unless those settings are still ``"auto"``).

    Raises:
        SettingError: naming the setting, the value received and the fix.
    """
    if not isinstance(loop, bool):
        raise SettingError(f"loop must be True or False, got {loop!r}")
    if not loop or auto_settings is not None:
        return
    if getattr(executor.generator, "__name__", "") != "gpipe":
        raise SettingError(f"loop=True builds GPipe with re-materialization as tick loops; got schedule="
                           f"{executor.schedule_name!r}. Use schedule='gpipe' and recompute=True, or loop=False")
    if not all(stage.recompute for stage in executor.stages):
        raise SettingError("loop=True needs recompute=True on every stage (a backward in a later tick can only "
                           "recompute its stage from the saved input); got recompute="
                           f"{[stage.recompute for stage in executor.stages]}. Set recompute=True or loop=False")


def _check_compute_loss(model: PipelineModel) -> None:
    """Refuses an overridden ``compute_loss`` (before any compute), saying what to use instead."""
    if type(model).compute_loss is keras.Model.compute_loss and "compute_loss" not in vars(model):
        return
    raise SettingError(
        f"{type(model).__name__} overrides compute_loss, which PipelineModel cannot honour exactly: the loss "
        "is computed per micro-batch inside the pipeline (from compile(loss=...), add_loss terms and "
        "regularizers), while Keras passes compute_loss the whole batch and model.losses. Remove the "
        "override and put the loss in a keras.losses.Loss subclass whose call(y_true, y_pred) returns "
        "per-sample losses, passed as compile(loss=MyLoss()); extra terms can go through layer.add_loss."
    )


def _check_reductions(loss: Any) -> None:
    """Refuses, at compile, a loss whose Keras reduction cannot be split into micro-batches (``"none"``)."""
    for item in keras.tree.flatten(loss) if loss is not None else []:
        try:
            obj = keras.losses.get(item) if isinstance(item, (str, dict)) else item
        except (ValueError, TypeError):
            obj = None  # e.g. "crossentropy": resolved by Keras at build time, a mean loss
        if isinstance(obj, keras.losses.Loss):
            mb_lib.check_reduction(obj.reduction)


def _terms(compiled_loss: Any) -> Callable[..., list[mb_lib.Term]]:
    """The compiled loss per micro-batch as one :class:`~pipeline.core.microbatch.Term` per output loss.

    Each term carries its loss weight and reduction, so outputs with different
    reductions combine exactly; the per-output loss metrics are not updated here.
    """
    def loss(y: Any, y_pred: Any, sample_weight: Any = None) -> list[mb_lib.Term]:
        with _compat.recorded_loss_values(compiled_loss) as values:
            total = compiled_loss(y, y_pred, sample_weight)
        flat = _compat.flat_losses(compiled_loss)
        if not values:  # one loss term: the compiled result is it, weight applied
            return [mb_lib.Term(total, flat[0][1], flat[0][0])]
        return [mb_lib.Term(value if weight is None else value * weight, reduction, path)
                for value, (path, reduction, weight) in zip(values, flat)]
    return loss


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
    autohook.resolve(model, x, in_step=True)  # "auto" settings not chosen yet (e.g. a generator fed fit)
    if training:
        numerics.loss_scale_optimizer(model.optimizer)  # refuses a wrapper it cannot honour
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


def _known_shapes(layer: keras.layers.Layer, attr: str) -> list[tuple] | None:
    """The shapes of a built Keras model's flat ``inputs``/``outputs`` (a list when several cross a cut)."""
    tensors = getattr(layer, attr, None) if layer.built and isinstance(layer, keras.Model) else None
    try:
        flat = tf.nest.flatten(tensors) if tensors else []
    except (AttributeError, ValueError):
        return None
    return [tuple(t.shape) for t in flat] or None


def _check_known_shapes(stages: list[Stage]) -> None:
    """Rejects, before any compute, a stage whose known input shapes differ from the previous outputs."""
    for prev, stage in zip(stages, stages[1:]):
        outs, ins = _known_shapes(prev.layer, "outputs"), _known_shapes(stage.layer, "inputs")
        if outs is None or ins is None:
            continue
        if len(outs) != len(ins):
            raise SettingError(
                f"stage {stage.index} ({stage.layer.name!r}) takes {len(ins)} tensor(s) {ins}, but stage "
                f"{prev.index} ({prev.layer.name!r}) returns {len(outs)} tensor(s) {outs}. Make stage "
                f"{prev.index}'s outputs match stage {stage.index}'s inputs (pipeline.split makes such stages)."
            )
        for out, inp in zip(outs, ins):
            _check_pair(prev, stage, out, inp)


def _check_pair(prev: Stage, stage: Stage, out: tuple, inp: tuple) -> None:
    """One tensor crossing from ``prev`` to ``stage``: its known dimensions must agree."""
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
