"""How long profile-layers takes, and where the time goes: dense forward, caching, local, end-to-end resume, decode.

    python benchmarks/profile_layers.py --out benchmarks/results/profile-vggt-1b.json           # the goal: <= 5 min, 1 H100
    python benchmarks/profile_layers.py --model vggt-tiny --clips 1 --frames 4 --size 112 --device cpu --dtype fp32   # smoke

Default: vggt-1b with random weights in bf16, 8 clips of 32 random frames at 518 x 518, 24 global layers x 6 K/V levels
(1, 1/2 .. 1/32) + 4 query levels (1 .. 4), frame-stride K/V, 6 additivity schedules per clip, up to 8 levels of a
layer per batched forward. Every clip runs through `spark3r.profiler.run.profile_clip`, the engine profile-layers
uses; the table sums its phase timers over clips (CUDA-synchronised) and gives the peak GPU memory. The JSON keeps
each clip's phases and torch.compile's counters; --trace writes the last clip's operator table (torch.profiler):

    python benchmarks/profile_layers.py --clips 2 --compile --head-dtype compute --resume-levels alternate \\
        --trace $OUT/profile-trace-vggt-1b.txt --out $OUT/profile-trace-vggt-1b.json
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from spark3r.commands.arguments import DTYPES, resolve_device
from spark3r.models.base import HEAD_DTYPES
from spark3r.models.loading import load_model
from spark3r.commands.profile_layers import DEFAULT_KV_KEEP, DEFAULT_QUERY_MERGE, parse_kv_keep, parse_query_merge
from spark3r.files import write_atomic
from spark3r.profiler.run import PHASES, RESUMES, ProfileOptions, profile_clip, profile_levels

_spec = importlib.util.spec_from_file_location("benchmarks_provenance",
                                              Path(__file__).resolve().parent / "provenance.py")
provenance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(provenance)

GOAL_SECONDS = 300.0
GOAL_WORKLOAD = {"model": "vggt-1b", "clips": 8, "frames": 32, "size": 518}  # on one H100
PHASE_NAMES = {"dense": "dense forward (cached)", "cache": "caching (hooks)", "local": "local deviations",
               "resume": "end-to-end resume (trunk)", "decode": "decode + deviation", "additivity": "additivity check"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vggt-1b")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=518, help="square image side in pixels")
    parser.add_argument("--kv-keep", default=DEFAULT_KV_KEEP)
    parser.add_argument("--query-merge", default=DEFAULT_QUERY_MERGE)
    parser.add_argument("--additivity", type=int, default=6)
    parser.add_argument("--level-batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--compile", action="store_true", help="load_model(compiled=True): compiled blocks and heads "
                                                               "(the first clip includes the compiling)")
    parser.add_argument("--head-dtype", default="fp32", choices=list(HEAD_DTYPES),
                        help="the dense heads' dtype while decoding (profile-layers' --head-dtype)")
    parser.add_argument("--resume-levels", default="all", choices=RESUMES,
                        help="levels resumed end to end (profile-layers' --resume-levels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", default=None,
                        help="run the last clip under torch.profiler and write its operator table (by self device "
                             "time) here")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


@contextlib.contextmanager
def traced(path: str | None, device: torch.device):
    """torch.profiler around the block when `path` is given: the 50 operators with the most self time go to `path`."""
    if path is None:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        yield
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (profiler.key_averages().table(sort_by=sort_by, row_limit=50) + "\n").encode())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    model = load_model(args.model, weights=None, device=device, dtype=DTYPES[args.dtype], seed=args.seed,
                       compiled=args.compile)
    generator = torch.Generator().manual_seed(args.seed)
    clips = [torch.rand(args.frames, 3, args.size, args.size, generator=generator) for _ in range(args.clips)]
    options, notes = profile_levels(model.adapter.layout(clips[0]), ProfileOptions(
        kv_keep=parse_kv_keep(args.kv_keep), query_merge=parse_query_merge(args.query_merge),
        additivity_schedules=args.additivity, level_batch=args.level_batch, seed=args.seed,
        resume=args.resume_levels, head_dtype=args.head_dtype))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals = dict.fromkeys(PHASES, 0.0)
    per_clip, phases_by_clip = [], []
    started = time.perf_counter()
    for index, images in enumerate(clips):
        clip_start = time.perf_counter()
        with traced(args.trace if index == len(clips) - 1 else None, device):
            measured = profile_clip(model, images.to(device), options)
        per_clip.append(time.perf_counter() - clip_start)
        phases_by_clip.append(dict(measured.timings))
        for phase, seconds in measured.timings.items():
            totals[phase] += seconds
        print(f"clip {index + 1}/{len(clips)}: {per_clip[-1]:.1f} s", file=sys.stderr)
    wall = time.perf_counter() - started
    result = {
        **provenance.record(__file__, argv, device), "model": args.model, "dtype": args.dtype, "clips": args.clips,
        "frames": args.frames, "size": args.size,
        "global_layers": model.adapter.num_global_layers, "kv_keep": list(options.kv_keep),
        "query_merge": list(options.query_merge), "additivity": args.additivity, "level_batch": args.level_batch,
        "resume_levels": args.resume_levels, "head_dtype": args.head_dtype,
        "seconds": totals, "wall_seconds": wall, "seconds_per_clip": per_clip, "seconds_by_clip": phases_by_clip,
        # torch.compile's counts (graphs compiled, graph breaks): many graphs mean recompiles for new shapes
        "dynamo": {key: dict(values) for key, values in counters.items() if values},
        "traced": args.trace,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "goal_seconds": GOAL_SECONDS,
    }
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
    return result


def table(result: dict) -> str:
    wall = result["wall_seconds"]
    lines = [f"{result['model']} ({result['dtype']}, {result['device_name']}): {result['clips']} clips x "
             f"{result['frames']} frames at {result['size']}px, {result['global_layers']} layers x "
             f"{len(result['kv_keep'])} K/V + {len(result['query_merge'])} query levels, "
             f"{result['additivity']} additivity schedules, level batch {result['level_batch']}",
             f"{'phase':<28}{'seconds':>10}{'share':>8}"]
    for phase, seconds in result["seconds"].items():
        lines.append(f"{PHASE_NAMES[phase]:<28}{seconds:>10.1f}{seconds / wall:>8.1%}")
    lines.append(f"{'total (wall)':<28}{wall:>10.1f}")
    if result["peak_gib"] is not None:
        lines.append(f"peak GPU memory {result['peak_gib']:.1f} GiB")
    if all(result[key] == value for key, value in GOAL_WORKLOAD.items()):
        verdict = "meets" if wall <= result["goal_seconds"] else "misses"
        lines.append(f"{verdict} the goal of {result['goal_seconds']:.0f} s for this workload on one H100")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
