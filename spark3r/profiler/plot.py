"""The profile heatmap: global layers x levels, a row of panels per metric, K/V pruning left and query merging right."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from spark3r.files import write_png
from spark3r.profiler.format import Profile


def save_heatmap(profile: Profile, path: str | os.PathLike) -> Path:
    """Draw the mean deviation tables of `profile` to a PNG at `path` (written atomically); log colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colors, pyplot

    metrics = profile.metrics
    figure, axes = pyplot.subplots(len(metrics), 2, squeeze=False, layout="constrained",
                                   figsize=(8, 0.8 + len(metrics) * (1.2 + 0.18 * profile.global_layers)))
    panels = (("K/V keep", profile.kv, [f"{keep:g}" for keep in profile.kv_keep]),
              ("query merge", profile.query, [str(merge) for merge in profile.query_merge]))
    for row, metric in enumerate(metrics):
        values = np.concatenate([profile.kv[metric].mean.ravel(), profile.query[metric].mean.ravel()])
        positive = values[values > 0]
        norm = colors.LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size and np.ptp(positive) > 0 \
            else colors.Normalize(vmin=0.0, vmax=max(float(values.max()), 1e-12))
        for column, (title, tables, labels) in enumerate(panels):
            axis = axes[row, column]
            mean = tables[metric].mean
            shown = np.where(mean > 0, mean, np.nan) if isinstance(norm, colors.LogNorm) else mean
            image = axis.imshow(shown, aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
            axis.set_title(f"{metric}: {title}", fontsize=9)
            axis.set_xticks(range(len(labels)), labels, fontsize=7)
            axis.set_yticks(range(profile.global_layers), [str(i) for i in range(profile.global_layers)],
                            fontsize=max(4, 8 - profile.global_layers // 8))
            axis.set_ylabel("global layer", fontsize=8)
            figure.colorbar(image, ax=axis, fraction=0.05)
    figure.suptitle(f"{profile.model}: deviation from dense, {len(profile.clips)} clip(s) of {profile.frames} frames",
                    fontsize=10)
    path = write_png(path, figure)
    pyplot.close(figure)
    return path
