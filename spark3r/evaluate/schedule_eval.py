"""The dense model against the model with a schedule, on the same clips (what `evaluate-schedule` runs).

For every clip, both runs are timed (synchronised, median of `--repeats` after `--warmup` untimed runs) with their peak
CUDA memory; the FLOP model (spark3r.reduce.flops) predicts both forwards' FLOPs and the speed-up; the reduced outputs
are compared with the dense ones (spark3r.evaluate.deviation.output_deviation); clips with ground truth are scored
against it for both runs (spark3r.evaluate.metrics: depth median-aligned per clip, cameras, point maps).
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from spark3r.data.clip import Clip
from spark3r.data.clips import iter_clips
from spark3r.errors import ParameterError, Spark3rError
from spark3r.evaluate.deviation import output_deviation
from spark3r.evaluate.metrics import camera_metrics, depth_metrics, point_metrics
from spark3r.models.base import ReconstructionModel
from spark3r.models.loading import load_model
from spark3r.models.registry import get_entry, resolve_model_name
from spark3r.reduce import global_attention_fraction, model_flops
from spark3r.schedule import Schedule, check_model, load_schedule, reduced

RUNS = ("dense", "reduced")
QUALITY_KEYS = ("abs_rel", "delta_1.25", "ate", "rpe_trans", "rpe_rot", "auc30", "accuracy", "completeness",
                "normal_consistency")


@dataclass
class ClipComparison:
    """One clip's dense and reduced runs.

    seconds / peak_bytes: per run ("dense", "reduced"); peak_bytes None off CUDA. flops: the FLOP model's prediction
    per run. deviation: output_deviation of reduced from dense. quality: per run, the ground-truth metrics the clip
    supports (empty without ground truth).
    """

    name: str
    frames: int
    seconds: dict[str, float]
    peak_bytes: dict[str, int | None]
    flops: dict[str, float]
    global_attention_fraction: float
    deviation: dict[str, float]
    quality: dict[str, dict[str, float]] = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed_forward(model: nn.Module, images: torch.Tensor, repeats: int = 3,
                  warmup: int = 1) -> tuple[dict[str, torch.Tensor], float, int | None]:
    """(outputs of the last run, median seconds of `repeats` synchronised forwards after `warmup` untimed ones, peak
    CUDA memory allocated during the timed forwards in bytes, or None off CUDA)."""
    device = images.device
    for _ in range(warmup):
        model(images)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, outputs = [], None
    for _ in range(repeats):
        outputs = None
        synchronize(device)
        start = time.perf_counter()
        outputs = model(images)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return outputs, statistics.median(seconds), peak


def quality(outputs: dict[str, torch.Tensor], clip: Clip) -> dict[str, float]:
    """Ground-truth metrics of one run's outputs (batch of 1) that the clip's ground truth supports."""
    scores: dict[str, float] = {}
    if clip.depth is not None and "depth" in outputs:
        depth = depth_metrics(outputs["depth"][0], clip.depth, align="sequence")
        scores.update({key: depth[key] for key in ("abs_rel", "delta_1.25")})
    if clip.extrinsics is not None and "extrinsics" in outputs and clip.frames >= 2:
        cameras = camera_metrics(outputs["extrinsics"][0], clip.extrinsics)
        scores.update({key: cameras[key] for key in ("ate", "rpe_trans", "rpe_rot", "auc30")})
    if clip.depth is not None and clip.extrinsics is not None and clip.intrinsics is not None and "points" in outputs:
        points = point_metrics(outputs["points"][0], clip.world_points())
        scores.update({key: points[key] for key in ("accuracy", "completeness", "normal_consistency")})
    return scores


def evaluate_clip(model: ReconstructionModel, schedule: Schedule, clip: Clip, device: torch.device, repeats: int = 3,
                  warmup: int = 1) -> ClipComparison:
    """Dense and reduced runs of one clip: times, peak memory, predicted FLOPs, deviation and ground-truth metrics."""
    images = clip.images.to(device)[None]
    flop_config = model.flop_config(clip.height, clip.width)
    outputs, seconds, peaks = {}, {}, {}
    for run in RUNS:
        with reduced(model, schedule) if run == "reduced" else contextlib.nullcontext():
            result, seconds[run], peaks[run] = timed_forward(model, images, repeats, warmup)
        outputs[run] = {key: value.float().cpu() for key, value in result.items()}
        del result
    flops = {"dense": model_flops(flop_config, clip.frames).total,
             "reduced": model_flops(flop_config, clip.frames, schedule).total}
    return ClipComparison(
        name=clip.name, frames=clip.frames, seconds=seconds, peak_bytes=peaks, flops=flops,
        global_attention_fraction=global_attention_fraction(flop_config, clip.frames, schedule),
        deviation=output_deviation(outputs["dense"], outputs["reduced"]),
        quality={run: quality(outputs[run], clip) for run in RUNS},
    )


def summarize(results: list[ClipComparison]) -> dict:
    """Totals and means over clips: time and predicted FLOPs summed (speed-ups are ratios of sums), peak memory the
    maximum, deviation and ground-truth metrics averaged over the clips that have them."""
    summary: dict = {"clips": len(results)}
    for run in RUNS:
        peaks = [r.peak_bytes[run] for r in results if r.peak_bytes[run] is not None]
        summary[run] = {"seconds": sum(r.seconds[run] for r in results), "flops": sum(r.flops[run] for r in results),
                        "peak_bytes": max(peaks) if peaks else None}
    summary["measured_speedup"] = summary["dense"]["seconds"] / max(summary["reduced"]["seconds"], 1e-12)
    summary["predicted_speedup"] = summary["dense"]["flops"] / summary["reduced"]["flops"]
    summary["global_attention_fraction"] = float(np.mean([r.global_attention_fraction for r in results]))
    summary["deviation"] = {key: float(np.mean([r.deviation[key] for r in results])) for key in results[0].deviation}
    for run in RUNS:
        keys = [key for key in QUALITY_KEYS if any(key in r.quality[run] for r in results)]
        summary[run]["quality"] = {key: float(np.mean([r.quality[run][key] for r in results if key in r.quality[run]]))
                                   for key in keys}
    return summary


@dataclass
class ScheduleEvaluation:
    """What `evaluate_schedule` measured: the run's context (model, schedule, clips, weights, device, dtype, compiled),
    every clip's comparison and their `summarize`d totals."""

    context: dict
    clips: list[ClipComparison]
    summary: dict

    def to_dict(self) -> dict:
        return {**self.context, "summary": self.summary, "per_clip": [asdict(clip) for clip in self.clips]}


