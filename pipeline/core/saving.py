"""Save, load and export a ``PipelineModel``: its Keras config, its compile config, and the merged SavedModel."""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Any, Iterator, Sequence

import keras
import tensorflow as tf

from pipeline.core import devices as devices_lib
from pipeline.core import schedule as sched
from pipeline.errors import DeviceError, SettingError

EXPORT_FORMATS = ("tf_saved_model",)
"""What :func:`export` writes."""

_LOAD_DEVICES: contextvars.ContextVar[Any] = contextvars.ContextVar("pipeline_load_devices", default=None)


def device_policy(devices: Sequence[str] | str | None) -> list[str] | str | None:
    """The ``devices`` setting as the user gave it, in a form a JSON config holds (re-resolved on load)."""
    if devices is None or isinstance(devices, str):
        return devices
    return [str(d) for d in devices]


@contextlib.contextmanager
def devices_on_load(devices: Sequence[str] | str | None) -> Iterator[None]:
    """Places the stages of every ``PipelineModel`` loaded in this block on ``devices``, not the saved setting.

    Example: ``with devices_on_load(["/GPU:0", "/GPU:1"]): model = keras.models.load_model("m.keras")``.

    Args:
        devices: what ``PipelineModel(devices=...)`` takes: ``None``/``"auto"``, ``"cpu"`` or one name per stage.
    """
    token = _LOAD_DEVICES.set((device_policy(devices),))
    try:
        yield
    finally:
        _LOAD_DEVICES.reset(token)


def schedule_name(generator: Any) -> str:
    """The registered name of a schedule generator (``"1f1b"``, ``"gpipe"``, ...), which a config can hold.

    Raises:
        SettingError: for a callable that is not one of :data:`pipeline.core.schedule.GENERATORS`.
    """
    for name, known in sched.GENERATORS.items():
        if known is generator:
            return name
    label = getattr(generator, "__name__", type(generator).__name__)
    raise SettingError(
        f"schedule: got the custom callable {label!r}; a saved model (model.save, ModelCheckpoint with "
        f"save_weights_only=False, get_config) records the schedule by name only, one of "
        f"{', '.join(sorted(sched.GENERATORS))}. Pass schedule= by name, or keep the custom schedule and save "
        "the weights only (model.save_weights / ModelCheckpoint(save_weights_only=True)), rebuilding the "
        "PipelineModel in code before load_weights."
    )


def pipeline_config(model: Any) -> dict[str, Any]:
    """The ``get_config`` of a ``PipelineModel``: nested stage configs plus every setting but the reducer.

    The ``gradient_reducer`` is a Python callable and is not saved (a warning says so); set
    ``loaded.gradient_reducer = reducer`` after loading.

    Raises:
        SettingError: for a custom schedule callable (see :func:`schedule_name`).
    """
    config: dict[str, Any] = {
        "name": model.name,
        "trainable": model.trainable,
        "stages": [keras.saving.serialize_keras_object(layer) for layer in model.stage_layers],
        "devices": getattr(model, "device_policy", None),
        "microbatches": model.microbatches,
        "schedule": schedule_name(model.executor.generator),
        "recompute": [stage.recompute for stage in model.pipeline_stages],
        "batchnorm": model.batchnorm_control.mode,
        "check_numerics": model.check_numerics,
        "virtual_stages": getattr(model, "virtual_stages", 1),
        "loop": model.executor.loop,
    }
    if model.gradient_reducer is not None:
        warnings.warn(
            f"PipelineModel {model.name!r}: gradient_reducer is a Python callable and is not saved with the "
            "model; after loading, set it again (loaded.gradient_reducer = reducer).", stacklevel=3)
    return config


def _devices_here(policy: Any, num_stages: int) -> Any:
    """The devices setting for this machine: an override, the saved policy, or ``"auto"`` when devices are gone.

    It is resolved before any stage variable exists, so the CPU fallback can still create its logical devices.
    """
    override = _LOAD_DEVICES.get()
    if override is not None:
        devices_lib.resolve(num_stages, override[0])  # an explicit choice: its DeviceError is the user's to see
        return override[0]
    if policy is None or isinstance(policy, str):
        devices_lib.resolve(num_stages, policy)
        return policy  # "auto"/"cpu"/None: resolved anew on this machine
    try:
        devices_lib.resolve(num_stages, policy)
        return policy
    except DeviceError as err:
        warnings.warn(
            f"the saved PipelineModel was placed on devices={policy}, which this process cannot use ({err}). "
            "Its stages are placed with devices='auto' instead. To choose the devices, load inside "
            "pipeline.core.saving.devices_on_load([...]).", stacklevel=4)
        devices_lib.resolve(num_stages, "auto")
        return "auto"


