"""keras.applications models nobody here wrote (weights=None, 32x32 inputs) split into K = 2, 3, 4 stages and verified.

Every architecture is cut by ``split(num_stages=K)`` with both balance modes over its rows, verified per
variable (rtol 1e-4 of the largest gradient) at M = 2 and 4 under both schedules, BatchNorm in "frozen" mode
(the unsplit reference runs BN in inference mode too). The steps run eagerly: the same executor actions,
one by one, without tracing a 6,000-op graph per micro-batch (graph mode is covered on small models).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import pipeline

ARCHITECTURES = {
    "ResNet50": keras.applications.ResNet50,
    "MobileNetV2": keras.applications.MobileNetV2,
    "DenseNet121": keras.applications.DenseNet121,
    "EfficientNetB0": keras.applications.EfficientNetB0,
}
# (K, balance, M, schedule): over the rows of all architectures, every K meets both balance modes,
# both M and both schedules.
ROWS = {
    "ResNet50": [(2, "params", 2, "1f1b"), (3, "time", 4, "gpipe"), (4, "params", 4, "1f1b")],
    "MobileNetV2": [(2, "time", 4, "gpipe"), (3, "params", 2, "1f1b"), (4, "time", 2, "gpipe")],
    "DenseNet121": [(2, "params", 4, "1f1b"), (3, "time", 2, "1f1b"), (4, "params", 2, "gpipe")],
    "EfficientNetB0": [(2, "time", 2, "gpipe"), (3, "params", 4, "gpipe"), (4, "time", 4, "1f1b")],
}
CASES = [(arch, *row) for arch, rows in ROWS.items() for row in rows]


@pytest.fixture(scope="module")
def built_models():
    """One instance per architecture for the whole file (verify changes no weights)."""
    return {}


def _model(cache: dict, arch: str) -> keras.Model:
    if arch not in cache:
        keras.utils.set_random_seed(7)
        model = ARCHITECTURES[arch](weights=None, input_shape=(32, 32, 3), classes=10)
        for layer in model.layers:
            if isinstance(layer, keras.layers.Dropout):
                layer.rate = 0.0  # EfficientNet's stochastic depth: masks differ per micro-batch by design
        cache[arch] = model
    return cache[arch]


def _batch(n: int = 8):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 32, 32, 3)).astype("float32"), (np.arange(n) % 10).astype("int32")


@pytest.fixture
def eager():
    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)


@pytest.mark.parametrize("arch,num_stages,balance,microbatches,schedule", CASES,
                         ids=[f"{a}-K{k}-{b}-M{m}-{s}" for a, k, b, m, s in CASES])
def test_split_and_verify(built_models, eager, arch, num_stages, balance, microbatches, schedule):
    model = _model(built_models, arch)
    x, y = _batch()
    stages = pipeline.split(model, num_stages=num_stages, balance=balance,
                            sample_input=x[:2] if balance == "time" else None)
    assert len(stages) == num_stages
    # every layer of the model is in exactly one stage
    owned = [layer.name for stage in stages for layer in stage.layers
             if not isinstance(layer, keras.layers.InputLayer)]
    assert sorted(owned) == sorted(layer.name for layer in model.layers
                                   if not isinstance(layer, keras.layers.InputLayer))
    report = pipeline.verify(stages, x, y, "sparse_categorical_crossentropy",
                             microbatches=microbatches, schedule=schedule, batchnorm="frozen", rtol=1e-4)
    assert report.ok, str(report)
    checked = {check.name for check in report.variables}
    assert {v.path for v in model.trainable_variables} <= checked
    assert "inference mode" in report.reference or "frozen" in report.reference, report.reference


@pytest.mark.parametrize("arch,num_stages,microbatches,schedule", [("MobileNetV2", 3, 2, "1f1b"),
                                                                   ("EfficientNetB0", 2, 4, "gpipe")])
def test_three_fit_steps_equal_the_unsplit_model(arch, num_stages, microbatches, schedule):
    """fit with batchnorm="frozen" equals a plain loop over the unsplit model with BN in inference mode."""
    cache: dict = {}
    model = _model(cache, arch)
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    initial = model.get_weights()
    x, y = _batch()
    loss = keras.losses.SparseCategoricalCrossentropy()
    stages = pipeline.split(model, num_stages=num_stages)
    piped = pipeline.PipelineModel(stages, microbatches=microbatches, schedule=schedule, batchnorm="frozen")
    piped.compile(keras.optimizers.SGD(0.05), loss, run_eagerly=True)
    history = piped.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0).history["loss"]
    optimizer = keras.optimizers.SGD(0.05)
    losses = []
    for _ in range(3):
        with tf.GradientTape() as tape:
            # training=False: BatchNorm in inference mode (the Dropout layers have rate 0)
            value = loss(y, reference(x, training=False))
        optimizer.apply(tape.gradient(value, reference.trainable_variables), reference.trainable_variables)
        losses.append(float(value))
    np.testing.assert_allclose(history, losses, rtol=1e-5)
    for got, want in zip(model.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-6, err_msg=got.path)
    assert any(not np.allclose(a, b) for a, b in zip(model.get_weights(), initial))  # it trained
