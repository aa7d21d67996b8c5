"""`evaluate-schedule`: the dense model against the model with a schedule, on the same clips.

    evaluate-schedule --model vggt-tiny --schedule schedules/vggt-tiny-paper.yaml --clips synthetic:4
    evaluate-schedule --model vggt-1b --schedule schedules/vggt-1b-b0.1.yaml --clips clips/ --weights model.pt --json

For every clip, both runs are timed (synchronised, median of `--repeats` after `--warmup` untimed runs) with their peak
CUDA memory; the FLOP model (spark3r.reduce.flops) predicts both forwards' FLOPs and the speed-up; the reduced outputs
are compared with the dense ones (spark3r.evaluate.deviation.output_deviation); clips with ground truth are scored
against it for both runs (spark3r.evaluate.metrics: depth median-aligned per clip, cameras, point maps). A table goes to
stdout, or JSON with `--json`.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from spark3r.cli import ArgumentParser, add_runtime_args, command, resolve_device, resolve_dtype
from spark3r.data.clips import Clip, iter_clips
from spark3r.errors import Spark3rError
from spark3r.evaluate.deviation import output_deviation
from spark3r.evaluate.metrics import camera_metrics, depth_metrics, point_metrics
from spark3r.models.base import ReconstructionModel
from spark3r.models.loading import load_model
from spark3r.models.registry import get_entry, resolve_model_name
from spark3r.reduce import global_attention_fraction, model_flops, reduced
from spark3r.schedule import Schedule, check_model, load_schedule

RUNS = ("dense", "reduced")
QUALITY_KEYS = ("abs_rel", "delta_1.25", "ate", "rpe_trans", "rpe_rot", "auc30", "accuracy", "completeness",
                "normal_consistency")


@dataclass
class ClipResult:
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
                  warmup: int = 1) -> ClipResult:
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
    return ClipResult(
        name=clip.name, frames=clip.frames, seconds=seconds, peak_bytes=peaks, flops=flops,
        global_attention_fraction=global_attention_fraction(flop_config, clip.frames, schedule),
        deviation=output_deviation(outputs["dense"], outputs["reduced"]),
        quality={run: quality(outputs[run], clip) for run in RUNS},
    )


def summarize(results: list[ClipResult]) -> dict:
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


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def format_report(summary: dict, header: str) -> str:
    """The stdout table of a summary."""
    dense, reduced_run = summary["dense"], summary["reduced"]
    lines = [header, f"{'':<26}{'dense':>12}{'reduced':>12}",
             f"{'time s (all clips)':<26}{dense['seconds']:>12.4f}{reduced_run['seconds']:>12.4f}"
             f"   measured speed-up {summary['measured_speedup']:.2f}x",
             f"{'peak CUDA memory GiB':<26}{_gib(dense['peak_bytes']):>12}{_gib(reduced_run['peak_bytes']):>12}",
             f"{'FLOPs (FLOP model) G':<26}{dense['flops'] / 1e9:>12.3f}{reduced_run['flops'] / 1e9:>12.3f}"
             f"   predicted speed-up {summary['predicted_speedup']:.2f}x, global attention at "
             f"{summary['global_attention_fraction']:.3f} of dense",
             "deviation of reduced from dense: " + "  ".join(f"{key} {value:.4g}"
                                                              for key, value in summary["deviation"].items())]
    keys = [key for key in QUALITY_KEYS if key in dense["quality"]]
    if keys:
        lines.append(f"{'ground truth':<26}{'dense':>12}{'reduced':>12}")
        lines += [f"{key:<26}{dense['quality'][key]:>12.4f}{reduced_run['quality'][key]:>12.4f}" for key in keys]
    else:
        lines.append("ground truth: none in these clips")
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="evaluate-schedule", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="registry name or alias, e.g. vggt-1b, vggt-tiny, da3")
    parser.add_argument("--schedule", required=True, help="schedule YAML file made for this model")
    parser.add_argument("--clips", required=True, help="a folder of clips, one clip, or synthetic:N[:SEED]")
    parser.add_argument("--weights", default="auto",
                        help="checkpoint file or folder, 'auto' (shipped or Hugging Face cache) or 'none' (random)")
    parser.add_argument("--frames", type=int, help="frames per clip (the first N; synthetic clips: 8 by default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per run; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards before timing each run")
    parser.add_argument("--json", action="store_true", help="print JSON (summary and per clip) instead of the table")
    add_runtime_args(parser)
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value, least in (("--frames", args.frames, 1), ("--repeats", args.repeats, 1),
                               ("--warmup", args.warmup, 0)):
        if value is not None and value < least:
            raise Spark3rError(f"{flag} is {value}: give a whole number >= {least}")
    name = resolve_model_name(args.model)
    schedule = load_schedule(args.schedule)
    if schedule.model != name:
        raise Spark3rError(f"{args.schedule} was made for {schedule.model}, not {name}: "
                           f"pass a schedule made for {name} or --model {schedule.model}")
    entry = get_entry(name)
    clips = iter_clips(args.clips, preprocess=entry.recipe(), max_frames=args.frames,
                       frames=args.frames)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = load_model(name, weights=args.weights, device=device, dtype=dtype, seed=args.seed)
    if not isinstance(model, ReconstructionModel):
        raise Spark3rError(f"model {name} has no FLOP config: evaluate one of spark3r's model classes")
    check_model(schedule, model.adapter.model_name, model.adapter.num_global_layers)
    results = [evaluate_clip(model, schedule, clip, device, args.repeats, args.warmup)
               for clip in tqdm(clips, desc="evaluate-schedule", unit="clip", file=sys.stderr)]
    if not results:
        raise Spark3rError(f"--clips {args.clips} holds no clips: pass a folder of clips, one clip or synthetic:N")
    summary = summarize(results)
    context = {"model": name, "schedule": str(Path(args.schedule)), "clips": args.clips, "weights": str(args.weights),
               "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    if args.json:
        print(json.dumps({**context, "summary": summary, "per_clip": [asdict(r) for r in results]}, indent=2))
    else:
        frames = "/".join(str(count) for count in sorted({r.frames for r in results}))
        clips = f"{len(results)} clip" + ("s" if len(results) > 1 else "")
        print(format_report(summary, f"evaluate-schedule: {name} with {args.schedule} on {args.clips} ({clips}, "
                                     f"{frames} frames; {context['device']}, {context['dtype']}; depth median-aligned "
                                     "per clip)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
