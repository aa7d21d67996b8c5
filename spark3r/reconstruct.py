"""Reconstruct a video or a folder of photos: sample and preprocess the frames, run a model (with a schedule applied or
dense), and write what other tools read.

    result = reconstruct("walk.mp4", model="vggt-1b", weights="model.safetensors", schedule="paper",
                         max_frames=300, out="walk", device="cuda", dtype=torch.bfloat16)

writes into `out`:
  points.ply                      coloured point cloud (binary PLY), confidence-filtered (below)
  sparse/0/cameras.txt, images.txt, points3D.txt   the cameras and the same points in COLMAP's text format
  images/<frame>.png              the frames as the model saw them (the size the cameras are given at)
  depth/<frame>.npz, <frame>.png  depth and confidence (float32), and depth as 16-bit png (summary: depth_png_scale)
  preview.png                     a few frames with their depth, and a top view of the points and camera path
  summary.json                    model, schedule, frames, seconds per stage, peak memory, point count

Points are the predicted depth unprojected with the predicted cameras (so they agree with the COLMAP cameras). The
default filter keeps a pixel when its depth is finite and positive and its depth confidence is at or above the
median over all frames (`confidence_percentile=50`), and keeps at most `max_points=1_000_000` of those (a seeded
uniform random subset).
"""
from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from spark3r.data.clip import Clip, unproject_pixels
from spark3r.data.clips import read_clip
from spark3r.errors import ParameterError, Spark3rError
from spark3r.export.colmap import write_colmap_text
from spark3r.export.frames import write_frames
from spark3r.export.ply import write_ply
from spark3r.export.preview import write_preview
from spark3r.files import write_json
from spark3r.models.loading import load_model
from spark3r.models.registry import get_entry, resolve_model_name
from spark3r.reduce import global_attention_fraction
from spark3r.schedule import Schedule, load_schedule, reduced, shipped_schedule

DEFAULT_CONFIDENCE_PERCENTILE = 50.0
DEFAULT_MAX_POINTS = 1_000_000
SCHEDULE_CHOICES = "paper (the shipped paper-rule schedule of the model), none (dense) or a schedule YAML file"


