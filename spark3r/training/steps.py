"""The clips of one training step: rendered on the fly (scene parameters sampled by DataLoader workers on the CPU,
the ray cast on the device), of a length and camera path drawn per step from the run's seed.

Run seed S renders, at step i, the clips of `synthetic:<clips>:<10^9 (S + 1) + i>`; every spec seed below 10^9 is
held out.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from spark3r.data.synthetic import Scene, SceneConfig, clip_seeds, render_views, sample_clip
from spark3r.training.losses import Targets, scene_targets

TRAIN_SEED_BASE = 10**9
SCENE_PATHS = ("arc", "walk", "mixed")
MIXED_ARC_FRAMES = 16


def train_spec_seed(seed: int, step: int) -> int:
    """The synthetic spec seed of run seed `seed` at `step`: 10^9 (seed + 1) + step (never below 10^9)."""
    return TRAIN_SEED_BASE * (seed + 1) + step


@dataclass(frozen=True)
class StepShape:
    """What one training step renders: `clips` clips of `frames` frames each, along camera path `path`.

    frames: (low, high) frame counts, drawn per step (low == high: fixed); frames_per_step: frames of a step when the
    length varies (clips = frames_per_step // length, at least 1), else `clips` clips per step; path: arc, walk or
    mixed (walks, and arcs for half of the steps of at most MIXED_ARC_FRAMES frames); arc_share (mixed only): instead,
    this share of the steps are arcs of low..min(high, MIXED_ARC_FRAMES) frames and the rest walks of low..high, so
    that training on long walks keeps seeing short arcs.
    """

    frames: tuple[int, int]
    clips: int
    frames_per_step: int | None = None
    path: str = "arc"
    arc_share: float | None = None

    def at(self, spec_seed: int) -> tuple[int, int, str]:
        """(frames, clips, path) of the step whose spec seed is `spec_seed`."""
        low, high = self.frames
        if low == high and self.path != "mixed":
            return low, self.clips, self.path
        draw = torch.Generator().manual_seed(spec_seed)
        if self.path == "mixed" and self.arc_share is not None:
            arc = torch.rand((), generator=draw).item() < self.arc_share
            longest = min(high, MIXED_ARC_FRAMES) if arc else high
            frames = int(torch.randint(low, max(low, longest) + 1, (), generator=draw))
            clips = self.clips if low == high else max(1, self.frames_per_step // frames)
            return frames, clips, "arc" if arc else "walk"
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
