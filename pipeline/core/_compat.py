"""The one place that uses Keras/TensorFlow internals: small named shims, each with a contract test (tests/test_compat.py)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import Any, Iterator

import keras
import tensorflow as tf
from keras.src import backend as keras_backend
from keras.src.backend.common import global_state

from pipeline.errors import CompatError

TESTED_KERAS = ">=3.10,<3.16"
"""The Keras versions these shims are tested with; ``pyproject.toml`` pins the same range."""

SCOPE_KEYS = ("stateless_scope", "symbolic_scope")
"""Keras' global-state keys of ``keras.StatelessScope`` and ``keras.SymbolicScope``."""
LOSS_SCALE_OPTIMIZER_METHODS = ("apply", "scale_loss", "check_finite", "_common_apply", "_tf_apply",
                                "_stateful_handle_finite_grads", "_stateful_handle_non_finite_grads")
"""The methods of ``keras.optimizers.LossScaleOptimizer`` (public and private) through which it scales the loss,
checks and applies gradients: a subclass overriding one of them is refused (:mod:`pipeline.core.numerics`)."""


def _broken(what: str, detail: str) -> CompatError:
    return CompatError(
        f"Keras {keras.__version__} (TensorFlow {tf.__version__}) changed an internal that the pipeline "
        f"relies on: {what} ({detail}). The pipeline is tested with keras{TESTED_KERAS}; install a Keras "
        f"in that range (pip install 'keras{TESTED_KERAS}')."
    )


def _private(obj: Any, name: str, what: str) -> Any:
    """``getattr(obj, name)``, or a :class:`CompatError` naming the Keras version if it is gone."""
    try:
        return getattr(obj, name)
    except AttributeError as err:
        raise _broken(what, f"{type(obj).__name__} has no attribute {name!r}") from err


# --- building a stage eagerly on its device -------------------------------------------------


@functools.cache
def _check_scope_keys() -> None:
    """Checks once that Keras keeps its scopes under :data:`SCOPE_KEYS` (entering the public scopes)."""
    scopes = (lambda: keras.StatelessScope(initialize_variables=False), keras.SymbolicScope)
    for key, make in zip(SCOPE_KEYS, scopes):
        before = global_state.get_global_attribute(key)
        with make() as scope:
            found = global_state.get_global_attribute(key)
        if found is not scope or global_state.get_global_attribute(key) is not before:
            raise _broken(f"the global-state key of keras.{type(scope).__name__}",
                          f"entering it did not set {key!r}")


@contextlib.contextmanager
def outside_keras_scopes() -> Iterator[None]:
    """Leaves Keras' stateless/symbolic scopes and any TF graph, so variables are created eagerly.

    Inside a Keras symbolic build (e.g. the trainer tracing a step) a layer built
    by calling it would get deferred variables initialised in a scratch graph;
    in this block it gets real variables, under the caller's ``tf.device``.

    Raises:
        CompatError: if Keras no longer keeps its scopes under :data:`SCOPE_KEYS`.
    """
    _check_scope_keys()
    saved = {key: global_state.get_global_attribute(key) for key in SCOPE_KEYS}
    for key in SCOPE_KEYS:
        global_state.set_global_attribute(key, None)
    try:
        with tf.init_scope():
            yield
    finally:
        for key, value in saved.items():
            global_state.set_global_attribute(key, value)


def compute_output_spec(layer: keras.layers.Layer, input_spec: Any) -> Any:
    """Calls ``layer`` on placeholders for ``input_spec``, building it; returns the output spec.

    Unlike ``layer.compute_output_spec`` this goes through ``layer.__call__``, so
    layers that make their variables in ``build`` or in ``call`` are built. Use it
    inside :func:`outside_keras_scopes` so those variables are real.

    Args:
        layer: the Keras layer or model.
        input_spec: a ``keras.KerasTensor`` or a nest of them.

    Returns:
        The output as ``keras.KerasTensor`` (nest).
    """
    fn = _private(keras_backend, "compute_output_spec", "keras.src.backend.compute_output_spec")
    return fn(layer, input_spec)


def recreate_variable(variable: keras.Variable, value: tf.Tensor) -> None:
    """Re-creates the backend variable behind ``variable`` from ``value`` under the current ``tf.device``.

    The Keras variable object stays the same (layers, optimizers and checkpoints
    keep referring to it); only its TensorFlow variable, and so its device, is new.
    """
    _private(variable, "_initialize", "keras.Variable._initialize (re-creating a variable in place)")(value)


# --- losses ---------------------------------------------------------------------------------


