"""Gantt charts of simulated or measured timelines as PNG files (matplotlib)."""

from __future__ import annotations

import os
from typing import Sequence

from pipeline.core import schedule as sched
from pipeline.perf import simulate as sim
from pipeline.perf.simulate import Interval

_COLORS = {sched.F: "#4C72B0", sched.B: "#DD8452", sched.W: "#55A868"}


def gantt(path: str, rows: Sequence[tuple[str, Sequence[Interval]]], num_devices: int,
          title: str | None = None) -> str:
    """Draws one or more timelines (e.g. predicted, then measured) as Gantt charts in a PNG.

    Args:
        path: the PNG file to write.
        rows: ``(label, timeline)`` pairs, drawn top to bottom on a shared time axis;
            the label should carry the step time, e.g. ``"predicted 0.41 s"``.
        num_devices: one lane per device (``Interval.row``); with several stages per
            device each bar is labelled with its stage (``2F3``) and later stages are drawn lighter.
        title: the figure title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, sharex=True, squeeze=False,
                             figsize=(11, 0.6 + (0.55 * num_devices + 0.5) * len(rows)))
    for ax, (label, timeline) in zip(axes[:, 0], rows):
        several = any(iv.row != iv.action.stage for iv in timeline)
        for iv in timeline:
            r, a = iv.row, iv.action
            chunk = a.stage // num_devices if several else 0
            ax.broken_barh([(iv.start, iv.duration)], (r - 0.4, 0.8), facecolors=_COLORS[a.op],
                           alpha=1.0 / (1 + 0.6 * chunk), edgecolors="black", linewidth=0.4)
            text = str(a) if several else f"{a.op.value}{a.microbatch}"
            ax.text(iv.start + iv.duration / 2, r, text, ha="center", va="center", fontsize=7,
                    color="white" if chunk == 0 else "black")
        ax.set_yticks(range(num_devices), [f"device {r}" for r in range(num_devices)])
        ax.set_ylim(num_devices - 0.5, -0.5)
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("time (s)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def schedule_gallery(directory: str, num_devices: int = 2, num_microbatches: int = 4, forward: float = 1.0,
                     backward: float = 2.0) -> dict[str, tuple[str, sim.Simulation]]:
    """Draws every training schedule on the same model and devices: ``<directory>/schedule_<name>.png``.

    The model takes ``forward`` + ``backward`` per micro-batch and device; one-stage-per-device
    schedules cut it in ``num_devices`` stages, interleaved 1F1B in ``2 * num_devices`` stages
    (V=2) of half the cost each, and ZB-H1 splits each backward into equal B and W halves.

    Returns:
        Per schedule name, the PNG path and its :class:`~pipeline.perf.simulate.Simulation`.
    """
    out = {}
    for name in sched.NAMES:
        stages = 2 * num_devices if name == "interleaved_1f1b" else num_devices
        share = num_devices / stages
        costs = [sim.StageCost(forward * share, backward * share)] * stages
        result = sim.simulate(sched.get(name)(stages, num_microbatches, num_devices), costs)
        path = os.path.join(directory, f"schedule_{name}.png")
        gantt(path, [(f"{result.makespan:g} units\nbubble {result.bubble:.0%}", result.timeline)], num_devices,
              title=f"{name}: {stages} stages on {num_devices} devices, M={num_microbatches} "
                    f"(F={forward:g}, B={backward:g} per micro-batch and device)")
        out[name] = (path, result)
    return out
