"""One preview image of a reconstruction: a few frames above their depth maps, and a top view of the points and the
camera path."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from spark3r.files import atomic_save

PREVIEW_FRAMES = 4
PREVIEW_POINTS = 50_000


def camera_centres(extrinsics: np.ndarray) -> np.ndarray:
    """Camera centres [S, 3] in world coordinates of world-to-camera [R | t] [S, 3, 4]: C = -R^T t."""
    rotation, translation = extrinsics[:, :, :3], extrinsics[:, :, 3]
    return -np.einsum("sji,sj->si", rotation, translation)


def write_preview(path: str | os.PathLike, images: np.ndarray, depth: np.ndarray, points: np.ndarray,
                  colors: np.ndarray, extrinsics: np.ndarray, seed: int = 0) -> Path:
    """images uint8 [S, H, W, 3], depth [S, H, W], points [N, 3] with colors uint8 [N, 3], extrinsics [S, 3, 4].

    Shows up to PREVIEW_FRAMES frames spread over the clip with their depth, and the points (at most PREVIEW_POINTS,
    a seeded random subset) and camera centres seen from above (world x right, z up the page; y points down)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = np.unique(np.linspace(0, len(images) - 1, min(PREVIEW_FRAMES, len(images))).round().astype(int))
    figure = plt.figure(figsize=(3 * (len(frames) + 2), 6), constrained_layout=True)
    grid = figure.add_gridspec(2, len(frames) + 2)
    for column, index in enumerate(frames):
        top, bottom = figure.add_subplot(grid[0, column]), figure.add_subplot(grid[1, column])
        top.imshow(images[index])
        top.set_title(f"frame {index}")
        bottom.imshow(np.where(np.isfinite(depth[index]), depth[index], np.nan), cmap="turbo")
        bottom.set_title("depth")
        for axis in (top, bottom):
            axis.axis("off")
    view = figure.add_subplot(grid[:, len(frames):])
    if len(points):
        chosen = np.random.default_rng(seed).permutation(len(points))[:PREVIEW_POINTS]
        view.scatter(points[chosen, 0], points[chosen, 2], c=colors[chosen] / 255, s=0.5, linewidths=0)
    centres = camera_centres(extrinsics)
    view.plot(centres[:, 0], centres[:, 2], "-", color="crimson", linewidth=1.2, label="camera path")
    view.plot(centres[:1, 0], centres[:1, 2], "o", color="crimson", label="first frame")
    view.set_aspect("equal", adjustable="datalim")
    view.set_xlabel("x")
    view.set_ylabel("z")
    view.set_title(f"top view: {len(points)} points, {len(extrinsics)} cameras")
    view.legend(loc="upper right", fontsize=8)
    saved = atomic_save(path, lambda temporary: figure.savefig(temporary, format="png", dpi=80))
    plt.close(figure)
    return saved
