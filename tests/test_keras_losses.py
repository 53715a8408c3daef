"""Exact losses and Keras' loss/metric names: PipelineModel against the unsplit Keras model (issue 10, 3 and 4).

Each test trains (or evaluates) the unsplit functional model and a 2-stage
PipelineModel of a copy with the same weights on the same data, and compares
logged values (history / evaluate) and trained weights.
"""

import keras
import numpy as np
import pytest

import pipeline
from pipeline.errors import SettingError

B = 8  # batch size: M=2 divides it, M=3 gives micro-batches of 3, 3 and 2


class MeanPenalty(keras.layers.Layer):
    """Identity that adds ``rate * mean(x**2)``: a batch-mean add_loss term (the documented rule)."""

    def __init__(self, rate: float, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate

    def call(self, x):
        self.add_loss(self.rate * keras.ops.mean(keras.ops.square(x)))
        return x


def _single(activity: bool = False, add_loss: bool = False, l2: float = 0.0) -> keras.Model:
    inp = keras.Input((5,), name="x")
    h = keras.layers.Dense(6, activation="tanh", name="h",
                           activity_regularizer=keras.regularizers.L2(0.05) if activity else None,
                           kernel_regularizer=keras.regularizers.L2(l2) if l2 else None)(inp)
    if add_loss:
        h = MeanPenalty(0.3, name="pen")(h)
    h2 = keras.layers.Dense(6, activation="relu", name="h2",
                            activity_regularizer=keras.regularizers.L1(0.02) if activity else None)(h)
    return keras.Model(inp, keras.layers.Dense(3, name="cls")(h2), name="single")


def _two(kind: str = "list") -> keras.Model:
    inp = keras.Input((5,), name="x")
    h = keras.layers.Dense(6, activation="tanh", name="h")(inp)
    h2 = keras.layers.Dense(6, activation="tanh", name="h2")(h)
    r1, r2 = keras.layers.Dense(2, name="r1")(h2), keras.layers.Dense(1, name="r2")(h2)
    return keras.Model(inp, {"a": r1, "b": r2} if kind == "dict" else [r1, r2], name=f"two_{kind}")


def _pair(build, m: int, **kwargs):
    """The unsplit model and a PipelineModel (cut after ``h``) of a copy with the same weights."""
    reference, copy = build(**kwargs), build(**kwargs)
    copy.set_weights(reference.get_weights())
    return reference, pipeline.PipelineModel(pipeline.split(copy, cuts=["h"]), devices="cpu", microbatches=m)


def _data(n: int = 2 * B, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype("float32")
    return (x, rng.integers(0, 3, size=n).astype("int32"), rng.normal(size=(n, 2)).astype("float32"),
            rng.normal(size=(n, 1)).astype("float32"), rng.uniform(0.2, 2.0, size=n).astype("float32"))


def _fit_both(reference, piped, compile_kwargs, x, y, epochs=2, **fit_kwargs):
    histories = []
    for model in (reference, piped):
        model.compile(optimizer=keras.optimizers.SGD(0.1), **compile_kwargs)
        histories.append(model.fit(x, y, batch_size=B, epochs=epochs, shuffle=False, verbose=0,
                                   **fit_kwargs).history)
    return histories


def _assert_same(ref_logs: dict, pipe_logs: dict, rtol: float = 2e-5):
    assert sorted(pipe_logs) == sorted(ref_logs)
    for key, value in ref_logs.items():
        np.testing.assert_allclose(pipe_logs[key], value, rtol=rtol, atol=1e-6, err_msg=key)


def _assert_weights(reference, piped, rtol: float = 2e-5):
    ref = {v.path: v.numpy() for v in reference.weights}
    got = {v.path: v.numpy() for stage in piped.stage_layers for v in stage.weights}
    assert sorted(got) == sorted(ref)
    for path, value in ref.items():
        np.testing.assert_allclose(got[path], value, rtol=rtol, atol=1e-6, err_msg=path)


# --- finding 3: call-time losses, reductions, compute_loss ----------------------------------------

@pytest.mark.parametrize("m", [2, 3])
def test_activity_regularizer_and_add_loss_match_keras(m):
    x, y, *_ = _data(2 * B + 1)  # the last batch has 1 sample < M: one-sample micro-batches
    reference, piped = _pair(_single, m, activity=True, add_loss=True, l2=0.01)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    ref_hist, pipe_hist = _fit_both(reference, piped, {"loss": loss}, x, y, validation_data=(x[:5], y[:5]))
    _assert_same(ref_hist, pipe_hist)  # loss and val_loss (an odd batch of 5 < B, 5 > M)
    _assert_weights(reference, piped)
    _assert_same(reference.evaluate(x[:7], y[:7], batch_size=7, verbose=0, return_dict=True),
                 piped.evaluate(x[:7], y[:7], batch_size=7, verbose=0, return_dict=True))


@pytest.mark.parametrize("reductions", [("sum", "sum"), ("mean_with_sample_weight", "sum")])
def test_reductions_with_sample_weight_and_loss_weights_match_keras(reductions):
    x, _, y1, y2, weight = _data(2 * B + 2)  # the last batch has 2 samples < M=3
    reference, piped = _pair(_two, 3)
    compile_kwargs = {"loss": [keras.losses.MeanSquaredError(reduction=reductions[0]),
                               keras.losses.MeanAbsoluteError(reduction=reductions[1])],
                      "loss_weights": [0.7, 0.2]}
    ref_hist, pipe_hist = _fit_both(reference, piped, compile_kwargs, x, (y1, y2), sample_weight=weight)
    np.testing.assert_allclose(pipe_hist["loss"], ref_hist["loss"], rtol=2e-5)
    _assert_weights(reference, piped)
    _assert_same(ref_hist, pipe_hist)  # r1_loss, r2_loss: each output's unweighted loss


def test_reduction_none_is_refused_at_compile():
    _, piped = _pair(_two, 2)
    with pytest.raises(SettingError, match=r"reduction='none'.*sum_over_batch_size"):
        piped.compile(optimizer="sgd", loss=["mse", keras.losses.MeanSquaredError(reduction="none")])


def test_compute_loss_override_is_refused_before_compute():
    class Custom(pipeline.PipelineModel):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            return keras.ops.mean(keras.ops.square(y_pred - y))

    copy = _single()
    piped = Custom(pipeline.split(copy, cuts=["h"]), devices="cpu", microbatches=2)
    before = [v.numpy() for v in copy.weights]
    with pytest.raises(SettingError, match=r"Custom overrides compute_loss.*keras.losses.Loss subclass"):
        piped.compile(optimizer="sgd", loss="mse")
    keras.Model.compile(piped, optimizer="sgd", loss="mse")  # compile's check bypassed: fit still refuses
    x, _, y1, *_ = _data()
    with pytest.raises(SettingError, match="overrides compute_loss"):
        piped.fit(x, np.concatenate([y1, y1[:, :1]], axis=1), batch_size=B, verbose=0)
    for before_value, variable in zip(before, copy.weights):
        np.testing.assert_array_equal(variable.numpy(), before_value)


# --- finding 4: names, monitors, dict outputs ------------------------------------------------------

def test_single_output_names_match_keras():
    x, y, *_ = _data()
    reference, piped = _pair(_single, 2)
    compile_kwargs = {"loss": {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
                      "metrics": {"cls": ["accuracy"]}}
    ref_hist, pipe_hist = _fit_both(reference, piped, compile_kwargs, x, y, validation_data=(x, y))
    _assert_same(ref_hist, pipe_hist)  # the same keys as Keras (a dict loss crashed before), the same values


def test_two_outputs_with_the_same_loss_log_both_like_keras():
    x, _, y1, y2, _ = _data()
    reference, piped = _pair(_two, 2)
    compile_kwargs = {"loss": ["mse", "mse"], "loss_weights": [1.0, 0.5], "metrics": [["mae"], ["mae"]]}
    ref_hist, pipe_hist = _fit_both(reference, piped, compile_kwargs, x, (y1, y2),
                                    validation_data=(x[:6], (y1[:6], y2[:6])))
    assert {"r1_loss", "r2_loss", "val_r1_loss", "r1_mae", "r2_mae"} <= set(pipe_hist)
    _assert_same(ref_hist, pipe_hist)
    _assert_weights(reference, piped)


def test_early_stopping_on_a_per_output_loss_fires_like_keras():
    x, _, y1, y2, _ = _data()
    reference, piped = _pair(_two, 2)
    stops = []
    for model in (reference, piped):
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=["mse", "mse"])
        stop = keras.callbacks.EarlyStopping(monitor="val_r1_loss", mode="min", patience=1,
                                             min_delta=100.0)
        history = model.fit(x, (y1, y2), batch_size=B, epochs=6, shuffle=False, verbose=0,
                            validation_data=(x, (y1, y2)), callbacks=[stop])
        stops.append((len(history.history["val_r1_loss"]), stop.stopped_epoch))
    assert stops[0] == (2, 1)  # Keras stops after the second epoch: no improvement by min_delta
    assert stops[1] == stops[0]


def test_dict_outputs_from_split_match_keras():
    x, _, y1, y2, weight = _data()
    reference, piped = _pair(_two, 3, kind="dict")
    out = piped.stage_layers[-1](piped.stage_layers[0](x[:2]))
    assert isinstance(out, dict) and sorted(out) == ["a", "b"]
    compile_kwargs = {"loss": {"a": "mse", "b": keras.losses.MeanAbsoluteError()},
                      "loss_weights": {"a": 0.3, "b": 1.0}, "metrics": {"a": ["mae"], "b": ["mse"]}}
    ys = {"a": y1, "b": y2}
    ref_hist, pipe_hist = _fit_both(reference, piped, compile_kwargs, x, ys, sample_weight=weight,
                                    validation_data=(x[:6], {"a": y1[:6], "b": y2[:6]}))
    assert {"a_loss", "b_loss", "val_a_loss", "a_mae", "b_mse"} <= set(pipe_hist)
    _assert_same(ref_hist, pipe_hist)
    _assert_weights(reference, piped)
