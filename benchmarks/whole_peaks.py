"""Time and peak memory of the paper-rule forward run whole (one model(images) call), per model.

    python benchmarks/whole_peaks.py --frames 1000 --out benchmarks/results/whole-reduced-peaks-1000.json

Random weights, bf16 autocast, each model at its default size. Per model: build it on the device, warm it up at 2
frames, then run `frames` random frames twice under its shipped paper schedule and keep the second run (the first
sizes the allocator and picks kernels). The peak is the CUDA allocator's high-water mark of that run.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from spark3r.commands.arguments import DTYPES, resolve_device
from spark3r.files import check_output_file, write_json
from spark3r.models.registry import build_model, get_entry
from spark3r.schedule import apply_schedule

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("benchmarks_foundation", HERE / "foundation.py")
foundation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(foundation)
_spec = importlib.util.spec_from_file_location("benchmarks_models", HERE / "models.py")
models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models)
_spec = importlib.util.spec_from_file_location("benchmarks_provenance", HERE / "provenance.py")
provenance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(provenance)


def default_size(model, name: str) -> tuple[int, int]:
    """The model's default (H, W): its config's, else square at its preprocessing width."""
    size = getattr(model.config, "default_size", None)
    return tuple(size) if size else (get_entry(name).image_width,) * 2


def whole_run(model, frames: int, size: tuple[int, int], device: torch.device) -> tuple[float, float | None]:
    """(seconds, peak GiB) of the second of two paper-rule forwards on `frames` random frames."""
    images = torch.rand(1, frames, 3, *size, device=device)
    with apply_schedule(model, models.paper_rule(model)):
        foundation.measure(device, lambda: model(images))
        _, seconds, peak = foundation.measure(device, lambda: model(images))
    return seconds, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vggt-1b", "pi3", "da3-giant", "vggt-omega"])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="trunk autocast dtype")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/whole-reduced-peaks.json"))
    args = parser.parse_args(argv)
    check_output_file(args.out, "out")
    device = resolve_device(args.device)
    rows = []
    for name in args.models:
        torch.manual_seed(args.seed)
        model = build_model(name, device).eval().requires_grad_(False)
        model.compute_dtype = DTYPES[args.dtype]
        size = default_size(model, name)
        with torch.inference_mode():
            whole_run(model, 2, size, device)  # warm-up: kernels, cuDNN plans
            seconds, peak = whole_run(model, args.frames, size, device)
        rows.append({"model": name, "frames": args.frames, "size": list(size), "seconds": seconds, "peak_gib": peak,
                     "note": "measured whole"})
        print(f"{name}: {args.frames} frames at {size[0]}x{size[1]}: {seconds:.1f} s, peak "
              f"{'n/a' if peak is None else f'{peak:.1f} GiB'}", file=sys.stderr)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_json(args.out, {**provenance.record(__file__, argv, device), "dtype": args.dtype, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
