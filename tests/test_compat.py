"""Contract tests of pipeline/core/_compat.py: each shim against real Keras/TF objects, so a Keras change fails here."""

import contextlib
import glob
import os
import tomllib
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.core import _compat
from pipeline.errors import CompatError

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _functional():
    """x -> a -> shared -> shared; add(a, shared(shared(a))): a layer called twice and a skip connection."""
    inp = keras.Input((4,), name="x")
    a = keras.layers.Dense(4, name="a")
    shared = keras.layers.Dense(4, name="shared")
    h = a(inp)
    s1 = shared(h)
    s2 = shared(s1)
    out = keras.layers.Add(name="add")([h, s2])
    return keras.Model(inp, out), (inp, h, s1, s2)


class _AddsLoss(keras.layers.Layer):
    def call(self, x):
        self.add_loss(3.0 * tf.reduce_sum(x))
        return x


def _with_losses():
    """Dense with kernel and activity regularizers, then a layer calling add_loss."""
    return keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(2, kernel_regularizer=keras.regularizers.L2(0.1),
                           activity_regularizer=keras.regularizers.L2(0.01), name="d"),
        _AddsLoss(),
    ])


def test_pyproject_pins_the_tested_keras_range():
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    assert f"keras{_compat.TESTED_KERAS}" in deps


# --- building a stage eagerly on its device -------------------------------------------------


def test_outside_keras_scopes_builds_real_variables_on_the_device_inside_a_symbolic_build():
    layer = keras.layers.Dense(3)
    with keras.StatelessScope(), keras.SymbolicScope():
        with _compat.outside_keras_scopes(), tf.device("/CPU:1"):
            spec = _compat.compute_output_spec(layer, keras.KerasTensor((None, 4)))
    assert tuple(spec.shape) == (None, 3) and layer.built
    for v in layer.variables:  # created at once under /CPU:1, not deferred to the outer scope's exit
        assert tf.DeviceSpec.from_string(v.value.device).device_index == 1, v.value.device


def test_a_renamed_scope_key_fails_loudly(monkeypatch):
    monkeypatch.setattr(_compat, "SCOPE_KEYS", ("stateless_scope_renamed", "symbolic_scope"))
    _compat._check_scope_keys.cache_clear()
    try:
        with pytest.raises(CompatError, match=rf"Keras {keras.__version__}.*StatelessScope"):
            with _compat.outside_keras_scopes():
                pass
    finally:
        monkeypatch.undo()
        _compat._check_scope_keys.cache_clear()
    with _compat.outside_keras_scopes():
        pass


def test_compute_output_spec_builds_a_nested_model_by_calling_it():
    model = keras.Sequential([keras.layers.Dense(5), keras.layers.Dropout(0.5), keras.layers.Dense(2)])
    with _compat.outside_keras_scopes():
        spec = _compat.compute_output_spec(model, keras.KerasTensor((None, 7)))
    assert isinstance(spec, keras.KerasTensor) and tuple(spec.shape) == (None, 2)
    assert model.built and [tuple(v.shape) for v in model.trainable_variables] == [(7, 5), (5,), (5, 2), (2,)]
    np.testing.assert_equal(model(np.zeros((1, 7), "float32")).shape, (1, 2))


def test_recreate_variable_moves_it_and_keeps_the_keras_object():
    layer = keras.layers.BatchNormalization()
    with tf.device("/CPU:0"):
        layer.build((None, 3))
    kernel, moving = layer.gamma, layer.moving_mean
    kernel.assign([1.0, 2.0, 3.0])
    for variable in (kernel, moving):
        before = variable.numpy()
        with tf.device("/CPU:2"):
            _compat.recreate_variable(variable, tf.identity(variable.value))
        assert tf.DeviceSpec.from_string(variable.value.device).device_index == 2
        np.testing.assert_array_equal(variable.numpy(), before)
        assert variable.value.trainable == variable.trainable
    assert layer.gamma is kernel and any(v is kernel for v in layer.trainable_variables)
    with tf.GradientTape() as tape:
        y = layer(tf.ones((4, 3)), training=True)
    grad = tape.gradient(y, kernel)
    assert grad is not None
    kernel.assign_add(tf.ones(3))
    np.testing.assert_array_equal(layer.gamma.numpy(), [2.0, 3.0, 4.0])


