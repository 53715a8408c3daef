"""The ``"auto"`` choice checked by the clock: the top predicted plans timed for a few real steps, the fastest kept.

The simulator ranks every candidate from stage costs measured once; plans predicted within a few percent of
each other are often ordered differently by a real run (copies, op dispatch, devices sharing cores, costs
per micro-batch). So a few plans predicted within ``within`` of the best (at most ``top``: the best of each
M first) are each built as a real pipelined step (forward and backward of every micro-batch, no optimizer
update) and timed, and the fastest measured wins::

    simulate all -> [1f1b M=8 0.120 s, gpipe M=8 0.122 s, zb_h1 M=8 0.125 s, ...]
                      |  time 3 real steps each, same batch, interleaved rounds
                      v
    measured       -> [1f1b M=8 0.131 s, gpipe M=8 0.118 s, zb_h1 M=8 0.140 s]  -> choice: gpipe M=8
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from pipeline.perf import autoplan
from pipeline.perf.measure import wait_for

REFINE = {"top": 4, "within": 0.5, "steps": 3, "rounds": 2}
"""Defaults of :func:`refine`: how many plans, how close to the best predicted, timed steps per round, rounds."""


def candidate_step(stages: Sequence[Any], x: Any, candidate: autoplan.Candidate) -> Callable[[], Any]:
    """A compiled pipelined step of ``candidate`` on ``stages`` (loss: the mean square of the outputs).

    The stages' ``recompute`` flags are set to the candidate's while the step is traced (on its first
    call) and restored afterwards.
    """
    import tensorflow as tf

    from pipeline.core.executor import Executor
    from pipeline.perf.trace import compiled_step

    def loss_fn(j: int, y_pred: Any) -> tf.Tensor:  # noqa: ARG001 - the executor's loss signature
        floats = [tf.cast(t, tf.float32) for t in tf.nest.flatten(y_pred) if t.dtype.is_floating]
        return tf.add_n([tf.reduce_mean(tf.square(t)) for t in floats])

    step = compiled_step(Executor(stages, candidate.schedule, candidate.microbatches), x, loss_fn,
                         regularize=False)

    def run() -> Any:
        saved = [stage.recompute for stage in stages]
        for stage in stages:
            stage.recompute = candidate.recompute
        try:
            return step()
        finally:
            for stage, flag in zip(stages, saved):
                stage.recompute = flag

    return run


def finalists(choice: autoplan.Choice, top: int, within: float) -> list[autoplan.Candidate]:
    """At most ``top`` fitting candidates predicted within ``within`` (a fraction) of the best, best first.

    The best predicted plan of each M comes first (in predicted order), then the other plans: the
    simulator's error grows with M (per-micro-batch costs it does not model), so plans of several M are
    timed rather than the near-copies of one.
    """
    limit = choice.best.step * (1 + within)
    near = [c for c in choice.table if c.fits and c.step <= limit]
    seen: set[int] = set()
    per_m = [c for c in near if not (c.microbatches in seen or seen.add(c.microbatches))]
    rest = [c for c in near if c not in per_m]
    picked = (per_m + rest)[:max(1, top)]
    return sorted(picked, key=near.index)


def refine(choice: autoplan.Choice, stages: Sequence[Any], x: Any, top: int = REFINE["top"],
           within: float = REFINE["within"], steps: int = REFINE["steps"], rounds: int = REFINE["rounds"],
           timer: Callable[[Callable[[], Any]], float] | None = None) -> autoplan.Choice:
    """``choice`` with its best replaced by the fastest measured finalist (see the module doc).

    Args:
        choice: the simulated choice.
        stages: the model's stages (built, placed).
        x: one mini-batch of inputs.
        top: at most this many plans are timed.
        within: only plans predicted within this fraction of the best predicted step.
        steps: timed steps per plan and round (the median is kept).
        rounds: rounds over all finalists (each plan's fastest round is kept: the least disturbed).
        timer: ``timer(run) -> seconds`` for one plan (tests replace it); default: the median of ``steps``.

    Returns:
        A :class:`~pipeline.perf.autoplan.Choice` whose finalists carry ``measured`` step times; the
        best is the fastest measured, the runner-up the next. With one finalist, ``choice`` unchanged.
    """
    chosen = finalists(choice, top, within)
    if len(chosen) < 2:
        return choice
    if timer is None:
        from pipeline.perf.measure import median_time

        def timer(run: Callable[[], Any]) -> float:
            return median_time(run, steps)
    runs = [candidate_step(stages, x, c) for c in chosen]
    for run in runs:  # every plan traced and warm before any timing
        wait_for(run())
    best: list[float] = [float("inf")] * len(runs)
    for _ in range(max(1, rounds)):
        for i, run in enumerate(runs):
            best[i] = min(best[i], timer(run))
    measured = [dataclasses.replace(c, measured=t) for c, t in zip(chosen, best)]
    order = sorted(range(len(measured)), key=lambda i: (measured[i].measured, i))
    ranked = [measured[i] for i in order]
    keys = {c.label() for c in chosen}
    table = tuple(ranked + [c for c in choice.table if c.label() not in keys])
    return dataclasses.replace(choice, best=ranked[0], runner_up=ranked[1], table=table)
