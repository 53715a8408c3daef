"""Gantt charts of simulated or measured timelines as PNG files (matplotlib)."""

from __future__ import annotations

from typing import Sequence

from pipeline.core import schedule as sched
from pipeline.perf.simulate import Interval

_COLORS = {sched.F: "#4C72B0", sched.B: "#DD8452", sched.W: "#55A868"}


def gantt(path: str, rows: Sequence[tuple[str, Sequence[Interval]]], num_stages: int,
          title: str | None = None) -> str:
    """Draws one or more timelines (e.g. predicted, then measured) as Gantt charts in a PNG.

    Args:
        path: the PNG file to write.
        rows: ``(label, timeline)`` pairs, drawn top to bottom on a shared time axis;
            the label should carry the step time, e.g. ``"predicted 0.41 s"``.
        num_stages: K, one lane per device.
        title: the figure title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, sharex=True, squeeze=False,
                             figsize=(11, 0.6 + (0.55 * num_stages + 0.5) * len(rows)))
    for ax, (label, timeline) in zip(axes[:, 0], rows):
        for iv in timeline:
            s = iv.action.stage
            ax.broken_barh([(iv.start, iv.duration)], (s - 0.4, 0.8),
                           facecolors=_COLORS[iv.action.op], edgecolors="black", linewidth=0.4)
            ax.text(iv.start + iv.duration / 2, s, f"{iv.action.op.value}{iv.action.microbatch}",
                    ha="center", va="center", fontsize=7, color="white")
        ax.set_yticks(range(num_stages), [f"device {s}" for s in range(num_stages)])
        ax.set_ylim(num_stages - 0.5, -0.5)
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("time (s)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
