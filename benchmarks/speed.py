"""Speed of reduced vs dense global attention: aggregator and end-to-end time, peak memory, FLOP-model speed-up.

    python benchmarks/speed.py --model vggt-1b --frames 32 100 300 1000 --size 518 --dtype bf16 \
        --out benchmarks/results/speed-vggt-1b.json

Random weights (no download). For each clip length S the dense model and every schedule (default: the model's shipped
paper-rule and uniform schedules) run encoder + trunk ("aggregator") and heads; times are the best of --repeats runs
after one warm-up pass over all variants at 2 frames. A dense trunk longer than --dense-max-frames is not run whole:
it is assembled from one timed frame block and one timed global block (foundation.py's `run_trunk`), and its row says
"assembled". The select+merge share is measured on random q, k, v of the global layers' shape: (time of
reduced_attention - time of the bare attention on the reduced shapes) / time of reduced_attention, summed over layers.
Markdown table on stdout, JSON in --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
import torch
import torch.nn.functional as F

from spark3r.cli import DTYPES, resolve_device
from spark3r.models.registry import build_model
from spark3r.reduce import apply_schedule, kv_count, model_flops, query_count, reduced_attention
from spark3r.reduce.attention import is_dense
from spark3r.schedule import load_schedule

_spec = importlib.util.spec_from_file_location("benchmarks_foundation", HERE / "foundation.py")
foundation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(foundation)
measure, run_trunk, write_json = foundation.measure, foundation.run_trunk, foundation.write_json

SCHEDULES = HERE.parent / "schedules"


def best_of(repeats: int, device: torch.device, fn):
    """(result of the last run, least seconds, largest peak GiB) over `repeats` runs of fn()."""
    runs = [measure(device, fn) for _ in range(repeats)]
    peaks = [peak for _, _, peak in runs if peak is not None]
    return runs[-1][0], min(seconds for _, seconds, _ in runs), max(peaks) if peaks else None


def run_model(model, images, repeats, device, handle=None, dense_assembled=False) -> dict:
    """Encoder + trunk ("aggregator") and heads of one clip: seconds and peak GiB."""
    if handle is not None:
        handle.set_layout(model.adapter.layout(images))
    state, prepare_s, prepare_peak = best_of(repeats, device, lambda: model.prepare(images))
    if dense_assembled:
        finished, rows = run_trunk(model, state, False, device)
        trunk_s, trunk_peak = rows[-1]["seconds"], rows[-1]["peak_gib"]
    else:
        finished, trunk_s, trunk_peak = best_of(repeats, device, lambda: model.run_steps(state))
    del state
    _, decode_s, decode_peak = best_of(repeats, device, lambda: model.decode(finished, images))
    peaks = [peak for peak in (prepare_peak, trunk_peak, decode_peak) if peak is not None]
    return {"aggregator_s": prepare_s + trunk_s, "end_to_end_s": prepare_s + trunk_s + decode_s,
            "peak_gib": max(peaks) if peaks else None}


def select_merge_share(model, layout, schedule, repeats, device, dtype) -> float | None:
    """Share of the reduced global attention spent selecting K/V and merging queries, over all layers."""
    attn = model.adapter.modules(model)[0]
    heads, head_dim = attn.num_heads, attn.head_dim
    layers = Counter(schedule.reductions(layout.frames))
    layers = {reduction: count for reduction, count in layers.items() if not is_dense(layout, reduction)}
    if not layers:
        return None
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = torch.randn(3, 1, heads, layout.tokens, head_dim, device=device, dtype=dtype, generator=generator)
    total = bare = 0.0
    for reduction, count in layers.items():
        _, full_s, _ = best_of(repeats, device, lambda: reduced_attention(q, k, v, layout, reduction))
        n_q, n_kv = query_count(layout, reduction), kv_count(layout, reduction)
        _, attention_s, _ = best_of(repeats, device, lambda: F.scaled_dot_product_attention(
            q[:, :, :n_q], k[:, :, :n_kv], v[:, :, :n_kv]))
        total += count * full_s
        bare += count * attention_s
    return (total - bare) / total


def benchmark(model, frames, size, schedules, repeats, dense_max_frames, device, dtype) -> list[dict]:
    """Rows for one clip length: dense first, then every schedule."""
    images = torch.rand(1, frames, 3, size, size, device=device)
    layout = model.adapter.layout(images)
    flop_config = model.flop_config(size, size)
    dense_flops = model_flops(flop_config, frames)
    assembled = frames > dense_max_frames
    dense = run_model(model, images, repeats, device, dense_assembled=assembled)
    note = "assembled from one frame + one global block" if assembled else "measured"
    rows = [{"frames": frames, "schedule": "dense", **dense, "speedup_end_to_end": 1.0, "speedup_aggregator": 1.0,
             "flop_speedup": 1.0, "global_attention_flop_fraction": 1.0, "select_merge_share": None, "note": note}]
    for name, schedule in schedules.items():
        with apply_schedule(model, schedule) as handle:
            timing = run_model(model, images, repeats, device, handle)
        reduced_flops = model_flops(flop_config, frames, schedule)
        rows.append({
            "frames": frames, "schedule": name, **timing,
            "speedup_end_to_end": dense["end_to_end_s"] / timing["end_to_end_s"],
            "speedup_aggregator": dense["aggregator_s"] / timing["aggregator_s"],
            "flop_speedup": dense_flops.total / reduced_flops.total,
            "global_attention_flop_fraction": reduced_flops.global_attention / dense_flops.global_attention,
            "select_merge_share": select_merge_share(model, layout, schedule, repeats, device, dtype),
            "note": "measured",
        })
    return rows


def markdown(rows: list[dict]) -> str:
    def number(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        "| frames | schedule | aggregator (s) | end to end (s) | peak (GiB) | speed-up e2e | speed-up aggregator | "
        "FLOP-model speed-up | global-attn FLOP fraction | select+merge share | note |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['frames']} | {row['schedule']} | {number(row['aggregator_s'], 3)} | "
            f"{number(row['end_to_end_s'], 3)} | {number(row['peak_gib'])} | {number(row['speedup_end_to_end'])}x | "
            f"{number(row['speedup_aggregator'])}x | {number(row['flop_speedup'])}x | "
            f"{number(row['global_attention_flop_fraction'], 4)} | {number(row['select_merge_share'], 3)} | "
            f"{row['note']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vggt-1b")
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 100, 300, 1000])
    parser.add_argument("--size", type=int, default=518, help="square frame size in pixels")
    parser.add_argument("--schedule", type=Path, nargs="+", default=None,
                        help="schedule files (default: schedules/<model>-paper.yaml and -uniform.yaml)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (the best is kept)")
    parser.add_argument("--dense-max-frames", type=int, default=100,
                        help="longest clip whose dense trunk runs whole; longer ones are assembled per block")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="trunk autocast dtype")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    paths = args.schedule or [SCHEDULES / f"{args.model}-{rule}.yaml" for rule in ("paper", "uniform")]
    schedules = {path.stem: load_schedule(path) for path in paths}

    torch.manual_seed(args.seed)
    model = build_model(args.model, device).eval().requires_grad_(False)
    model.compute_dtype = DTYPES[args.dtype]
    rows = []
    with torch.inference_mode():
        benchmark(model, 2, args.size, schedules, 1, args.dense_max_frames, device, DTYPES[args.dtype])  # warm-up
        for frames in args.frames:
            rows += benchmark(model, frames, args.size, schedules, args.repeats, args.dense_max_frames, device,
                              DTYPES[args.dtype])
            print(f"done: {frames} frames", file=sys.stderr)
    print(markdown(rows))
    write_json(args.out, {
        "model": args.model, "size": args.size, "dtype": args.dtype, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "repeats": args.repeats, "dense_max_frames": args.dense_max_frames,
        "schedules": {name: str(path) for name, path in zip(schedules, paths)}, "rows": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
