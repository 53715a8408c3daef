"""mixed_float16 loss scaling across stages and check_numerics, compared with the unsplit Keras model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import pipeline
from pipeline.errors import NumericsError, SettingError

MARK = 100.0
"""A sample whose feature 0 exceeds this triggers the Gate layer's gradient factor."""


@pytest.fixture(autouse=True)
def _float32_after():
    yield
    keras.mixed_precision.set_global_policy("float32")


class Gate(keras.layers.Layer):
    """``Gate(factor)([h, x])`` is ``h``; its backward multiplies the gradient of the samples with
    ``x[:, 0] > MARK`` by ``factor`` (in the compute dtype): an fp16 overflow (6e4) or a NaN."""

    def __init__(self, factor: float, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, inputs):
        h, x = inputs
        marked = x[:, :1] > MARK
        factor = tf.cast(self.factor, h.dtype)

        @tf.custom_gradient
        def gate(t):
            def grad(dy):
                return tf.where(marked, dy * factor, dy)
            return tf.identity(t), grad

        return gate(h)


class Sqrt(keras.layers.Layer):
    """sqrt(x): NaN for a negative input (a forward NaN)."""

    def call(self, x):
        return tf.sqrt(x)


def _model(seed: int = 0, factor: float = 6e4, width: int = 16) -> keras.Model:
    keras.utils.set_random_seed(seed)
    x = keras.Input((8,))
    h = keras.layers.Dense(width, activation="tanh", name="d1")(x)
    h = Gate(factor, name="gate")([h, x])
    h = keras.layers.Dense(width, activation="relu", name="d2")(h)
    h = keras.layers.Dense(width, activation="tanh", name="d3")(h)
    out = keras.layers.Dense(3, dtype="float32", name="out")(h)
    return keras.Model(x, out)


def _data(n: int, marked: tuple[int, ...] = (), seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    x[list(marked), 0] = 2 * MARK
    return x, rng.integers(0, 3, size=n).astype("int32")


def _lso(initial_scale: float = 2.0 ** 10, growth: int = 4):
    return keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05), initial_scale=initial_scale,
                                               dynamic_growth_steps=growth)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class _Record(keras.callbacks.Callback):
    """After each batch: the loss scale, the iteration count, the loss and (per stage) the weights."""

    def __init__(self, parts):
        super().__init__()
        self.parts, self.scales, self.iterations, self.losses, self.weights = parts, [], [], [], []

    def on_train_batch_end(self, batch, logs=None):
        self.scales.append(float(self.model.optimizer.dynamic_scale.numpy()))
        self.iterations.append(int(self.model.optimizer.iterations.numpy()))
        self.losses.append(float(logs["loss"]))
        self.weights.append([[w.copy() for w in part.get_weights()] for part in self.parts])


