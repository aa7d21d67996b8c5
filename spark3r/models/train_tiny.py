"""Train the bundled vggt-tiny on synthetic clips rendered on the fly, and evaluate it on held-out clips.

    python -m spark3r.models.train_tiny --steps 100000 --minutes 21 --seed 0 --out vggt-tiny.safetensors
    python -m spark3r.models.train_tiny --frames 2 --max-frames 48 --frames-per-step 384 --path mixed \
        --init old.safetensors --out vggt-tiny.safetensors
    python -m spark3r.models.train_tiny --evaluate vggt-tiny.safetensors --clips synthetic:16:1000:walk \
        --frames 8,32,128,256

Training renders new clips on the device every step (spark3r.data.synthetic: scene parameters are sampled by
DataLoader workers on the CPU, the ray cast runs on the device): `--batch` clips of `--frames` frames, or, with
`--max-frames`, clips of a length drawn per step from `--frames`..`--max-frames`, as many as fit `--frames-per-step`
frames (VGGT trains on a varying number of frames so that it generalises in length). `--path` picks the camera path:
arc (short arcs), walk (hand-held walks through the scene) or mixed (walks, and arcs for half of the steps of at most
16 frames). It trains the vggt-tiny architecture, the same code as vggt-1b, from random weights or from `--init`
weights (a shallower trunk is grown by `grow_depth`) with VGGT's losses:
- targets as VGGT normalises them: cameras relative to frame 0, points in frame 0's camera coordinates, and depth,
  points and translations divided by the mean distance of the clip's points from camera 0;
- camera: L1 on pose_enc (translation, quaternion xyzw, field of view; FoV weighted 0.5) of every refinement iteration
  of the camera head, iteration i of n weighted 0.6^(n-1-i), times `--camera-weight`;
- depth and points: VGGT's aleatoric loss conf * |err| - alpha * log(conf) (alpha 0.2) plus the plain |err| and a
  3-scale gradient-matching term (VGGT uses a normal loss for points; the gradient term is used for both here).
AdamW with linear warm-up and cosine decay to 5 % of `--lr`; the trunk runs in bf16 on CUDA (heads in fp32 as
upstream), gradients are clipped. Schedule progress is max(step / --steps, time / --minutes), so a time-limited run
still decays its learning rate to the end. A checkpoint beside `--out` (`<out stem>.ckpt.pt`) is written every
`--checkpoint-every` steps and at the end; rerunning the same command resumes from it (--minutes counts the total
training time over all resumes). The weights are written as fp16 safetensors in the state_dict layout that
`load_model("vggt-tiny", weights=path)` loads strictly (10.6 MB).

Seeds: run seed S renders, at step i, the clips of `synthetic:<clips>:<10^9 (S + 1) + i>` (the step's length and path
are drawn from the same seed); every spec seed below 10^9 is held out. The periodic eval log uses synthetic:16:999 (at
the longest training length) and `--evaluate` defaults to synthetic:16:1000:walk at 8, 32, 128 and 256 frames.

`--evaluate` prints, at each of `--frames` (a list), depth AbsRel and delta < 1.25 (median-aligned per clip), rotation
and translation error of the cameras relative to frame 0 (translation in the normalised scene scale), ATE
(Sim(3)-aligned, normalised scale) and AUC@30 for the model, the model with every global attention layer reduced to
frame-only attention, and the trivial baselines (a constant depth per clip, identity cameras).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from spark3r.cli import (
    ArgumentParser,
    add_runtime_args,
    command,
    resolve_device,
    resolve_dtype,
)
from spark3r.data.clips import Clip, open_clips, parse_synthetic_spec
from spark3r.data.synthetic import (
    Scene,
    SceneConfig,
    clip_seeds,
    render_batch,
    render_views,
    sample_clip,
)
from spark3r.errors import Spark3rError
from spark3r.evaluate.metrics import (
    camera_centers,
    camera_metrics,
    depth_metrics,
    pose_auc,
    rotation_angle_deg,
)
from spark3r.files import atomic_save
from spark3r.models.base import FrameLayout
from spark3r.models.blocks import project_heads, qkv_heads
from spark3r.models.loading import load_model
from spark3r.models.registry import get_entry

MODEL = "vggt-tiny"
TRAIN_SEED_BASE = 10**9
HELD_OUT_SPEC = "synthetic:16:999"
DEFAULT_EVAL_SPEC = "synthetic:16:1000:walk"
DEFAULT_EVAL_FRAMES = "8,32,128,256"
SCENE_PATHS = ("arc", "walk", "mixed")
MIXED_ARC_FRAMES = 16
CONF_ALPHA = 0.2
CAMERA_GAMMA = 0.6
FOCAL_WEIGHT = 0.5
GRADIENT_SCALES = 3
FINAL_LR_FRACTION = 0.05
MAX_WEIGHTS_BYTES = 25 * 10**6


# ----------------------------------------------------------------------------------------------------------- targets
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
    (row i, column j) has its centre at (j + 0.5, i + 0.5), as spark3r.data.clips.unproject_depth. Written without a
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


# ------------------------------------------------------------------------------------------------------------ losses
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
    count = len(pose_iterations)
    total = target.new_zeros(())
    for index, pred in enumerate(pose_iterations):
        error = (pred - target).abs()
        parts = error[..., :3].mean() + error[..., 3:7].mean() + FOCAL_WEIGHT * error[..., 7:].mean()
        total = total + gamma ** (count - 1 - index) * parts
    return total / count


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
                  camera_weight: float) -> tuple[Tensor, Tensor]:
    """(total loss, [camera, depth, points] parts) of one batch."""
    camera = camera_loss(pose_iterations, targets.pose_enc)
    depth = dense_loss(outputs["depth"][..., None], outputs["depth_conf"], targets.depth[..., None], targets.valid)
    points = dense_loss(outputs["points"], outputs["points_conf"], targets.points, targets.valid)
    return camera_weight * camera + depth + points, torch.stack([camera, depth, points]).detach()


def learning_rate(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from `peak` to FINAL_LR_FRACTION * peak as `progress`
    goes from 0 to 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * cosine)


# -------------------------------------------------------------------------------------------------------------- data
def train_spec_seed(seed: int, step: int) -> int:
    """The synthetic spec seed of run seed `seed` at `step`: 10^9 (seed + 1) + step (never below 10^9)."""
    return TRAIN_SEED_BASE * (seed + 1) + step


@dataclass(frozen=True)
class StepShape:
    """What one training step renders: `clips` clips of `frames` frames each, along camera path `path`.

    frames: (low, high) frame counts, drawn per step (low == high: fixed); frames_per_step: frames of a step when the
    length varies (clips = frames_per_step // length, at least 1), else `clips` clips per step; path: arc, walk or
    mixed (walks, and arcs for half of the steps of at most MIXED_ARC_FRAMES frames).
    """

    frames: tuple[int, int]
    clips: int
    frames_per_step: int | None = None
    path: str = "arc"

    def at(self, spec_seed: int) -> tuple[int, int, str]:
        """(frames, clips, path) of the step whose spec seed is `spec_seed`."""
        low, high = self.frames
        if low == high and self.path != "mixed":
            return low, self.clips, self.path
        draw = torch.Generator().manual_seed(spec_seed)
        frames = int(torch.randint(low, high + 1, (), generator=draw))
        arc = torch.rand((), generator=draw).item() < 0.5
        path = self.path if self.path != "mixed" else ("arc" if arc and frames <= MIXED_ARC_FRAMES else "walk")
        clips = self.clips if low == high else max(1, self.frames_per_step // frames)
        return frames, clips, path


class StepScenes(torch.utils.data.Dataset):
    """Item `step`: the sampled scenes and cameras of that step's clips (CPU float32), ready for `render_views`."""

    def __init__(self, seed: int, shape: StepShape, size: tuple[int, int], scene: SceneConfig):
        self.seed, self.shape, self.size, self.scene = seed, shape, size, scene

    def __getitem__(self, step: int) -> dict[str, Tensor]:
        spec_seed = train_spec_seed(self.seed, step)
        frames, clips, path = self.shape.at(spec_seed)
        scene = replace(self.scene, path=path)
        sampled = [sample_clip(clip_seed, frames, *self.size, scene) for clip_seed in clip_seeds(spec_seed, clips)]
        scene = Scene.stack([item[0] for item in sampled])
        arrays = {item.name: getattr(scene, item.name) for item in fields(Scene)}
        arrays["intrinsics"] = torch.stack([item[1] for item in sampled])
        arrays["extrinsics"] = torch.stack([item[2] for item in sampled])
        return {key: value.float() for key, value in arrays.items()}


def render_step(arrays: dict[str, Tensor], size: tuple[int, int], device: torch.device) -> tuple[Tensor, Targets]:
    """Ray-cast one step's clips on `device`: images [B, S, 3, H, W] and their normalised targets."""
    arrays = {key: value.to(device, non_blocking=True) for key, value in arrays.items()}
    intrinsics, extrinsics = arrays.pop("intrinsics"), arrays.pop("extrinsics")
    images, depth = render_views(Scene(**arrays), intrinsics, extrinsics, *size)
    return images, scene_targets(depth, intrinsics, extrinsics)


# ------------------------------------------------------------------------------------------------------ growth
TRUNK_BLOCK = re.compile(r"aggregator\.(frame_blocks|global_blocks)\.(\d+)\.(.+)")


def trunk_depth(state: dict[str, Tensor]) -> int:
    """The number of frame (= global) blocks of a VGGT state_dict."""
    return 1 + max(int(match.group(2)) for match in map(TRUNK_BLOCK.fullmatch, state) if match)


def grow_depth(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """A VGGT state_dict with d frame + d global blocks -> one with `depth` = k d of each that computes the same
    function: block i becomes block k (i + 1) - 1, after k - 1 copies of it whose LayerScale gammas are zero (identity
    blocks that training then opens). Frame and global block k (i + 1) - 1 then output what old frame and global block
    i did, so old tap t (the pair of both outputs) is new tap k (t + 1) - 1 (vggt-tiny's 1, 3, 4, 5 of 6 are 3, 7, 9,
    11 of 12)."""
    old = trunk_depth(state)
    if depth % old:
        raise Spark3rError(f"cannot grow a trunk of {old} blocks to {depth}: give a whole multiple of {old}")
    factor = depth // old
    grown = {}
    for key, value in state.items():
        match = TRUNK_BLOCK.fullmatch(key)
        if not match:
            grown[key] = value
            continue
        kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
        for copy in range(factor):
            silent = copy < factor - 1 and rest in ("ls1.gamma", "ls2.gamma")
            grown[f"aggregator.{kind}.{factor * index + copy}.{rest}"] = torch.zeros_like(value) if silent else value
    return grown


def initial_weights(path: str, model: nn.Module) -> None:
    """Load `path` (a safetensors file of vggt-tiny weights, any trunk depth that divides the model's) into `model`,
    strictly, growing its trunk with `grow_depth` first."""
    try:
        state = load_file(path)
    except (OSError, ValueError) as error:
        raise Spark3rError(f"--init {path} is not a readable safetensors file ({error}): give a vggt-tiny weights "
                           "file") from None
    depth = len(model.aggregator.frame_blocks)
    state = grow_depth(state, depth) if trunk_depth(state) != depth else state
    missing, unexpected = model.load_state_dict({key: value.float() for key, value in state.items()}, strict=False)
    if missing or unexpected:
        raise Spark3rError(f"--init {path} does not fit {MODEL}: missing {missing[:3]}, unexpected {unexpected[:3]}")


# ------------------------------------------------------------------------------------------------------ frame-only
@contextlib.contextmanager
def frame_only_global_attention(model: nn.Module, layout: FrameLayout) -> Iterator[None]:
    """Inside the block, every global attention layer of `model` attends within each frame only (block-diagonal
    attention over the `layout.tokens_per_frame` tokens of each frame); the class forward is restored on exit."""
    modules = model.adapter.modules(model)
    if any("forward" in vars(attn) for attn in modules):
        raise Spark3rError("the model's global attention is already patched: remove the other patch first")

    def frame_only(attn: nn.Module):
        def forward(x: Tensor, pos: Tensor | None = None) -> Tensor:
            q, k, v = qkv_heads(attn, x, pos)
            batch, heads, tokens, head_dim = q.shape
            if tokens != layout.tokens:
                raise Spark3rError(f"global attention got {tokens} tokens but the layout holds {layout.tokens}: "
                                   "give the layout of the clip being run")
            per_frame = (batch, heads, layout.frames, layout.tokens_per_frame, head_dim)
            out = F.scaled_dot_product_attention(q.reshape(per_frame), k.reshape(per_frame), v.reshape(per_frame))
            return project_heads(attn, out.reshape(batch, heads, tokens, head_dim))

        return forward

    for attn in modules:
        attn.forward = frame_only(attn)
    try:
        yield
    finally:
        for attn in modules:
            vars(attn).pop("forward", None)


# -------------------------------------------------------------------------------------------------------- evaluation
EVAL_ROWS = ("model", "frame_only", "trivial")
EVAL_LABELS = {"model": "model", "frame_only": "model, frame-only global attention",
               "trivial": "constant depth / identity cameras"}
EVAL_COLUMNS = (("abs_rel", "depth AbsRel", 3), ("delta_1.25", "delta<1.25", 3), ("rotation_deg", "rot err deg", 2),
                ("translation", "trans err", 3), ("ate", "ATE", 3), ("auc30", "AUC@30", 3))


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, chunk: int = 16, frame_only: bool = False) -> tuple[Tensor, Tensor]:
    """Depth [N, S, H, W] and extrinsics [N, S, 3, 4] (CPU) of N clips of images [N, S, 3, H, W], `chunk` at a time."""
    depth, extrinsics = [], []
    layout = model.adapter.layout(images)
    for start in range(0, len(images), chunk):
        with frame_only_global_attention(model, layout) if frame_only else contextlib.nullcontext():
            outputs = model(images[start:start + chunk])
        depth.append(outputs["depth"].float().cpu())
        extrinsics.append(outputs["extrinsics"].float().cpu())
    return torch.cat(depth), torch.cat(extrinsics)


def clip_scores(depth: Tensor, extrinsics: Tensor | None, targets: Targets, index: int) -> dict[str, float]:
    """Metrics of clip `index`: depth [S, H, W]; extrinsics [S, 3, 4] (None: identity cameras)."""
    gt_cameras = targets.extrinsics[index].double().cpu()
    scores = depth_metrics(depth, targets.depth[index].cpu(), align="sequence")
    rows = {"abs_rel": scores["abs_rel"], "delta_1.25": scores["delta_1.25"]}
    if extrinsics is None:
        frames = len(gt_cameras)
        identity = torch.eye(3, 4, dtype=torch.float64).expand(frames, 3, 4)
        centers = camera_centers(gt_cameras)
        first, second = torch.triu_indices(frames, frames, offset=1)
        pair_rotation = rotation_angle_deg(gt_cameras[first, :, :3], gt_cameras[second, :, :3])
        rows["ate"] = float((centers - centers.mean(0)).square().sum(-1).mean().sqrt())
        # identity cameras have no translation, whose direction error the metric counts as 90 degrees
        rows["auc30"] = pose_auc(np.maximum(pair_rotation.numpy(), 90.0))
        pred = identity
    else:
        pred = relative_to_first(extrinsics[None].double())[0]
        cameras = camera_metrics(pred, gt_cameras)
        rows["ate"], rows["auc30"] = cameras["ate"], cameras["auc30"]
    rows["rotation_deg"] = float(rotation_angle_deg(pred[1:, :, :3], gt_cameras[1:, :, :3]).mean())
    rows["translation"] = float((pred[1:, :, 3] - gt_cameras[1:, :, 3]).norm(dim=-1).mean())
    return rows


def evaluate(model: nn.Module, images: Tensor, targets: Targets, rows: tuple[str, ...] = EVAL_ROWS) -> dict:
    """Mean metrics over clips for each of `rows` ("model", "frame_only", "trivial"): {row: {metric: value}}."""
    results = {}
    for row in rows:
        if row == "trivial":
            depth, extrinsics = torch.ones(images.shape[:2] + images.shape[-2:]), None
        else:
            depth, extrinsics = predict(model, images, frame_only=row == "frame_only")
        per_clip = [clip_scores(depth[i], None if extrinsics is None else extrinsics[i], targets, i)
                    for i in range(len(images))]
        results[row] = {key: float(np.mean([clip[key] for clip in per_clip])) for key in per_clip[0]}
    return results


def format_table(results: dict, title: str) -> str:
    """The evaluation table, plus the frame-only / model pose error ratios when both rows are present."""
    width = max(len(EVAL_LABELS[row]) for row in results)
    lines = [title, " " * width + "".join(f"  {label:>12}" for _, label, _ in EVAL_COLUMNS)]
    for row, values in results.items():
        lines.append(f"{EVAL_LABELS[row]:<{width}}" + "".join(f"  {values[key]:>12.{digits}f}"
                                                            for key, _, digits in EVAL_COLUMNS))
    if "model" in results and "frame_only" in results:
        ratios = [f"{name} {results['frame_only'][key] / max(results['model'][key], 1e-12):.2f}x"
                  for key, name in (("rotation_deg", "rotation"), ("translation", "translation"), ("ate", "ATE"))]
        lines.append("frame-only / model pose error: " + ", ".join(ratios))
    return "\n".join(lines)


def clips_batch(clips: list[Clip], device: torch.device) -> tuple[Tensor, Targets]:
    """Images [N, S, 3, H, W] and normalised targets of clips with ground truth, all of one shape."""
    missing = [clip.name for clip in clips if clip.depth is None or clip.extrinsics is None or clip.intrinsics is None]
    if missing:
        raise Spark3rError(f"clip {missing[0]} has no ground-truth depth and cameras: evaluate on clips with ground "
                           "truth, e.g. synthetic:64:1000")
    shapes = {tuple(clip.images.shape) for clip in clips}
    if len(shapes) > 1:
        raise Spark3rError(f"the clips differ in shape ({sorted(shapes)}): evaluate clips of one length and size")
    images = torch.stack([clip.images for clip in clips]).to(device)
    targets = scene_targets(*(torch.stack([getattr(clip, key) for clip in clips]).to(device)
                              for key in ("depth", "intrinsics", "extrinsics")))
    return images, targets


# ---------------------------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Settings of one training run (see `build_parser` for their meaning)."""

    out: str
    steps: int = 10000
    batch: int = 48
    frames: int = 8
    max_frames: int | None = None
    frames_per_step: int | None = None
    path: str = "arc"
    init: str | None = None
    size: int = 112
    seed: int = 0
    lr: float = 6e-4
    warmup: int = 300
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    camera_weight: float = 5.0
    minutes: float | None = None
    log_every: int = 100
    eval_every: int = 1000
    checkpoint_every: int = 1000
    workers: int | None = None
    compile: bool = False
    held_out: str = HELD_OUT_SPEC
    device: str = "auto"
    dtype: str = "auto"

    RESUME_KEYS = ("batch", "frames", "max_frames", "frames_per_step", "path", "size", "seed")

    def check(self) -> None:
        for name in ("steps", "batch", "frames", "size", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise Spark3rError(f"--{name.replace('_', '-')} is {getattr(self, name)}: give a whole number >= 1")
        if self.frames < 2:
            raise Spark3rError(f"--frames is {self.frames}: relative pose needs at least 2 frames per clip")
        if self.max_frames is not None and self.max_frames < self.frames:
            raise Spark3rError(f"--max-frames {self.max_frames} is below --frames {self.frames}: give the longest "
                               "clip length of the range")
        if self.frames_per_step is not None and self.frames_per_step < self.longest:
            raise Spark3rError(f"--frames-per-step {self.frames_per_step} holds no clip of {self.longest} frames: "
                               f"give at least {self.longest}")
        if self.path not in SCENE_PATHS:
            raise Spark3rError(f"--path {self.path} is not one of {', '.join(SCENE_PATHS)}")
        if self.size % 14:
            raise Spark3rError(f"--size {self.size} is not a multiple of the patch size 14: use e.g. 112")
        if self.minutes is not None and not self.minutes > 0:
            raise Spark3rError(f"--minutes is {self.minutes}: give a positive time limit")
        if not (self.lr > 0 and self.warmup >= 0 and self.weight_decay >= 0 and self.clip_grad > 0):
            raise Spark3rError("--lr and --clip-grad must be > 0, --warmup and --weight-decay >= 0")
        if not self.out.endswith(".safetensors"):
            raise Spark3rError(f"--out {self.out} must name a .safetensors file, e.g. vggt-tiny.safetensors")

    @property
    def longest(self) -> int:
        return self.max_frames or self.frames

    @property
    def step_shape(self) -> StepShape:
        frames_per_step = self.frames_per_step or self.batch * self.frames
        return StepShape((self.frames, self.longest), self.batch, frames_per_step, self.path)

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.out).with_suffix(".ckpt.pt")


def save_weights(model: nn.Module, path: str | os.PathLike) -> int:
    """Write the model's state_dict as fp16 safetensors (atomically); returns the file size in bytes."""
    state = {key: (value.half() if value.is_floating_point() else value).detach().cpu().contiguous()
             for key, value in model.state_dict().items()}
    path = Path(path)
    atomic_save(path, lambda temporary: save_file(state, temporary, metadata={"model": MODEL, "dtype": "float16"}))
    return path.stat().st_size


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and conv kernels, none on biases, norms, LayerScale and tokens."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        skip = parameter.ndim < 2 or "token" in name or "pos_embed" in name
        (no_decay if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_checkpoint(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """Resume from the run's checkpoint if there is one: (next step, training seconds so far), else (0, 0)."""
    path = config.checkpoint_path
    if not path.exists():
        return 0, 0.0
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in TrainConfig.RESUME_KEYS:
        if checkpoint["settings"][key] != getattr(config, key):
            raise Spark3rError(f"checkpoint {path} was made with --{key} {checkpoint['settings'][key]}, not "
                               f"{getattr(config, key)}: pass the same settings to resume, or delete it to start over")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    print(f"resuming from {path} at step {checkpoint['step']} ({checkpoint['seconds'] / 60:.1f} min trained)",
          file=sys.stderr)
    return checkpoint["step"], checkpoint["seconds"]


def save_checkpoint(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    seconds: float) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "seconds": seconds,
             "settings": asdict(config)}
    atomic_save(config.checkpoint_path, lambda temporary: torch.save(state, temporary))


def compile_model(model: nn.Module) -> None:
    """torch.compile every transformer block and both DPT heads in place (the rest runs eagerly)."""
    blocks = [*model.aggregator.frame_blocks, *model.aggregator.global_blocks, *model.camera_head.trunk]
    for module in [*blocks, model.depth_head, model.point_head]:
        module.compile()


def train(config: TrainConfig) -> dict:
    """Run (or resume) training; write the weights to `config.out`. Returns the last held-out evaluation."""
    config.check()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    size = (config.size, config.size)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = load_model(MODEL, weights=None, device=device, dtype=dtype, seed=config.seed).train()
    # whole batches through the per-frame stages and heads: chunks bound inference memory on long clips, but a
    # training batch of 384 frames in chunks of 8 launches the heads' small kernels 48 times over
    model.config = replace(model.config, frame_chunk_frames=sys.maxsize, head_chunk_frames=sys.maxsize)
    eval_model = load_model(MODEL, weights=None, device=device, dtype=dtype, seed=config.seed)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95),
                                  **({"fused": True} if device.type == "cuda" else {}))
    start, seconds_before = load_checkpoint(config, model, optimizer)
    if start == 0 and config.init is not None:
        initial_weights(config.init, model)
    if config.compile:
        compile_model(model)
    count, held_out_seed, held_out_path = parse_synthetic_spec(config.held_out)
    if held_out_seed >= TRAIN_SEED_BASE:
        raise Spark3rError(f"held-out spec {config.held_out} uses a training seed: give a seed below {TRAIN_SEED_BASE}")
    held_out = render_batch(clip_seeds(held_out_seed, count), frames=config.longest, height=size[0], width=size[1],
                            config=SceneConfig(path=held_out_path), device=device)
    held_images, held_targets = held_out.images, scene_targets(held_out.depth, held_out.intrinsics, held_out.extrinsics)
    workers = config.workers if config.workers is not None else (min(8, (os.cpu_count() or 2) - 1)
                                                                 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(
        StepScenes(config.seed, config.step_shape, size, SceneConfig()), batch_size=None,
        sampler=range(start, config.steps), num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=False, **({"prefetch_factor": 4} if workers else {}))
    parameters = list(model.parameters())
    limit = None if config.minutes is None else config.minutes * 60
    print(f"training {MODEL} ({sum(p.numel() for p in parameters) / 1e6:.2f} M parameters) on {device} "
          f"({str(dtype).removeprefix('torch.')} trunk): "
          + (f"batch {config.batch} x {config.frames} frames" if config.max_frames is None else
             f"{config.step_shape.frames_per_step} frames per step in clips of {config.frames}-{config.max_frames}")
          + f" of {size[0]}x{size[1]} ({config.path} paths), steps {start}..{config.steps}"
          + (f", at most {config.minutes:g} min" if limit else ""), flush=True)

    def held_out_eval(step: int) -> dict:
        eval_model.load_state_dict(model.state_dict())
        results = evaluate(eval_model, held_images, held_targets, rows=("model", "frame_only"))
        model_row, frame_row = results["model"], results["frame_only"]
        print(f"eval step {step}: depth abs_rel {model_row['abs_rel']:.3f} delta {model_row['delta_1.25']:.3f} | "
              f"rot {model_row['rotation_deg']:.2f} deg (frame-only {frame_row['rotation_deg']:.2f}) | trans "
              f"{model_row['translation']:.3f} (frame-only {frame_row['translation']:.3f}) | auc30 "
              f"{model_row['auc30']:.3f} [{config.held_out}, {config.longest} frames]", flush=True)
        return results

    step, began = start, time.monotonic()
    seconds = seconds_before
    running = torch.zeros(4, device=device)
    last_log, last_log_step = began, start
    results: dict = {}
    for arrays in loader:
        seconds = seconds_before + time.monotonic() - began
        if limit is not None and seconds >= limit:
            print(f"time limit of {config.minutes:g} min reached at step {step}", flush=True)
            break
        progress = max(step / config.steps, seconds / limit if limit else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, progress, config.lr, config.warmup)
        images, targets = render_step(arrays, size, device)
        with camera_iterations(model) as pose_iterations:
            outputs = model(images)
        loss, parts = training_loss(outputs, pose_iterations, targets, config.camera_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.clip_grad)
        optimizer.step()
        running += torch.cat([loss.detach()[None], parts])
        step += 1
        if step % config.log_every == 0 or step == config.steps:
            values = (running / (step - last_log_step)).tolist()
            if not math.isfinite(values[0]):
                raise Spark3rError(f"the loss became {values[0]} at step {step}: lower --lr (now {config.lr:g}) and "
                                   "rerun (the run resumes from the last checkpoint)")
            now = time.monotonic()
            print(f"step {step}/{config.steps}  lr {optimizer.param_groups[0]['lr']:.2e}  loss {values[0]:.4f} "
                  f"(camera {values[1]:.4f} depth {values[2]:.4f} points {values[3]:.4f})  "
                  f"{(step - last_log_step) / (now - last_log):.1f} steps/s  "
                  f"{(seconds_before + now - began) / 60:.1f} min", flush=True)
            running.zero_()
            last_log, last_log_step = now, step
        if step % config.eval_every == 0:
            results = held_out_eval(step)
        if step % config.checkpoint_every == 0:
            save_checkpoint(config, model, optimizer, step, seconds_before + time.monotonic() - began)
    seconds = seconds_before + time.monotonic() - began
    save_checkpoint(config, model, optimizer, step, seconds)
    if step % config.eval_every or not results:
        results = held_out_eval(step)
    size_bytes = save_weights(model, config.out)
    print(f"wrote {config.out} ({size_bytes / 2**20:.1f} MiB, fp16) after {step} steps, {seconds / 60:.1f} min",
          flush=True)
    if size_bytes > MAX_WEIGHTS_BYTES:
        raise Spark3rError(f"{config.out} is {size_bytes / 2**20:.1f} MiB, over the 15 MiB limit: shrink vggt-tiny")
    return results


# ------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m spark3r.models.train_tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="vggt-tiny.safetensors", help="weights file to write (fp16 safetensors)")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="training steps (default %(default)s)")
    parser.add_argument("--minutes", type=float, help="stop cleanly after this much training time (all resumes)")
    parser.add_argument("--batch", type=int, default=TrainConfig.batch,
                        help="clips per step at a fixed length (default %(default)s)")
    parser.add_argument("--frames", help=f"frames per clip (training: one number, default {TrainConfig.frames}, the "
                        f"shortest when --max-frames is given; --evaluate: a list, default {DEFAULT_EVAL_FRAMES})")
    parser.add_argument("--max-frames", type=int, help="train on clip lengths drawn per step from --frames to this")
    parser.add_argument("--frames-per-step", type=int,
                        help="with --max-frames: frames per step (clips = this // length; default batch x frames)")
    parser.add_argument("--path", choices=SCENE_PATHS, default=TrainConfig.path,
                        help="camera path of the training clips (default %(default)s)")
    parser.add_argument("--init", help="start from these vggt-tiny weights (safetensors; a shallower trunk is grown)")
    parser.add_argument("--size", type=int, default=TrainConfig.size, help="square image size (default %(default)s)")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=TrainConfig.warmup, help="warm-up steps (default %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    parser.add_argument("--clip-grad", type=float, default=TrainConfig.clip_grad, help="gradient norm clip")
    parser.add_argument("--camera-weight", type=float, default=TrainConfig.camera_weight,
                        help="weight of the camera loss (default %(default)s)")
    parser.add_argument("--log-every", type=int, default=TrainConfig.log_every)
    parser.add_argument("--eval-every", type=int, default=TrainConfig.eval_every,
                        help="steps between evaluations on the --held-out clips")
    parser.add_argument("--held-out", default=HELD_OUT_SPEC,
                        help="synthetic:N:SEED clips (SEED < 10^9) for the periodic evaluation (default %(default)s)")
    parser.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    parser.add_argument("--workers", type=int, help="scene-sampling workers (default: 0 on CPU, up to 8 on CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks and DPT heads")
    parser.add_argument("--evaluate", metavar="WEIGHTS",
                        help="evaluate these weights (a file, 'auto' for the shipped ones, 'none' for random) instead")
    parser.add_argument("--clips", default=DEFAULT_EVAL_SPEC, help="clips for --evaluate (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="with --evaluate: print JSON instead of the table")
    add_runtime_args(parser)
    return parser


def frame_counts(text: str | None, default: str) -> list[int]:
    """`--frames` as a list of whole numbers >= 2 ("8" or "8,32,128")."""
    try:
        counts = [int(part) for part in (text or default).split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 2:
        raise Spark3rError(f"--frames {text}: give whole numbers of at least 2 frames per clip (relative pose needs "
                           "two), e.g. 8 or 8,32,128,256")
    return counts


def evaluate_lengths(model: nn.Module, spec: str, lengths: list[int], device: torch.device) -> dict[int, dict]:
    """{frames: evaluate(...) rows} of the clips of `spec` rendered or read at each of `lengths` frames."""
    entry = get_entry(MODEL)
    results = {}
    for frames in lengths:
        clips = open_clips(spec, preprocess=f"{entry.preprocess}:{entry.image_width}", frames=frames)
        if not clips:
            raise Spark3rError(f"--clips {spec} holds no clips: pass synthetic:N[:SEED][:walk] or a folder of clips")
        images, targets = clips_batch(clips, device)
        results[images.shape[1]] = {"count": len(clips), "size": list(images.shape[-2:]),
                                    "results": evaluate(model, images, targets)}
    return results


def run_evaluation(args) -> int:
    device = resolve_device(args.device)
    lengths = frame_counts(args.frames, DEFAULT_EVAL_FRAMES)
    model = load_model(MODEL, weights=args.evaluate, device=device, dtype=resolve_dtype(args.dtype, device),
                       seed=args.seed)
    by_length = evaluate_lengths(model, args.clips, lengths, device)
    if args.json:
        print(json.dumps({"weights": args.evaluate, "clips": args.clips, "frames": list(by_length),
                          "lengths": {str(frames): row for frames, row in by_length.items()}}, indent=2))
        return 0
    for frames, row in by_length.items():
        height, width = row["size"]
        print(format_table(row["results"], f"{MODEL} ({args.evaluate}) on {args.clips}: {row['count']} clips x "
                                           f"{frames} frames, {height}x{width}; depth median-aligned per clip"))
    return 0


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.evaluate is not None:
        return run_evaluation(args)
    counts = frame_counts(args.frames, str(TrainConfig.frames))
    if len(counts) > 1:
        raise Spark3rError(f"--frames {args.frames} is a list: training takes one length (add --max-frames for a range)")
    train(TrainConfig(
        out=args.out, steps=args.steps, batch=args.batch, frames=counts[0], max_frames=args.max_frames,
        frames_per_step=args.frames_per_step, path=args.path, init=args.init, size=args.size, seed=args.seed,
        lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        camera_weight=args.camera_weight, minutes=args.minutes, log_every=args.log_every, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, workers=args.workers, compile=args.compile, held_out=args.held_out,
        device=args.device, dtype=args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
