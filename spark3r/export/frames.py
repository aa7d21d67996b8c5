"""Per-frame files: the images the model saw (png), and depth with its confidence (npz float32, and a 16-bit png)."""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from spark3r.files import write_atomic

DEPTH_PNG_MAX = 65535


def write_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """An RGB uint8 image [H, W, 3] as png."""
    return write_atomic(path, _png(np.ascontiguousarray(image[..., ::-1])))  # OpenCV writes BGR


def depth_png_scale(depth: np.ndarray) -> float:
    """Depth units per step of the 16-bit depth png: the largest finite depth maps to 65535 (1.0 if none)."""
    finite = depth[np.isfinite(depth) & (depth > 0)]
    return float(finite.max()) / DEPTH_PNG_MAX if finite.size else 1.0


def write_depth(folder: str | os.PathLike, name: str, depth: np.ndarray, confidence: np.ndarray,
                scale: float) -> tuple[Path, Path]:
    """`<folder>/<name>.npz` (depth, confidence float32 [H, W]) and `<folder>/<name>.png`: uint16 depth / scale,
    rounded; 0 where the depth is not finite or not positive."""
    folder = Path(folder)
    buffer = io.BytesIO()
    np.savez(buffer, depth=depth.astype(np.float32), confidence=confidence.astype(np.float32))
    archive = write_atomic(folder / f"{name}.npz", buffer.getvalue())
    valid = np.isfinite(depth) & (depth > 0)
    steps = np.where(valid, np.round(np.where(valid, depth, 0) / scale), 0).clip(0, DEPTH_PNG_MAX).astype(np.uint16)
    return archive, write_atomic(folder / f"{name}.png", _png(steps))


def write_frames(folder: str | os.PathLike, names: Sequence[str], images: np.ndarray, depth: np.ndarray,
                 confidence: np.ndarray, on_frame=None, workers: int | None = None) -> float:
    """Every frame's image (`<folder>/images/<name>.png`) and depth (`<folder>/depth/<name>.npz|.png`); returns the
    depth png scale. images uint8 [S, H, W, 3], depth and confidence [S, H, W]; `on_frame()` after each frame.

    Frames are encoded on `workers` threads (default: up to 8 of the CPU's cores; png and file writes release the
    GIL), so a 1000-frame reconstruction is not bound by one core; the files do not depend on `workers`."""
    folder = Path(folder)
    scale = depth_png_scale(depth)

    def write(index: int) -> None:
        write_image(folder / "images" / f"{names[index]}.png", images[index])
        write_depth(folder / "depth", names[index], depth[index], confidence[index], scale)

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(write, range(len(names))):
            if on_frame is not None:
                on_frame()
    return scale


def _png(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode an array of shape {array.shape} as png")
    return encoded.tobytes()
