"""The README's low-level loop (Stage + Executor in your own tf.function) trains like the unsplit model."""

import keras
import numpy as np
import tensorflow as tf

import pipeline
from modelzoo import BUILDERS, data
from pipeline import Stage
from pipeline.core import microbatch
from pipeline.core.executor import Executor


def test_readme_low_level_loop_matches_unsplit():
    model = BUILDERS["cnn"][0]()
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    model_0, model_1 = pipeline.split(model, cuts=["flatten"])

    stages = [Stage(model_0, "/CPU:0", 0, 2), Stage(model_1, "/CPU:1", 1, 2)]
    for stage in stages:
        stage.place()
    executor = Executor(stages, "1f1b", num_microbatches=4)
    optimizer = keras.optimizers.Adam(1e-2)
    optimizer.build([v for stage in stages for v in stage.trainable_variables])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(x, y):
        loss_fn = microbatch.microbatch_loss(loss, y, None, 4, tf.shape(y)[0])  # mean loss x share of batch
        result = executor.train(x, loss_fn)
        grads, variables = zip(*result.pairs(stages))
        optimizer.apply(list(grads), list(variables))
        return result.loss

    x, y = data("cnn", n=48, seed=7)
    losses = [float(train_step(tf.constant(x[i:i + 16]), tf.constant(y[i:i + 16]))) for i in (0, 16, 32)]
    reference.compile(keras.optimizers.Adam(1e-2), loss)
    history = reference.fit(x, y, batch_size=16, shuffle=False, epochs=1, verbose=0)
    for got, want in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert abs(np.mean(losses) - history.history["loss"][0]) < 1e-5
    assert {tf.DeviceSpec.from_string(v.value.device).device_index for v in optimizer.variables[2:]} == {0, 1}
