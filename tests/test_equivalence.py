"""The core promise: pipelined gradients and trained weights equal the unsplit model's."""

import keras
import numpy as np
import pytest

import pipeline
from modelzoo import BUILDERS, data, loss


def split_model(kind, k):
    build, cuts, _ = BUILDERS[kind]
    model = build()
    return model, (pipeline.split(model, cuts=cuts[k]) if k > 1 else [model])


@pytest.mark.parametrize("kind", ["cnn", "residual"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_gradients_equal_unsplit(kind, schedule, k, m):
    _, stages = split_model(kind, k)
    x, y = data(kind, n=16)
    report = pipeline.verify(stages, x, y, loss(), microbatches=m, schedule=schedule)
    assert report.num_stages == k and report.num_microbatches == m
    assert len(report.variables) == (8 if kind == "cnn" else 10)
    assert report.ok, str(report)
    assert abs(report.loss_pipelined - report.loss_unsplit) < 1e-5


@pytest.mark.parametrize("kind", ["cnn", "residual"])
@pytest.mark.parametrize("k,m", [(2, 1), (2, 4), (3, 3), (4, 8)])
def test_zero_bubble_gradients_equal_unsplit(kind, k, m):
    """ZB-H1 splits each backward into the input-gradient B and the weight-gradient W: same sums."""
    _, stages = split_model(kind, k)
    x, y = data(kind, n=16)
    report = pipeline.verify(stages, x, y, loss(), microbatches=m, schedule="zb_h1")
    assert report.ok, str(report)
    assert abs(report.loss_pipelined - report.loss_unsplit) < 1e-5


@pytest.mark.parametrize("kind", ["cnn", "residual"])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_interleaved_gradients_equal_unsplit_with_two_stages_per_device(kind, m):
    """4 stages on 2 devices (stage s on device s % 2), Megatron's interleaved order."""
    _, stages = split_model(kind, 4)
    x, y = data(kind, n=16)
    model = pipeline.PipelineModel(stages, devices=["/CPU:0", "/CPU:1"], microbatches=m,
                                   schedule="interleaved_1f1b")
    assert [s.device for s in model.stages] == ["/CPU:0", "/CPU:1", "/CPU:0", "/CPU:1"]
    assert len(model.executor.train_schedule) == 2  # one row per device
    report = pipeline.verify(model, x, y, loss())
    assert report.ok, str(report)


def test_verify_with_a_string_loss_uses_the_mean():
    """keras.losses.get('mse') returns per-sample values; micro-batch and unsplit losses are their mean."""
    _, stages = split_model("residual", 2)
    x, _ = data("residual", n=12)
    y = np.random.default_rng(3).normal(size=(12, 10)).astype("float32")
    report = pipeline.verify(stages, x, y, "mse", microbatches=3)
    assert report.ok, str(report)
    out = stages[1](stages[0](x))
    assert report.loss_unsplit == pytest.approx(float(np.mean((np.asarray(out) - y) ** 2)), rel=1e-5)


def test_uneven_batch_follows_array_split_policy():
    _, stages = split_model("cnn", 2)
    x, y = data("cnn", n=11)  # 11 = 3 + 3 + 3 + 2
    report = pipeline.verify(stages, x, y, loss(), microbatches=4, schedule="1f1b")
    assert report.ok, str(report)


def test_verify_detects_a_wrong_cut_layer_gradient(monkeypatch):
    """A check that can fail: if the cut-layer gradient were scaled, stage 0 must be flagged."""
    from pipeline.core.stage import Stage

    _, stages = split_model("cnn", 2)
    x, y = data("cnn", n=8)
    assert pipeline.verify(stages, x, y, loss(), microbatches=2).ok
    original = Stage.backward

    def doubled(self, microbatch, grad=None):
        return original(self, microbatch, None if grad is None else [2.0 * g for g in grad])

    monkeypatch.setattr(Stage, "backward", doubled)
    report = pipeline.verify(stages, x, y, loss(), microbatches=2)
    assert not report.ok
    assert "FAIL" in str(report)
    assert {v.stage for v in report.variables if not v.close} == {0}


def _fit(model, x, y, steps, batch):
    model.compile(keras.optimizers.Adam(1e-2), loss(), metrics=["accuracy"])
    history = model.fit(x, y, batch_size=batch, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
    return history.history


@pytest.mark.parametrize("kind,k,m,schedule", [
    ("cnn", 2, 4, "1f1b"), ("cnn", 3, 2, "gpipe"), ("residual", 4, 8, "1f1b"), ("residual", 2, 3, "gpipe"),
    ("cnn", 3, 4, "zb_h1"), ("residual", 4, 4, "interleaved_1f1b"),
])
def test_fit_matches_unsplit_fit(kind, k, m, schedule):
    model, stages = split_model(kind, k)
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    x, y = data(kind, n=5 * 24, seed=1)
    devices = ["/CPU:0", "/CPU:1"] if schedule == "interleaved_1f1b" else None  # 2 stages per device
    piped = pipeline.PipelineModel(stages, devices=devices, microbatches=m, schedule=schedule)
    h_pipe = _fit(piped, x, y, steps=5, batch=24)
    h_ref = _fit(reference, x, y, steps=5, batch=24)
    for got, want in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert h_pipe["loss"][0] == pytest.approx(h_ref["loss"][0], rel=1e-5)
    assert h_pipe["accuracy"][0] == pytest.approx(h_ref["accuracy"][0])


def test_user_models_hold_trained_weights():
    """Training PipelineModel([model_0, model_1]) trains the user's objects, like Sequential would."""
    model, (m0, m1) = split_model("cnn", 2)
    ref0, ref1 = keras.models.clone_model(m0), keras.models.clone_model(m1)
    ref0.set_weights(m0.get_weights())
    ref1.set_weights(m1.get_weights())
    x, y = data("cnn", n=64, seed=2)
    _fit(pipeline.PipelineModel([m0, m1], microbatches=4), x, y, steps=4, batch=16)
    _fit(keras.Sequential([ref0, ref1]), x, y, steps=4, batch=16)
    for got, want in zip(m0.get_weights() + m1.get_weights(), ref0.get_weights() + ref1.get_weights()):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # and the original unsplit model shares those layers
    for got, want in zip(model.get_weights(), m0.get_weights() + m1.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_evaluate_and_predict_match_unsplit():
    model, stages = split_model("residual", 3)
    x, y = data("residual", n=40, seed=3)
    piped = pipeline.PipelineModel(stages, microbatches=4)
    piped.compile(loss=loss(), metrics=["accuracy"])
    model.compile(loss=loss(), metrics=["accuracy"])
    np.testing.assert_allclose(piped.predict(x, batch_size=20, verbose=0),
                               model.predict(x, batch_size=20, verbose=0), atol=1e-6)
    np.testing.assert_allclose(piped.evaluate(x, y, batch_size=20, verbose=0),
                               model.evaluate(x, y, batch_size=20, verbose=0), rtol=1e-6)


def test_run_eagerly_debug_path_matches_graph():
    model, stages = split_model("cnn", 2)
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    x, y = data("cnn", n=32, seed=4)
    piped = pipeline.PipelineModel(stages, microbatches=4)
    piped.compile(keras.optimizers.SGD(0.1), loss(), run_eagerly=True)
    piped.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    reference.compile(keras.optimizers.SGD(0.1), loss())
    reference.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_weight_regularization_enters_once_per_batch():
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.1), name="r1")(inp)
    out = keras.layers.Dense(10, kernel_regularizer=keras.regularizers.L2(0.05), name="r2")(h)
    model = keras.Model(inp, out)
    stages = pipeline.split(model, cuts=["r1"])
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.integers(0, 10, 16)
    report = pipeline.verify(stages, x, y, loss(), microbatches=4)
    assert report.ok, str(report)