def call_losses(layer: keras.layers.Layer) -> list[tf.Tensor]:
    """Losses added during the layer's last call (``add_loss``, activity regularizers), no weight terms.

    ``layer.losses`` adds the weight regularization terms (computed anew); Keras
    has no public API for the call-time losses alone.
    """
    losses: list[tf.Tensor] = []
    flatten = _private(layer, "_flatten_layers", "Layer._flatten_layers (walking sublayers)")
    for sub in flatten(include_self=True):
        losses.extend(_private(sub, "_get_own_losses", "Layer._get_own_losses (call-time losses)")())
    return losses


def seed_generators(layer: keras.layers.Layer) -> list[keras.random.SeedGenerator]:
    """The ``keras.random.SeedGenerator`` objects held by ``layer`` and its sublayers (e.g. Dropout's)."""
    found: list[keras.random.SeedGenerator] = []
    flatten = _private(layer, "_flatten_layers", "Layer._flatten_layers (walking sublayers)")
    for sub in flatten(include_self=True):
        for value in vars(sub).values():
            if isinstance(value, keras.random.SeedGenerator) and all(value is not g for g in found):
                found.append(value)
    return found


def sublayers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """``layer`` and every layer nested in it (models, custom layers), each once, depth first."""
    return list(_private(layer, "_flatten_layers", "Layer._flatten_layers (walking sublayers)")(include_self=True))


