"""How far a reduced model's outputs move from the dense model's (profile-layers, search-schedule --verify,
evaluate-schedule).

Inputs are the model output dicts (`ReconstructionModel.forward`): depth [B, S, H, W], points [B, S, H, W, 3],
extrinsics [B, S, 3, 4] (world-to-camera, OpenCV), intrinsics [B, S, 3, 3]; only the keys both dicts hold are compared.
Each run is first put in its own frame-0 camera coordinates (cameras as poses relative to frame 0, points mapped by the
run's own frame-0 extrinsics), so a change of world frame is no deviation, while a change of scale is.

Terms, each averaged over the batch:
  depth                relative L1: sum |D_r - D_d| / sum |D_d| over all frames and pixels
  points               relative L2: ||P_r - P_d|| / ||P_d|| (Frobenius over frames and pixels, frame-0 camera
                       coordinates, so the denominator is the scene's depth scale)
  camera_center        RMS over frames of ||C_r - C_d|| (camera centres relative to frame 0) divided by the scene scale:
                       the median dense depth (else the median distance of the dense points from camera 0, else the RMS
                       dense camera centre)
  camera_rotation_deg  mean over frames 1..S-1 of the angle of R_r R_d^T (rotations relative to frame 0), in degrees
  focal                mean of |f_r - f_d| / f_d over fx and fy of all frames
score: the weighted sum of the terms present. DEFAULT_WEIGHTS give every term weight 1 except camera_rotation_deg,
weighted pi / 180 so that it counts in radians (a rotation of a radians moves points at depth z by about a * z, a
relative error of a).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from spark3r.errors import Spark3rError
from spark3r.evaluate.metrics import camera_centers, rotation_angle_deg

SHAPES = {"depth": "[B, S, H, W]", "points": "[B, S, H, W, 3]", "extrinsics": "[B, S, 3, 4]",
          "intrinsics": "[B, S, 3, 3]"}
DEFAULT_WEIGHTS = {"depth": 1.0, "points": 1.0, "camera_center": 1.0, "camera_rotation_deg": math.pi / 180,
                   "focal": 1.0}


def output_deviation(dense: Mapping[str, torch.Tensor], reduced: Mapping[str, torch.Tensor],
                     weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Relative deviation of `reduced` from `dense` per output term, and their weighted sum `score` (module docstring).

    weights: overrides of DEFAULT_WEIGHTS by term name. To compare many reduced runs with one dense run, build its
    `DenseReference` once.
    """
    return DenseReference(dense).deviation(reduced, weights)


