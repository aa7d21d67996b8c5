"""Does a longer clip hurt the long-clip vggt-tiny on the frames it already had? Runs the first N frames of the same
held-out walks at each --lengths N (the walks are generated once at the longest length: a generated walk's path
depends on its length) and reports, per length:

* the rotation error (deg, against frame 0) of frames 1..P-1 and the error of consecutive-frame rotations over them,
  P = the shortest length (the same frames at every length, so only the added context differs);
* per global layer, where the attention of a frame's queries (its camera token and --patches patch tokens, averaged
  over heads, queries and the frames 1..P-1) goes: its own frame, frames 1-2 and 3-8 away, frame 0, the rest; the
  effective number of frames attended (exp of the entropy of the attention mass per frame) and of tokens attended
  (the same over single keys, against the N keys of the clip), and the mean largest attention probability.

    python benchmarks/tiny_attention.py --weights benchmarks/checkpoints/vggt-tiny-long-stage6.safetensors \
        --out benchmarks/results/attention-vggt-tiny-long-s6.json

--logit-scale T multiplies every global attention's logits by T first (`scale_global_logits`): does sharper attention
alone bring the long clips back?

The attention is recomputed from the layer's q and k (after qk-norm and RoPE) beside the dense attention, which still
produces the layer's output, so the outputs are the dense model's. Markdown beside --out.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from spark3r.commands.arguments import resolve_device, resolve_dtype
from spark3r.data.clips import open_clips
from spark3r.models.base import FrameLayout
from spark3r.models.loading import load_model
from spark3r.models.registry import get_entry
from spark3r.reduce.patch import AttentionPatch
from spark3r.training.evaluation import MODEL, clips_batch, predict
from spark3r.training.losses import relative_to_first
from spark3r.training.tiny import scale_global_logits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402
import tiny_drift  # noqa: E402

# (label, lowest frame distance, highest) of the attention bins besides frame 0
DISTANCES = (("own frame", 0, 0), ("1-2 frames away", 1, 2), ("3-8 frames away", 3, 8), ("further", 9, None))


def query_tokens(layout: FrameLayout, patches: int) -> Tensor:
    """Token offsets inside a frame of the queries looked at: the camera token (0) and `patches` evenly spaced patch
    tokens -> [1 + patches] long."""
    grid = layout.grid_h * layout.grid_w
    chosen = torch.linspace(0, grid - 1, patches).round().long() if patches else torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), layout.n_special + chosen])


def attention_rows(q: Tensor, k: Tensor, layout: FrameLayout, queries: Tensor, frames: int) -> Tensor:
    """Attention probabilities of the chosen queries of frames 1..frames-1 over every key: q, k [B, h, N, D] ->
    [B, h, frames-1, Q, N] (float32)."""
    batch, heads, _, head_dim = q.shape
    rows = (torch.arange(1, frames)[:, None] * layout.tokens_per_frame + queries[None]).flatten().to(q.device)
    logits = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) / head_dim ** 0.5
    return logits.softmax(-1).reshape(batch, heads, frames - 1, len(queries), -1)


def frame_mass(probabilities: Tensor, layout: FrameLayout) -> Tensor:
    """[..., N] attention probabilities -> [..., S] their sum over each key frame's tokens."""
    return probabilities.unflatten(-1, (layout.frames, layout.tokens_per_frame)).sum(-1)


def effective_count(probabilities: Tensor) -> Tensor:
    """exp of the entropy over the last dim: 1 for one-hot rows, the row length for uniform ones."""
    return (-(probabilities * probabilities.clamp_min(1e-30).log()).sum(-1)).exp()


def mass_by_distance(mass: Tensor) -> dict[str, float]:
    """[B, h, F-1, Q, S] masses of query frames 1..F-1 -> mean share per DISTANCES bin and frame 0, and the effective
    number of frames attended."""
    query_frame = torch.arange(1, mass.shape[2] + 1)[:, None, None]
    key_frame = torch.arange(mass.shape[-1])[None, None, :]
    distance = (query_frame - key_frame).abs().to(mass.device)  # [F-1, 1, S]
    shares = {"frame 0": float(mass[..., 0].mean())}
    not_first = key_frame.to(mass.device) > 0
    for label, low, high in DISTANCES:
        inside = (distance >= low) & not_first & (distance <= high if high is not None else True)
        shares[label] = float((mass * inside).sum(-1).mean())
    shares["effective frames"] = float(effective_count(mass).mean())
    return shares


def record_attention(prefix: int, queries_per_frame: int, stats: dict[int, dict[str, float]]):
    """An AttentionPatch `attention_for` that keeps in `stats` each layer's attention summary for the queries of frames
    1..prefix-1 (`mass_by_distance`, the effective number of tokens attended, the mean largest probability) and
    returns the dense attention."""
    def attention_for(layer: int, layout: FrameLayout):
        def attend(heads, x: Tensor, chunk: int | None) -> Tensor:
            q, k, v = heads(slice(None))
            probabilities = attention_rows(q, k, layout, query_tokens(layout, queries_per_frame), prefix)
            stats[layer] = {**mass_by_distance(frame_mass(probabilities, layout)),
                            "effective tokens": float(effective_count(probabilities).mean()),
                            "top key": float(probabilities.amax(-1).mean())}
            return F.scaled_dot_product_attention(q, k, v)
        return attend
    return attention_for


