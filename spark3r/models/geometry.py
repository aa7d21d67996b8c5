"""Camera geometry the model families share: rotations, VGGT's pose encoding, rigid-transform inverses, and depth
unprojected to world points."""
from __future__ import annotations

import torch
from torch import Tensor


def quaternion_to_matrix(quaternion: Tensor) -> Tensor:
    """Unit or non-unit quaternions [..., 4] in xyzw (scalar last) -> rotation matrices [..., 3, 3]."""
    x, y, z, w = quaternion.unbind(-1)
    two_s = 2.0 / (quaternion * quaternion).sum(-1)
    matrix = torch.stack([
        1 - two_s * (y * y + z * z), two_s * (x * y - z * w), two_s * (x * z + y * w),
        two_s * (x * y + z * w), 1 - two_s * (x * x + z * z), two_s * (y * z - x * w),
        two_s * (x * z - y * w), two_s * (y * z + x * w), 1 - two_s * (x * x + y * y),
    ], dim=-1)
    return matrix.unflatten(-1, (3, 3))


def pose_encoding_to_extrinsics_intrinsics(pose_enc: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """pose_enc [..., 9] = [t (3), quaternion xyzw (4), fov_h, fov_w] of an H x W image ->
    extrinsics [..., 3, 4] = [R | t] (world-to-camera, OpenCV), intrinsics [..., 3, 3] (principal point at the centre).
    """
    height, width = image_size
    rotation = quaternion_to_matrix(pose_enc[..., 3:7])
    extrinsics = torch.cat([rotation, pose_enc[..., :3, None]], dim=-1)
    fy = (height / 2.0) / torch.tan(pose_enc[..., 7] / 2.0)
    fx = (width / 2.0) / torch.tan(pose_enc[..., 8] / 2.0)
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    intrinsics = torch.stack([
        fx, zero, zero + width / 2.0,
        zero, fy, zero + height / 2.0,
        zero, zero, one,
    ], dim=-1).unflatten(-1, (3, 3))
    return extrinsics, intrinsics


def se3_inverse(pose: Tensor) -> Tensor:
    """Inverse of rigid transforms [..., 4, 4] (or [..., 3, 4]) -> [..., 4, 4]."""
    rotation_t = pose[..., :3, :3].transpose(-1, -2)
    translation = -(rotation_t @ pose[..., :3, 3:])
    bottom = torch.zeros_like(pose[..., :1, :4])
    bottom[..., 0, 3] = 1.0
    return torch.cat([torch.cat([rotation_t, translation], dim=-1), bottom], dim=-2)


def unproject_pixel_indices(depth: Tensor, intrinsics: Tensor, cam_to_world: Tensor) -> Tensor:
    """depth [B, S, H, W], intrinsics [B, S, 3, 3], camera-to-world [B, S, 3 or 4, 4] -> world points [B, S, H, W, 3].

    Pixel (u, v) sits at its integer indices, as upstream DA3 and VGGT-Omega place it: camera point =
    depth * K^-1 [u, v, 1]. (Ground truth uses pixel centres instead: spark3r.data.clip.unproject_depth.)
    """
    height, width = depth.shape[-2:]
    v, u = torch.meshgrid(
        torch.arange(height, device=depth.device, dtype=depth.dtype),
        torch.arange(width, device=depth.device, dtype=depth.dtype),
        indexing="ij",
    )
    pixels = torch.stack([u, v, torch.ones_like(u)], dim=-1)
    rays = torch.einsum("bsij,hwj->bshwi", torch.linalg.inv(intrinsics), pixels)
    points = rays * depth[..., None]
    return torch.einsum("bsij,bshwj->bshwi", cam_to_world[..., :3, :3], points) + cam_to_world[:, :, None, None, :3, 3]
