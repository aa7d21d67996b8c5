"""The search plot: predicted deviation against FLOPs fraction, with the Pareto front and the schedules compared."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spark3r.files import write_png  # noqa: E402

Point = tuple[float, float]  # (FLOPs fraction, predicted deviation)


def save_search_plot(path: str | Path, *, front: Sequence[Point], trials: Sequence[Point], infeasible: Sequence[Point],
                     uniform: Sequence[Point], chosen: Point, budget: float, paper: Point | None = None,
                     title: str = "", xlabel: str = "FLOPs fraction") -> Path:
    """Write the plot as PNG to `path` atomically."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    if infeasible:
        axes.scatter(*zip(*infeasible), s=4, color="0.8", label="trials over budget", zorder=1)
    if trials:
        axes.scatter(*zip(*trials), s=4, color="tab:blue", alpha=0.4, label="trials within budget", zorder=2)
    axes.plot(*zip(*front), color="black", lw=1.2, drawstyle="steps-post", label="Pareto front (knapsack)", zorder=3)
    if uniform:
        axes.scatter(*zip(*uniform), marker="s", s=22, facecolors="none", edgecolors="tab:green",
                     label="uniform schedules", zorder=4)
    if paper is not None:
        axes.scatter(*paper, marker="^", s=70, color="tab:orange", label="paper's rule", zorder=5)
    axes.scatter(*chosen, marker="*", s=160, color="tab:red", label="chosen", zorder=6)
    axes.axvline(budget, color="tab:red", ls="--", lw=0.8, label=f"budget {budget:g}")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("predicted deviation")
    axes.set_xlim(0, 1.02)
    axes.set_ylim(bottom=0)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, loc="upper right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = write_png(path, figure)
    plt.close(figure)
    return path
