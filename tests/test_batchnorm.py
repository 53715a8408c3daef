"""BatchNorm modes (microbatch / deferred / frozen) against the unsplit Keras model run with the same semantics.

The references here are written independently of pipeline.core.batchnorm: a plain Keras loop over the
ghost batches (each micro-batch through the whole unsplit model, gradients summed with the loss share
n_j / B), BatchNormalization called with training=False for "frozen", and numpy moments of the layer's
concatenated inputs for the deferred moving statistics.
"""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import pipeline
from pipeline.core import batchnorm as bn_lib
from pipeline.errors import SettingError
from pipeline.train import config as config_lib
from pipeline.train import runner
from pipeline.train.typed_yaml import ConfigError

BN = keras.layers.BatchNormalization
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mlp(seed: int = 3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(6, name="d1"), BN(momentum=0.9, name="bn1"),
        keras.layers.Dense(6, activation="relu", name="d2"), BN(momentum=0.8, name="bn2"),
        keras.layers.Dense(3, name="out"),
    ], name="mlp")


def _cnn(seed: int = 3) -> keras.Model:
    """Conv + BN over channels (axis -1) and a BN over axis 1 (image rows): axis != -1."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, name="conv"), BN(momentum=0.7, name="bn1"),
        keras.layers.Conv2D(3, 3, activation="relu", name="d2"), BN(axis=1, momentum=0.6, name="bn2"),
        keras.layers.Flatten(name="flat"), keras.layers.Dense(3, name="out"),
    ], name="cnnbn")


MODELS = {"mlp": (_mlp, (5,)), "cnn": (_cnn, (6, 6, 2))}


def _data(kind: str, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, *MODELS[kind][1])) * 2 + 0.5).astype("float32")
    return x, rng.integers(0, 3, size=n).astype("int32")


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _piped(kind: str, mode: str, m: int = 2, recompute: bool = False):
    model = MODELS[kind][0]()
    reference = MODELS[kind][0]()
    reference.set_weights(model.get_weights())
    piped = pipeline.PipelineModel(pipeline.split(model, cuts=["d2"]), devices=["/CPU:0", "/CPU:1"],
                                   microbatches=m, batchnorm=mode, recompute=recompute)
    return model, reference, piped


def _reference_fit(model: keras.Model, x, y, batch: int, m: int, mode: str, lr: float, epochs: int = 1):
    """The unsplit model, batch by batch: ghost batches (np.array_split into min(m, n)), one SGD step each."""
    opt = keras.optimizers.SGD(lr)
    bns = [layer for layer in model.layers if isinstance(layer, BN)]
    for _ in range(epochs):
        for start in range(0, len(x), batch):
            xb, yb = x[start:start + batch], y[start:start + batch]
            n = len(xb)
            old = {id(b): (b.moving_mean.numpy(), b.moving_variance.numpy()) for b in bns}
            seen = {id(b): [] for b in bns}
            total = [tf.zeros_like(v) for v in model.trainable_variables]
            for idx in np.array_split(np.arange(n), min(m, n)):
                with tf.GradientTape() as tape:
                    h = tf.constant(xb[idx])
                    for layer in model.layers:
                        if isinstance(layer, BN):
                            seen[id(layer)].append(h.numpy())
                            h = layer(h, training=mode != "frozen")
                        else:
                            h = layer(h, training=True)
                    value = tf.reduce_mean(_loss()(yb[idx], h)) * (len(idx) / n)
                total = [a + g for a, g in zip(total, tape.gradient(value, model.trainable_variables))]
            opt.apply(total, model.trainable_variables)
            if mode == "deferred":  # one update from the whole mini-batch the layer saw (numpy, float64)
                for b in bns:
                    mean, var = _moments(b, np.concatenate(seen[id(b)]))
                    b.moving_mean.assign((old[id(b)][0] * b.momentum + mean * (1 - b.momentum)).astype("float32"))
                    b.moving_variance.assign((old[id(b)][1] * b.momentum + var * (1 - b.momentum)).astype("float32"))


def _moments(layer, inputs):
    axes = tuple(a for a in range(inputs.ndim) if a != layer.axis % inputs.ndim)
    data = inputs.astype("float64")
    return data.mean(axis=axes), data.var(axis=axes)


def _assert_same_weights(model, reference, atol=2e-5):
    for got, want in zip(model.weights, reference.weights):
        assert got.path == want.path
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=atol, err_msg=got.path)


def _fit(piped, x, y, batch, eager, lr, epochs=1):
    piped.compile(keras.optimizers.SGD(lr), _loss(), run_eagerly=eager)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        piped.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)


# --- deferred: moving statistics of the whole mini-batch ------------------------------------------------


@pytest.mark.parametrize("kind,eager,recompute", [("mlp", False, False), ("mlp", True, False), ("cnn", False, True)])
def test_deferred_moving_statistics_are_the_full_mini_batch_statistics(kind, eager, recompute):
    """Graph (fit) and eager; the cnn case has a BN over axis 1 and recomputed stages (replays record nothing)."""
    model, reference, piped = _piped(kind, "deferred", m=4, recompute=recompute)
    x, y = _data(kind, 16)
    bn1, bn2 = model.get_layer("bn1"), model.get_layer("bn2")
    old = [(b.moving_mean.numpy(), b.moving_variance.numpy()) for b in (bn1, bn2)]
    # the layers' inputs, independently: bn1 sees conv/d1(x); bn2 sees d2 of the ghost-normalized bn1 output
    r = {layer.name: layer for layer in reference.layers}
    h1 = r["d1" if kind == "mlp" else "conv"](x).numpy()
    h2 = np.concatenate([r["d2"](r["bn1"](h1[i:i + 4], training=True)).numpy() for i in range(0, 16, 4)])
    _fit(piped, x, y, batch=16, eager=eager, lr=0.1)
    for b, inputs, (mean0, var0) in zip((bn1, bn2), (h1, h2), old):
        mean, var = _moments(b, inputs)
        np.testing.assert_allclose(b.moving_mean.numpy(), mean0 * b.momentum + mean * (1 - b.momentum),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.moving_variance.numpy(), var0 * b.momentum + var * (1 - b.momentum),
                                   rtol=1e-5, atol=1e-6)


def test_deferred_masked_statistics_use_keras_masked_formula():
    """Embedding(mask_zero) -> BN: the deferred update pools only the unmasked positions (Keras' epsilon)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((5,), dtype="int32")
    h = BN(momentum=0.5, name="bn1")(keras.layers.Embedding(7, 3, mask_zero=True, name="emb")(inp))
    h = keras.layers.Dense(4, name="d2")(keras.layers.GlobalAveragePooling1D(name="pool")(h))
    model = keras.Model(inp, keras.layers.Dense(3, name="out")(BN(name="bn2")(h)))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 7, size=(8, 5)).astype("int32")
    x[:, 0], x[0, 1:] = 1, 0  # micro-batch 0 has far fewer unmasked positions than micro-batch 1
    kept = model.get_layer("emb")(x).numpy()[x != 0].astype("float64")
    piped = pipeline.PipelineModel(pipeline.split(model, cuts=["pool"]), devices=["/CPU:0", "/CPU:1"],
                                   microbatches=2, batchnorm="deferred")
    _fit(piped, x, rng.integers(0, 3, size=8), batch=8, eager=False, lr=0.0)
    eps = keras.config.epsilon()
    mean = kept.sum(0) / (len(kept) + eps)
    var = ((kept - mean) ** 2).sum(0) / (len(kept) + eps)
    bn1 = model.get_layer("bn1")
    np.testing.assert_allclose(bn1.moving_mean.numpy(), 0.5 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), 0.5 + 0.5 * var, rtol=1e-5, atol=1e-6)