@dataclass
class Reconstruction:
    """What `reconstruct` made: the folder, the cameras as the model predicted them, and the summary it wrote.

    intrinsics [S, 3, 3] and extrinsics [S, 3, 4] (world-to-camera, OpenCV) at image_size (height, width);
    frame_names: one per frame (image file stems, or frame<index> of the source video); points: the point count of
    points.ply and points3D.txt; seconds: per stage; summary: the contents of summary.json.
    """

    out: Path
    model: str
    schedule: str
    frame_names: list[str]
    image_size: tuple[int, int]
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    points: int
    confidence_threshold: float
    seconds: dict[str, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def resolve_schedule(schedule: str | os.PathLike | Schedule | None, model: str) -> tuple[Schedule | None, str]:
    """(schedule or None for dense, how to name it): "paper" -> the shipped paper-rule schedule of `model`, "none" or
    None -> dense, a Schedule, or a YAML path."""
    if schedule is None or schedule == "none":
        return None, "none"
    if isinstance(schedule, Schedule):
        return schedule, "given"
    if schedule == "paper":
        path = shipped_schedule(model)
        if path is None:
            raise ParameterError(f"no paper-rule `schedule` is shipped for {model}: pass a schedule file or none",
                                 "schedule")
        return load_schedule(path), f"paper ({path.name})"
    if not Path(schedule).is_file():
        raise ParameterError(f"`schedule` {schedule} is not a file: pass {SCHEDULE_CHOICES}", "schedule")
    return load_schedule(schedule), str(schedule)


def point_cloud(depth: np.ndarray, confidence: np.ndarray, intrinsics: np.ndarray, extrinsics: np.ndarray,
                images: np.ndarray, confidence_percentile: float = DEFAULT_CONFIDENCE_PERCENTILE,
                max_points: int = DEFAULT_MAX_POINTS, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """(points [N, 3] float32 world, colours [N, 3] uint8, confidence threshold) of the filtered pixels.

    depth, confidence [S, H, W]; intrinsics [S, 3, 3]; extrinsics [S, 3, 4]; images uint8 [S, H, W, 3]. A pixel is kept
    when its depth is finite and positive and its confidence is at or above the `confidence_percentile`-th
    percentile of the valid pixels' confidences; beyond `max_points` kept pixels, each is kept with probability
    max_points / kept (seeded). Only the kept pixels are unprojected (float64), one frame at a time.
    """
    if not 0 <= confidence_percentile <= 100:
        raise ParameterError(f"`confidence_percentile` {confidence_percentile} is outside [0, 100]: give a percentile",
                             "confidence_percentile")
    if max_points < 1:
        raise ParameterError(f"`max_points` is {max_points}: keep at least 1 point", "max_points")
    valid = np.isfinite(depth) & (depth > 0) & np.isfinite(confidence)
    if not valid.any():
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8), float("nan")
    threshold = float(np.percentile(confidence[valid], confidence_percentile))
    keep = valid & (confidence >= threshold)
    probability = min(1.0, max_points / int(keep.sum()))
    generator = np.random.default_rng(seed)
    points, colors = [], []
    for index in range(len(depth)):
        rows, cols = np.nonzero(keep[index])
        if probability < 1:
            chosen = generator.random(len(rows)) < probability
            rows, cols = rows[chosen], cols[chosen]
        world = unproject_pixels(torch.from_numpy(depth[index, rows, cols].astype(np.float64))[None],
                                 torch.from_numpy(rows), torch.from_numpy(cols),
                                 torch.from_numpy(intrinsics[index:index + 1]),
                                 torch.from_numpy(extrinsics[index:index + 1]))[0]
        points.append(world.numpy().astype(np.float32))
        colors.append(images[index, rows, cols])
    return np.concatenate(points), np.concatenate(colors), threshold


def reconstruct(input: str | os.PathLike, model: str, *, weights: str | os.PathLike | None = "auto",
                schedule: str | os.PathLike | Schedule | None = "paper", size: int | None = None,
                every: int | None = None, max_frames: int | None = None, out: str | os.PathLike = "reconstruction",
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, compiled: bool = False,
                head_dtype: str = "fp32", confidence_percentile: float = DEFAULT_CONFIDENCE_PERCENTILE, max_points: int = DEFAULT_MAX_POINTS,
                seed: int = 0, progress: bool = True) -> Reconstruction:
    """Reconstruct a video, an image folder or a `scene/images/` folder into `out` (see the module docstring).

    size: the preprocessing size (the side of a square image; default: the model's own, e.g. 518 for VGGT-1B);
    every / max_frames: keep every N-th frame, or N frames spread over the whole input (default: all frames).
    compiled: run the blocks and DPT heads through torch.compile (`load_model`'s `compiled`: faster on a GPU; the one
    forward here is the first at its clip length, so the compile is counted in the "model" stage's seconds).
    head_dtype: the dense heads in fp32 (as upstream) or "compute" (`load_model`'s `head_dtype`: opt-in, faster).
    """
    device = torch.device(device)
    name = resolve_model_name(model)
    entry = get_entry(name)
    recipe = entry.recipe(size)
    resolved, schedule_name = resolve_schedule(schedule, name)
    if not Path(input).exists():
        raise ParameterError(f"`input` {input} does not exist: give a video, a folder of images or a folder holding "
                             "images/", "input")
    out = Path(out)
    seconds: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tqdm(total=6, desc="reconstruct", unit="stage", disable=not progress) as stages:

        def stage(label: str):
            stages.set_postfix_str(label)
            return _timed(seconds, label, device, stages)

        with stage("read"):
            clip = read_clip(input, every=every, max_frames=max_frames, preprocess=recipe)
        with stage("load_model"):
            network = load_model(name, weights=weights, device=device, dtype=dtype, seed=seed, compiled=compiled,
                                 head_dtype=head_dtype)
        with stage("model"):
            outputs = run_model(network, clip, resolved, device)
        images = clip.images.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        depth, confidence = outputs["depth"], outputs["depth_conf"]
        intrinsics, extrinsics = outputs["intrinsics"].astype(np.float64), outputs["extrinsics"].astype(np.float64)
        names = list(clip.frame_names)
        with stage("points"):
            points, colors, threshold = point_cloud(depth, confidence, intrinsics, extrinsics, images,
                                                    confidence_percentile, max_points, seed)
            write_ply(out / "points.ply", points, colors)
            write_colmap_text(out / "sparse" / "0", intrinsics, extrinsics, (clip.height, clip.width),
                              [f"{frame}.png" for frame in names], points, colors)
        with stage("frames"), tqdm(total=clip.frames, desc="writing frames", unit="frame", leave=False,
                                   disable=not progress) as bar:
            depth_scale = write_frames(out, names, images, depth, confidence, on_frame=bar.update)
        with stage("preview"):
            write_preview(out / "preview.png", images, depth, points, colors, extrinsics, seed)
    summary = {
        "input": str(input), "model": name, "weights": str(weights), "schedule": schedule_name,
        "global_attention_flops_fraction": None if resolved is None else float(
            global_attention_fraction(network.flop_config(clip.height, clip.width), clip.frames, resolved)),
        "preprocess": recipe, "frames": clip.frames, "frame_names": names,
        "sampling": {"every": every, "max_frames": max_frames}, "image_size": [clip.height, clip.width],
        "device": _device_name(device), "dtype": str(dtype).removeprefix("torch."), "compiled": compiled,
        "head_dtype": head_dtype, "points": len(points), "point_filter": {"confidence_percentile": confidence_percentile,
                                                "confidence_threshold": threshold, "max_points": max_points,
                                                "seed": seed},
        "depth_png_scale": depth_scale, "seconds": seconds, "seconds_total": sum(seconds.values()),
        "peak_memory_bytes": peak_memory(device),
    }
    write_json(out / "summary.json", summary)
    return Reconstruction(out=out, model=name, schedule=schedule_name, frame_names=names,
                          image_size=(clip.height, clip.width), intrinsics=intrinsics, extrinsics=extrinsics,
                          points=len(points), confidence_threshold=threshold, seconds=seconds, summary=summary)


def run_model(model: torch.nn.Module, clip: Clip, schedule: Schedule | None,
              device: torch.device) -> dict[str, np.ndarray]:
    """One forward of the clip's frames (batch of 1), with `schedule` applied if given: depth and depth_conf
    [S, H, W], intrinsics [S, 3, 3] and extrinsics [S, 3, 4] as float32 numpy on the host (other outputs dropped)."""
    images = clip.images.to(device)[None]
    with torch.inference_mode(), reduced(model, schedule) if schedule is not None else contextlib.nullcontext():
        outputs = model(images)
    wanted = ("depth", "depth_conf", "intrinsics", "extrinsics")
    missing = [key for key in wanted if key not in outputs]
    if missing:
        raise Spark3rError(f"the model gives no {', '.join(missing)}: reconstruct needs depth, its confidence and "
                           "cameras")
    return {key: outputs[key][0].float().cpu().numpy() for key in wanted}


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """Peak host memory of this process (max RSS) and peak CUDA memory allocated on `device` (None off CUDA), bytes."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"host_max_rss": host,
            "device_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


@contextlib.contextmanager
def _timed(seconds: dict[str, float], label: str, device: torch.device, bar: tqdm):
    """Time the block (synchronised on CUDA) into seconds[label], then advance the stage bar."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds[label] = time.perf_counter() - start
    bar.update()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"
