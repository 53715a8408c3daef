"""Recomputation is exact: same gradients, same state updates, same trained weights as without it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from modelzoo import two_stage_mlp
from pipeline.core import recompute
from pipeline.core.model import PipelineModel
from pipeline.core.verify import verify


def _mlp(seed=0):
    return two_stage_mlp(12, (16, 16), 16, 10, seed)


def _stateful(seed=0):
    """Stages with BatchNorm (moving statistics) and Dropout (seed state)."""
    keras.utils.set_random_seed(seed)
    a = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                          keras.layers.Activation("relu"), keras.layers.Dropout(0.3)], name="a")
    b = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16, activation="tanh"),
                          keras.layers.Dropout(0.2), keras.layers.Dense(10)], name="b")
    return [a, b]


def _data(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 12)).astype("float32"), rng.integers(0, 10, size=n).astype("int32")


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("m", [1, 4])
def test_recomputed_pipeline_matches_unsplit(schedule, m):
    x, y = _data()
    model = PipelineModel(_mlp(), microbatches=m, schedule=schedule, recompute=True)
    report = verify(model, x, y, LOSS)
    assert report.ok, str(report)


def test_call_equals_plain_call_with_batchnorm_and_dropout():
    layer = _stateful()[0]
    x = tf.random.stateless_normal((8, 12), seed=(1, 2))

    def run(use_recompute):
        keras.utils.set_random_seed(3)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = recompute.call(layer, x, training=True) if use_recompute else layer(x, training=True)
            value = tf.reduce_sum(out * out)
        grads = tape.gradient(value, [x] + layer.trainable_variables)
        state = [v.numpy().copy() for v in layer.non_trainable_variables]
        return [value] + grads, state

    start = [v.numpy().copy() for v in layer.non_trainable_variables]
    plain, plain_state = run(False)
    for v, s in zip(layer.non_trainable_variables, start):
        v.assign(s)
    again, again_state = run(True)
    for p, q in zip(plain, again):
        np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-7)
    for p, q in zip(plain_state, again_state):
        np.testing.assert_array_equal(p, q)  # moving statistics updated once, not twice


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_fit_with_recompute_trains_the_same_weights(schedule):
    x, y = _data(32)
    weights = []
    for flag in (False, [True, False], True):
        stages = _stateful(seed=5)
        model = PipelineModel(stages, microbatches=4, schedule=schedule, recompute=flag)
        model.compile(keras.optimizers.Adam(1e-2), LOSS)
        keras.utils.set_random_seed(9)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        weights.append([v.numpy() for s in stages for v in s.variables])
    for other in weights[1:]:
        for p, q in zip(weights[0], other):
            np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)


def test_stage_flag_and_count_check():
    model = PipelineModel(_mlp(), recompute=[False, True])
    assert [s.recompute for s in model.stages] == [False, True]
    with pytest.raises(ValueError, match=r"recompute lists 3 flag\(s\) for 2 stage\(s\)"):
        PipelineModel(_mlp(), recompute=[True, True, False])


def test_call_losses_are_rejected():
    layer = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activity_regularizer="l2")])
    with pytest.raises(recompute.RecomputeError, match="adds losses during its call"):
        recompute.call(layer, tf.ones((2, 4)), training=True)
