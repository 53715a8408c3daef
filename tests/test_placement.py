"""Placement is real: variables, optimizer slots and gradient accumulators live on their stage's device."""

import keras
import numpy as np
import tensorflow as tf

import pipeline
from modelzoo import BUILDERS, data, loss
from pipeline.core.executor import Executor


def _index(device: str) -> int:
    return tf.DeviceSpec.from_string(device).device_index


def test_variables_and_optimizer_slots_on_stage_devices():
    model = BUILDERS["cnn"][0]()  # built on CPU:0 before the pipeline exists
    stages = pipeline.split(model, cuts=["conv_b", "flatten"])
    piped = pipeline.PipelineModel(stages, devices=["/CPU:1", "/CPU:2", "/CPU:3"], microbatches=2)
    x, y = data("cnn", n=8)
    piped.compile(keras.optimizers.Adam(), loss())
    piped.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for i, stage_model in enumerate(stages):
        for v in stage_model.variables:
            assert _index(v.value.device) == i + 1, (v.path, v.value.device)
    optimizer = piped.optimizer
    # Adam's slots: every optimizer variable but its two scalar counters (iteration, learning rate).
    slots = [v for v in optimizer.variables
             if v is not optimizer.iterations and not v.path.endswith("learning_rate")]
    trainable = [(i, var) for i, stage_model in enumerate(stages) for var in stage_model.trainable_variables]
    assert len(slots) == 2 * len(trainable) > 0
    # Wherever their names come from: slot devices and shapes are those of the stage variables, twice each.
    got = sorted((_index(s.value.device), tuple(s.shape)) for s in slots)
    want = sorted([(i + 1, tuple(var.shape)) for i, var in trainable] * 2)
    assert got == want
    # By name: each variable's momentum and velocity sit on its stage's device.
    by_path = {s.path: s for s in slots}
    for i, var in trainable:
        for kind in ("momentum", "velocity"):
            slot = by_path[f"{optimizer.name}/{var.path.replace('/', '_')}_{kind}"]
            assert _index(slot.value.device) == i + 1, (slot.path, slot.value.device)


def test_unbuilt_stages_are_built_on_their_devices():
    m0 = keras.Sequential([keras.layers.Dense(5, activation="relu")])
    m1 = keras.Sequential([keras.layers.Dense(3)])
    piped = pipeline.PipelineModel([m0, m1], devices=["/CPU:2", "/CPU:3"], microbatches=2)
    piped.compile(keras.optimizers.Adam(), "mse")
    piped.fit(np.ones((4, 7), "float32"), np.zeros((4, 3), "float32"), verbose=0)
    assert {_index(v.value.device) for v in m0.variables} == {2}
    assert {_index(v.value.device) for v in m1.variables} == {3}


def test_gradient_accumulators_on_stage_devices():
    model = BUILDERS["residual"][0]()
    stages = pipeline.split(model, cuts=["add", "d3"])
    piped = pipeline.PipelineModel(stages, devices=["/CPU:3", "/CPU:1", "/CPU:2"], microbatches=4)
    x, y = data("residual", n=8)
    lossf = loss()
    executor = Executor(piped.stages, "1f1b", 4)
    result = executor.train(tf.constant(x), lambda j, yp: lossf(y[2 * j: 2 * j + 2], yp) / 4)
    for stage, grads in zip(piped.stages, result.gradients):
        assert grads and all(_index(g.device) == _index(stage.device) for g in grads)


def test_one_f_one_b_bounds_in_flight_microbatches_by_counting():
    """Count live tapes while really running (eagerly), not by trusting the generator."""
    model = BUILDERS["cnn"][0]()
    stages = pipeline.split(model, cuts=["conv_a", "conv_b", "dense_a"])
    x, y = data("cnn", n=16)
    lossf = loss()
    for schedule, expected in (("1f1b", [4, 3, 2, 1]), ("gpipe", [8, 8, 8, 8])):
        piped = pipeline.PipelineModel(stages, microbatches=8, schedule=schedule)
        executor = piped.executor
        live = [0] * 4
        peaks = [0] * 4
        seen = []

        def hook(action):
            seen.append(str(action))

        executor.action_hook = hook
        for stage in piped.stages:
            stage.peak_in_flight = 0
        executor.train(tf.constant(x), lambda j, yp: lossf(y[2 * j: 2 * j + 2], yp) / 8)
        for a in seen:  # replay the order the actions actually ran in
            s = int(a[0])
            live[s] += 1 if a[1] == "F" else -1
            peaks[s] = max(peaks[s], live[s])
        assert peaks == expected
        assert [stage.peak_in_flight for stage in piped.stages] == expected


def test_graph_mode_devices_follow_their_schedule_rows():
    """In the compiled step, count from a profiler trace of a real run: each device runs its row in order,
    so 1F1B keeps at most K-i micro-batches in flight on stage i and GPipe all M."""
    from pipeline.perf.trace import run_measured

    model = BUILDERS["cnn"][0]()
    stages = pipeline.split(model, cuts=["conv_a", "conv_b", "dense_a"])
    x, y = data("cnn", n=16)
    for schedule, expected in (("1f1b", [4, 3, 2, 1]), ("gpipe", [8, 8, 8, 8])):
        piped = pipeline.PipelineModel(stages, microbatches=8, schedule=schedule)
        rows_of = [[str(a) for a in row] for row in piped.executor.train_schedule]
        # The order is read from a profiler trace: on a loaded machine two adjacent forwards can be recorded
        # crossed. A wrong order fails every measurement;
        # a measurement artifact does not repeat: up to three traces, every device must match in one of them.
        for _attempt in range(3):
            _, timeline, _ = run_measured(piped.stages, x, y, loss(), schedule, 8, steps=1)
            # by end: each action's ops wait for the previous action's outputs (a few label-only ops may not)
            per_stage = [sorted((iv for iv in timeline if iv.action.stage == s), key=lambda iv: iv.end)
                         for s in range(4)]
            if all([str(iv.action) for iv in rows] == rows_of[s] for s, rows in enumerate(per_stage)):
                break
        peaks = []
        for s, rows in enumerate(per_stage):
            order = [str(iv.action) for iv in rows]
            assert order == rows_of[s], (schedule, s, order)
            live = peak = 0
            for iv in rows:
                live += 1 if iv.action.op.value == "F" else -1
                peak = max(peak, live)
            peaks.append(peak)
        assert peaks == expected, (schedule, peaks)
