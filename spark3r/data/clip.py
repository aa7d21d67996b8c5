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
    world-to-camera (OpenCV). `source` says where the clip came from; `frame_names` (optional, one per frame) name
    each frame by its file stem or, for videos and .npz clips, by its index in the source (`frame000042`).
    """

    name: str
    images: torch.Tensor
    depth: torch.Tensor | None = None
    intrinsics: torch.Tensor | None = None
    extrinsics: torch.Tensor | None = None
    source: str = ""
    frame_names: tuple[str, ...] = ()

    def __post_init__(self):
        where = self.source or self.name
        if self.images.dim() != 4 or self.images.shape[1] != 3 or not self.images.is_floating_point():
            raise Spark3rError(f"clip {where} has images of shape {tuple(self.images.shape)} and dtype "
                               f"{self.images.dtype}: give float images [S, 3, H, W] in [0, 1]")
        frames, _, height, width = self.images.shape
        if self.frame_names and len(self.frame_names) != frames:
            raise Spark3rError(f"clip {where} has {len(self.frame_names)} frame names for {frames} frames: "
                               "give one name per frame (or none)")
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
        indices = list(indices)
        index = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        names = tuple(self.frame_names[i] for i in indices) if self.frame_names else ()
        return dataclasses.replace(self._map(lambda tensor: tensor[index]), frame_names=names)

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
    rows, cols = torch.meshgrid(torch.arange(height, device=depth.device), torch.arange(width, device=depth.device),
                                indexing="ij")
    valid = torch.isfinite(depth) & (depth > 0)
    z = torch.where(valid, depth, torch.nan).reshape(frames, -1)
    return unproject_pixels(z, rows.flatten(), cols.flatten(), intrinsics, extrinsics).reshape(frames, height, width, 3)


def unproject_pixels(z: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, intrinsics: torch.Tensor,
                     extrinsics: torch.Tensor) -> torch.Tensor:
    """World points [S, n, 3] of n pixels (row, column indices rows, cols [n]) at z-depth z [S, n], intrinsics
    [S, 3, 3], world-to-camera extrinsics [S, 3, 4]: x_world = R^T (z K^-1 [j + 0.5, i + 0.5, 1] - t), in z's dtype
    (at least float32)."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    pixels = torch.stack([cols.to(dtype) + 0.5, rows.to(dtype) + 0.5, torch.ones(len(rows), dtype=dtype,
                                                                                  device=z.device)], dim=-1)
    rays = pixels[None] @ torch.linalg.inv(intrinsics.to(dtype)).transpose(-1, -2)  # [S, n, 3]
    rotation, translation = extrinsics[..., :3].to(dtype), extrinsics[..., 3].to(dtype)
    return (z.to(dtype)[..., None] * rays - translation[:, None]) @ rotation


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8 values on the CPU (rounded, clamped)."""
    return images.detach().cpu().float().mul(255).round_().clamp_(0, 255).to(torch.uint8)