class DenseReference:
    """One dense run's outputs, prepared once for `output_deviation` against many reduced runs: checked float64
    copies, points and cameras relative to frame 0, and the scene scale (a median over every dense depth pixel, the
    slowest part of a comparison on a GPU), per set of keys the runs share."""

    def __init__(self, dense: Mapping[str, torch.Tensor]):
        self.dense = dense
        self._prepared: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def deviation(self, reduced: Mapping[str, torch.Tensor],
                  weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """`output_deviation(dense, reduced, weights)`."""
        weights = _weights(weights)
        keys = tuple(key for key in SHAPES if key in self.dense and key in reduced)
        if not keys:
            raise Spark3rError(f"the dense and reduced outputs share none of {', '.join(SHAPES)}: nothing to compare")
        dense = self.prepared(keys)
        reduced = {key: _checked(reduced[key], key, "reduced") for key in keys}
        for key in keys:
            if dense[key].shape != reduced[key].shape:
                raise Spark3rError(f"the dense and reduced {key!r} outputs differ in shape ({tuple(dense[key].shape)} "
                                   f"vs {tuple(reduced[key].shape)}): run both on the same clip")

        terms: dict[str, torch.Tensor] = {}
        if "depth" in keys:
            terms["depth"] = _relative_norm(reduced["depth"] - dense["depth"], dense["depth"], order=1)
        if "points" in keys:
            reduced_points = reduced["points"]
            if "extrinsics" in keys:
                reduced_points = _to_first_camera(reduced_points, reduced["extrinsics"])
            terms["points"] = _relative_norm(reduced_points - dense["first_camera_points"],
                                             dense["first_camera_points"], order=2)
        if "extrinsics" in keys:
            reduced_cameras = _relative_to_first(reduced["extrinsics"])
            reduced_centers = camera_centers(reduced_cameras)
            terms["camera_center"] = ((reduced_centers - dense["centers"]).square().sum(-1).mean(-1).sqrt()
                                      / dense["scale"])
            angle = rotation_angle_deg(reduced_cameras[:, 1:, :, :3], dense["cameras"][:, 1:, :, :3])
            terms["camera_rotation_deg"] = angle.mean(-1) if angle.shape[-1] else torch.zeros_like(dense["scale"])
        if "intrinsics" in keys:
            focal = dense["focal"]
            reduced_focal = torch.stack([reduced["intrinsics"][..., 0, 0], reduced["intrinsics"][..., 1, 1]], -1)
            terms["focal"] = ((reduced_focal - focal).abs() / focal.abs().clamp(min=1e-12)).flatten(1).mean(-1)

        deviation = {name: float(value.mean()) for name, value in terms.items()}
        deviation["score"] = sum(weights[name] * value for name, value in deviation.items())
        return deviation

    def prepared(self, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The dense outputs of `keys` (float64, checked) and what every comparison on those keys derives from them
        alone: "first_camera_points", "cameras", "centers", "scale", "focal"."""
        if keys not in self._prepared:
            dense = {key: _checked(self.dense[key], key, "dense") for key in keys}
            if "points" in keys:
                dense["first_camera_points"] = _to_first_camera(dense["points"], dense["extrinsics"]) \
                    if "extrinsics" in keys else dense["points"]
            if "extrinsics" in keys:
                dense["cameras"] = _relative_to_first(dense["extrinsics"])
                dense["centers"] = camera_centers(dense["cameras"])
                dense["scale"] = _scene_scale(dense, dense["centers"])
            if "intrinsics" in keys:
                dense["focal"] = torch.stack([dense["intrinsics"][..., 0, 0], dense["intrinsics"][..., 1, 1]], -1)
            self._prepared[keys] = dense
        return self._prepared[keys]


def _weights(overrides: Mapping[str, float] | None) -> dict[str, float]:
    weights = dict(DEFAULT_WEIGHTS)
    for name, value in (overrides or {}).items():
        if name not in DEFAULT_WEIGHTS:
            raise Spark3rError(f"unknown deviation weight {name!r}: use one of {', '.join(DEFAULT_WEIGHTS)}")
        if not (math.isfinite(value) and value >= 0):
            raise Spark3rError(f"deviation weight {name} is {value}: give a finite number >= 0")
        weights[name] = float(value)
    return weights


def _checked(value: torch.Tensor, key: str, run: str) -> torch.Tensor:
    """`value` as float64 after checking its rank, trailing shape and finiteness."""
    if not torch.is_tensor(value):
        raise Spark3rError(f"the {run} {key!r} output is a {type(value).__name__}, not a tensor {SHAPES[key]}")
    trailing = {"depth": (), "points": (3,), "extrinsics": (3, 4), "intrinsics": (3, 3)}[key]
    rank = {"depth": 4, "points": 5, "extrinsics": 4, "intrinsics": 4}[key]
    if value.dim() != rank or tuple(value.shape[value.dim() - len(trailing):]) != trailing:
        raise Spark3rError(f"the {run} {key!r} output has shape {tuple(value.shape)}, not {SHAPES[key]}")
    if not torch.isfinite(value).all():
        fix = ("the model's weights or the input frames are broken: check them" if run == "dense" else
               "the reduced forward is numerically broken: try a milder schedule, or fp32 if it ran in bf16 or fp16")
        raise Spark3rError(f"the {run} {key!r} output holds NaN or Inf values: {fix}")
    return value.detach().double()


def _relative_norm(difference: torch.Tensor, reference: torch.Tensor, order: int) -> torch.Tensor:
    """||difference|| / ||reference|| per batch item (L1 or Frobenius over everything else)."""
    difference, reference = difference.flatten(1), reference.flatten(1)
    return difference.norm(p=order, dim=1) / reference.norm(p=order, dim=1).clamp(min=1e-12)


def _relative_to_first(extrinsics: torch.Tensor) -> torch.Tensor:
    """Extrinsics [B, S, 3, 4] of E_i E_0^-1: the same cameras with camera 0 as the world frame."""
    rotation, translation = extrinsics[..., :3], extrinsics[..., 3]
    relative = rotation @ rotation[:, :1].transpose(-1, -2)
    return torch.cat([relative, (translation - (relative @ translation[:, :1, :, None])[..., 0])[..., None]], -1)


def _to_first_camera(points: torch.Tensor, extrinsics: torch.Tensor) -> torch.Tensor:
    """Points [B, S, H, W, 3] mapped into camera 0's frame by frame 0's extrinsics."""
    rotation, translation = extrinsics[:, 0, :, :3], extrinsics[:, 0, :, 3]
    return points @ rotation[:, None, None].transpose(-1, -2) + translation[:, None, None, None]


def _scene_scale(dense: dict[str, torch.Tensor], centers: torch.Tensor) -> torch.Tensor:
    """Per batch item: median dense depth, else median distance of dense points from camera 0, else RMS centre."""
    if "depth" in dense:
        scale = dense["depth"].flatten(1).abs().median(dim=1).values
    elif "points" in dense:
        scale = dense["first_camera_points"].flatten(1, -2).norm(dim=-1).median(dim=1).values
    else:
        scale = centers.square().sum(-1).mean(-1).sqrt()
    return torch.where(scale > 0, scale, torch.ones_like(scale))