# --- losses ---------------------------------------------------------------------------------


def test_call_losses_are_the_call_time_losses_without_weight_terms():
    model = _with_losses()
    x = tf.constant([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    for _ in range(2):  # a second call replaces the losses of the first
        y = model(x)
        losses = _compat.call_losses(model)
        assert len(losses) == 2
    dense_out = model.get_layer("d")(x)
    activity = 0.01 * tf.reduce_sum(tf.square(dense_out)) / 2  # Keras divides by the batch size
    np.testing.assert_allclose(sorted(float(v) for v in losses),
                               sorted([float(activity), float(3.0 * tf.reduce_sum(y))]), rtol=1e-5)
    regs = _compat.regularization_losses(model)
    assert len(model.losses) == len(losses) + len(regs)
    np.testing.assert_allclose(float(tf.add_n(model.losses)), float(tf.add_n(losses + regs)), rtol=1e-5)


def test_regularization_losses_are_the_weight_terms_of_nested_layers():
    model = _with_losses()
    outer = keras.Sequential([keras.Input((3,)), model, keras.layers.Dense(1)])
    kernel = model.get_layer("d").kernel
    (reg,) = _compat.regularization_losses(outer)
    np.testing.assert_allclose(float(reg), 0.1 * float(tf.reduce_sum(tf.square(kernel))), rtol=1e-6)
    assert _compat.regularization_losses(keras.layers.Dense(2)) == []


def test_compiled_loss_is_the_compiled_loss_without_model_losses():
    model = _with_losses()
    assert _compat.compiled_loss(model) is None
    model.compile(loss="mse")
    y = tf.constant([[1.0, 0.0], [0.0, 2.0]])
    y_pred = tf.constant([[0.5, 0.5], [1.0, 1.0]])
    weights = tf.constant([1.0, 3.0])
    loss = _compat.compiled_loss(model)
    np.testing.assert_allclose(float(loss(y, y_pred)), float(tf.reduce_mean(tf.square(y - y_pred))), rtol=1e-6)
    per_sample = tf.reduce_mean(tf.square(y - y_pred), axis=1)
    np.testing.assert_allclose(float(loss(y, y_pred, weights)), float(tf.reduce_sum(per_sample * weights) / 2),
                               rtol=1e-6)
    # Keras' compute_loss (used by test_step) takes `training` and adds model.losses on top.
    model(tf.ones((2, 3)))
    total = model.compute_loss(y=y, y_pred=y_pred, training=False)
    np.testing.assert_allclose(float(total), float(loss(y, y_pred)) + float(tf.add_n(model.losses)), rtol=1e-5)


def test_loss_metric_is_the_metric_keras_reports_as_loss():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    logs = model.evaluate(np.ones((4, 3), "float32"), np.zeros((4, 1), "float32"), verbose=0, return_dict=True)
    metric = _compat.loss_metric(model)
    assert metric.name == "loss"
    np.testing.assert_allclose(float(metric.result()), logs["loss"], rtol=1e-6)
    metric.update_state(100.0)
    assert float(model.get_metrics_result()["loss"]) > logs["loss"]  # the tracker Keras reads


def test_recorded_loss_values_and_flat_losses_are_the_compiled_per_output_terms():
    inp = keras.Input((3,))
    model = keras.Model(inp, [keras.layers.Dense(2, name="p")(inp), keras.layers.Dense(1, name="q")(inp)])
    model.compile(loss=["mse", keras.losses.MeanAbsoluteError(reduction="sum")], loss_weights=[0.5, 2.0])
    compiled = _compat.compiled_loss(model)
    y = (tf.constant([[1.0, 0.0], [0.0, 2.0]]), tf.constant([[1.0], [-1.0]]))
    y_pred = (tf.constant([[0.5, 0.5], [1.0, 1.0]]), tf.constant([[0.0], [0.0]]))
    total = compiled(y, y_pred)  # builds it; updates the per-output metrics p_loss, q_loss
    before = [float(m.result()) for m in compiled.metrics]
    assert [m.name for m in compiled.metrics] == ["p_loss", "q_loss"]
    with _compat.recorded_loss_values(compiled) as values:
        again = compiled(y, y_pred)
    assert [float(m.result()) for m in compiled.metrics] == before  # no metric update in the block
    mse, mae_sum = float(tf.reduce_mean(tf.square(y[0] - y_pred[0]))), 2.0
    np.testing.assert_allclose([float(v) for v in values], [mse, mae_sum], rtol=1e-6)
    np.testing.assert_allclose(float(again), float(total), rtol=1e-6)
    assert _compat.flat_losses(compiled) == [((0,), "sum_over_batch_size", 0.5), ((1,), "sum", 2.0)]


def test_accepts_training_matches_what_keras_passes():
    seen = []

    class WithTraining(keras.layers.Layer):
        def call(self, x, training=None):
            seen.append(training)
            return x

    class WithoutTraining(keras.layers.Layer):
        def call(self, x):
            return x

    model = keras.Sequential([keras.Input((2,)), WithTraining(), WithoutTraining()])
    model(tf.ones((1, 2)), training=True)
    assert seen[-1] is True
    assert _compat.accepts_training(WithTraining()) and not _compat.accepts_training(WithoutTraining())
    assert _compat.accepts_training(keras.layers.Dropout(0.5)) and _compat.accepts_training(model)


def test_seed_states_are_non_trainable_variables():
    """recompute snapshots ``non_trainable_variables``; dropout masks repeat only if seed states are among them."""
    drop = keras.layers.Dropout(0.5)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3), keras.Sequential([drop])])
    assert any(v is drop.seed_generator.state for v in model.non_trainable_variables)