def _fit_pair(x, y, batch: int, m: int, optimizer, **fit):
    """Trains the unsplit model and the 2-stage pipeline (M=m) from the same weights; returns both records."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    reference, model = _model(), _model()
    reference.compile(optimizer(), _loss())
    stages = pipeline.split(model, cuts=["d2"])
    piped = pipeline.PipelineModel(stages, devices=["/CPU:0", "/CPU:1"], microbatches=m)
    piped.compile(optimizer(), _loss())
    assert isinstance(piped.optimizer, keras.optimizers.LossScaleOptimizer)
    records = _Record([reference]), _Record(stages)
    reference.fit(x, y, batch_size=batch, shuffle=False, verbose=0, callbacks=[records[0]], **fit)
    piped.fit(x, y, batch_size=batch, shuffle=False, verbose=0, callbacks=[records[1]], **fit)
    return reference, stages, records


def test_twenty_steps_match_keras_skips_scale_history_and_weights():
    x, y = _data(160, marked=(6 * 8 + 3, 13 * 8 + 5))  # overflows at steps 6 and 13 (0-based)
    reference, stages, (ref, pipe) = _fit_pair(x, y, batch=8, m=2, optimizer=_lso)
    assert len(pipe.scales) == 20
    assert pipe.scales == ref.scales
    assert pipe.iterations == ref.iterations
    skipped = [i for i in range(20) if pipe.iterations[i] == (pipe.iterations[i - 1] if i else 0)]
    assert skipped == [6, 13]
    assert pipe.scales[6] == pipe.scales[5] / 2 and max(pipe.scales) > 2.0 ** 10  # halved, and grown
    # Only stage 0's d1 gradients overflow there (stage 1's are finite): the one decision holds stage 1 too.
    for step in skipped:  # every stage kept its weights on the skipped step
        for before, after in zip(pipe.weights[step - 1], pipe.weights[step]):
            for a, b in zip(before, after):
                np.testing.assert_array_equal(a, b)
    for before, after in zip(pipe.weights[7], pipe.weights[8]):  # and trains on the others
        assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    np.testing.assert_allclose(pipe.losses, ref.losses, rtol=1e-4)  # unscaled, as Keras logs it
    assert np.isfinite(pipe.losses[5]) and pipe.losses[5] < 5
    merged = [w for part in pipe.weights[-1] for w in part]
    for a, b in zip(merged, reference.get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-4)  # measured: 2.3e-5 (weights move ~4e-2)


def test_batch_smaller_than_microbatches_under_loss_scaling():
    x, y = _data(19, marked=(17,))  # batches 8, 8, 3 < M=4: the last one through the one-by-one path
    reference, stages, (ref, pipe) = _fit_pair(x, y, batch=8, m=4, epochs=2,
                                               optimizer=lambda: _lso(2.0 ** 10, growth=2))
    assert pipe.scales == ref.scales and pipe.iterations == ref.iterations
    assert ref.iterations == [1, 2, 2, 3, 4, 4]  # the marked sample's batch is skipped each epoch
    merged = [w for part in pipe.weights[-1] for w in part]
    for a, b in zip(merged, reference.get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-4)


def test_automatic_loss_scale_optimizer_and_a_wrapper_it_cannot_honour():
    x, y = _data(16)
    _, _, (ref, pipe) = _fit_pair(x, y, batch=8, m=2, optimizer=lambda: keras.optimizers.SGD(0.05))
    assert pipe.scales == ref.scales == [2.0 ** 15] * 2 and pipe.iterations == [1, 2]

    class Custom(keras.optimizers.LossScaleOptimizer):
        def scale_loss(self, loss):
            return loss * 3.0

    keras.mixed_precision.set_global_policy("mixed_float16")
    piped = pipeline.PipelineModel(pipeline.split(_model(), cuts=["d2"]), devices="cpu", microbatches=2)
    piped.compile(Custom(keras.optimizers.SGD(0.1)), _loss())
    with pytest.raises(SettingError, match="optimizer: got Custom.*overriding scale_loss"):
        piped.fit(x, y, batch_size=8, shuffle=False, verbose=0)


# --- check_numerics ----------------------------------------------------------------------------

def _nan_model(where: str) -> list[keras.Model]:
    """Stage 0: d1 -> Gate -> d2 (identity-initialised); stage 1: Sqrt (forward NaN) or [Gate ->] Dense -> out."""
    keras.utils.set_random_seed(0)
    x = keras.Input((8,))
    h = keras.layers.Dense(8, name="d1")(x)
    h = Gate(float("nan") if where == "gradient" else 1.0, name="gate")([h, x])
    h = keras.layers.Dense(8, kernel_initializer="identity", name="d2")(h)
    if where == "forward":
        h = Sqrt(name="sqrt")(h)
    else:
        if where == "cut":  # stage 1 starts with a gate: its input (cut-layer) gradient turns NaN
            h = Gate(float("nan"), name="gate2")([h, h])
        h = keras.layers.Dense(8, activation="tanh", name="d3")(h)
    out = keras.layers.Dense(3, name="out")(h)
    return pipeline.split(keras.Model(x, out), cuts=["d2"])


def _nan_data(where: str):
    x = np.abs(np.random.default_rng(0).normal(size=(8, 8))).astype("float32")
    if where == "forward":
        x[5] = -1.0  # micro-batch 1 (samples 4..7) gets a negative input at d2 -> sqrt NaN in stage 1
    else:
        x[6, 0] = 2 * MARK  # micro-batch 1: the Gate's backward turns stage 0's gradient NaN
    return x, np.zeros(8, "int32")


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_check_numerics_names_a_forward_nan_in_stage_1(run_eagerly):
    stages = _nan_model("forward")
    stages[0].get_layer("d1").set_weights([np.eye(8, dtype="float32"), np.zeros(8, "float32")])
    piped = pipeline.PipelineModel(stages, devices="cpu", microbatches=2, check_numerics=True)
    piped.compile(keras.optimizers.SGD(0.1), _loss(), run_eagerly=run_eagerly)
    x, y = _nan_data("forward")
    with pytest.raises(NumericsError, match=r"NaN values first appeared at stage 1, micro-batch 1, in the "
                                            r"activation output") as info:
        piped.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    assert (info.value.stage, info.value.microbatch, info.value.tensor) == (1, 1, "activation output")


def test_check_numerics_names_the_cut_layer_gradient_where_a_nan_appears():
    stages = _nan_model("cut")
    stages[0].get_layer("d1").set_weights([np.eye(8, dtype="float32"), np.zeros(8, "float32")])
    piped = pipeline.PipelineModel(stages, devices="cpu", microbatches=2, check_numerics=True)
    piped.compile(keras.optimizers.SGD(0.1), _loss())
    x, y = _nan_data("cut")
    with pytest.raises(NumericsError, match=r"stage 1, micro-batch 1, in the cut-layer gradient \(of stage 1's input"):
        piped.fit(x, y, batch_size=8, shuffle=False, verbose=0)


def test_check_numerics_names_the_weight_gradient_where_a_nan_appears():
    piped = pipeline.PipelineModel(_nan_model("gradient"), devices="cpu", microbatches=2, check_numerics=True)
    piped.compile(keras.optimizers.SGD(0.1), _loss())
    x, y = _nan_data("gradient")
    with pytest.raises(NumericsError, match=r"stage 0, micro-batch 1, in the weight gradient of 'd1/kernel'"):
        piped.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    piped.compile(keras.optimizers.SGD(0.1), _loss())
    with pytest.raises(NumericsError, match=r"stage 0, micro-batch 0, in the weight gradient of 'd1/kernel'"):
        piped.train_on_batch(x[6:], y[6:])  # the marked sample is in micro-batch 0 of this batch


def test_check_numerics_off_changes_nothing_and_adds_no_op():
    x, y = _data(16)
    weights = []
    for flag in (False, True):
        stages = pipeline.split(_model(), cuts=["d2"])
        piped = pipeline.PipelineModel(stages, devices="cpu", microbatches=2, check_numerics=flag)
        piped.compile(keras.optimizers.SGD(0.1), _loss())
        history = piped.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        weights.append((piped.get_weights(), history.history["loss"]))
        spec = (tf.TensorSpec((8, 8), tf.float32), tf.TensorSpec((8,), tf.int32))
        graph = tf.function(piped.train_step).get_concrete_function(spec).graph
        checks = [op for op in graph.get_operations() if op.type == "CheckNumerics"]
        assert (len(checks) > 0) == flag, len(checks)
    (off, loss_off), (on, loss_on) = weights
    assert loss_off == loss_on
    for a, b in zip(off, on):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(SettingError, match=r"check_numerics: got 'yes'; must be True or False"):
        pipeline.PipelineModel(pipeline.split(_model(), cuts=["d2"]), check_numerics="yes")


def test_check_numerics_under_loss_scaling_reports_the_skipped_overflow(capfd):
    x, y = _data(16, marked=(3,))
    keras.mixed_precision.set_global_policy("mixed_float16")
    runs = []
    for flag in (False, True):
        stages = pipeline.split(_model(), cuts=["d2"])
        piped = pipeline.PipelineModel(stages, devices="cpu", microbatches=2, check_numerics=flag)
        piped.compile(_lso(2.0 ** 10), _loss())
        piped.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        runs.append((piped.get_weights(), int(piped.optimizer.iterations.numpy()),
                     float(piped.optimizer.dynamic_scale.numpy())))
    assert runs[0][1:] == runs[1][1:] == (1, 2.0 ** 9)  # first batch skipped, not raised
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(a, b)
    err = capfd.readouterr().err
    assert "[pipeline-numerics] stage 0, micro-batch 0: weight gradient of 'd1/kernel'" in err