def evaluate_schedule(model: str, schedule: str | Path, clips: str, *, device: torch.device, dtype: torch.dtype,
                      weights: str | None = "auto", frames: int | None = None, every: int | None = None,
                      size: int | None = None, repeats: int = 3, warmup: int = 1, seed: int = 0,
                      compiled: bool = False, head_dtype: str = "fp32", progress: bool = True) -> ScheduleEvaluation:
    """Load `model` (a registry name or alias) and `schedule` (a YAML path), and `evaluate_clip` every clip of the
    spec `clips`: `frames` frames spread over each (synthetic clips: rendered with that many) or every `every`-th,
    preprocessed by the model's recipe at `size` (the side of a square image; default: the model's). `compiled`: the
    model's blocks and DPT heads run through torch.compile (`load_model`); each new clip length compiles in the first
    warm-up forward, so give `warmup` >= 1 for times without the compile. `head_dtype`: the dense heads of both runs
    in fp32 (as upstream) or "compute" (`load_model`: opt-in, faster)."""
    for parameter, value, least in (("frames", frames, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if value is not None and value < least:
            raise ParameterError(f"`{parameter}` is {value}: give a whole number >= {least}", parameter)
    name = resolve_model_name(model)
    loaded = load_schedule(schedule)
    if loaded.model != name:
        raise ParameterError(f"{schedule} was made for {loaded.model}, not {name}: "
                             f"pass a schedule made for {name} or `model` {loaded.model}", "model")
    entry = get_entry(name)
    clip_iter = iter_clips(clips, preprocess=entry.recipe(size), max_frames=frames, every=every, frames=frames)
    network = load_model(name, weights=weights, device=device, dtype=dtype, seed=seed, compiled=compiled,
                         head_dtype=head_dtype)
    if not isinstance(network, ReconstructionModel):
        raise Spark3rError(f"model {name} has no FLOP config: evaluate one of spark3r's model classes")
    check_model(loaded, network.adapter.model_name, network.adapter.num_global_layers)
    results = [evaluate_clip(network, loaded, clip, device, repeats, warmup)
               for clip in tqdm(clip_iter, desc="evaluate-schedule", unit="clip", file=sys.stderr,
                                disable=not progress)]
    if not results:
        raise ParameterError(f"`clips` {clips} holds no clips: pass a folder of clips, one clip or synthetic:N",
                             "clips")
    context = {"model": name, "schedule": str(Path(schedule)), "clips": clips, "weights": str(weights),
               "device": str(device), "dtype": str(dtype).removeprefix("torch."), "compiled": compiled,
               "head_dtype": head_dtype}
    return ScheduleEvaluation(context, results, summarize(results))