# --- the functional graph -------------------------------------------------------------------


def test_functional_graph_calls_inputs_and_producers():
    model, (inp, h, s1, s2) = _functional()
    a, shared, add = (model.get_layer(n) for n in ("a", "shared", "add"))
    assert (_compat.call_count(a), _compat.call_count(shared), _compat.call_count(add)) == (1, 2, 1)
    assert _compat.producer(h) is a and _compat.producer(s2) is shared
    assert isinstance(_compat.producer(inp), keras.layers.InputLayer)
    assert [id(t) for t in _compat.call_inputs(add)] == [id(h), id(s2)]
    assert [id(t) for t in _compat.call_inputs(shared)] == [id(h), id(s1)]
    assert _compat.call_inputs(shared, call=1)[0] is s1


def test_fill_call_arguments_repeats_each_call_on_values():
    model, (inp, h, s1, s2) = _functional()
    add, shared = model.get_layer("add"), model.get_layer("shared")
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 4)), tf.float32)
    hv = model.get_layer("a")(x)
    s1v = shared(hv)
    s2v = shared(s1v)
    args, kwargs = _compat.fill_call_arguments(shared, {id(s1): s1v}, call=1)
    assert args[0] is s1v and not kwargs
    args, kwargs = _compat.fill_call_arguments(add, {id(h): hv, id(s2): s2v})
    np.testing.assert_allclose(add(*args, **kwargs), model(x), rtol=1e-6)
    assert _compat.call_count(add) == 1  # calling on values adds no node


def test_a_missing_internal_fails_loudly():
    with pytest.raises(CompatError, match=rf"Keras {keras.__version__} .*_keras_history"):
        _compat.producer(tf.constant(1.0))


# --- TensorFlow profiler --------------------------------------------------------------------


def test_read_xspace_parses_a_real_profile(tmp_path):
    @tf.function
    def step(x):
        with tf.name_scope("act0F0"):
            return tf.reduce_sum(tf.matmul(x, x))

    x = tf.ones((8, 8))
    step(x)
    tf.profiler.experimental.start(str(tmp_path))
    try:
        step(x).numpy()
    finally:
        tf.profiler.experimental.stop()
    (path,) = glob.glob(os.path.join(tmp_path, "plugins", "profile", "*", "*.xplane.pb"))
    space = _compat.read_xspace(path)
    names = [plane.event_metadata[event.metadata_id].name
             for plane in space.planes if plane.name.startswith("/host:CPU")
             for line in plane.lines for event in line.events]
    assert any(name.startswith("act0F0/") for name in names), names[:20]
    event = next(e for p in space.planes if p.name.startswith("/host:CPU") for line in p.lines for e in line.events)
    assert event.duration_ps >= 0 and event.offset_ps >= 0