# --- microbatch (ghost batches) and frozen --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_microbatch_mode_equals_unsplit_ghost_batches_after_three_steps(kind):
    model, reference, piped = _piped(kind, "microbatch", m=2)
    x, y = _data(kind, 24)
    _fit(piped, x, y, batch=8, eager=False, lr=0.2)
    _reference_fit(reference, x, y, 8, 2, "microbatch", 0.2)
    _assert_same_weights(model, reference)
    assert not np.allclose(model.get_layer("bn2").moving_mean.numpy(), 0.0)


def test_frozen_equals_unsplit_with_batchnorm_in_inference_mode():
    model, reference, piped = _piped("mlp", "frozen", m=2)
    x, y = _data("mlp", 24)
    gamma0 = model.get_layer("bn1").gamma.numpy()
    stats0 = [w.numpy() for w in model.non_trainable_weights]
    _fit(piped, x, y, batch=8, eager=False, lr=0.2)
    _reference_fit(reference, x, y, 8, 2, "frozen", 0.2)
    _assert_same_weights(model, reference)
    for before, after in zip(stats0, model.non_trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())  # moving statistics used, never updated
    assert not np.allclose(gamma0, model.get_layer("bn1").gamma.numpy())  # gamma/beta still train


# --- batches smaller than M ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,n,batch", [("microbatch", 17, 8), ("deferred", 17, 8), ("microbatch", 1, 1),
                                          ("deferred", 1, 1)])
