"""Coloured point clouds as binary little-endian PLY (vertex x, y, z float32 and red, green, blue uint8)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from spark3r.files import write_atomic

VERTEX = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])


def write_ply(path: str | os.PathLike, points: np.ndarray, colors: np.ndarray) -> Path:
    """Write points [N, 3] (float) with colours [N, 3] (uint8 RGB) to `path` atomically."""
    vertices = np.empty(len(points), dtype=VERTEX)
    for axis, name in enumerate("xyz"):
        vertices[name] = points[:, axis]
    for channel, name in enumerate(("red", "green", "blue")):
        vertices[name] = colors[:, channel]
    header = "\n".join(["ply", "format binary_little_endian 1.0", f"element vertex {len(vertices)}",
                        "property float x", "property float y", "property float z",
                        "property uchar red", "property uchar green", "property uchar blue", "end_header", ""])
    return write_atomic(path, header.encode("ascii") + vertices.tobytes())
