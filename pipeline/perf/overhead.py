"""Step overhead: the time a real training step spends outside the schedule's stage actions.

The simulator places forward and backward actions; a real ``fit`` step also
feeds the batch, computes the loss and metrics on the whole output, applies
the optimizer and runs Keras' step loop. That per-step work does not depend
on the schedule or on M, so it is measured once, on the unpipelined step
(M=1) of the same stages, same data and same devices, as the difference of
two real steps, and added to every simulated makespan::

    fit step (M=1):       |feed|F0 F1 B1 B0|loss, metrics, optimizer, Keras|
    executor step (M=1):       |F0 F1 B1 B0|
    overhead           =  fit step - executor step     (>= 0)
    predicted(M)       =  simulated makespan(schedule, M) + overhead
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from pipeline.errors import MeasureError


def _step_timer() -> Any:
    """A Keras callback that stamps the end of every training batch (or group of batches)."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.ends: list[tuple[int, float]] = []

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.ends.append((batch, time.perf_counter()))

    return StepTimer()


def _as_tuples(data: Any) -> Any:
    """Lists -> tuples, recursively: ``tf.data`` would stack a list of inputs into one tensor."""
    if isinstance(data, (list, tuple)):
        return tuple(_as_tuples(item) for item in data)
    if isinstance(data, dict):
        return {key: _as_tuples(value) for key, value in data.items()}
    return data


def time_fit_step(model: Any, x: Any, y: Any, steps: int, calls: int = 3) -> float:
    """Steady-state seconds per ``fit`` step: the median gap between consecutive batch ends.

    Gaps between batch ends hold everything a step does in ``fit`` (feeding the
    batch, the compiled step, callbacks) but not the per-call set-up and
    teardown: ending a ``fit`` call deletes its ``tf.data`` iterator, which
    here took 0 or ~250 ms at random and, divided over a few steps, made step
    times bimodal. With ``steps_per_execution`` > 1 Keras reports once per
    group of steps; each gap is divided by the steps it covers.

    Args:
        model: a compiled Keras model (a :class:`pipeline.model.PipelineModel` or not).
        x: inputs of one batch (arrays or tensors, or a structure of them).
        y: targets of one batch.
        steps: steps per timed fit (the batch is fed ``steps + 1`` times from memory, so
            the gaps leave out input-pipeline work; add that from your own input pipeline).
        calls: timed fits; the median over all their gaps is kept.

    Raises:
        MeasureError: when the fits report fewer than two batch ends (``steps`` too small
            for the model's ``steps_per_execution``).
    """
    import tensorflow as tf

    batch = _as_tuples((x, y))
    model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0, shuffle=False)  # trace, warm up
    data = tf.data.Dataset.from_tensors(batch).repeat(steps + 1)
    gaps: list[float] = []
    for _ in range(calls):
        timer = _step_timer()
        model.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
        gaps.extend((t1 - t0) / (b1 - b0) for (b0, t0), (b1, t1) in zip(timer.ends, timer.ends[1:]) if b1 > b0)
    if not gaps:
        raise MeasureError(f"time_fit_step: steps={steps} gave fewer than two batch ends per fit; use steps of at "
                         "least 2 x the model's steps_per_execution")
    return float(statistics.median(gaps))


def _unpipelined_twin(model: Any) -> Any:
    """A PipelineModel over the same stage layers and devices with M=1, compiled like ``model``.

    The twin has its own optimizer (same settings) and no ``gradient_reducer``:
    it runs in this process only, so a replicated model's all-reduce is not in
    the measured overhead (and a collective on one rank alone would wait forever).

    Raises:
        SettingError: when the optimizer cannot be rebuilt from its config.
    """
    import warnings

    import keras

    from pipeline.errors import SettingError
    from pipeline.core.model import PipelineModel

    stages = model.stages
    # GPipe at M=1 runs the actions in the same order as any schedule does, and is what gets subtracted.
    twin = PipelineModel([s.layer for s in stages], devices=[s.device for s in stages], microbatches=1,
                         schedule="gpipe", recompute=[s.recompute for s in stages])
    try:  # same optimizer settings, loss and metrics (fresh objects: nothing shared with ``model``)
        twin.compile(**keras.saving.deserialize_keras_object(model.get_compile_config()))
        return twin
    except Exception as err:  # noqa: BLE001 - any custom object that does not round-trip its config
        reason = err
    try:
        optimizer = type(model.optimizer).from_config(model.optimizer.get_config())
    except Exception as err:  # noqa: BLE001
        raise SettingError(
            f"cannot measure the step overhead: the model's compile settings do not round-trip through their "
            f"config ({reason}) and neither does the optimizer ({err}); give it with --overhead SECONDS") from err
    warnings.warn(f"step overhead: compile settings do not round-trip through their config ({reason}); the M=1 "
                  "step is timed with the optimizer and loss only, without metrics", stacklevel=3)
    twin.compile(optimizer=optimizer, loss=model.loss)
    return twin


def measure_step_overhead(model: Any, x: Any, y: Any, steps: int = 6, calls: int = 3) -> float:
    """Seconds a real ``fit`` step spends outside the stage actions, from the unpipelined (M=1) step.

    Times ``fit`` on a twin of ``model`` with M=1 (same layers, devices, optimizer
    settings, loss and metrics; no gradient reducer) and the same M=1 step
    without the optimizer, loss bookkeeping and Keras (``trace.executor_step``),
    and returns the difference. Every variable of the layers (weights,
    BatchNorm statistics, dropout seed states) is restored afterwards.

    Args:
        model: a compiled, built :class:`pipeline.model.PipelineModel`.
        x: one batch of inputs.
        y: the batch's targets.
        steps: steps per timed fit (and 3 x as many timed executor steps).
        calls: timed fits (median kept).

    Returns:
        The overhead in seconds, at least 0.
    """
    from pipeline.perf import trace

    from pipeline.perf.measure import variables_kept

    twin = _unpipelined_twin(model)
    with variables_kept(model.stages):
        real = time_fit_step(twin, x, y, steps, calls)
        bare = trace.median_time(trace.executor_step(model.stages, x, y, model.loss, "gpipe", 1), 3 * steps)
    return max(0.0, real - bare)
