"""pi3, DA3-giant and VGGT-Omega end to end: dense vs the paper's rule (random weights), beside the paper's speed-ups
and the FLOP model's.

    python benchmarks/models.py --models pi3 da3-giant vggt-omega --frames 100 300 1000 --dtype bf16 \
        --out benchmarks/results/models.json

Each forward is assembled from measured parts, the same way for dense and reduced, because dense global attention at
1000 frames takes tens of seconds per layer:
  encoder  = model.prepare(images), measured;
  steps    = every trunk step that is not a global layer, each measured once on the prepared tokens;
  global   = one global step per distinct reduction, measured, times the number of layers with that reduction
             (dense: one measured global step times the number of global layers);
  heads    = model.decode on a finished trunk of min(S, --head-frames) frames, scaled by S / that (the heads are per
             frame; VGGT-Omega's camera trunk over S * 17 tokens is a negligible part). The finished trunk is run with
             every global layer pruned to frame 0's K/V, which changes values but not the heads' work.
Timing does not depend on the weights or the token values (the reduction's shapes depend only on S and the layout).
The paper's rule is schedules/<model>-paper.yaml; tiny models get the same rule with their middle third sensitive.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import defaultdict
from pathlib import Path

import torch

from spark3r.commands.arguments import DTYPES, resolve_device
from spark3r.files import write_json
from spark3r.models.base import TrunkState
from spark3r.models.registry import build_model
from spark3r.reduce import Reduction, apply_reductions
from spark3r.reduce.flops import model_flops
from spark3r.schedule import apply_schedule, load_schedule, paper_schedule, shipped_schedule

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmarks_foundation", REPO / "benchmarks" / "foundation.py")
foundation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(foundation)
measure = foundation.measure
_spec = importlib.util.spec_from_file_location("benchmarks_provenance", REPO / "benchmarks" / "provenance.py")
provenance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(provenance)

# the paper's end-to-end speed-ups at about 1000 frames, on an H20
PAPER_SPEEDUP = {"vggt-1b": "26-28x", "pi3": "23-25x", "da3-giant": "16-18x", "vggt-omega": "16-19x"}


def paper_rule(model):
    """The paper's hand-set schedule of `model`: the one shipped in the package, or (models without one) the middle
    third sensitive."""
    name, layers = model.adapter.model_name, model.adapter.num_global_layers
    path = shipped_schedule(name)
    if path is not None:
        return load_schedule(path)
    return paper_schedule(name, layers, list(range(layers // 3, 2 * layers // 3)))


def step_state(state: TrunkState, step: int) -> TrunkState:
    """The prepared tokens posing as the state entering `step` (timing needs shapes, not values)."""
    return TrunkState(tokens=state.tokens, step=step, extras=dict(state.extras))


def time_steps(model, state: TrunkState, steps: list[int], device: torch.device, repeats: int) -> dict[int, float]:
    """Seconds of each listed trunk step, each run on its own."""
    seconds = {}
    for step in steps:
        _, seconds[step], _ = measure(device, lambda: model.run_steps(step_state(state, step), step + 1), repeats)
    return seconds


def time_heads(model, frames: int, size: tuple[int, int], device: torch.device, repeats: int) -> float:
    """Seconds of model.decode on a finished trunk of `frames` frames (global layers pruned to frame 0's K/V), after one
    untimed decode (which compiles compiled heads for this shape and lets cuDNN pick its kernels)."""
    images = torch.rand(1, frames, 3, *size, device=device)
    cheap = Reduction(kv_keep=1.0 / frames) if frames > 1 else Reduction()
    with apply_reductions(model, {layer: cheap for layer in range(model.adapter.num_global_layers)}) as handle:
        handle.set_layout(model.adapter.layout(images))
        finished = model.run_steps(model.prepare(images))
    model.decode(finished, images, model.decode_dtype())
    _, seconds, _ = measure(device, lambda: model.decode(finished, images, model.decode_dtype()), repeats)
    return seconds


def benchmark(model, frames: int, size: tuple[int, int], head_frames: int, device: torch.device,
              repeats: int, whole_reduced: bool = False) -> dict:
    """One row: dense and paper-rule seconds (assembled, see the module docstring) and the FLOP model's speed-up;
    `whole_reduced`: also the paper-rule forward run whole, once (seconds and peak memory)."""
    images = torch.rand(1, frames, 3, *size, device=device)
    layout = model.adapter.layout(images)
    state, encoder_s, encoder_peak = measure(device, lambda: model.prepare(images), repeats)
    global_steps = model.global_layer_steps
    other = time_steps(model, state, [s for s in range(model.num_steps) if s not in global_steps], device, repeats)
    first_global = global_steps[0]
    _, dense_global, dense_global_peak = measure(
        device, lambda: model.run_steps(step_state(state, first_global), first_global + 1), repeats)

    schedule = paper_rule(model)
    layers_by_reduction = defaultdict(list)
    for layer, reduction in enumerate(schedule.reductions(frames)):
        layers_by_reduction[reduction].append(layer)
    reduced_global = 0.0
    with apply_schedule(model, schedule) as handle:
        handle.set_layout(layout)
        for layers in layers_by_reduction.values():
            step = global_steps[layers[0]]
            reduced_global += len(layers) * time_steps(model, state, [step], device, repeats)[step]
    state = None  # free the prepared tokens before the heads are timed
    if device.type == "cuda":
        torch.cuda.empty_cache()

    whole = {}
    if whole_reduced:
        try:
            with apply_schedule(model, schedule):
                _, whole["reduced_whole_s"], whole["reduced_whole_peak_gib"] = measure(device, lambda: model(images), 1)
        except torch.cuda.OutOfMemoryError:
            whole = {"reduced_whole_s": None, "reduced_whole_peak_gib": None}
        if device.type == "cuda":
            torch.cuda.empty_cache()

    head_count = min(frames, head_frames)
    heads_s = time_heads(model, head_count, size, device, repeats) * frames / head_count
    shared = encoder_s + sum(other.values()) + heads_s
    dense_s = shared + len(global_steps) * dense_global
    reduced_s = shared + reduced_global
    flops = model.flop_config(*size)
    flop_speedup = model_flops(flops, frames).total / model_flops(flops, frames, schedule).total
    return {
        "model": model.adapter.model_name, "frames": frames, "size": list(size),
        "encoder_s": encoder_s, "other_steps_s": sum(other.values()), "heads_s": heads_s,
        "dense_global_layer_s": dense_global, "dense_global_s": len(global_steps) * dense_global,
        "reduced_global_s": reduced_global, "dense_s": dense_s, "reduced_s": reduced_s,
        "speedup": dense_s / reduced_s, "flop_speedup": flop_speedup,
        "paper_speedup": PAPER_SPEEDUP.get(model.adapter.model_name, "n/a"),
        "encoder_peak_gib": encoder_peak, "dense_global_step_peak_gib": dense_global_peak,
        "note": "assembled" + (f"; heads scaled from {head_count} frames" if head_count < frames else "")
                + ("; paper rule whole: out of memory" if whole_reduced and whole["reduced_whole_s"] is None else ""),
        **whole,
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| model | frames | dense (s) | paper rule (s) | speed-up | FLOP-model speed-up | paper (~1000 frames) "
             "| dense global share | dense global step peak (GiB) | paper rule whole (s) | its peak (GiB) | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def cell(row: dict, key: str, digits: int) -> str:
        return "n/a" if row.get(key) is None else f"{row[key]:.{digits}f}"

    for row in rows:
        lines.append(
            f"| {row['model']} | {row['frames']} | {row['dense_s']:.2f} | {row['reduced_s']:.2f} | "
            f"{row['speedup']:.1f}x | {row['flop_speedup']:.1f}x | {row['paper_speedup']} | "
            f"{row['dense_global_s'] / row['dense_s']:.0%} | {cell(row, 'dense_global_step_peak_gib', 1)} | "
            f"{cell(row, 'reduced_whole_s', 2)} | {cell(row, 'reduced_whole_peak_gib', 1)} | {row['note']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["pi3", "da3-giant", "vggt-omega"])
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--size", type=int, nargs="*", default=[],
                        help="H W, or one value for square frames (default: each model's default size)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="trunk autocast dtype")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--head-frames", type=int, default=100, help="frames the heads are timed on (then scaled)")
    parser.add_argument("--repeats", type=int, default=3, help="timings under 1 s are repeated, best kept")
    parser.add_argument("--whole-reduced", action="store_true",
                        help="also run the paper-rule forward whole once per length: end-to-end seconds, peak memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/models.json"))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)

    rows = []
    for name in args.models:
        torch.manual_seed(args.seed)
        model = build_model(name, device).eval().requires_grad_(False)
        model.compute_dtype = DTYPES[args.dtype]
        size = tuple((args.size * 2)[:2]) if args.size else model.config.default_size
        with torch.inference_mode():
            benchmark(model, 2, size, args.head_frames, device, 1)  # warm-up: kernels, cuDNN plans
            for frames in args.frames:
                try:
                    rows.append(benchmark(model, frames, size, args.head_frames, device, args.repeats,
                                          args.whole_reduced))
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"out of memory: {name} at {frames} frames (longer clips skipped)", file=sys.stderr)
                    break
                print(f"done: {name} at {frames} frames", file=sys.stderr)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(markdown(rows))
    write_json(args.out, {
        **provenance.record(__file__, argv, device), "models": args.models, "dtype": args.dtype,
        "device": str(device), "rows": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
