"""Where the long-clip vggt-tiny's pose error comes from: rotation error against frame 0 by frame index, beside how far
the true cameras have turned from frame 0, and the error of the rotation between consecutive frames (a smooth drift
keeps it small; per-frame noise does not), for the model and for frame-only global attention.

    python benchmarks/tiny_drift.py --weights benchmarks/checkpoints/vggt-tiny-long-stage6.safetensors \
        --out benchmarks/results/drift-vggt-tiny-long-s6-256.json

Clips: --clips (default synthetic:4:1000:walk, held out) at --frames frames; cameras relative to frame 0 as the
evaluation (`train_tiny --evaluate`) compares them. Markdown beside --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from spark3r.commands.arguments import resolve_device, resolve_dtype
from spark3r.data.clips import open_clips
from spark3r.evaluate.metrics import rotation_angle_deg
from spark3r.models.loading import load_model
from spark3r.models.registry import get_entry
from spark3r.training.evaluation import MODEL, clips_batch, predict
from spark3r.training.losses import relative_to_first

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402


def index_bins(frames: int) -> list[tuple[int, int]]:
    """Frame-index bins [start, stop): 1-7, 8-31, 32-127, 128-... (those that hold frames of a clip of `frames`)."""
    edges = [1, 8, 32, 128, frames]
    return [(start, min(stop, frames)) for start, stop in zip(edges, edges[1:]) if start < frames]


def drift(predicted: torch.Tensor, truth: torch.Tensor, bins: list[tuple[int, int]]) -> dict:
    """predicted, truth [N, S, 3, 4] world-to-camera relative to frame 0 -> mean rotation error (deg) against frame 0
    per bin of frame indices, and mean error of the rotation between consecutive frames."""
    against_first = rotation_angle_deg(predicted[..., :3], truth[..., :3])  # [N, S]
    step = lambda cameras: cameras[:, 1:, :, :3] @ cameras[:, :-1, :, :3].transpose(-1, -2)  # noqa: E731
    return {"by_index": {f"{start}-{stop - 1}": float(against_first[:, start:stop].mean()) for start, stop in bins},
            "consecutive": float(rotation_angle_deg(step(predicted), step(truth)).mean())}


def markdown(result: dict) -> str:
    bins = list(result["truth_turn"])
    lines = [f"# Pose error by frame index: vggt-tiny, {result['frames']} frames of {result['clips']}", "",
             f"`{result['command']}` (git {result['commit']}, {result['device_name']}); weights {result['weights']}.",
             "", "| | " + " | ".join(f"frames {label}" for label in bins) + " | consecutive frames |",
             "|---|" + "---:|" * (len(bins) + 1),
             "| true rotation from frame 0 (deg) | " + " | ".join(f"{result['truth_turn'][label]:.1f}" for label in bins)
             + f" | {result['truth_consecutive']:.2f} |"]
    for row, values in result["rows"].items():
        lines.append(f"| rotation error (deg), {row} | " + " | ".join(f"{values['by_index'][label]:.2f}"
                                                                    for label in bins)
                     + f" | {values['consecutive']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="auto", help="vggt-tiny weights (default: the shipped ones)")
    parser.add_argument("--clips", default="synthetic:4:1000:walk")
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/drift-vggt-tiny-<frames>.json)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model = load_model(MODEL, weights=args.weights, device=device, dtype=resolve_dtype(args.dtype, device))
    clips = open_clips(args.clips, preprocess=get_entry(MODEL).recipe(), frames=args.frames, device=device)
    images, targets = clips_batch(clips, device)
    truth = targets.extrinsics.double().cpu()
    bins = index_bins(images.shape[1])
    identity = torch.eye(3, 4, dtype=torch.float64).expand_as(truth)
    turned = drift(identity, truth, bins)  # identity cameras: the error is how far the truth turned
    rows = {}
    for row, frame_only in (("model", False), ("frame-only global attention", True)):
        extrinsics = predict(model, images, chunk=1, frame_only=frame_only)[1]
        rows[row] = drift(relative_to_first(extrinsics.double()), truth, bins)
    result = {**provenance.record(__file__, argv, device), "weights": args.weights, "clips": args.clips,
              "frames": images.shape[1], "truth_turn": turned["by_index"], "truth_consecutive": turned["consecutive"],
              "rows": rows}
    provenance.publish(args.out, HERE / "results" / f"drift-vggt-tiny-{images.shape[1]}.json", result,
                       markdown(result))
    return result


if __name__ == "__main__":
    main()
