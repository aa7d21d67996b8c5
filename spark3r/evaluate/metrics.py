"""Reconstruction quality against ground truth: depth, point maps and cameras (float64, one clip at a time).

- `depth_metrics`: Abs Rel and delta < 1.25 over all valid pixels of the clip pooled (gt > 0 and finite), after median
  scale alignment per frame ("frame"), per sequence ("sequence") or none ("none").
- `point_metrics`: accuracy / completeness (mean and median nearest-neighbour distances, scipy cKDTree on up to
  `max_points` random valid pixels, drawn evenly over frames) and normal consistency, after a Umeyama Sim(3)
  alignment of the predicted point map to the ground truth (pixel correspondences), as 7-Scenes / NRGBD report them.
- `camera_metrics`: ATE (RMSE of camera centres after Sim(3) alignment of the centres), RPE-trans / RPE-rot (RMSE over
  consecutive frame pairs of the relative-pose error, after the same alignment) and AUC@30 over all frame pairs of
  max(rotation error, translation-direction error) with 1-degree bins, as VGGT / pi3 report it.

Cameras are extrinsics [S, 3, 4] world-to-camera (OpenCV); tensors (any device) or arrays are accepted anywhere. Depth
is evaluated on its own device; point maps are drawn frame by frame, so long clips stay within memory.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree

from spark3r.errors import Spark3rError

DEPTH_ALIGNMENTS = ("frame", "sequence", "none")
POINT_ALIGNMENTS = ("sim3", "none")
AUC_THRESHOLD = 30


def _float64(value) -> torch.Tensor:
    """A float64 tensor of a tensor (on its device) or an array (on the CPU)."""
    if torch.is_tensor(value):
        return value.detach().double()
    return torch.as_tensor(np.asarray(value), dtype=torch.float64)


def _mask(mask, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """A bool tensor of `shape` on `device` from a tensor or array mask."""
    mask = torch.as_tensor(mask.detach() if torch.is_tensor(mask) else np.asarray(mask)).to(device, torch.bool)
    if mask.numel() != shape.numel():
        raise Spark3rError(f"the mask has {mask.numel()} entries but the maps have {shape.numel()} pixels: "
                           "give one entry per pixel")
    return mask.reshape(shape)


def umeyama(src, dst, with_scale: bool = True) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Least-squares similarity (scale, rotation [3, 3], translation [3]): dst ~ scale * rotation @ src + translation.

    src, dst: [N, 3] corresponding points, N >= 2. Umeyama (1991), with the reflection fix; float64.
    """
    src, dst = _float64(src).cpu(), _float64(dst).cpu()
    if src.dim() != 2 or src.shape[1] != 3 or src.shape != dst.shape:
        raise Spark3rError(f"umeyama needs two point sets of the same shape [N, 3], got {tuple(src.shape)} "
                           f"and {tuple(dst.shape)}")
    if len(src) < 2 or not (torch.isfinite(src).all() and torch.isfinite(dst).all()):
        raise Spark3rError(f"umeyama needs at least 2 finite point pairs, got {len(src)}: "
                           "check the inputs for NaN / Inf")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_centered, dst_centered = src - src_mean, dst - dst_mean
    src_variance = src_centered.square().sum(1).mean()
    if src_variance <= 1e-24:
        raise Spark3rError("umeyama got source points that all coincide: the alignment is undefined")
    covariance = dst_centered.T @ src_centered / len(src)
    u, singular, vt = torch.linalg.svd(covariance)
    fix = torch.ones(3, dtype=torch.float64)
    if torch.det(u) * torch.det(vt) < 0:
        fix[2] = -1
    rotation = u @ torch.diag(fix) @ vt
    scale = float((singular * fix).sum() / src_variance) if with_scale else 1.0
    translation = dst_mean - scale * rotation @ src_mean
    return scale, rotation, translation


