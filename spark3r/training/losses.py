"""What training the tiny model compares: ground truth normalised as VGGT trains on it, and VGGT's losses.

- targets: cameras relative to frame 0, points in frame 0's camera coordinates, and depth, points and translations
  divided by the mean distance of the clip's points from camera 0;
- camera: L1 on pose_enc (translation, quaternion xyzw, field of view; FoV weighted 0.5) of every refinement iteration
  of the camera head, iteration i of n weighted 0.6^(n-1-i);
- relative pose (opt-in, `relative_weight`): of the pairs (i, i + d) of a clip for d in `relative_offsets` (1, 2, 4,
  ..., 32 by default), the chordal distance of the relative rotation R_{i+d} R_i^T and the L1 of the relative
  translation, weighted over iterations as the camera loss; invariant to a rigid motion of the predicted world, unlike
  the per-frame loss;
- depth and points: VGGT's aleatoric loss conf * |err| - alpha * log(conf) (alpha 0.2) plus the plain |err| and a
  3-scale gradient-matching term (VGGT uses a normal loss for points; the gradient term is used for both here).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spark3r.models.geometry import quaternion_to_matrix

CONF_ALPHA = 0.2
CAMERA_GAMMA = 0.6
RELATIVE_OFFSETS = (1, 2, 4, 8, 16, 32)
FOCAL_WEIGHT = 0.5
GRADIENT_SCALES = 3


def matrix_to_quaternion(rotation: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] -> unit quaternions [..., 4] in xyzw (scalar last) with w >= 0.

    Each of the four components' magnitude is computed from the diagonal; the quaternion is read off the row of the
    largest one, which is well conditioned for every rotation.
    """
    m = rotation
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    twice_abs = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22],
                            dim=-1).clamp(min=0).sqrt()  # 2 |w|, 2 |x|, 2 |y|, 2 |z|
    d21, d02, d10 = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    s10, s02, s21 = m[..., 1, 0] + m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 2, 1] + m[..., 1, 2]
    candidates = torch.stack([  # rows: (w, x, y, z) * 2 * twice_abs[i], read off component i
        torch.stack([twice_abs[..., 0] ** 2, d21, d02, d10], dim=-1),
        torch.stack([d21, twice_abs[..., 1] ** 2, s10, s02], dim=-1),
        torch.stack([d02, s10, twice_abs[..., 2] ** 2, s21], dim=-1),
        torch.stack([d10, s02, s21, twice_abs[..., 3] ** 2], dim=-1),
    ], dim=-2) / (2 * twice_abs[..., None].clamp(min=1e-12))
    best = twice_abs.argmax(dim=-1)
    wxyz = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    wxyz = wxyz * torch.where(wxyz[..., :1] < 0, -1.0, 1.0)
    return F.normalize(wxyz[..., [1, 2, 3, 0]], dim=-1)


