"""Step overhead: steady-state fit step timing and the work outside the stage actions, measured at M=1."""

import keras
import numpy as np
import pytest

from pipeline import overhead
from pipeline import simulate as sim
from pipeline.model import PipelineModel


def _pipeline(metrics=None):
    keras.utils.set_random_seed(0)
    a = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu")])
    b = keras.Sequential([keras.Input((16,)), keras.layers.Dense(4)])
    model = PipelineModel([a, b], devices=["/CPU:0", "/CPU:1"], microbatches=4, schedule="gpipe")
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", metrics=metrics)
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 8)).astype("float32"), rng.normal(size=(16, 4)).astype("float32")


def test_time_fit_step_counts_steps_between_batch_ends():
    model = _pipeline()
    x, y = _data()
    seen = []

    class Count(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(batch)

    original = model.fit

    def fit(*args, callbacks=None, **kwargs):
        return original(*args, callbacks=(callbacks or []) + [Count()], **kwargs)

    model.fit = fit
    step = overhead.time_fit_step(model, x, y, steps=3, calls=2)
    assert step > 0
    # One warm-up fit of 1 step, then 2 timed fits of steps + 1 = 4 batches (3 gaps each).
    assert seen == [0, 0, 1, 2, 3, 0, 1, 2, 3]


def test_step_overhead_is_the_m1_step_minus_its_simulated_actions_and_restores_weights():
    model = _pipeline(metrics=["mae"])
    x, y = _data()
    model.fit(x, y, batch_size=16, verbose=0)
    before = [w.copy() for s in model.stages for w in s.layer.get_weights()]
    iterations = int(model.optimizer.iterations.numpy())
    zero = [sim.StageCost(0.0, 0.0), sim.StageCost(0.0, 0.0)]
    whole_step = overhead.measure_step_overhead(model, x, y, zero, steps=3, calls=1)
    assert whole_step > 0  # nothing subtracted: the whole M=1 step
    assert overhead.measure_step_overhead(model, x, y, [sim.StageCost(10.0, 10.0)] * 2, steps=3, calls=1) == 0.0
    after = [w for s in model.stages for w in s.layer.get_weights()]
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

