"""A clip: frames with optional ground truth, and the ground truth's geometry (world points of depth).

Ground-truth conventions: depth [S, H, W] is z-depth, 0, negative or non-finite meaning "no measurement"; intrinsics
[S, 3, 3] in pixels with the centre of pixel (row i, column j) at image coordinates (j + 0.5, i + 0.5); extrinsics
[S, 3, 4] world-to-camera [R | t] (x_cam = R x_world + t), OpenCV camera (x right, y down, z forward).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

from spark3r.errors import Spark3rError

GROUND_TRUTH_KEYS = ("depth", "intrinsics", "extrinsics")


@dataclass
class Clip:
    """One clip: images [S, 3, H, W] float in [0, 1] and optional ground truth.

    depth [S, H, W] z-depth (<= 0 or non-finite: no measurement); intrinsics [S, 3, 3]; extrinsics [S, 3, 4]
    world-to-camera (OpenCV). `source` says where the clip came from.
    """

    name: str
    images: torch.Tensor
    depth: torch.Tensor | None = None
    intrinsics: torch.Tensor | None = None
    extrinsics: torch.Tensor | None = None
    source: str = ""

    def __post_init__(self):
        where = self.source or self.name
        if self.images.dim() != 4 or self.images.shape[1] != 3 or not self.images.is_floating_point():
            raise Spark3rError(f"clip {where} has images of shape {tuple(self.images.shape)} and dtype "
                               f"{self.images.dtype}: give float images [S, 3, H, W] in [0, 1]")
        frames, _, height, width = self.images.shape
        expected = {"depth": (frames, height, width), "intrinsics": (frames, 3, 3), "extrinsics": (frames, 3, 4)}
        for key, shape in expected.items():
            value = getattr(self, key)
            if value is not None and tuple(value.shape) != shape:
                raise Spark3rError(f"clip {where} has {key} of shape {tuple(value.shape)} but its images need "
                                   f"{list(shape)}: give one entry per frame at the image size")

    @property
    def frames(self) -> int:
        return self.images.shape[0]

    @property
    def height(self) -> int:
        return self.images.shape[2]

    @property
    def width(self) -> int:
        return self.images.shape[3]

    def fingerprint(self) -> str:
        """sha256 of the pixels as 8-bit values (and their shape): equal for a clip and its folder / npz copies."""
        digest = hashlib.sha256(f"{self.frames}x{self.height}x{self.width}".encode())
        digest.update(to_uint8(self.images).numpy().tobytes())
        return digest.hexdigest()

    def select(self, indices: Sequence[int]) -> "Clip":
        """The clip restricted to frames `indices` (in that order)."""
        index = torch.as_tensor(list(indices), dtype=torch.long, device=self.images.device)
        return self._map(lambda tensor: tensor[index])

    def to(self, device: torch.device | str) -> "Clip":
        return self._map(lambda tensor: tensor.to(device))

    def world_points(self) -> torch.Tensor:
        """Ground-truth point map [S, H, W, 3] in world coordinates (non-finite where depth has no measurement)."""
        if self.depth is None or self.intrinsics is None or self.extrinsics is None:
            raise Spark3rError(f"clip {self.name} has no depth and cameras: it needs ground truth for points")
        return unproject_depth(self.depth, self.intrinsics, self.extrinsics)

    def _map(self, function) -> "Clip":
        return dataclasses.replace(self, **{key: None if getattr(self, key) is None else function(getattr(self, key))
                                            for key in ("images", *GROUND_TRUTH_KEYS)})


def unproject_depth(depth: torch.Tensor, intrinsics: torch.Tensor, extrinsics: torch.Tensor) -> torch.Tensor:
    """World points [S, H, W, 3] of z-depth [S, H, W]: x_world = R^T (z K^-1 [j + 0.5, i + 0.5, 1] - t).

    Pixels without a measurement (depth <= 0 or non-finite) get NaN.
    """
    frames, height, width = depth.shape
    dtype = torch.promote_types(depth.dtype, torch.float32)
    rows = torch.arange(height, device=depth.device, dtype=dtype) + 0.5
    cols = torch.arange(width, device=depth.device, dtype=dtype) + 0.5
    pixels = torch.stack([cols.expand(height, width), rows[:, None].expand(height, width),
                          torch.ones(height, width, device=depth.device, dtype=dtype)], dim=-1)
    rays = pixels.reshape(1, -1, 3) @ torch.linalg.inv(intrinsics.to(dtype)).transpose(-1, -2)  # [S, HW, 3]
    valid = torch.isfinite(depth) & (depth > 0)
    z = torch.where(valid, depth.to(dtype), torch.nan).reshape(frames, -1, 1)
    rotation, translation = extrinsics[..., :3].to(dtype), extrinsics[..., 3].to(dtype)
    points = (z * rays - translation[:, None]) @ rotation
    return points.reshape(frames, height, width, 3)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8 values on the CPU (rounded, clamped)."""
    return images.detach().cpu().float().mul(255).round_().clamp_(0, 255).to(torch.uint8)
