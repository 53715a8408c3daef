"""Step overhead: steady-state fit step timing and the work outside the stage actions, measured at M=1."""

import keras
import numpy as np
import pytest

from pipeline.errors import MeasureError
from pipeline.perf import overhead
from pipeline.perf import trace
from pipeline.core.model import PipelineModel


def _pipeline(metrics=None):
    keras.utils.set_random_seed(0)
    a = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dropout(0.3)])
    b = keras.Sequential([keras.Input((16,)), keras.layers.Dense(4)])
    model = PipelineModel([a, b], devices=["/CPU:0", "/CPU:1"], microbatches=4, schedule="gpipe")
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", metrics=metrics)
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 8)).astype("float32"), rng.normal(size=(16, 4)).astype("float32")


def _record_batch_ends(model):
    """Adds a callback to every ``model.fit`` call that records the batch indices Keras reports."""
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(batch)

    original = model.fit
    model.fit = lambda *a, callbacks=None, **k: original(*a, callbacks=(callbacks or []) + [Record()], **k)
    return seen


class _Clock:
    """``time`` stand-in whose ``perf_counter`` advances by 1.0 per call (one call per batch end)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


def test_time_fit_step_counts_steps_between_batch_ends(monkeypatch):
    model = _pipeline()
    x, y = _data()
    seen = _record_batch_ends(model)
    monkeypatch.setattr(overhead, "time", _Clock())
    assert overhead.time_fit_step(model, x, y, steps=3, calls=2) == 1.0  # one clock tick per step
    # One warm-up fit of 1 step, then 2 timed fits of steps + 1 = 4 batches (3 gaps each).
    assert seen == [0, 0, 1, 2, 3, 0, 1, 2, 3]


def test_time_fit_step_divides_gaps_by_steps_per_execution(monkeypatch):
    model = _pipeline()
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", steps_per_execution=2)
    x, y = _data()
    seen = _record_batch_ends(model)
    monkeypatch.setattr(overhead, "time", _Clock())
    assert overhead.time_fit_step(model, x, y, steps=5, calls=1) == 0.5  # one tick per report of 2 steps
    assert seen[-3:] == [1, 3, 5]
    with pytest.raises(MeasureError, match="fewer than two batch ends"):
        overhead.time_fit_step(model, x, y, steps=1, calls=1)


def test_time_fit_step_keeps_a_list_of_inputs_a_list():
    keras.utils.set_random_seed(0)
    a, b = keras.Input((3,)), keras.Input((5,))
    out = keras.layers.Dense(2)(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], out)
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(4, 5)).astype("float32")]
    assert overhead.time_fit_step(model, x, np.zeros((4, 2), "float32"), steps=2, calls=1) > 0


def test_step_overhead_is_the_fit_step_minus_the_bare_executor_step(monkeypatch):
    model = _pipeline()
    x, y = _data()
    model.fit(x, y, batch_size=16, verbose=0)
    ran = []

    def bare_step_time(step, repeats):
        ran.append(step())  # the executor step really runs: loss and gradients of the M=1 step
        return 0.004

    monkeypatch.setattr(overhead, "time_fit_step", lambda twin, *a, **k: 0.010 if twin.microbatches == 1 else 1.0)
    monkeypatch.setattr(trace, "median_time", bare_step_time)
    assert overhead.measure_step_overhead(model, x, y, steps=2, calls=1) == pytest.approx(0.006)
    loss, grads = ran[0]
    assert float(loss) > 0 and len(grads) == 2  # one gradient list per stage
    monkeypatch.setattr(trace, "median_time", lambda step, repeats: 0.02)
    assert overhead.measure_step_overhead(model, x, y, steps=2, calls=1) == 0.0  # never negative


def test_step_overhead_restores_every_variable_and_leaves_the_optimizer_alone():
    model = _pipeline(metrics=["mae"])
    x, y = _data()
    model.fit(x, y, batch_size=16, verbose=0)
    before = [v.numpy().copy() for s in model.stages for v in s.layer.variables]
    iterations = int(model.optimizer.iterations.numpy())
    overhead.measure_step_overhead(model, x, y, steps=3, calls=1)  # runs real twin fits (SGD, lr 0.5)
    after = [v.numpy() for s in model.stages for v in s.layer.variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))  # the twin's SGD steps (lr 0.5) were undone
    assert int(model.optimizer.iterations.numpy()) == iterations  # the twin had its own optimizer


def test_unpipelined_twin_shares_layers_devices_and_compile_settings():
    model = _pipeline(metrics=["mae"])
    x, y = _data()
    model.fit(x, y, batch_size=16, verbose=0)
    twin = overhead._unpipelined_twin(model)
    assert twin.microbatches == 1
    assert [s.layer for s in twin.stages] == [s.layer for s in model.stages]
    assert [s.device for s in twin.stages] == [s.device for s in model.stages]
    assert twin.optimizer is not model.optimizer
    assert twin.optimizer.get_config()["learning_rate"] == pytest.approx(0.5)
    logs = twin.fit(x, y, batch_size=16, verbose=0).history
    assert set(logs) == {"loss", "mae"}



def test_twin_without_a_serializable_compile_config_keeps_optimizer_and_loss(monkeypatch):
    model = _pipeline(metrics=["mae"])
    monkeypatch.setattr(model, "get_compile_config", lambda: (_ for _ in ()).throw(RuntimeError("custom metric")))
    with pytest.warns(UserWarning, match="without metrics"):
        twin = overhead._unpipelined_twin(model)
    assert twin.optimizer is not model.optimizer and twin.loss == "mse"


def test_twin_runs_gpipe_without_the_gradient_reducer():
    model = _pipeline()
    model.gradient_reducer = lambda grads, variables: grads
    twin = overhead._unpipelined_twin(model)
    assert twin.executor.schedule_name == "gpipe" and twin.gradient_reducer is None