def test_graph_shims_count_only_the_given_models_nodes():
    """Building a model from intermediate tensors (what split does) appends cloned nodes to the layers;
    with ``model=`` the shims see only that model's own calls."""
    model, (inp, h, s1, s2) = _functional()
    a, shared, add = (model.get_layer(n) for n in ("a", "shared", "add"))
    keras.Model(h, s2)  # clones the nodes of shared: 2 more nodes on it
    assert _compat.call_count(shared) == 4
    assert _compat.call_count(shared, model) == 2
    assert _compat.call_count(a, model) == 1
    assert [id(t) for t in _compat.call_inputs(shared, model=model)] == [id(h), id(s1)]
    assert _compat.call_outputs(a, model=model)[0] is h
    assert _compat.call_outputs(shared, call=1, model=model)[0] is s2
    assert [id(t) for t in _compat.call_inputs(add, model=model)] == [id(h), id(s2)]
    seq = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    assert _compat.call_count(seq.layers[0], seq) == _compat.call_count(seq.layers[0])


def test_seed_generators_finds_dropouts_in_sublayers():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.5, name="d1")])
    model = keras.Sequential([keras.Input((3,)), inner, keras.layers.Dropout(0.2, name="d2"), keras.layers.Dense(2)])
    gens = _compat.seed_generators(model)
    assert len(gens) == 2 and all(isinstance(g, keras.random.SeedGenerator) for g in gens)
    assert all(g.state.dtype == "int64" for g in gens)
    assert _compat.seed_generators(keras.layers.Dense(2)) == []


def test_keras_mask_reads_the_mask_keras_attaches_symbolically_and_eagerly():
    ids = keras.Input((4,), dtype="int32")
    emb = keras.layers.Embedding(6, 3, mask_zero=True)
    symbolic = _compat.keras_mask(emb(ids))
    assert symbolic is not None and symbolic.shape == (None, 4) and symbolic.dtype == "bool"
    assert _compat.keras_mask(ids) is None
    eager = _compat.keras_mask(emb(tf.constant([[1, 0, 2, 0]])))
    np.testing.assert_array_equal(eager.numpy(), [[True, False, True, False]])


# --- BatchNorm (pipeline.core.batchnorm) ----------------------------------------------------------


def test_sublayers_walks_nested_models_once():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, name="in_d"),
                              keras.layers.BatchNormalization(name="in_bn")], name="inner")
    outer = keras.Sequential([keras.Input((3,)), inner, keras.layers.BatchNormalization(name="out_bn")], name="outer")
    names = [layer.name for layer in _compat.sublayers(outer)]
    assert names[0] == "outer" and {"inner", "in_d", "in_bn", "out_bn"} <= set(names)
    assert len(names) == len(set(names))


def test_batchnorm_moments_are_the_biased_batch_statistics_and_keras_masked_formula():
    bn = keras.layers.BatchNormalization(axis=1)
    x = np.random.default_rng(0).normal(size=(4, 3, 2)).astype("float32")
    bn.build(x.shape)
    mean, var = _compat.batchnorm_moments(bn, tf.constant(x), None)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, x.var(axis=(0, 2)), rtol=1e-5, atol=1e-6)
    bn = keras.layers.BatchNormalization()
    x = x.transpose(0, 2, 1)
    bn.build(x.shape)
    mask = np.array([[1, 1], [1, 0], [0, 1], [1, 1]], bool)
    mean, var = _compat.batchnorm_moments(bn, tf.constant(x), tf.constant(mask))
    kept, eps = x[mask], keras.config.epsilon()
    want = kept.sum(0) / (len(kept) + eps)
    np.testing.assert_allclose(mean, want, rtol=1e-5)
    np.testing.assert_allclose(var, ((kept - want) ** 2).sum(0) / (len(kept) + eps), rtol=1e-5)


def test_in_stateless_scope_follows_keras_stateless_scope():
    assert not _compat.in_stateless_scope()
    with keras.StatelessScope():
        assert _compat.in_stateless_scope()
    assert not _compat.in_stateless_scope()