def depth_metrics(pred, gt, *, align: str = "frame", mask=None) -> dict:
    """Abs Rel and delta < 1.25 of predicted depth [S, H, W] against ground truth [S, H, W].

    align: "frame" scales each frame by median(gt) / median(pred) over its valid pixels; "sequence" uses one such scale
    for the whole clip; "none" compares metric depth. Valid pixels: gt > 0 and finite (and `mask`, if given). Both
    metrics pool all valid pixels of the clip. Returns abs_rel, delta_1.25, valid_pixels and align (the alignment used).
    """
    if align not in DEPTH_ALIGNMENTS:
        raise Spark3rError(f"unknown depth alignment {align!r}: use one of {', '.join(DEPTH_ALIGNMENTS)}")
    pred, gt = _float64(pred), _float64(gt)
    if pred.shape != gt.shape or pred.dim() < 2:
        raise Spark3rError(f"predicted depth {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape: "
                           "resize the prediction to the ground-truth size")
    pred, gt = pred.reshape(-1, *pred.shape[-2:]), gt.reshape(-1, *gt.shape[-2:])
    valid = torch.isfinite(gt) & (gt > 0)
    if mask is not None:
        valid &= _mask(mask, valid.shape, valid.device)
    if not valid.any():
        raise Spark3rError("the ground-truth depth has no valid pixel (gt > 0 and finite): nothing to evaluate")
    if not torch.isfinite(pred[valid]).all():
        raise Spark3rError("the predicted depth holds NaN or Inf at valid pixels: the model's output is broken")
    scale = torch.ones(len(pred), dtype=torch.float64, device=pred.device)
    if align == "sequence":
        scale[:] = _median_ratio(gt[valid], pred[valid], "the clip")
    elif align == "frame":
        for index in range(len(pred)):
            if valid[index].any():
                scale[index] = _median_ratio(gt[index][valid[index]], pred[index][valid[index]], f"frame {index}")
    aligned = (pred * scale[:, None, None])[valid]
    target = gt[valid]
    ratio = torch.where(aligned > 0, torch.maximum(aligned / target, target / aligned), torch.inf)
    return {
        "abs_rel": float(((aligned - target).abs() / target).mean()),
        "delta_1.25": float((ratio < 1.25).double().mean()),
        "valid_pixels": int(valid.sum()),
        "align": align,
    }


def _median_ratio(gt: torch.Tensor, pred: torch.Tensor, where: str) -> float:
    pred_median = _median(pred)
    if pred_median <= 0:
        raise Spark3rError(f"the predicted depth of {where} has a median <= 0: it cannot be median-scaled")
    return _median(gt) / pred_median