def pose_encoding(extrinsics: Tensor, intrinsics: Tensor, image_size: tuple[int, int]) -> Tensor:
    """VGGT's absT_quaR_FoV: extrinsics [..., 3, 4], intrinsics [..., 3, 3] of an H x W image -> [..., 9] =
    [t (3), quaternion xyzw (4), fov_h, fov_w] with fov = 2 atan(size / 2 / focal)."""
    height, width = image_size
    fov_h = 2 * torch.atan(height / 2 / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan(width / 2 / intrinsics[..., 0, 0])
    return torch.cat([extrinsics[..., 3], matrix_to_quaternion(extrinsics[..., :3]), fov_h[..., None],
                      fov_w[..., None]], dim=-1)


def relative_to_first(extrinsics: Tensor) -> Tensor:
    """World-to-camera extrinsics [B, S, 3, 4] -> E_i E_0^-1: the same cameras with camera 0 as the world frame."""
    rotation, translation = extrinsics[..., :3], extrinsics[..., 3]
    relative = rotation @ rotation[:, :1].transpose(-1, -2)
    return torch.cat([relative, (translation - (relative @ translation[:, :1, :, None])[..., 0])[..., None]], dim=-1)


@dataclass
class Targets:
    """Ground truth normalised as VGGT trains on it (frame-0 cameras, unit mean point distance).

    depth [B, S, H, W]; points [B, S, H, W, 3] in frame 0's camera coordinates (0 where invalid); valid [B, S, H, W];
    extrinsics [B, S, 3, 4] relative to frame 0; pose_enc [B, S, 9]; scale [B]: the distance the scene was divided by.
    """

    depth: Tensor
    points: Tensor
    valid: Tensor
    extrinsics: Tensor
    pose_enc: Tensor
    scale: Tensor


def camera_points(depth: Tensor, intrinsics: Tensor) -> Tensor:
    """Camera-frame points [..., H, W, 3] of z-depth [..., H, W] with skew-free intrinsics [..., 3, 3]: pixel
    (row i, column j) has its centre at (j + 0.5, i + 0.5), as spark3r.data.clip.unproject_depth. Written without a
    matrix inverse (torch.linalg.inv waits for the GPU), so the training loop has no host sync."""
    height, width = depth.shape[-2:]
    fx, fy = intrinsics[..., 0, 0, None, None], intrinsics[..., 1, 1, None, None]
    cx, cy = intrinsics[..., 0, 2, None, None], intrinsics[..., 1, 2, None, None]
    cols = torch.arange(width, device=depth.device, dtype=depth.dtype) + 0.5
    rows = torch.arange(height, device=depth.device, dtype=depth.dtype)[:, None] + 0.5
    return torch.stack([(cols - cx) / fx * depth, (rows - cy) / fy * depth, depth], dim=-1)


def scene_targets(depth: Tensor, intrinsics: Tensor, extrinsics: Tensor) -> Targets:
    """Normalised targets of clips: depth [B, S, H, W] (z-depth; <= 0 or non-finite = none), intrinsics [B, S, 3, 3]
    (no skew), extrinsics [B, S, 3, 4] world-to-camera (OpenCV)."""
    height, width = depth.shape[-2:]
    depth, intrinsics, extrinsics = depth.float(), intrinsics.float(), extrinsics.float()
    relative = relative_to_first(extrinsics)
    valid = torch.isfinite(depth) & (depth > 0)
    depth = torch.where(valid, depth, 0.0)
    offset = camera_points(depth, intrinsics) - relative[:, :, None, None, :, 3]
    points = torch.einsum("bshwi,bsij->bshwj", offset, relative[..., :3])  # R^T (x - t): frame 0's camera frame
    points = torch.where(valid[..., None], points, 0.0)
    count = valid.flatten(1).sum(1).clamp(min=1)
    scale = (points.norm(dim=-1).flatten(1).sum(1) / count).clamp(min=1e-6)
    depth = depth / scale[:, None, None, None]
    points = points / scale[:, None, None, None, None]
    relative = torch.cat([relative[..., :3], relative[..., 3:] / scale[:, None, None, None]], dim=-1)
    return Targets(depth, points, valid, relative, pose_encoding(relative, intrinsics, (height, width)), scale)


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of `values` over the True entries of `valid` (same shape), without a host sync."""
    return (values * valid).sum() / valid.sum().clamp(min=1)


def confidence_loss(error: Tensor, conf: Tensor, valid: Tensor, alpha: float = CONF_ALPHA) -> Tensor:
    """VGGT's aleatoric-uncertainty loss: mean over valid pixels of conf * error - alpha * log(conf) (conf >= 1)."""
    return masked_mean(conf * error - alpha * torch.log(conf), valid)


def gradient_loss(pred: Tensor, target: Tensor, valid: Tensor, scales: int = GRADIENT_SCALES) -> Tensor:
    """Gradient matching over `scales` pixel strides 1, 2, 4, ...: pred, target [N, H, W, C], valid [N, H, W].

    At each scale, sum |d(pred - target)| over horizontal and vertical neighbours that are both valid, divided by the
    number of valid values (pixels x C); the scales are averaged (VGGT's "grad" loss).
    """
    total = pred.new_zeros(())
    for scale in range(scales):
        step = 2**scale
        mask = valid[:, ::step, ::step, None].to(pred.dtype)
        diff = (pred[:, ::step, ::step] - target[:, ::step, ::step]) * mask
        grad_x = (diff[:, :, 1:] - diff[:, :, :-1]).abs() * (mask[:, :, 1:] * mask[:, :, :-1])
        grad_y = (diff[:, 1:] - diff[:, :-1]).abs() * (mask[:, 1:] * mask[:, :-1])
        total = total + (grad_x.sum() + grad_y.sum()) / (mask.sum() * pred.shape[-1]).clamp(min=1)
    return total / scales


def dense_loss(pred: Tensor, conf: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Confidence loss + plain L1/L2 + gradient term of a dense prediction [B, S, H, W, C] with conf [B, S, H, W]."""
    error = (pred - target).norm(dim=-1)
    flat = (pred.flatten(0, 1), target.flatten(0, 1), valid.flatten(0, 1))
    return confidence_loss(error, conf, valid) + masked_mean(error, valid) + gradient_loss(*flat)


def camera_loss(pose_iterations: list[Tensor], target: Tensor, gamma: float = CAMERA_GAMMA) -> Tensor:
    """L1 of every camera-head iteration's pose_enc [B, S, 9] against `target`: translation + quaternion + 0.5 FoV,
    iteration i of n weighted gamma^(n-1-i), averaged over iterations."""
    errors = [(pred - target).abs() for pred in pose_iterations]
    return iteration_weighted([error[..., :3].mean() + error[..., 3:7].mean() + FOCAL_WEIGHT * error[..., 7:].mean()
                               for error in errors], gamma)


def iteration_weighted(losses: list[Tensor], gamma: float) -> Tensor:
    """The camera head's iterations' losses (scalars, first to last) combined: iteration i of n weighted
    gamma^(n-1-i), averaged over iterations."""
    count = len(losses)
    return sum(gamma ** (count - 1 - index) * loss for index, loss in enumerate(losses)) / count


def relative_poses(pose_enc: Tensor, offsets: list[int]) -> list[tuple[Tensor, Tensor]]:
    """Relative poses of the frame pairs (i, i + d) of pose_enc [B, S, 9] (world-to-camera: x_cam = R x + t), for
    each offset d: rotations R_{i+d} R_i^T [B, S - d, 3, 3] and translations t_{i+d} - R_{i+d} R_i^T t_i
    [B, S - d, 3], the quaternions normalised first."""
    rotation = quaternion_to_matrix(F.normalize(pose_enc[..., 3:7], dim=-1))
    translation = pose_enc[..., :3, None]
    poses = []
    for offset in offsets:
        relative = rotation[:, offset:] @ rotation[:, :-offset].transpose(-1, -2)
        poses.append((relative, (translation[:, offset:] - relative @ translation[:, :-offset])[..., 0]))
    return poses


def relative_pose_loss(pose_iterations: list[Tensor], target: Tensor, offsets: tuple[int, ...] = RELATIVE_OFFSETS,
                       gamma: float = CAMERA_GAMMA) -> Tensor:
    """Relative-pose loss of every camera-head iteration's pose_enc [B, S, 9] against `target` [B, S, 9]: for each
    offset d < S, over the pairs (i, i + d) of each clip, the mean chordal distance ||R_pred - R_true||_F of the
    relative rotations plus the mean absolute error of the relative translations (per component, as `camera_loss`);
    averaged over offsets, iteration i of n weighted gamma^(n-1-i), averaged over iterations. Invariant to a rigid
    motion of the predicted world (no frame-0 gauge); 0 when no offset is below S."""
    used = [offset for offset in offsets if 0 < offset < target.shape[1]]
    truth = relative_poses(target, used)
    losses = []
    for pred in pose_iterations:
        error = target.new_zeros(())
        for (rotation, translation), (true_rotation, true_translation) in zip(relative_poses(pred, used), truth):
            chordal = torch.linalg.matrix_norm(rotation - true_rotation)
            error = error + chordal.mean() + (translation - true_translation).abs().mean()
        losses.append(error / max(len(used), 1))
    return iteration_weighted(losses, gamma)


@contextlib.contextmanager
def camera_iterations(model: nn.Module) -> Iterator[list[Tensor]]:
    """Inside the block, the list it yields fills with the pose_enc [B, S, 9] of each camera-head refinement
    iteration of the forwards run: the running sum of `camera_head.pose_branch`'s deltas, activated as the head does
    (FoV through ReLU). The last entry of a forward equals its output pose_enc."""
    raw: list[Tensor] = []
    poses: list[Tensor] = []

    def record(module: nn.Module, args: tuple, delta: Tensor) -> None:
        raw.append(delta if len(raw) % model.camera_head.iterations == 0 else raw[-1] + delta)
        poses.append(torch.cat([raw[-1][..., :7], torch.relu(raw[-1][..., 7:])], dim=-1))

    handle = model.camera_head.pose_branch.register_forward_hook(record)
    try:
        yield poses
    finally:
        handle.remove()


def training_loss(outputs: dict[str, Tensor], pose_iterations: list[Tensor], targets: Targets,
                  camera_weight: float, relative_weight: float = 0.0,
                  relative_offsets: tuple[int, ...] = RELATIVE_OFFSETS) -> tuple[Tensor, Tensor]:
    """(total loss, [camera, depth, points, relative] parts, unweighted) of one batch: camera_weight * camera +
    relative_weight * relative (over the frame pairs `relative_offsets` apart) + depth + points. relative_weight 0
    skips the relative-pose loss (its part is 0)."""
    camera = camera_loss(pose_iterations, targets.pose_enc)
    depth = dense_loss(outputs["depth"][..., None], outputs["depth_conf"], targets.depth[..., None], targets.valid)
    points = dense_loss(outputs["points"], outputs["points_conf"], targets.points, targets.valid)
    total = camera_weight * camera + depth + points
    relative = camera.new_zeros(())
    if relative_weight:
        relative = relative_pose_loss(pose_iterations, targets.pose_enc, relative_offsets)
        total = total + relative_weight * relative
    return total, torch.stack([camera, depth, points, relative]).detach()
