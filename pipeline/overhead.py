"""Step overhead: the time a real training step spends outside the schedule's stage actions.

The simulator places forward and backward actions; a real ``fit`` step also
feeds the batch, splits and merges micro-batches, computes the loss and
metrics on the merged output, applies the optimizer and dispatches the
executor. That work does not depend on the schedule or on M, so it is
measured once, on the unpipelined step (M=1) of the same stages, same data
and same devices, and added to every simulated makespan::

    real step (M=1):  |feed|F0 F1 ... B1 B0|optimizer, loss, metrics|
    simulated (M=1):       |F0 F1 ... B1 B0|
    overhead       =  real step - simulated     (>= 0)
    predicted(M)   =  simulated makespan(schedule, M) + overhead
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

from pipeline import schedule as sched
from pipeline import simulate as sim


def _step_timer() -> Any:
    """A Keras callback that stamps the end of every training batch."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.ends: list[float] = []

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.ends.append(time.perf_counter())

    return StepTimer()


def time_fit_step(model: Any, x: Any, y: Any, steps: int, calls: int = 3) -> float:
    """Steady-state seconds per ``fit`` step: the median gap between consecutive batch ends.

    Gaps between batch ends hold everything a step does in ``fit`` (feeding the
    batch, the compiled step, callbacks) but not the per-call set-up and
    teardown: ending a ``fit`` call deletes its ``tf.data`` iterator, which
    here took 0 or ~250 ms at random and, divided over a few steps, made step
    times bimodal.

    Args:
        model: a compiled Keras model (a :class:`pipeline.model.PipelineModel` or not).
        x: inputs of one batch (arrays or tensors, or a structure of them).
        y: targets of one batch.
        steps: steps per timed fit (the batch is fed ``steps + 1`` times from memory, so
            the gaps leave out input-pipeline work; add that from your own input pipeline).
        calls: timed fits; the median over all their gaps is kept.
    """
    import tensorflow as tf

    model.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0, shuffle=False)  # trace, warm up
    data = tf.data.Dataset.from_tensors((x, y)).repeat(steps + 1)
    gaps: list[float] = []
    for _ in range(calls):
        timer = _step_timer()
        model.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
        gaps.extend(b - a for a, b in zip(timer.ends, timer.ends[1:]))
    return float(statistics.median(gaps))


def _unpipelined_twin(model: Any) -> Any:
    """A PipelineModel over the same stage layers and devices with M=1, compiled like ``model``."""
    import keras

    from pipeline.model import PipelineModel

    stages = model.stages
    twin = PipelineModel([s.layer for s in stages], devices=[s.device for s in stages], microbatches=1,
                         schedule=model.executor.generator, recompute=[s.recompute for s in stages])
    try:  # same optimizer settings, loss and metrics (fresh objects: nothing shared with ``model``)
        twin.compile(**keras.saving.deserialize_keras_object(model.get_compile_config()))
    except (TypeError, ValueError):  # custom objects that do not serialize: optimizer and loss only
        twin.compile(optimizer=keras.optimizers.deserialize(keras.optimizers.serialize(model.optimizer)),
                     loss=model.loss)
    return twin


def measure_step_overhead(model: Any, x: Any, y: Any, stage_costs: Sequence[sim.StageCost], steps: int = 6,
                          calls: int = 3) -> float:
    """Seconds a real step spends outside the stage actions, from the unpipelined (M=1) step.

    Runs ``fit`` on a twin of ``model`` with M=1 (same layers, devices, optimizer
    settings, loss and metrics) and subtracts the simulated M=1 step. The
    layers' weights are restored afterwards.

    Args:
        model: a compiled, built :class:`pipeline.model.PipelineModel`.
        x: one batch of inputs.
        y: the batch's targets.
        stage_costs: forward/backward seconds of each stage on the WHOLE batch, each
            stage alone (``planner.measure_stage_costs(stages, x, under_load=False)``):
            an M=1 step runs one stage at a time.
        steps: steps per timed fit.
        calls: timed fits (median kept).

    Returns:
        The overhead in seconds, at least 0.
    """
    twin = _unpipelined_twin(model)
    saved = [s.layer.get_weights() for s in model.stages]
    try:
        real = time_fit_step(twin, x, y, steps, calls)
    finally:
        for stage, weights in zip(model.stages, saved):
            stage.layer.set_weights(weights)
    simulated = sim.simulate(sched.get("gpipe")(len(stage_costs), 1), stage_costs).makespan
    return max(0.0, real - simulated)