def _median(values: torch.Tensor) -> float:
    """The median of a 1-D tensor; of an even count, the mean of the two middle values."""
    count = len(values)
    if count % 2:
        return float(values.kthvalue(count // 2 + 1).values)
    return float(values.kthvalue(count // 2).values + values.kthvalue(count // 2 + 1).values) / 2


def grid_normals(points: torch.Tensor) -> torch.Tensor:
    """Unit normals [S, H, W, 3] of point maps [S, H, W, 3] from central differences along the pixel grid.

    Border pixels and pixels next to a non-finite point get NaN.
    """
    normals = torch.full_like(points, torch.nan)
    across = points[:, 1:-1, 2:] - points[:, 1:-1, :-2]
    down = points[:, 2:, 1:-1] - points[:, :-2, 1:-1]
    cross = torch.linalg.cross(across, down)
    length = cross.norm(dim=-1, keepdim=True)
    normals[:, 1:-1, 1:-1] = torch.where(length > 0, cross / length, torch.nan)
    return normals


def point_metrics(pred, gt, *, mask=None, align: str = "sim3", max_points: int = 100_000, seed: int = 0) -> dict:
    """Accuracy, completeness and normal consistency of a predicted point map [S, H, W, 3] against ground truth.

    Valid pixels: both points finite (and `mask`). Up to `max_points` valid pixels are drawn, the same number from each
    frame, and both clouds are built from them. align: "sim3" first maps the prediction onto the ground truth with
    `umeyama` over those pixel pairs; "none" does not. accuracy: distance from each predicted point to the nearest
    ground-truth point; completeness: from each ground-truth point to the nearest predicted one (means and medians);
    normal_consistency: mean |cos| between the grid normals of nearest neighbours, averaged over both directions.
    """
    if align not in POINT_ALIGNMENTS:
        raise Spark3rError(f"unknown point alignment {align!r}: use one of {', '.join(POINT_ALIGNMENTS)}")
    pred = pred.detach() if torch.is_tensor(pred) else torch.as_tensor(np.asarray(pred))
    gt = gt.detach() if torch.is_tensor(gt) else torch.as_tensor(np.asarray(gt))
    if pred.shape != gt.shape or pred.dim() != 4 or pred.shape[-1] != 3:
        raise Spark3rError(f"point maps must both be [S, H, W, 3], got {tuple(pred.shape)} and {tuple(gt.shape)}")
    masks = None if mask is None else _mask(mask, pred.shape[:-1], torch.device("cpu"))
    generator = np.random.default_rng(seed)
    per_frame = -(-max_points // len(pred))
    samples = [_sample_frame(pred[index], gt[index], None if masks is None else masks[index], per_frame, generator)
               for index in range(len(pred))]
    pred_points, pred_normals, gt_points, gt_normals = (torch.cat(parts) for parts in zip(*samples))
    if len(pred_points) < 3:
        raise Spark3rError("fewer than 3 pixels have both a predicted and a ground-truth point: nothing to evaluate")
    if align == "sim3":
        scale, rotation, translation = umeyama(pred_points, gt_points)
        pred_points, pred_normals = scale * pred_points @ rotation.T + translation, pred_normals @ rotation.T
    pred_points, gt_points = pred_points.numpy(), gt_points.numpy()
    pred_normals, gt_normals = pred_normals.numpy(), gt_normals.numpy()
    accuracy, to_gt = cKDTree(gt_points).query(pred_points)
    completeness, to_pred = cKDTree(pred_points).query(gt_points)
    consistency = [np.nanmean(np.abs((pred_normals * gt_normals[to_gt]).sum(-1))),
                   np.nanmean(np.abs((gt_normals * pred_normals[to_pred]).sum(-1)))]
    return {
        "accuracy": float(accuracy.mean()),
        "accuracy_median": float(np.median(accuracy)),
        "completeness": float(completeness.mean()),
        "completeness_median": float(np.median(completeness)),
        "normal_consistency": float(np.mean(consistency)),
        "align": align,
    }


def _sample_frame(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None, count: int,
                  generator: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """Up to `count` random valid pixels of one frame: pred points and normals, gt points and normals (CPU float64)."""
    pred, gt = pred.to("cpu", torch.float64)[None], gt.to("cpu", torch.float64)[None]
    valid = torch.isfinite(pred).all(-1) & torch.isfinite(gt).all(-1)
    if mask is not None:
        valid &= mask[None]
    index = valid.flatten().nonzero()[:, 0]
    if len(index) > count:
        index = index[torch.from_numpy(np.sort(generator.choice(len(index), count, replace=False)))]
    return tuple(value.reshape(-1, 3)[index] for value in (pred, grid_normals(pred), gt, grid_normals(gt)))


def camera_centers(extrinsics: torch.Tensor) -> torch.Tensor:
    """Camera centres [S, 3] of world-to-camera extrinsics [S, 3, 4]: -R^T t."""
    return -(extrinsics[..., :3].transpose(-1, -2) @ extrinsics[..., 3:])[..., 0]


def rotation_angle_deg(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Angle in degrees of first @ second^T for rotation stacks [..., 3, 3].

    atan2 of the sine (from the skew part) and the cosine (from the trace): accurate near 0, where arccos of the
    trace alone loses half the digits (a float32 rotation against itself read about 0.004 degrees instead of 0).
    """
    relative = first @ second.transpose(-1, -2)
    skew = relative - relative.transpose(-1, -2)
    sine = torch.stack([skew[..., 2, 1], skew[..., 0, 2], skew[..., 1, 0]], -1).norm(dim=-1) / 2
    cosine = (relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.rad2deg(torch.atan2(sine, cosine))


def _relative(extrinsics: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E_a E_b^-1 for frame indices a, b: the pose of camera b in camera a's frame, as rotation and translation."""
    rotation = extrinsics[a, :, :3] @ extrinsics[b, :, :3].transpose(-1, -2)
    translation = extrinsics[a, :, 3] - (rotation @ extrinsics[b, :, 3:])[..., 0]
    return rotation, translation


def camera_metrics(pred_extrinsics, gt_extrinsics, *, align: str = "sim3") -> dict:
    """ATE, RPE-trans, RPE-rot (degrees) and AUC@30 of predicted cameras [S, 3, 4] against ground truth.

    align: "sim3" maps the predicted camera centres onto the ground truth with `umeyama` (ATE, and the scale used by
    RPE-trans); "none" compares as given. RPE: RMSE over consecutive pairs (i, i+1). AUC@30: over all pairs i < j, the
    error of a pair is max(relative rotation error, angle between relative translation directions up to sign), binned at
    1 degree up to 30 (scale-free, so it needs no alignment).
    """
    if align not in POINT_ALIGNMENTS:
        raise Spark3rError(f"unknown camera alignment {align!r}: use one of {', '.join(POINT_ALIGNMENTS)}")
    pred, gt = _float64(pred_extrinsics).cpu(), _float64(gt_extrinsics).cpu()
    if pred.shape != gt.shape or pred.dim() != 3 or pred.shape[1:] != (3, 4) or len(pred) < 2:
        raise Spark3rError(f"cameras must both be extrinsics [S, 3, 4] with S >= 2, got {tuple(pred.shape)} and "
                           f"{tuple(gt.shape)}")
    if not (torch.isfinite(pred).all() and torch.isfinite(gt).all()):
        raise Spark3rError("the cameras hold NaN or Inf values: the model's output is broken")
    pred_centers, gt_centers = camera_centers(pred), camera_centers(gt)
    if align == "sim3" and (pred_centers - pred_centers.mean(0)).abs().max() <= 1e-12:
        raise Spark3rError("the predicted cameras all sit at one point: a Sim(3) alignment needs a moving camera "
                           "(use align='none')")
    scale, rotation, translation = umeyama(pred_centers, gt_centers) if align == "sim3" else \
        (1.0, torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    aligned_centers = scale * pred_centers @ rotation.T + translation
    ate = float((aligned_centers - gt_centers).square().sum(-1).mean().sqrt())

    frames = len(pred)
    first, second = torch.arange(frames - 1), torch.arange(1, frames)
    pred_rotation, pred_translation = _relative(pred, first, second)
    gt_rotation, gt_translation = _relative(gt, first, second)
    error_translation = (gt_rotation.transpose(-1, -2) @ (scale * pred_translation - gt_translation)[..., None])[..., 0]
    rpe_trans = float(error_translation.square().sum(-1).mean().sqrt())
    rpe_rot = float(rotation_angle_deg(pred_rotation, gt_rotation).square().mean().sqrt())

    first, second = torch.triu_indices(frames, frames, offset=1)
    pred_rotation, pred_translation = _relative(pred, first, second)
    gt_rotation, gt_translation = _relative(gt, first, second)
    rotation_error = rotation_angle_deg(pred_rotation, gt_rotation)
    translation_error = _direction_angle_deg(pred_translation, gt_translation)
    return {
        "ate": ate,
        "rpe_trans": rpe_trans,
        "rpe_rot": rpe_rot,
        f"auc{AUC_THRESHOLD}": pose_auc(torch.maximum(rotation_error, translation_error).numpy()),
        "align": align,
        "pairs": "rpe: consecutive frames; auc: all pairs",
    }


def _direction_angle_deg(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between the lines of two vector stacks [..., 3] (sign ignored: in [0, 90]; 90 if one is 0)."""
    norms = first.norm(dim=-1) * second.norm(dim=-1)
    cosine = torch.where(norms > 0, (first * second).sum(-1).abs() / norms.clamp(min=1e-300), 0.0)
    return torch.rad2deg(torch.arccos(cosine.clamp(0, 1)))


def pose_auc(errors, max_threshold: int = AUC_THRESHOLD) -> float:
    """Mean over thresholds 1..max_threshold degrees of the fraction of errors below it (1-degree histogram bins)."""
    errors = np.asarray(errors, dtype=np.float64).reshape(-1)
    if errors.size == 0:
        raise Spark3rError("pose AUC needs at least one frame pair")
    histogram, _ = np.histogram(errors, bins=np.arange(max_threshold + 1))
    return float(np.mean(np.cumsum(histogram / errors.size)))

