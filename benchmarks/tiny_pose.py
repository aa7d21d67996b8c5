"""Where the shipped vggt-tiny loses pose on long clips: relative-rotation error by frame gap, and whether sharper
global attention at inference would help (the attention-dilution hypothesis).

    python benchmarks/tiny_pose.py --clips synthetic:4:1000:walk --frames 256 --temperatures 1,1.15,1.3,1.5,2 \
        --windows 2,8,32

1. Gaps: for every pair of frames (i, j), the angle between the predicted and the true relative rotation
   R_j R_i^T, binned by the gap j - i, beside the true relative rotation of the same pairs (what identity cameras
   would score). Local pose that holds while long gaps fail is drift in chaining frames, not lost matching.
2. Temperatures: every global attention layer's queries are multiplied by t after qk-norm (logits times t; t > 1
   sharpens attention over the S x P keys). If dilution over the longer key set bounded pose, some t > 1 would
   help at long length.
3. Windows: every global attention layer attends only to the frames within W of the query's frame, and to frame 0
   (the reference every camera is expressed in; without it no frame beyond W can be placed). If far frames
   disturbed the local estimate, a window would bring the short-gap error back to its short-clip value.
Dense, fp32, on the device picked by --device; the table goes to --out (JSON) and its .md.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spark3r.commands.arguments import resolve_device
from spark3r.data.clips import open_clips
from spark3r.evaluate.metrics import rotation_angle_deg
from spark3r.models.loading import load_model
from spark3r.models.registry import get_entry
from spark3r.models.base import FrameLayout
from spark3r.reduce.patch import AttentionPatch
from spark3r.training.evaluation import MODEL, clip_scores, clips_batch, predict
from spark3r.training.losses import Targets, relative_to_first

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance

GAP_BINS = ((1, 3), (4, 15), (16, 63), (64, 255), (256, 1 << 30))
METRICS = (("abs_rel", "depth AbsRel", 3), ("rotation_deg", "rot err deg", 2), ("ate", "ATE", 3),
           ("auc30", "AUC@30", 3))


@contextlib.contextmanager
def global_query_scale(model: nn.Module, scale: float) -> Iterator[None]:
    """Inside the block, every global attention layer's queries leave qk-norm multiplied by `scale`."""
    handles = [attn.q_norm.register_forward_hook(lambda module, args, out: out * scale)
               for attn in model.adapter.modules(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def window_attention(q: Tensor, k: Tensor, v: Tensor, layout: FrameLayout, window: int) -> Tensor:
    """Each token attends to the tokens of the frames within `window` of its own and of the reference frame 0 (whose
    camera is the origin): q, k, v [B, h, S*P, D] -> same."""
    frame = torch.arange(layout.tokens, device=q.device) // layout.tokens_per_frame
    near = ((frame[:, None] - frame[None, :]).abs() <= window) | (frame[None, :] == 0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=near)


@contextlib.contextmanager
def windowed_global_attention(model: nn.Module, layout: FrameLayout, window: int) -> Iterator[None]:
    """Inside the block, every global attention layer runs `window_attention`."""
    adapter = model.adapter
    with AttentionPatch(model, adapter, range(adapter.num_global_layers),
                        lambda layer, current: lambda heads, x, chunk: window_attention(*heads(slice(None)), current,
                                                                                      window)) as patch:
        patch.set_layout(layout)
        yield


def scores(model: nn.Module, images: Tensor, targets: Targets) -> tuple[dict, list[dict]]:
    """(mean metrics over clips, gap_errors) of one prediction of `images`, a clip at a time (a windowed layer's
    mask-based attention holds its [h, S*P, S*P] scores)."""
    depth, extrinsics = predict(model, images, chunk=1)
    per_clip = [clip_scores(depth[i], extrinsics[i], targets, i) for i in range(len(images))]
    means = {key: float(np.mean([clip[key] for clip in per_clip])) for key in per_clip[0]}
    return means, gap_errors(relative_to_first(extrinsics.double()), targets.extrinsics.double().cpu())


def gap_errors(predicted: torch.Tensor, truth: torch.Tensor) -> list[dict]:
    """Per gap bin: median and mean angle (deg) between predicted and true relative rotations of frame pairs,
    and the median true relative rotation. predicted, truth: extrinsics [N, S, 3, 4]."""
    frames = truth.shape[1]
    first, second = torch.triu_indices(frames, frames, offset=1)
    gaps = (second - first).numpy()
    errors, motion = [], []
    for pred, true in zip(predicted.double(), truth.double()):
        pred_rel = pred[second, :, :3] @ pred[first, :, :3].transpose(-1, -2)
        true_rel = true[second, :, :3] @ true[first, :, :3].transpose(-1, -2)
        errors.append(rotation_angle_deg(pred_rel, true_rel).numpy())
        motion.append(rotation_angle_deg(true_rel, torch.eye(3, dtype=torch.float64).expand_as(true_rel)).numpy())
    errors, motion = np.concatenate(errors), np.concatenate(motion)
    gaps = np.tile(gaps, len(predicted))
    rows = []
    for low, high in GAP_BINS:
        chosen = (gaps >= low) & (gaps <= high)
        if chosen.any():
            rows.append({"gaps": [low, min(high, frames - 1)], "pairs": int(chosen.sum()),
                         "error_median": float(np.median(errors[chosen])), "error_mean": float(errors[chosen].mean()),
                         "motion_median": float(np.median(motion[chosen]))})
    return rows


def markdown(result: dict) -> str:
    lines = [f"# vggt-tiny pose at {result['frames']} frames: gaps and attention temperature", "",
             f"`{result['command']}` (git {result['commit']}, {result['device_name']}, torch {result['torch']})", "",
             f"Shipped weights, dense, fp32, clips {result['clips']}.", "",
             "## Relative-rotation error by frame gap (t = 1)", "",
             "| gaps | pairs | error median (deg) | error mean (deg) | true motion median (deg) |",
             "|---|---:|---:|---:|---:|"]
    for row in result["gaps"]:
        lines.append(f"| {row['gaps'][0]}-{row['gaps'][1]} | {row['pairs']} | {row['error_median']:.2f} | "
                     f"{row['error_mean']:.2f} | {row['motion_median']:.2f} |")
    for title, rows, key, label in (("Global-attention query scale t at inference", result["temperatures"], "t", "t"),
                                    ("Global attention windowed to W frames either side at inference",
                                     result["windows"], "window", "W")):
        lines += ["", f"## {title}", "",
                  f"| {label} | " + " | ".join(name for _, name, _ in METRICS) + " | gap 1-3 error median (deg) |",
                  "|---:|" + "---:|" * (len(METRICS) + 1)]
        for row in rows:
            lines.append(f"| {row[key]:g} | " + " | ".join(f"{row[name]:.{digits}f}" for name, _, digits in METRICS)
                         + f" | {row['gap_1_3_median']:.2f} |")
    plain = next(row for row in result["temperatures"] if row["t"] == 1.0)
    lowest = []
    for label, key in (("t", "temperatures"), ("W", "windows")):
        if result[key]:
            best = min(result[key], key=lambda row: row["rotation_deg"])
            value = best["t" if label == "t" else "window"]
            lowest.append(f"{label} = {value:g}: {best['rotation_deg']:.2f} deg, AUC@30 {best['auc30']:.3f}")
    lines += ["", f"Lowest rotation error: {'; '.join(lowest)} (plain: {plain['rotation_deg']:.2f} deg, "
              f"{plain['auc30']:.3f}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--clips", default="synthetic:4:1000:walk")
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--temperatures", default="1,1.15,1.3,1.5,2")
    parser.add_argument("--windows", default="2,8,32", help="frames either side (empty: none)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    temperatures = [float(value) for value in args.temperatures.split(",")]
    if 1.0 not in temperatures:
        temperatures.insert(0, 1.0)
    model = load_model(MODEL, weights=args.weights, device=device)
    clips = open_clips(args.clips, preprocess=get_entry(MODEL).recipe(), frames=args.frames)
    images, targets = clips_batch(clips, device)
    layout = model.adapter.layout(images)
    variants = [("t", scale, global_query_scale(model, scale)) for scale in temperatures]
    variants += [("window", int(window), windowed_global_attention(model, layout, int(window)))
                 for window in args.windows.split(",") if window]
    rows, gaps = {"t": [], "window": []}, None
    for kind, value, context in variants:
        with context:
            means, variant_gaps = scores(model, images, targets)
        if kind == "t" and value == 1.0:
            gaps = variant_gaps
        rows[kind].append({kind: value, **means, "gap_1_3_median": variant_gaps[0]["error_median"]})
        print(f"{kind} = {value:g}: " + ", ".join(f"{key} {means[key]:.4f}" for key, _, _ in METRICS), flush=True)
    result = {**provenance.record(__file__, argv, device), **provenance.weights_identity(MODEL, args.weights),
              "clips": args.clips, "frames": args.frames,
              "weights": args.weights, "gaps": gaps, "temperatures": rows["t"], "windows": rows["window"]}
    default = provenance.REPO / "benchmarks" / "results" / f"tiny-pose-{args.frames}.json"
    provenance.publish(args.out, default, result, markdown(result))


if __name__ == "__main__":
    main()
