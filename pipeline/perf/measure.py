"""Timing of stages on their devices: per-micro-batch forward/backward costs, alone or under load.

A stage's loop runs ``repeats`` times inside one ``tf.function``; with ``under_load``
the other stages keep their devices busy from background threads::

    timed stage 0:  |F F F F ... (repeats)|FB FB FB FB ... (repeats)|
    load, stage 1:  |FB FB FB FB FB FB FB FB FB FB FB FB FB FB FB FB ...|
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from pipeline.perf import simulate as sim


class _NewLoopsAreNotRetracing(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning: it counts every new ``tf.function`` of the
    same Python code as a retrace, and timing builds new loops of one code by design (one per stage and call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def timing_loops() -> Iterator[None]:
    """Within the block (or the decorated function), the timing loops' new functions warn of no retracing."""
    import tensorflow as tf

    quiet = _NewLoopsAreNotRetracing()
    tf.get_logger().addFilter(quiet)
    try:
        yield
    finally:
        tf.get_logger().removeFilter(quiet)


@contextlib.contextmanager
def variables_kept(stages: Sequence[Any]) -> Iterator[None]:
    """Within the block the stages run freely; afterwards every variable of their layers (weights,
    BatchNorm statistics, dropout seed states) holds its value from before: timing runs never change training."""
    variables = [v for stage in stages for v in stage.layer.variables]
    saved = [v.numpy() for v in variables]
    try:
        yield
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (after one warm-up call), waiting for its tensors."""
    fn()  # trace and warm up
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = fn()
        wait_for(out)
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def wait_for(out: Any) -> None:
    """Blocks until the first tensor of ``out`` is computed (asynchronous eager or graph results)."""
    import tensorflow as tf

    flat = [t for t in tf.nest.flatten(out) if isinstance(t, tf.Tensor)]
    if flat:
        flat[0].numpy()


def step_peak_mb(step: Callable[[], Any], device: str = "CPU:0") -> float | None:
    """Peak MB held by TensorFlow's allocator of ``device`` during ``step()`` (logical CPUs share one).

    Unlike the process's peak RSS it leaves out graph building and memory the C allocator keeps after a
    free: it shows the tensors a step keeps alive. On CPU only the BFC allocator keeps statistics, and
    TensorFlow picks it by itself on some processors only: start the process with
    ``TF_CPU_ALLOCATOR_USE_BFC=true`` (:data:`pipeline.core.runtime.BFC_ENV`; the bench and
    the tests do).

    Returns:
        The peak in MB, or None (after running ``step``) where this allocator keeps no statistics.
    """
    import tensorflow as tf

    try:
        tf.config.experimental.reset_memory_stats(device)
    except ValueError:  # "Cannot reset memory stats for device": an allocator without statistics
        step()
        return None
    step()
    return tf.config.experimental.get_memory_info(device)["peak"] / 2**20


def _stage_loops(stages: Sequence[Any], x: Any, repeats: int) -> list[tuple[Any, Callable, Callable]]:
    """Per stage: its micro-batch input and two loop bodies (forward; forward+backward) of ``repeats`` runs.

    Each run's input depends on the previous run's outputs by a data edge, so
    grappler can neither drop a run (results used only by control edges become
    NoOps) nor merge two runs.
    """
    import tensorflow as tf

    def nudged(inp: Any, carry: Any) -> Any:
        return tf.nest.map_structure(lambda t: t + tf.cast(carry, t.dtype) if t.dtype.is_floating else t, inp)

    def probe(outs: list[Any]) -> Any:
        return tf.add_n([tf.cast(tf.reshape(o, [-1])[0], tf.float32) for o in outs]) * 1e-30

    loops = []
    for stage in stages:
        layer, device = stage.layer, stage.device
        variables = list(layer.trainable_variables)
        watch = stage.index > 0

        def forward(inp, layer=layer):
            return tf.nest.flatten(layer(inp, training=True))

        def forward_backward(inp, layer=layer, variables=variables, watch=watch):
            sources = [t for t in tf.nest.flatten(inp) if t.dtype.is_floating] if watch else []
            with tf.GradientTape() as tape:
                tape.watch(sources)
                outs = tf.nest.flatten(layer(inp, training=True))
            return tape.gradient(outs, sources + variables, output_gradients=[tf.ones_like(o) for o in outs])

        def loop(body: Callable, device: str = device, accumulate: int = 0) -> Callable[[Any], Any]:
            """``accumulate``: how many trailing outputs are weight gradients summed over runs, as a stage does."""
            def run(inp):
                with tf.device(device):
                    carry = tf.constant(0.0)
                    acc: list[Any] = []
                    for _ in range(repeats):
                        outs = [o for o in body(nudged(inp, carry)) if o is not None]
                        if accumulate:
                            grads = outs[len(outs) - accumulate:]
                            acc = grads if not acc else [a + g for a, g in zip(acc, grads)]
                            outs = outs[:len(outs) - accumulate] + acc
                        carry = probe(outs)
                    return carry
            return run

        with tf.device(device):
            x = tf.nest.map_structure(tf.identity, x)
        loops.append((x, loop(forward), loop(forward_backward, accumulate=len(variables))))
        with tf.device(device):
            x = layer(x, training=True)
    return loops


class StageLoad:
    """Keeps other stages' devices busy from background threads while one stage is timed.

    ``with StageLoad(runs):`` starts one thread per function of ``runs`` (each a
    compiled loop of another stage, already traced), each calling its function
    over and over until the block ends. The block starts once every thread has
    finished one call; an error in a thread is raised in the caller.
    """

    def __init__(self, runs: Sequence[Callable[[], Any]]):
        self.stop_event = threading.Event()
        self.thread_errors: list[BaseException] = []
        self.ready = threading.Barrier(len(runs) + 1) if runs else None
        self.threads = [threading.Thread(target=self.keep_running, args=(run,), name=f"pipeline-stage-load-{i}",
                                         daemon=True) for i, run in enumerate(runs)]

    def keep_running(self, run: Callable[[], Any]) -> None:
        """One load thread: calls ``run`` until :attr:`stop_event` is set, meeting the others once at start."""
        first = True
        try:
            while first or not self.stop_event.is_set():
                wait_for(run())
                if first:
                    first = False
                    self.ready.wait()
        except threading.BrokenBarrierError:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            self.thread_errors.append(err)
            self.ready.abort()

    def __enter__(self) -> "StageLoad":
        for thread in self.threads:
            thread.start()
        if self.ready is not None:
            try:
                self.ready.wait()
            except threading.BrokenBarrierError:  # a load thread failed: raise its error
                self.__exit__()
            except BaseException:  # e.g. KeyboardInterrupt: release the threads, then re-raise
                self.ready.abort()
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join()
        if self.thread_errors:
            raise self.thread_errors[0]


@timing_loops()
def measure_stage_costs(stages: Sequence[Any], x: Any, repeats: int = 10, calls: int = 3,
                        under_load: bool = True) -> list[sim.StageCost]:
    """Forward and backward seconds of each stage on its device for one micro-batch ``x``.

    Inside one ``tf.function`` the stage runs ``repeats`` times back to back,
    as its actions run inside a pipelined step: the Python call overhead is
    paid once, not per action. The median of ``calls`` calls is divided by
    ``repeats``. The backward is the VJP of the stage output (input and weight
    gradients) plus the accumulation of the weight gradients over micro-batches,
    timed as forward+backward minus forward.

    ``under_load`` times each stage while the other devices run a stage's
    forward+backward loop from background threads (one per device): the
    steady state of a pipeline, where every device is busy. Devices that share
    hardware (logical CPU devices on the same cores) are slower then than
    alone; separate GPUs are not, and both ways give the same costs::

        timed stage 0:  |F F F F ... (repeats)|FB FB FB FB ... (repeats)|
        load, stage 1:  |FB FB FB FB FB FB FB FB FB FB FB FB FB FB FB FB ...|  (one thread per other device)

    Args:
        stages: :class:`pipeline.stage.Stage` objects (layer and device), built.
        x: one micro-batch of the pipeline's input.
        repeats: stage runs per timed call.
        calls: timed calls; the median is kept.
        under_load: time each stage while the others run (default), or alone.

    Returns:
        One :class:`pipeline.simulate.StageCost` per stage.
    """
    import tensorflow as tf

    loops = [(inp, tf.function(forward), tf.function(forward_backward))
             for inp, forward, forward_backward in _stage_loops(stages, x, repeats)]
    for inp, run_f, run_fb in loops:  # trace every loop before any timing
        wait_for(run_f(inp))
        wait_for(run_fb(inp))
    costs = []
    for i, (inp, run_f, run_fb) in enumerate(loops):
        others = [(lambda fb=loops[j][2], a=loops[j][0]: fb(a)) for j in loaders(stages, i)] if under_load else []
        with StageLoad(others):
            f = median_time(lambda: run_f(inp), calls) / repeats
            fb = median_time(lambda: run_fb(inp), calls) / repeats
        costs.append(sim.StageCost(f, max(fb - f, 0.0)))
    return costs


def loaders(stages: Sequence[Any], timed: int) -> list[int]:
    """The stages that load the other devices while stage ``timed`` is timed: the first stage of each other
    device (stages that share a device never run at once: one load per device, not one per stage)."""
    first: dict[str, int] = {}
    for j, stage in enumerate(stages):
        first.setdefault(stage.device, j)
    return [j for device, j in first.items() if device != stages[timed].device]


@timing_loops()
def contention_factor(stages: Sequence[Any], x: Any, repeats: int = 10, calls: int = 3) -> float:
    """How much slower the stages run all at once than the slowest one alone (1.0: no interference).

    Devices that share hardware (logical CPU devices on the same cores, a busy
    machine) slow each other down when the pipeline keeps them all busy; GPUs
    normally do not. A diagnostic of the machine (``pipeline bench`` prints it);
    :func:`measure_stage_costs` with ``under_load=True`` already times each
    stage in that busy state.
    """
    import tensorflow as tf

    loops = _stage_loops(stages, x, repeats)
    alone = []
    for inp, _, forward_backward in loops:
        run = tf.function(forward_backward)
        alone.append(median_time(lambda: run(inp), calls))
    together = tf.function(lambda inputs: [body(i) for (_, _, body), i in zip(loops, inputs)])
    inputs = [inp for inp, _, _ in loops]
    both = median_time(lambda: together(inputs), calls)
    return max(1.0, both / max(alone))
