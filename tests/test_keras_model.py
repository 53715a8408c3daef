"""PipelineModel as a Keras model: built state and weight files, any batch size, the jit guard.

Each test compares with the unsplit Keras model (same weights, same data).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import pipeline
from modelzoo import cnn, data, loss
from pipeline.errors import SettingError


def _mlp(batchnorm: bool = False, l2: float = 0.0) -> keras.Model:
    regularizer = keras.regularizers.L2(l2) if l2 else None
    layers = [keras.Input((6,)), keras.layers.Dense(8, activation="tanh", kernel_regularizer=regularizer, name="d1")]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization(name="bn"))
    layers += [keras.layers.Dense(8, activation="relu", name="d2"), keras.layers.Dense(3, name="out")]
    return keras.Sequential(layers, name="mlp")


def _piped(model: keras.Model, cuts: list[str], m: int) -> pipeline.PipelineModel:
    return pipeline.PipelineModel(pipeline.split(model, cuts=cuts), devices="cpu", microbatches=m)


def _xy(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, size=n).astype("int32")


# --- 10.1: built, save_weights/load_weights, count_params ---------------------------------------

def test_built_after_fit_and_weights_round_trip(tmp_path):
    model = cnn()
    reference_params = model.count_params()
    piped = _piped(model, ["flatten"], 4)
    x, y = data("cnn", n=16)
    piped.compile(keras.optimizers.Adam(1e-2), loss())
    piped.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert piped.built
    assert piped.count_params() == reference_params
    path = str(tmp_path / "p.weights.h5")
    piped.save_weights(path)
    fresh = _piped(cnn(), ["flatten"], 4)
    assert not np.allclose(fresh.predict(x, verbose=0), piped.predict(x, verbose=0))
    fresh.load_weights(path)
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), piped.predict(x, verbose=0))


def test_model_checkpoint_weights_only(tmp_path):
    piped = _piped(cnn(), ["flatten"], 2)
    x, y = data("cnn", n=16)
    piped.compile(keras.optimizers.SGD(0.1), loss())
    path = str(tmp_path / "ckpt.weights.h5")
    piped.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[keras.callbacks.ModelCheckpoint(path, save_weights_only=True)])
    fresh = _piped(cnn(), ["flatten"], 2)
    fresh.load_weights(path)
    for a, b in zip(fresh.get_weights(), piped.get_weights()):
        np.testing.assert_array_equal(a, b)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_like_the_uninterrupted_run(tmp_path):
    x, y = data("cnn", n=16)
    keras.utils.set_random_seed(7)
    model = cnn()
    initial = model.get_weights()
    runs = []
    for interrupt in (False, True):
        model.set_weights(initial)
        piped = _piped(model, ["flatten"], 2)
        piped.compile(keras.optimizers.SGD(0.05), loss())
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / f"backup{interrupt}"))
        if interrupt:
            with pytest.raises(RuntimeError, match="interrupted"):
                piped.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=[backup, _Interrupt()])
            model.set_weights(initial)  # a fresh process: weights come back from the backup
            piped = _piped(model, ["flatten"], 2)
            piped.compile(keras.optimizers.SGD(0.05), loss())
        history = piped.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=[backup])
        runs.append((model.get_weights(), len(history.history["loss"])))
    (done, epochs_done), (resumed, epochs_resumed) = runs
    assert (epochs_done, epochs_resumed) == (4, 2)
    for a, b in zip(done, resumed):
        np.testing.assert_allclose(a, b, atol=1e-6)


# --- 10.5 + 11.6: batches with fewer samples than M ----------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3])
def test_predict_fewer_samples_than_microbatches(n):
    model = _mlp()
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    piped = _piped(model, ["d2"], 4)
    x, _ = _xy(n)
    np.testing.assert_allclose(piped.predict(x, verbose=0), reference.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_evaluate_fewer_samples_than_microbatches(run_eagerly):
    model = _mlp()
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    piped = _piped(model, ["d2"], 4)
    x, y = _xy(3)
    for m in (piped, reference):
        m.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=run_eagerly)
    assert piped.evaluate(x, y, batch_size=8, verbose=0) == pytest.approx(
        reference.evaluate(x, y, batch_size=8, verbose=0), abs=1e-6)


def _mean_loss(y_true, y_pred):
    """A custom loss that returns the mean itself (NaN on an empty micro-batch)."""
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True))


def _ghost_fit(model: keras.Model, x, y, batch: int, m: int, lr: float) -> list[float]:
    """The unsplit model trained as the pipeline does: per batch, min(B, M) ghost micro-batches
    (array_split sizes), each micro-batch loss times n_j / B, one SGD step per batch."""
    loss_fn = _mean_loss
    optimizer = keras.optimizers.SGD(lr)
    losses = []
    for start in range(0, len(x), batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        parts = min(len(xb), m)
        grads, total = None, 0.0
        for xs, ys in zip(np.array_split(xb, parts), np.array_split(yb, parts)):
            with tf.GradientTape() as tape:
                value = loss_fn(ys, model(xs, training=True)) * (len(xs) / len(xb))
            g = tape.gradient(value, model.trainable_variables)
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            total += float(value)
        if model.losses:  # weight regularization: once per mini-batch
            with tf.GradientTape() as tape:
                reg = tf.add_n(model.losses)
            grads = [a if b is None else a + b for a, b in zip(grads, tape.gradient(reg, model.trainable_variables))]
            total += float(reg)
        optimizer.apply(grads, model.trainable_variables)
        losses.append(total)
    return losses


@pytest.mark.parametrize("kind", ["plain", "batchnorm", "l2"])
@pytest.mark.parametrize("run_eagerly", [False, True])
def test_fit_with_last_batch_smaller_than_microbatches(kind, run_eagerly):
    """41 (43) samples, batch 8, M=4: the last batch holds 1 (3) samples; no empty micro-batch, weights exact.

    BatchNorm is compared with the unsplit model on the same ghost batches (moving statistics too);
    weight regularization enters once per mini-batch.
    """
    model = _mlp(batchnorm=kind == "batchnorm", l2=0.01 if kind == "l2" else 0.0)
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    piped = _piped(model, ["d2"], 4)
    x, y = _xy(43 if kind == "l2" else 41)  # last batch: 3 samples, or 1
    piped.compile(keras.optimizers.SGD(0.1), _mean_loss, run_eagerly=run_eagerly)
    history = piped.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    expected = _ghost_fit(reference, x, y, batch=8, m=4, lr=0.1)
    assert np.isfinite(history.history["loss"][0])
    assert history.history["loss"][0] == pytest.approx(np.average(expected, weights=[8] * 5 + [len(x) - 40]), abs=1e-5)
    for var, want in zip(model.weights, reference.weights):
        got = np.asarray(var)
        assert np.all(np.isfinite(got)), var.path
        np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, err_msg=var.path)


def test_partial_batch_with_gpipe_recompute_and_two_epochs():
    """The run-time small-batch path (a loop over one-sample micro-batches) with recompute and GPipe."""
    model = _mlp(batchnorm=True)
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    piped = pipeline.PipelineModel(pipeline.split(model, cuts=["d2"]), devices=["/CPU:0", "/CPU:1"],
                                   microbatches=4, schedule="gpipe", recompute=True)
    x, y = _xy(42)  # last batch: 2 samples
    piped.compile(keras.optimizers.SGD(0.1), _mean_loss)
    piped.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for _ in range(2):
        _ghost_fit(reference, x, y, batch=8, m=4, lr=0.1)
    for var, want in zip(model.weights, reference.weights):
        assert np.all(np.isfinite(np.asarray(var))), var.path
        np.testing.assert_allclose(np.asarray(var), np.asarray(want), atol=1e-5, err_msg=var.path)


def test_every_batch_smaller_than_microbatches_trains_exactly():
    """batch_size 3 < M=8 (was refused: "microbatches=8 is larger than the batch size"): 3 micro-batches."""
    model = _mlp()
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    piped = _piped(model, ["d2"], 8)
    x, y = _xy(9)
    piped.compile(keras.optimizers.SGD(0.1), _mean_loss)
    piped.fit(x, y, batch_size=3, epochs=1, shuffle=False, verbose=0)
    _ghost_fit(reference, x, y, batch=3, m=8, lr=0.1)
    for var, want in zip(model.weights, reference.weights):
        np.testing.assert_allclose(np.asarray(var), np.asarray(want), atol=1e-6, err_msg=var.path)


# --- 10.7: the jit attribute ---------------------------------------------------------------------

def test_setting_jit_compile_true_is_refused_clearly():
    piped = _piped(_mlp(), ["d2"], 2)
    piped.compile("sgd", "mse")
    with pytest.raises(SettingError, match=r"jit_compile=True is not supported by PipelineModel: XLA"):
        piped.jit_compile = True
    piped.jit_compile = False
    assert piped.jit_compile is False