def test_partial_batches_below_m_stay_finite_and_equal_the_ghost_reference(mode, n, batch):
    """17 = 8 + 8 + 1: two full steps, then one sample (< M) in graph mode (tf.cond + tf.while_loop path)."""
    model, reference, piped = _piped("mlp", mode, m=2)
    x, y = _data("mlp", n)
    _fit(piped, x, y, batch=batch, eager=False, lr=0.1)
    _reference_fit(reference, x, y, batch, 2, mode, 0.1)
    for w in model.weights:
        assert np.all(np.isfinite(w.numpy())), w.path
    _assert_same_weights(model, reference)


# --- the small micro-batch warning ----------------------------------------------------------------------


@pytest.mark.parametrize("mode,eager", [("microbatch", False), ("deferred", True)])
def test_small_microbatches_warn_once_naming_mode_size_and_options(mode, eager):
    _, _, piped = _piped("mlp", mode, m=4)
    x, y = _data("mlp", 32)
    piped.compile(keras.optimizers.SGD(0.01), _loss(), run_eagerly=eager)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        piped.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    ours = [w for w in caught if "BatchNormalization" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    text = str(ours[0].message)
    assert f"batchnorm='{mode}'" in text and "micro-batches of 4 sample(s)" in text
    assert "deferred" in text and "frozen" in text and "fewer micro-batches" in text


def test_no_warning_in_frozen_mode_or_with_16_samples_per_microbatch():
    for mode, batch in (("frozen", 8), ("microbatch", 32)):
        _, _, piped = _piped("mlp", mode, m=2)
        x, y = _data("mlp", 32)
        piped.compile(keras.optimizers.SGD(0.01), _loss())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            piped.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        assert not [w for w in caught if "BatchNormalization" in str(w.message)], mode


# --- settings ------------------------------------------------------------------------------------------


def test_bad_batchnorm_value_is_refused_before_any_compute():
    with pytest.raises(SettingError, match=r"batchnorm: got 'ghost'.*'microbatch'.*'deferred'.*'frozen'"):
        pipeline.PipelineModel(pipeline.split(_mlp(), cuts=["d2"]), devices="cpu", microbatches=2,
                               batchnorm="ghost")


def test_verify_refuses_a_bad_batchnorm_value():
    with pytest.raises(SettingError, match=r"batchnorm: got 'sync'"):
        pipeline.verify(pipeline.split(_mlp(), cuts=["d2"]), *_data("mlp", 4), _loss(), batchnorm="sync")


def test_deferred_refuses_batch_renormalization():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="d1"),
                              BN(renorm=True, name="rn"), keras.layers.Dense(2, name="d2")])
    with pytest.raises(SettingError, match=r"'rn' uses renorm=True"):
        pipeline.PipelineModel(pipeline.split(model, cuts=["d1"]), devices="cpu", microbatches=2,
                               batchnorm="deferred")


def test_config_key_is_validated_and_reaches_the_model(tmp_path):
    assert config_lib.BATCHNORM_MODES == bn_lib.MODES
    path = os.path.join(ROOT, "configs", "digits_cnn.yaml")
    with pytest.raises(ConfigError, match=r"pipeline\.batchnorm.*'ghost'.*microbatch, deferred, frozen"):
        config_lib.load_config(path, ["pipeline.batchnorm=ghost"])
    cfg = config_lib.load_config(path, ["train.verbose=0", "pipeline.batchnorm=deferred"])
    assert cfg.pipeline.batchnorm == "deferred"
    built = runner.build(cfg, str(tmp_path))
    assert built.pipeline.batchnorm_control.mode == "deferred"


# --- verify ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,reference", [
    ("microbatch", "reference: ghost batches of 4 samples, because batchnorm='microbatch'"),
    ("deferred", "reference: ghost batches of 4 samples, because batchnorm='deferred'; moving statistics "
                 "updated once from the whole batch of 8"),
    ("frozen", "reference: the unsplit model with BatchNorm in inference mode, because batchnorm='frozen'"),
])
def test_verify_passes_on_a_batchnorm_model_and_names_its_reference(mode, reference):
    model, _, piped = _piped("mlp", mode, m=2)
    x, y = _data("mlp", 8)
    before = [w.numpy() for w in model.weights]
    report = pipeline.verify(piped, x, y, _loss())
    text = str(report)
    assert report.ok, text
    assert reference in text and "BatchNorm (bn1, bn2)" in text and f"batchnorm={mode!r}" in text
    stat_rows = [v for v in report.variables if "moving_" in v.name]
    assert len(stat_rows) == 4 and all(v.max_abs <= 1e-5 for v in stat_rows)
    for old, w in zip(before, model.weights):  # nothing applied, moving statistics restored
        np.testing.assert_array_equal(old, w.numpy())