def test_loss_scale_step_evolves_like_loss_scale_optimizer_apply():
    """Keras' apply on scaled gradients vs the shim on gradients unscaled beforehand: same scale, counter,
    iterations and weights, through growth (every 2 finite steps) and a skipped non-finite step."""
    made = []
    for _ in range(2):
        variable = keras.Variable(np.ones(3, "float32"))
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.5), initial_scale=4.0,
                                                        dynamic_growth_steps=2)
        optimizer.build([variable])
        made.append((optimizer, variable))
    (keras_opt, keras_var), (shim_opt, shim_var) = made
    history = []
    for step, bad in enumerate([False, False, False, True, False, False]):
        grad = np.full(3, np.inf if bad else 0.25 * (step + 1), "float32")
        scale = float(keras_opt.dynamic_scale.numpy())
        keras_opt.apply([tf.constant(grad * scale)], [keras_var])
        unscaled = tf.constant(grad)
        _compat.loss_scale_step(shim_opt, tf.reduce_all(tf.math.is_finite(unscaled)), [unscaled], [shim_var])
        for a, b in [(keras_opt.dynamic_scale, shim_opt.dynamic_scale), (keras_opt.step_counter, shim_opt.step_counter),
                     (keras_opt.iterations, shim_opt.iterations), (keras_var, shim_var)]:
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        history.append(float(shim_opt.dynamic_scale.numpy()))
    assert history == [4.0, 8.0, 8.0, 4.0, 4.0, 8.0]
    assert int(shim_opt.iterations.numpy()) == 5


def test_loss_scale_optimizer_methods_exist_in_this_keras():
    """The methods whose override is refused are all defined by Keras' LossScaleOptimizer itself."""
    for name in _compat.LOSS_SCALE_OPTIMIZER_METHODS:
        assert callable(vars(keras.optimizers.LossScaleOptimizer).get(name)), name


def test_each_layer_call_wraps_the_top_level_calls_only_and_restores_keras():
    from keras.src.models import functional

    model, _ = _functional()
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.Dense(4, name="inner_dense")(inner_in), name="inner")
    outer_in = keras.Input((4,))
    outer = keras.Model(outer_in, inner(model(outer_in)), name="outer")
    seen = []

    def wrap(operation, context, call, args, kwargs):
        seen.append((operation.name, sorted(context)))
        return call(*args, **kwargs)

    original = functional.operation_fn
    x = tf.ones((2, 4))
    with _compat.each_layer_call(wrap):
        got = outer(x, training=True)
    assert functional.operation_fn is original
    assert seen == [(model.name, ["training"]), ("inner", ["training"])]  # not the layers inside them
    np.testing.assert_allclose(got, outer(x), rtol=1e-6)
    seen.clear()
    with _compat.each_layer_call(wrap):
        model(x)
    assert [name for name, _ in seen] == ["a", "shared", "shared", "add"]
    assert _compat.is_graph_model(model) and _compat.is_graph_model(keras.Sequential([keras.Input((4,)),
                                                                                      keras.layers.Dense(2)]))
    assert not _compat.is_graph_model(keras.layers.Dense(2))


def _weight_shaped_zeros(capped: bool) -> int:
    """Fill/ZerosLike ops shaped like the kernel in the graph of a persistent tape's gradient of a traced call."""
    dense = keras.layers.Dense(32)
    dense.build((None, 32))
    call = tf.function(lambda t: dense(t))

    @tf.function
    def step(x):
        block = _compat.first_order_function_calls() if capped else contextlib.nullcontext()
        with tf.GradientTape(persistent=True) as tape, block:
            tape.watch(x)
            y = call(x)
        return tape.gradient(y, x), tape.gradient(y, dense.kernel)

    graph = step.get_concrete_function(tf.TensorSpec((4, 32))).graph
    np.testing.assert_allclose(step(tf.ones((4, 32)))[1], 4 * np.ones((32, 32)), rtol=1e-6)
    return sum(1 for op in graph.get_operations()
               if op.type in ("Fill", "ZerosLike") and op.outputs[0].shape == (32, 32))


def test_first_order_function_calls_drops_the_higher_order_zeros_inside_the_block_only():
    """Under a persistent tape TensorFlow records a traced call for higher-order gradients: each backward is fed
    zeros of every intermediate's shape, the kernel's included (folded into constants that live with the graph).
    Capped at first order, it is not, and the gradients are the same."""
    assert _weight_shaped_zeros(capped=False) > 0  # what the shim is for: if 0, TensorFlow changed
    assert _weight_shaped_zeros(capped=True) == 0
    assert _weight_shaped_zeros(capped=False) > 0  # outside the block TensorFlow answers as before
