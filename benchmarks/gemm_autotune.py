"""Do inductor's Triton GEMM templates (max-autotune, which can fuse GELU and bias into the matrix product's epilogue)
beat the shipped compile (cuBLAS matrix products, separate fused elementwise kernels)? One frame block and one
paper-rule global block of random VGGT-1B at --frames frames, compiled with this process's inductor settings: the
first (compiling) call, the warm median, and the compiled output against eager on the first 64 frames.

    python benchmarks/gemm_autotune.py --frames 1000 --out $OUT/gemm-autotune-default.json
    TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 python benchmarks/gemm_autotune.py --frames 1000 --out $OUT/gemm-autotune-max.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from spark3r.commands.arguments import resolve_device
from spark3r.models.blocks import compile_model, compute_autocast
from spark3r.models.registry import build_model
from spark3r.schedule import apply_schedule

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import models  # noqa: E402
import provenance  # noqa: E402
import speed  # noqa: E402

COMPARED_FRAMES = 64


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--model", default="vggt-1b", help="a VGGT-family model (vggt-tiny for a CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, device).eval().requires_grad_(False)
    model.compute_dtype = torch.bfloat16
    config = model.config
    per_frame = config.n_special + (config.img_size // config.patch_size) ** 2
    tokens = torch.randn(args.frames, per_frame, config.embed_dim, device=device,
                         generator=torch.Generator(device).manual_seed(0))
    sequence = tokens.reshape(1, -1, config.embed_dim)
    pos = model.prepare(torch.rand(1, 2, 3, config.img_size, config.img_size, device=device)).extras["pos"]
    schedule = models.paper_rule(model)
    reductions = schedule.reductions(args.frames)
    layer = max(range(len(reductions)), key=lambda index: reductions[index].kv_factor)
    handle = apply_schedule(model, schedule)
    handle.set_layout(model.adapter.layout(torch.empty(1, args.frames, 3, config.img_size, config.img_size,
                                                       device="meta")))
    runs = {"frame block": (model.aggregator.frame_blocks[0], tokens, lambda y: y[:COMPARED_FRAMES]),
            "global block": (model.aggregator.global_blocks[layer], sequence,
                             lambda y: y[:, : COMPARED_FRAMES * per_frame])}
    result = {**provenance.record(__file__, argv, device), "frames": args.frames, "global layer": layer,
              "max_autotune_gemm": os.environ.get("TORCHINDUCTOR_MAX_AUTOTUNE_GEMM", "0"), "blocks": {}}
    with torch.inference_mode():
        def call(block, x):
            with compute_autocast(device.type, torch.bfloat16):
                return block(x, pos=pos)

        eager = {name: compared(call(block, x)).float() for name, (block, x, compared) in runs.items()}
        compile_model(model)
        for name, (block, x, compared) in runs.items():
            start = time.perf_counter()
            out = call(block, x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - start
            result["blocks"][name] = {
                "first_call_s": first, "warm_s": speed.median_seconds(device, lambda: call(block, x), args.repeats),
                "compiled_vs_eager": relative(compared(out).float(), eager[name])}
            print(name, result["blocks"][name], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