def init_kwargs(config: dict[str, Any], custom_objects: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``PipelineModel(**kwargs)`` that :func:`pipeline_config` describes, stages deserialized.

    Raises:
        SettingError: for a config without stages (written before ``.keras`` saving was supported).
    """
    config = dict(config)
    if "stages" not in config:
        raise SettingError(
            f"the PipelineModel config {sorted(config)} has no 'stages': it was written by a version that could "
            "not save a PipelineModel. Rebuild the PipelineModel in code and use load_weights instead.")
    stage_configs = config.pop("stages")
    config["devices"] = _devices_here(config.get("devices"), len(stage_configs))
    stages = [keras.saving.deserialize_keras_object(c, custom_objects=custom_objects) for c in stage_configs]
    return {"stages": stages, **config}


def compile_from_config(model: Any, config: dict[str, Any]) -> None:
    """Compiles ``model`` as the saved compile config says and builds the optimizer beside the variables.

    With the optimizer built before Keras loads the weights file, its saved state (iterations, slots)
    is restored, so ``fit`` continues exactly where the saved model stopped.
    """
    config = keras.saving.deserialize_keras_object(config)
    model.compile(**config)
    if getattr(model, "optimizer", None) is not None and model.built:
        with tf.init_scope():
            model.optimizer.build(model.trainable_variables)


def merged_forward(layers: Sequence[keras.layers.Layer], inputs: Any) -> Any:
    """The stages chained as one plain forward (inference mode), without any device scope."""
    x = inputs
    for layer in layers:
        x = layer(x, training=False)
    return x


def default_input_signature(model: Any) -> list[Any]:
    """``[spec structure]`` of the first stage's input, for :func:`export`.

    Raises:
        SettingError: when the model is not built or the input shape is unknown.
    """
    first = model.stage_layers[0]
    if isinstance(first, keras.Sequential) and first.built and getattr(first, "inputs", None):
        struct = first.inputs[0]
    elif isinstance(first, keras.Model) and first.built and getattr(first, "inputs", None):
        struct = first.input
    else:
        shapes = (model.get_build_config() or {}).get("input_shape") if model.built else None
        if shapes is None:
            raise SettingError(
                f"export: the input shape of PipelineModel {model.name!r} is unknown (its first stage has no "
                "keras.Input and the model was never built). Call fit/predict once, or pass "
                "input_signature=[keras.InputSpec(shape=(None, ...), dtype='float32')].")
        dtype = keras.config.floatx()
        return [keras.tree.map_shape_structure(lambda s: keras.InputSpec(shape=tuple(s), dtype=dtype), shapes)]
    return [keras.tree.map_structure(lambda t: keras.InputSpec(shape=tuple(t.shape), dtype=t.dtype), struct)]


def export(model: Any, filepath: Any, format: str = "tf_saved_model", verbose: bool | None = None,
           input_signature: Any = None, **kwargs: Any) -> None:
    """Writes the merged model (stages chained, no device pinning) as a TF SavedModel with a ``serve`` endpoint.

    Raises:
        SettingError: for another format, or an unknown input shape.
    """
    if format not in EXPORT_FORMATS:
        raise SettingError(
            f"export: format={format!r} is not supported by PipelineModel; allowed: {', '.join(EXPORT_FORMATS)}. "
            "Export the SavedModel and convert it (e.g. with tf2onnx), or export one stage at a time.")
    signature = input_signature if input_signature is not None else default_input_signature(model)
    layers = list(model.stage_layers)
    archive = keras.export.ExportArchive()
    for layer in layers:
        archive.track(layer)
    archive.add_endpoint("serve", lambda inputs: merged_forward(layers, inputs), input_signature=signature,
                         **kwargs)
    archive.write_out(str(filepath), verbose=True if verbose is None else verbose)