def batchnorm_moments(layer: keras.layers.BatchNormalization, inputs: tf.Tensor,
                      mask: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
    """The (mean, variance) a BatchNormalization computes in training from ``inputs`` (and ``mask``).

    Keras' own ``BatchNormalization._moments`` (biased variance; masked sums over weight + epsilon).
    """
    return _private(layer, "_moments", "BatchNormalization._moments (batch statistics)")(inputs, mask)


def in_stateless_scope() -> bool:
    """Whether a ``keras.StatelessScope`` is active (its variable updates are collected, not applied)."""
    from keras.src.backend.common import stateless_scope  # noqa: PLC0415

    return bool(_private(stateless_scope, "in_stateless_scope", "keras stateless_scope.in_stateless_scope")())


def regularization_losses(layer: keras.layers.Layer) -> list[tf.Tensor]:
    """The weight regularization terms of ``layer`` and its sublayers (public route: ``variable.regularizer``)."""
    return [v.regularizer(v) for v in layer.trainable_weights if v.regularizer is not None]


def compiled_loss(model: keras.Model) -> Any:
    """The loss object ``compile(loss=...)`` made, ``loss(y, y_pred, sample_weight)``; ``None`` before compile.

    It applies ``loss_weights`` and multi-output structure and nothing else (no
    ``model.losses``), which a per-micro-batch loss needs; ``Model.compute_loss``
    would add the regularization once per micro-batch.
    """
    return _private(model, "_compile_loss", "Model._compile_loss (the compiled loss)")


class _Recorder:
    """Stands in for a per-output loss metric of ``CompileLoss``: keeps the values instead of averaging them."""

    def __init__(self, values: list[tf.Tensor]):
        self.values = values

    def update_state(self, value: tf.Tensor, sample_weight: Any = None) -> None:
        del sample_weight
        self.values.append(value)


@contextlib.contextmanager
def recorded_loss_values(compiled: Any) -> Iterator[list[tf.Tensor]]:
    """Within the block, calling the compiled loss records each output's unweighted loss, updating no metric.

    Yields the list the values are appended to (one per flat loss, in
    :func:`flat_losses` order); it stays empty for a compiled loss with a single
    term (Keras keeps no per-output metric then). Per micro-batch this keeps the
    ``<output>_loss`` metrics untouched (the model updates them once per batch,
    on the merged outputs, as Keras does) and gives each output's value to
    combine by its own reduction.
    """
    metrics = _private(compiled, "_metrics", "CompileLoss._metrics (the per-output loss metrics)")
    values: list[tf.Tensor] = []
    if not metrics:
        yield values
        return
    compiled._metrics = [_Recorder(values) for _ in metrics]  # noqa: SLF001
    try:
        yield values
    finally:
        compiled._metrics = metrics  # noqa: SLF001


def flat_losses(compiled: Any) -> list[tuple[tuple, str, float | None]]:
    """``(output path, Keras reduction, loss weight)`` of each loss term of a built compiled loss, in order."""
    flat = _private(compiled, "_flat_losses", "CompileLoss._flat_losses (the per-output losses)")
    if flat is None:
        raise _broken("CompileLoss._flat_losses", "the compiled loss is not built after a call")
    return [(tuple(item.path), getattr(item.loss, "reduction", "sum_over_batch_size"), item.loss_weights)
            for item in flat]


def loss_metric(model: keras.Model) -> keras.metrics.Metric:
    """The compiled model's metric reported as ``loss`` (public route: ``model.metrics`` by name).

    Raises:
        CompatError: if a compiled model has no metric named ``loss``.
    """
    for metric in model.metrics:
        if metric.name == "loss":
            return metric
    raise _broken("the loss tracker", f"model {model.name!r} has no metric named 'loss' after compile")


def accepts_training(layer: keras.layers.Layer) -> bool:
    """Whether ``layer.call`` takes a ``training`` argument (public route: ``inspect.signature``)."""
    return "training" in inspect.signature(layer.call).parameters


# --- the functional graph -------------------------------------------------------------------


def _nodes(layer: keras.layers.Layer, model: keras.Model | None = None) -> list[Any]:
    """The layer's call nodes; with ``model``, only those of ``model``'s own graph.

    Building a functional model from intermediate tensors (as ``split`` does)
    appends cloned nodes to the layers, so a layer of a model that was split
    before has more nodes than calls in that model.
    """
    nodes = list(_private(layer, "_inbound_nodes", "Layer._inbound_nodes (the functional graph)"))
    if model is None or isinstance(model, keras.Sequential):
        return nodes
    keys = _private(model, "_nodes", "Functional._nodes (the node keys of a functional graph)")
    return [node for i, node in enumerate(nodes) if f"{id(layer)}_ib-{i}" in keys]


def call_count(layer: keras.layers.Layer, model: keras.Model | None = None) -> int:
    """How many times ``layer`` is called: in ``model``'s graph, or in every graph it belongs to."""
    return len(_nodes(layer, model))


def call_inputs(layer: keras.layers.Layer, call: int | None = None,
                model: keras.Model | None = None) -> list[keras.KerasTensor]:
    """The symbolic tensors ``layer`` takes: of every call, or of call number ``call`` (in ``model``'s graph)."""
    nodes = _nodes(layer, model)
    nodes = nodes if call is None else [nodes[call]]
    return [t for node in nodes for t in node.arguments.keras_tensors]


def call_outputs(layer: keras.layers.Layer, call: int = 0, model: keras.Model | None = None) -> list[Any]:
    """The symbolic tensors call number ``call`` of ``layer`` made (in ``model``'s graph)."""
    return list(_nodes(layer, model)[call].output_tensors)


def producer(tensor: keras.KerasTensor) -> Any:
    """The layer (operation) whose call made the symbolic ``tensor``."""
    history = _private(tensor, "_keras_history", "KerasTensor._keras_history (the functional graph)")
    return history.operation


def fill_call_arguments(layer: keras.layers.Layer, values: dict[int, Any], call: int = 0,
                        model: keras.Model | None = None) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` of call number ``call`` of ``layer``, with its symbolic tensors replaced.

    Args:
        layer: a layer of a functional model.
        values: ``id(symbolic tensor) -> value`` for every tensor of :func:`call_inputs`.
        call: which call of the layer.
        model: count calls in this model's graph only.

    Returns:
        ``args, kwargs`` such that ``layer(*args, **kwargs)`` repeats that call on the values.
    """
    return _nodes(layer, model)[call].arguments.fill_in(values)


def is_graph_model(layer: keras.layers.Layer) -> bool:
    """Whether ``layer`` runs as a functional graph of layer calls (a functional model, or a built Sequential)."""
    from keras.src.models import functional  # noqa: PLC0415

    if isinstance(layer, keras.Sequential):
        return getattr(layer, "_functional", None) is not None
    return isinstance(layer, functional.Functional)


@contextlib.contextmanager
def each_layer_call(wrap: Any) -> Iterator[None]:
    """Within the block, every call a functional graph makes of one of its layers goes through ``wrap``.

    ``wrap(operation, context, call, args, kwargs) -> result`` gets the layer, Keras' call-context
    arguments (``training``), ``call`` (which runs the layer with them, as Keras does) and the call's
    arguments; it must return what ``call(*args, **kwargs)`` returns. Calls made inside a wrapped call
    (the layers of a nested model) are not wrapped. Keras' ``Functional.call`` looks up the module
    function ``operation_fn`` at every call; this swaps it for the block.
    """
    from keras.src.models import functional  # noqa: PLC0415

    original = _private(functional, "operation_fn", "keras.src.models.functional.operation_fn (the per-node call)")
    depth = [0]

    def operation_fn(operation: Any, **context: Any) -> Any:
        call = original(operation, **context)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return call(*args, **kwargs)
            depth[0] += 1
            try:
                return wrap(operation, context, call, args, kwargs)
            finally:
                depth[0] -= 1
        return wrapped

    functional.operation_fn = operation_fn
    try:
        yield
    finally:
        functional.operation_fn = original


_FIRST_ORDER = threading.local()
_FIRST_ORDER_LOCK = threading.Lock()


@contextlib.contextmanager
def first_order_function_calls() -> Iterator[None]:
    """Within the block (in this thread), a ``tf.function`` called under a persistent tape or under nested
    tapes is recorded with its first-order gradient, as under one plain tape.

    TensorFlow records such a call for higher-order gradients: its forward returns every
    intermediate (weight reads included), and each backward takes a gradient for each of them, zeros
    for all but the real outputs. Those zeros (``Fill`` of every weight's shape, per call site) are
    folded into constants that live as long as the step graph: memory that grows with M. The split
    backward asks its tapes for first-order gradients only (twice: B, then W), never for the
    gradient of a gradient, so the first-order pair (the delayed rewrite) is exact. ``ConcreteFunction``
    asks ``gradients_util.PossibleTapeGradientTypes`` which pair to record; a wrapper, installed once,
    caps its answer at first order inside this block and passes it through unchanged elsewhere.
    """
    _install_first_order_cap()
    depth = getattr(_FIRST_ORDER, "depth", 0)
    _FIRST_ORDER.depth = depth + 1
    try:
        yield
    finally:
        _FIRST_ORDER.depth = depth


def _install_first_order_cap() -> None:
    from tensorflow.python.ops import gradients_util  # noqa: PLC0415

    with _FIRST_ORDER_LOCK:
        current = _private(gradients_util, "PossibleTapeGradientTypes",
                           "tensorflow.python.ops.gradients_util.PossibleTapeGradientTypes (tape gradient order)")
        if getattr(current, "pipeline_first_order_cap", False):
            return
        first = _private(gradients_util, "POSSIBLE_GRADIENT_TYPES_FIRST_ORDER",
                         "tensorflow.python.ops.gradients_util.POSSIBLE_GRADIENT_TYPES_FIRST_ORDER")

        def possible_tape_gradient_types(tensors: Any) -> int:
            answer = current(tensors)
            return min(answer, first) if getattr(_FIRST_ORDER, "depth", 0) else answer

        possible_tape_gradient_types.pipeline_first_order_cap = True  # type: ignore[attr-defined]
        gradients_util.PossibleTapeGradientTypes = possible_tape_gradient_types


# --- loss scaling (mixed_float16) -----------------------------------------------------------

def loss_scale_step(optimizer: keras.optimizers.LossScaleOptimizer, finite: Any, grads: list[Any],
                    variables: list[Any]) -> None:
    """Keras' ``LossScaleOptimizer.apply`` step for gradients the caller has already unscaled.

    ``finite`` (a bool tensor) decides: apply ``grads`` with ``optimizer.inner_optimizer``
    and count a finite step, doubling ``dynamic_scale`` every ``dynamic_growth_steps``
    of them (as Keras' finite branch after its own unscaling); or skip the update and
    run Keras' own non-finite branch (halve the scale, reset the counter).
    """
    skip = _private(optimizer, "_stateful_handle_non_finite_grads",
                    "LossScaleOptimizer._stateful_handle_non_finite_grads (skipping a step)")

    def upscale() -> None:
        optimizer.step_counter.assign(0)
        optimizer.dynamic_scale.assign(keras.ops.multiply(optimizer.dynamic_scale, 2.0))

    def increment() -> None:
        optimizer.step_counter.assign_add(1)

    def apply() -> None:
        optimizer.inner_optimizer.apply(grads, variables)
        keras.ops.cond(keras.ops.equal(optimizer.step_counter, optimizer.dynamic_growth_steps - 1),
                       upscale, increment)

    keras.ops.cond(finite, apply, skip)


# --- TensorFlow profiler --------------------------------------------------------------------


def read_xspace(path: str) -> Any:
    """Parses a TensorFlow profiler ``*.xplane.pb`` file into its ``XSpace`` protobuf message.

    Raises:
        CompatError: if TensorFlow no longer ships the XPlane protobuf module.
    """
    try:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: PLC0415 - only when traces are read
    except ImportError as err:
        raise _broken("the profiler's XPlane protobuf", f"cannot import tensorflow.tsl.profiler.protobuf.xplane_pb2: "
                      f"{err}") from err
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    return space


# --- processes ------------------------------------------------------------------------------

def hard_exit(code: int) -> None:
    """Ends the process at once, without cleanup (``os._exit``): for a watchdog thread whose main thread
    may be blocked inside a TensorFlow call that would never return. Not a Keras internal, but the one
    underscore name of the standard library the package needs, kept here with the others."""
    import os

    os._exit(code)  # noqa: SLF001


def keras_mask(tensor: Any) -> Any:
    """The Keras mask attached to ``tensor`` (symbolic or eager), or ``None``.

    Keras 3 carries masks (``Embedding(mask_zero=True)``, ``Masking``) as an attribute
    on the tensor; there is no public getter.
    """
    fn = _private(keras_backend, "get_keras_mask", "keras.src.backend.get_keras_mask (a tensor's mask)")
    return fn(tensor)
