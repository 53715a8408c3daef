"""GPipe with every stage recomputed runs as tick loops: the unsplit model's gradients and weights, and a
step graph that does not grow with the micro-batch count M."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import pipeline
from modelzoo import BUILDERS, data, loss, stateful_mlp, two_stage_mlp
from pipeline.core import looped
from pipeline.core import microbatch as mb_lib
from pipeline.perf.bench_build import _graph_ops


@pytest.fixture
def looped_runs(monkeypatch):
    """How many looped steps were built (a test of the looped path must not pass on the unrolled one)."""
    runs = []
    real = looped.LoopedGPipe.train

    def spy(self, *args, **kwargs):
        runs.append(self.num_microbatches)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(looped.LoopedGPipe, "train", spy)
    return runs


@pytest.mark.parametrize("kind", ["cnn", "residual"])
@pytest.mark.parametrize("k,m", [(2, 6), (3, 7), (4, 8), (2, 16)])
def test_looped_gradients_equal_unsplit(kind, k, m, looped_runs):
    """Fill, loop and drain ticks; uneven micro-batches (16 / 6, 16 / 7)."""
    build, cuts, _ = BUILDERS[kind]
    stages = pipeline.split(build(), cuts=cuts[k])
    x, y = data(kind, n=16)
    model = pipeline.PipelineModel(stages, microbatches=m, schedule="gpipe", recompute=True, loop=True)
    report = pipeline.verify(model, x, y, loss())
    assert looped_runs == [m]
    assert report.ok, str(report)
    assert abs(report.loss_pipelined - report.loss_unsplit) < 1e-5


def _step_graph_ops(m: int, unrolled: bool) -> int:
    stages = two_stage_mlp(12, (16, 16), 16, 10)
    model = pipeline.PipelineModel(stages, microbatches=m, schedule="gpipe", recompute=True, loop=not unrolled)
    x = tf.zeros((48, 12))
    loss_fn = mb_lib.microbatch_loss(loss(), tf.zeros((48,), tf.int32), None, m, 48)

    @tf.function
    def step(inp):
        return model.executor.train(inp, loss_fn).loss

    return _graph_ops(step.get_concrete_function(x).graph)


def test_step_graph_does_not_grow_with_m(looped_runs):
    """The same ops (loop body included) at M=6 and M=24; the unrolled step of the same model grows."""
    assert _step_graph_ops(6, unrolled=False) == _step_graph_ops(24, unrolled=False)
    assert looped_runs == [6, 24]
    assert _step_graph_ops(24, unrolled=True) > _step_graph_ops(6, unrolled=True) + 200  # 18 more micro-batches


def test_looped_batchnorm_and_dropout_train_the_weights_of_the_unrolled_step(looped_runs):
    """M=6 > K+1 (ticks in the loop): the same dropout masks and BatchNorm statistics, updated once per
    micro-batch and in micro-batch order, as the unrolled GPipe step with recomputation."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(36, 12)).astype("float32"), rng.integers(0, 10, 36).astype("int32")
    weights = []
    for unrolled in (True, False):
        stages = stateful_mlp(seed=5)
        model = pipeline.PipelineModel(stages, microbatches=6, schedule="gpipe", recompute=True, loop=not unrolled)
        model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        keras.utils.set_random_seed(9)
        model.fit(x, y, batch_size=12, epochs=2, shuffle=False, verbose=0)
        weights.append([v.numpy() for s in stages for v in s.variables])
    assert looped_runs  # the second fit ran looped
    assert len(weights[0]) == 12  # moving mean and variance, both dropout seed states
    for p, q in zip(*weights):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)


def test_fit_with_a_short_last_batch_trains_the_unsplit_models_weights(looped_runs):
    """38 samples in batches of 10 at M=6: the last batch of 8 has uneven micro-batches, sized at run time."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(38, 12)).astype("float32"), rng.integers(0, 10, 38).astype("int32")
    stages = two_stage_mlp(12, (16, 16), 16, 10, seed=3)
    reference = keras.Sequential(two_stage_mlp(12, (16, 16), 16, 10, seed=3))
    model = pipeline.PipelineModel(stages, microbatches=6, schedule="gpipe", recompute=True, loop=True)
    for m in (model, reference):
        m.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        m.fit(x, y, batch_size=10, epochs=2, shuffle=False, verbose=0)
    assert looped_runs
    for p, q in zip([v.numpy() for s in stages for v in s.variables], [v.numpy() for v in reference.variables]):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)


def test_without_loop_or_below_k_plus_4_the_step_is_unrolled(looped_runs):
    stages = two_stage_mlp(12, (16, 16), 16, 10)
    x, y = data("residual", n=16)[0][:, :12], data("residual", n=16)[1]
    # loop=False (the default), and loop=True below M = K + MIN_LOOP_TICKS
    for flags, m, loop in ((True, 8, False), (True, 2 + looped.MIN_LOOP_TICKS - 1, True)):
        model = pipeline.PipelineModel(stages, microbatches=m, schedule="gpipe", recompute=flags, loop=loop)
        report = pipeline.verify(model, x, y, loss())
        assert report.ok, str(report)
    assert looped_runs == []


@pytest.mark.parametrize("schedule,flags", [("1f1b", True), ("gpipe", [True, False]), ("gpipe", False)])
def test_loop_without_gpipe_and_full_recompute_is_refused_before_any_compute(schedule, flags):
    with pytest.raises(pipeline.errors.SettingError, match="loop=True"):
        pipeline.PipelineModel(two_stage_mlp(12, (16, 16), 16, 10), microbatches=8, schedule=schedule,
                               recompute=flags, loop=True)


def test_loop_is_saved_with_the_model(tmp_path):
    model = pipeline.PipelineModel(two_stage_mlp(12, (16, 16), 16, 10), microbatches=8, schedule="gpipe",
                                   recompute=True, loop=True)
    model.compile("sgd", loss())
    model.save(tmp_path / "m.keras")
    assert keras.models.load_model(tmp_path / "m.keras").executor.loop is True


def test_keras_application_with_batchnorm_runs_looped_and_matches_the_ghost_batch_reference(looped_runs):
    """MobileNetV2 (weights=None, 32x32, BatchNorm everywhere) in K=2 stages, M=6, graph mode: verify's
    reference runs the unsplit model on the same six ghost batches; gradients and moving statistics agree.

    In float64: BatchNorm over 8-sample ghost batches amplifies float32 rounding about 1e4-fold in the
    first layers' gradients, by how much depends on the processor's kernels (1.3e-3 of the largest gradient
    on one machine, 1e-4 on another; any schedule, looped or not). In float64 the pipelined and the unsplit
    gradients agree to 1e-7 of the largest (the float32 gradient sums), on any machine."""
    floatx = keras.config.floatx()
    keras.config.set_floatx("float64")
    try:
        keras.utils.set_random_seed(3)
        model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
        stages = pipeline.split(model, num_stages=2)
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(48, 32, 32, 3)), (np.arange(48) % 10).astype("int32")
        piped = pipeline.PipelineModel(stages, microbatches=6, schedule="gpipe", recompute=True, loop=True)
        report = pipeline.verify(piped, x, y, "sparse_categorical_crossentropy", rtol=1e-6)
    finally:
        keras.config.set_floatx(floatx)
    assert looped_runs == [6]
    assert report.ok, str(report)
