"""Dense VGGT speed and memory per stage (encoder, trunk, camera / depth / point heads) with random weights.

    python benchmarks/foundation.py --model vggt-1b --frames 100 1000 --size 518 \
        --out benchmarks/results/foundation.json

Random weights are built on the meta device, then materialised on the GPU and initialised (seconds, no download).
The trunk of a clip longer than --full-trunk-frames is not run whole (dense global attention at 1000 frames takes about
20 s per layer): one frame block and one global block are timed on the real tokens and the trunk time is assembled as
depth x (frame block + global block); its peak memory is the global block's peak plus the lean taps the full run would
hold. The heads then run on a trunk state whose taps all come from that one layer. Such rows say "assembled".
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from spark3r.commands.arguments import DTYPES, resolve_device
from spark3r.files import write_json
from spark3r.models.base import TrunkState
from spark3r.models.blocks import no_autocast
from spark3r.models.registry import build_model

_spec = importlib.util.spec_from_file_location("benchmarks_provenance",
                                              Path(__file__).resolve().parent / "provenance.py")
provenance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(provenance)

GIB = 2**30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, fn, repeats: int = 1):
    """(result, seconds, peak GiB or None) of fn(); peak is the CUDA allocator's high-water mark during fn. With
    repeats > 1, fn runs again while it takes under 1 s, up to `repeats` times, and the best time is kept."""
    best, result, peak = float("inf"), None, None
    for _ in range(repeats):
        result = None
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
        if best >= 1.0:
            break
    return result, best, peak


def run_trunk(model, state: TrunkState, full: bool, device: torch.device) -> tuple[TrunkState, list[dict]]:
    """The finished trunk state and its rows: measured whole, or assembled from one frame and one global block."""
    depth = model.config.depth
    if full:
        finished, seconds, peak = measure(device, lambda: model.run_steps(state))
        note = f"{depth} frame + {depth} global blocks"
        return finished, [{"stage": "trunk", "seconds": seconds, "peak_gib": peak, "note": note}]
    after_frame, frame_s, frame_peak = measure(device, lambda: model.run_steps(state, 1))
    after_global, global_s, global_peak = measure(device, lambda: model.run_steps(after_frame, 2))
    tap = torch.cat([after_frame.tokens, after_global.tokens], dim=-1).to(model.compute_dtype)
    kept = sorted(model.kept_layers())
    tap_gib = tap.numel() * tap.element_size() / GIB
    finished = TrunkState(
        tokens=after_global.tokens, step=model.num_steps, taps={layer: tap for layer in kept},
        extras={**after_global.extras, "camera_token": tap[:, :, 0].float()},
    )
    peak = None if global_peak is None else max(frame_peak, global_peak) + tap_gib * len(kept)
    return finished, [
        {"stage": "trunk: one frame block", "seconds": frame_s, "peak_gib": frame_peak, "note": "measured"},
        {"stage": "trunk: one global block", "seconds": global_s, "peak_gib": global_peak, "note": "measured"},
        {"stage": "trunk", "seconds": depth * (frame_s + global_s), "peak_gib": peak,
         "note": f"assembled: {depth} x (frame + global block); peak + {len(kept)} lean taps"},
    ]


def run_heads(model, state: TrunkState, images: torch.Tensor, device: torch.device) -> list[dict]:
    """One row per head (fp32, autocast off, DPT heads over chunks of frames, as VGGT.decode runs them)."""
    config = model.config
    taps = [state.taps[layer] for layer in config.taps]
    image_size = tuple(images.shape[-2:])
    heads = {
        "camera head": lambda: model.camera_head(state.extras["camera_token"]),
        "depth head": lambda: model.depth_head(taps, image_size, config.n_special, config.head_chunk_frames),
        "point head": lambda: model.point_head(taps, image_size, config.n_special, config.head_chunk_frames),
    }
    rows = []
    for name, head in heads.items():
        with no_autocast(device.type):
            _, seconds, peak = measure(device, head)
        rows.append({"stage": name, "seconds": seconds, "peak_gib": peak, "note": "fp32"})
    return rows


def benchmark(model, frames: int, height: int, width: int, full_trunk_frames: int, device: torch.device) -> list[dict]:
    images = torch.rand(1, frames, 3, height, width, device=device)
    state, seconds, peak = measure(device, lambda: model.prepare(images))
    rows = [{"stage": "encoder", "seconds": seconds, "peak_gib": peak, "note": "normalise + patch encoder"}]
    finished, trunk_rows = run_trunk(model, state, frames <= full_trunk_frames, device)
    rows += trunk_rows
    del state
    rows += run_heads(model, finished, images, device)
    return [{"frames": frames, **row} for row in rows]


def markdown(rows: list[dict]) -> str:
    lines = ["| frames | stage | time (s) | peak memory (GiB) | note |", "|---:|---|---:|---:|---|"]
    for row in rows:
        peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        lines.append(f"| {row['frames']} | {row['stage']} | {row['seconds']:.3f} | {peak} | {row['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vggt-1b")
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--size", type=int, nargs="+", default=[518], help="H W, or one value for square frames")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="trunk autocast dtype")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--full-trunk-frames", type=int, default=300,
                        help="longest clip whose trunk runs whole; longer clips are assembled from one block of each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/foundation.json"))
    args = parser.parse_args(argv)
    height, width = (args.size * 2)[:2]
    device = resolve_device(args.device)

    torch.manual_seed(args.seed)
    model = build_model(args.model, device).eval().requires_grad_(False)
    model.compute_dtype = DTYPES[args.dtype]
    rows = []
    with torch.inference_mode():
        benchmark(model, 2, height, width, args.full_trunk_frames, device)  # warm-up: kernels, cuDNN plans
        for frames in args.frames:
            rows += benchmark(model, frames, height, width, args.full_trunk_frames, device)
            print(f"done: {frames} frames", file=sys.stderr)
    print(markdown(rows))
    write_json(args.out, {
        **provenance.record(__file__, argv, device), "model": args.model, "size": [height, width],
        "dtype": args.dtype, "device": str(device), "rows": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
