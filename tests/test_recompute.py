"""Recomputation is exact: the unsplit model's gradients, state updates and trained weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import pipeline
from modelzoo import stateful_mlp as _stateful, two_stage_mlp
from pipeline.core import looped
from pipeline.core import microbatch as mb_lib
from pipeline.core import recompute
from pipeline.core.model import PipelineModel


def _mlp(seed=0):
    return two_stage_mlp(12, (16, 16), 16, 10, seed)


def _data(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 12)).astype("float32"), rng.integers(0, 10, size=n).astype("int32")


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture
def recomputed(monkeypatch):
    """The layers that really went through ``recompute.call``, or through the looped GPipe step, which
    recomputes every stage (so a comparison is not of two plain runs)."""
    layers = []
    real, real_looped = recompute.call, looped.LoopedGPipe.train

    def spy(layer, x, training=None):
        layers.append(layer.name)
        return real(layer, x, training=training)

    def looped_spy(self, *args, **kwargs):
        layers.extend(stage.layer.name for stage in self.stages)
        return real_looped(self, *args, **kwargs)

    monkeypatch.setattr(recompute, "call", spy)
    monkeypatch.setattr(looped.LoopedGPipe, "train", looped_spy)
    return layers


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("flags", [True, [False, True]])
def test_recomputed_gradients_equal_the_unsplit_models(schedule, m, flags, recomputed):
    x, y = _data()
    stages = _mlp()
    model = PipelineModel(stages, microbatches=m, schedule=schedule, recompute=flags)
    loss_fn = mb_lib.microbatch_loss(LOSS, tf.constant(y), None, m, len(x))

    @tf.function
    def pipelined():
        return model.executor.train(tf.constant(x), loss_fn).gradients

    got = [g.numpy() for grads in pipelined() for g in grads]
    assert set(recomputed) == ({"a", "b"} if flags is True else {"b"})
    # Reference: one plain tape over the whole (unsplit) model on the whole batch, the same mean loss.
    with tf.GradientTape() as tape:
        value = LOSS(y, stages[1](stages[0](x, training=True), training=True))
    want = tape.gradient(value, stages[0].trainable_variables + stages[1].trainable_variables)
    assert len(got) == len(want) == 8
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-6)


def _fit(model, x, y, batch, epochs=2):
    model.compile(keras.optimizers.Adam(1e-2), LOSS)
    keras.utils.set_random_seed(9)
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb_h1"])  # zb_h1: a split backward of a recomputed stage
@pytest.mark.parametrize("flags", [True, [True, False]])
def test_fit_with_recompute_trains_the_unsplit_models_weights(schedule, flags, recomputed):
    """4 optimizer steps at M=4 with recomputation: the weights the unsplit Keras model trains to."""
    x, y = _data(32)
    stages = _mlp(seed=5)
    _fit(PipelineModel(stages, microbatches=4, schedule=schedule, recompute=flags), x, y, batch=8)
    assert set(recomputed) == ({"a", "b"} if flags is True else {"a"})
    reference = keras.Sequential(_mlp(seed=5))  # same initial weights, not split
    _fit(reference, x, y, batch=8)
    got = [v.numpy() for s in stages for v in s.variables]
    want = [v.numpy() for v in reference.variables]
    assert len(got) == len(want) == 8
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_fit_with_recompute_batchnorm_and_dropout_trains_the_unsplit_models_weights(schedule, recomputed):
    """M=1 (BatchNorm sees the whole batch, as unsplit): the same dropout masks, moving statistics updated once."""
    x, y = _data(32)
    stages = _stateful(seed=5)
    _fit(PipelineModel(stages, microbatches=1, schedule=schedule, recompute=True), x, y, batch=16)
    assert set(recomputed) == {"a", "b"}
    reference = keras.Sequential(_stateful(seed=5))
    _fit(reference, x, y, batch=16)
    got = [v.numpy() for s in stages for v in s.variables]
    want = [v.numpy() for v in reference.variables]
    assert len(got) == len(want) == 12  # with the moving mean and variance and both dropout seed states
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_split_backward_of_recomputed_stages_with_batchnorm_and_dropout_gives_the_unsplit_gradients(recomputed):
    """ZB-H1 with recomputation asks the recomputed stage for B, then for W: both recompute under the state the
    forward saw (M=1: the same dropout masks as the unsplit model). Gradients, not Adam-trained weights: the Dense
    bias before BatchNorm has a zero gradient, whose float noise Adam's normalization turns into steps."""
    x, y = _data(32)
    stages = _stateful(seed=5)
    piped = PipelineModel(stages, microbatches=1, schedule="zb_h1", recompute=True)
    report = pipeline.verify(piped, x, y, LOSS)
    assert set(recomputed) == {"a", "b"}
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
def test_recompute_with_ghost_batches_trains_the_weights_of_no_recompute(schedule, recomputed):
    """At M=4 BatchNorm sees ghost batches (one micro-batch each), which the unsplit model has no equivalent of;
    here the reference is the same pipeline without recomputation: same dropout masks and BatchNorm
    statistics updated once per micro-batch, per micro-batch."""
    x, y = _data(32)
    weights = []
    for flag in (False, True):
        stages = _stateful(seed=5)
        _fit(PipelineModel(stages, microbatches=4, schedule=schedule, recompute=flag), x, y, batch=16, epochs=1)
        weights.append([v.numpy() for s in stages for v in s.variables])
    assert set(recomputed) == {"a", "b"}
    for p, q in zip(*weights):
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
