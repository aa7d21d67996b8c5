"""How good the tiny model is: depth, camera and pose metrics of the model, of the model with every global attention
layer reduced to frame-only attention, and of the trivial baselines (a constant depth per clip, identity cameras),
on clips with ground truth, at several clip lengths."""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from spark3r.data.clip import Clip
from spark3r.data.clips import open_clips
from spark3r.errors import ParameterError, Spark3rError
from spark3r.evaluate.metrics import camera_centers, camera_metrics, depth_metrics, pose_auc, rotation_angle_deg
from spark3r.models.base import FrameLayout
from spark3r.models.loading import load_model
from spark3r.models.registry import get_entry
from spark3r.reduce.patch import frame_only_patch
from spark3r.training.losses import Targets, relative_to_first, scene_targets

MODEL = "vggt-tiny"
DEFAULT_EVAL_SPEC = "synthetic:16:1000:walk"
DEFAULT_EVAL_FRAMES = "8,32,128,256"
EVAL_ROWS = ("model", "frame_only", "trivial")


@contextlib.contextmanager
def frame_only_global_attention(model: nn.Module, layout: FrameLayout) -> Iterator[None]:
    """Inside the block, every global attention layer of `model` attends within each frame only (spark3r.reduce's
    `frame_only_patch`) on clips of `layout` (or of the images the model is called on); restored on exit."""
    with frame_only_patch(model) as patch:
        patch.set_layout(layout)
        yield


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


def evaluate_lengths(model: nn.Module, clips: str, lengths: list[int], device: torch.device) -> dict[int, dict]:
    """{frames: {"count", "size", "results": evaluate(...) rows}} of the clips of the spec `clips` read, or rendered on
    `device`, at each of `lengths` frames."""
    entry = get_entry(model.adapter.model_name)
    results = {}
    for frames in lengths:
        opened = open_clips(clips, preprocess=entry.recipe(), frames=frames, device=device)
        if not opened:
            raise ParameterError(f"`clips` {clips} holds no clips: pass synthetic:N[:SEED][:walk] or a folder of clips",
                                 "clips")
        images, targets = clips_batch(opened, device)
        results[images.shape[1]] = {"count": len(opened), "size": list(images.shape[-2:]),
                                    "results": evaluate(model, images, targets)}
    return results


def evaluate_weights(weights: str | None, clips: str, lengths: list[int], *, device: torch.device,
                     dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[int, dict]:
    """`evaluate_lengths` of vggt-tiny with `weights` (a file, "auto" for the shipped ones, None or "none" for random
    weights from `seed`)."""
    model = load_model(MODEL, weights=weights, device=device, dtype=dtype, seed=seed)
    return evaluate_lengths(model, clips, lengths, device)