def pose_errors(extrinsics: Tensor, truth: Tensor, prefix: int) -> dict[str, float]:
    """Rotation error against frame 0 of frames 1..prefix-1, and of their consecutive-frame rotations (deg)
    (`tiny_drift.drift` over the first `prefix` frames)."""
    measured = tiny_drift.drift(relative_to_first(extrinsics.double())[:, :prefix], truth[:, :prefix], [(1, prefix)])
    return {"rotation_deg": measured["by_index"][f"1-{prefix - 1}"], "consecutive_deg": measured["consecutive"]}


def markdown(result: dict) -> str:
    lengths = [str(length) for length in result["lengths"]]
    prefix = result["lengths"][0]
    lines = [f"# Longer clips, same frames: vggt-tiny on the first {prefix} frames of {result['clips']}", "",
             f"`{result['command']}` (git {result['commit']}, {result['device_name']}); weights {result['weights']}"
             + (f", global attention logits x {result['logit_scale']:g}" if result["logit_scale"] != 1.0 else "") + ". "
             f"Frames 1-{prefix - 1} of the same walks, run as the first frames of clips of each length.", "",
             "| clip length | " + " | ".join(lengths) + " |", "|---|" + "---:|" * len(lengths),
             f"| rotation error of frames 1-{prefix - 1} (deg) | "
             + " | ".join(f"{result['pose'][n]['rotation_deg']:.2f}" for n in lengths) + " |",
             "| consecutive-frame rotation error (deg) | "
             + " | ".join(f"{result['pose'][n]['consecutive_deg']:.2f}" for n in lengths) + " |", "",
             f"Where the attention of frames 1-{prefix - 1} goes (camera token and {result['patches']} patch queries "
             "per frame, mean over heads), per global layer:", ""]
    labels = ["frame 0", *(label for label, _, _ in DISTANCES), "effective frames", "effective tokens", "top key"]
    lines += ["| layer | clip length | keys | " + " | ".join(labels) + " |",
              "|---:|---:|---:|" + "---:|" * len(labels)]
    for layer in range(result["global_layers"]):
        for n in lengths:
            shares = result["attention"][n][layer]
            lines.append(f"| {layer} | {n} | {int(n) * result['tokens_per_frame']} | " + " | ".join(
                f"{shares[label]:.1f}" if label.startswith("effective") else f"{shares[label]:.3f}" for label in labels)
                + " |")
    return "\n".join(lines) + "\n"


def logit_scale(text: str) -> float:
    """argparse type of --logit-scale (here and in tiny_eval.py): a finite factor > 0."""
    factor = float(text)
    if not (math.isfinite(factor) and factor > 0):
        raise argparse.ArgumentTypeError(f"{text}: give a factor > 0")
    return factor


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="auto", help="vggt-tiny weights (default: the shipped ones)")
    parser.add_argument("--clips", default="synthetic:4:1000:walk")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--patches", type=int, default=8, help="patch queries per frame besides the camera token")
    parser.add_argument("--logit-scale", type=logit_scale, default=1.0,
                        help="multiply the global attention logits by this factor (default %(default)s: as trained)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/attention-vggt-tiny.json)")
    args = parser.parse_args(argv)
    lengths = sorted(args.lengths)
    if lengths[0] < 2:
        parser.error(f"--lengths {lengths[0]}: give lengths of at least 2 frames")
    device = resolve_device(args.device)
    model = load_model(MODEL, weights=args.weights, device=device, dtype=resolve_dtype(args.dtype, device))
    scale_global_logits(model, args.logit_scale)
    clips = open_clips(args.clips, preprocess=get_entry(MODEL).recipe(), frames=lengths[-1], device=device)
    images, targets = clips_batch(clips, device)
    truth = relative_to_first(targets.extrinsics.double().cpu())
    layers = model.adapter.num_global_layers
    pose, attention = {}, {}
    for length in lengths:
        stats: dict[int, dict[str, float]] = {}
        with AttentionPatch(model, model.adapter, range(layers),
                            record_attention(lengths[0], args.patches, stats)):
            extrinsics = predict(model, images[:, :length], chunk=len(images))[1]
        pose[str(length)] = pose_errors(extrinsics.cpu(), truth, lengths[0])
        attention[str(length)] = [stats[layer] for layer in range(layers)]
    result = {**provenance.record(__file__, argv, device), "weights": args.weights, "clips": args.clips,
              "logit_scale": args.logit_scale, "lengths": lengths, "patches": args.patches, "global_layers": layers,
              "tokens_per_frame": model.adapter.layout(images[:, :1]).tokens_per_frame, "pose": pose,
              "attention": attention}
    provenance.publish(args.out, HERE / "results" / "attention-vggt-tiny.json", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
