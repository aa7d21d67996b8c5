"""Cameras, images and points in COLMAP's text format (cameras.txt, images.txt, points3D.txt), as Gaussian-splatting
and NeRF tools read them from `<scene>/sparse/0/` beside `<scene>/images/`.

Conventions match spark3r's: world-to-camera [R | t] with an OpenCV camera (COLMAP's), and the centre of the top-left
pixel at (0.5, 0.5) (COLMAP's), so intrinsics are written as they are. One PINHOLE camera per image (fx fy cx cy);
rotations as unit quaternions (qw, qx, qy, qz) with qw >= 0. Points carry no tracks (no 2-D observations): COLMAP and
the splatting tools read them as an initial point cloud.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from spark3r.files import write_atomic

FILES = ("cameras.txt", "images.txt", "points3D.txt")


def write_colmap_text(folder: str | os.PathLike, intrinsics: np.ndarray, extrinsics: np.ndarray,
                      image_size: tuple[int, int], names: Sequence[str], points: np.ndarray,
                      colors: np.ndarray) -> Path:
    """Write cameras.txt, images.txt and points3D.txt into `folder`; returns the folder.

    intrinsics [S, 3, 3], extrinsics [S, 3, 4] world-to-camera, image_size (height, width), names: S image file names
    (relative to the images folder), points [N, 3] world coordinates, colors [N, 3] uint8.
    """
    folder = Path(folder)
    height, width = image_size
    cameras = [f"{index + 1} PINHOLE {width} {height} {_numbers(K[0, 0], K[1, 1], K[0, 2], K[1, 2])}"
               for index, K in enumerate(np.asarray(intrinsics, dtype=np.float64))]
    extrinsics = np.asarray(extrinsics, dtype=np.float64)
    quaternions = Rotation.from_matrix(extrinsics[:, :, :3]).as_quat()[:, [3, 0, 1, 2]]  # scalar first
    quaternions *= np.where(quaternions[:, :1] < 0, -1.0, 1.0)
    images = []
    for index, (quaternion, pose, name) in enumerate(zip(quaternions, extrinsics, names)):
        images.append(f"{index + 1} {_numbers(*quaternion, *pose[:, 3])} {index + 1} {name}")
        images.append("")  # no 2-D points
    ids = np.arange(1, len(points) + 1)
    point_lines = [f"{i} {x!r} {y!r} {z!r} {r} {g} {b} 0" for i, (x, y, z), (r, g, b)
                   in zip(ids.tolist(), np.asarray(points, dtype=np.float64).tolist(), np.asarray(colors).tolist())]
    _write(folder / "cameras.txt", ["# Camera list: CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"], cameras)
    _write(folder / "images.txt", ["# Image list: IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
                                   "# then one line of POINTS2D[] as (X, Y, POINT3D_ID): empty here"], images)
    _write(folder / "points3D.txt", ["# 3D point list: POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] (empty here)"],
           point_lines)
    return folder


def _numbers(*values: float) -> str:
    """Floats written so that they read back exactly."""
    return " ".join(repr(float(value)) for value in values)


def _write(path: Path, header: list[str], lines: list[str]) -> None:
    write_atomic(path, ("\n".join(header + lines) + "\n").encode())
