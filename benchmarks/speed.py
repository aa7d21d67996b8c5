"""Speed of reduced vs dense global attention: aggregator and end-to-end time, peak memory, FLOP-model speed-up, and
where the time goes per stage.

    python benchmarks/speed.py --model vggt-1b --frames 32 100 300 1000 --size 518 --dtype bf16 \
        --out benchmarks/results/speed-vggt-1b.json

Random weights (no download). For each clip length S the dense model and every schedule (default: the model's shipped
paper-rule and uniform schedules) run encoder, trunk step by step and heads, each stage synchronised; the fastest of
--repeats runs is kept, after one warm-up pass over all variants at 2 frames. A dense trunk longer than
--dense-max-frames is not run whole: it is assembled from one timed frame block and one timed global block
(foundation.py's `run_trunk`), and its row says "assembled".

Where the time goes (second table): encoder, frame blocks, global blocks, of which the global attention modules (qkv,
qk-norm, RoPE, reduction, attention, proj; CUDA events around each module), heads; each next to the FLOP model's
TFLOP for that stage and the achieved TFLOP/s. Select+merge: for each distinct reduction of the schedule, each step of
K/V selection, query merging and un-merging alone, and the attention on the reduced tensors alone, are timed on random
q, k, v of the layer's shape (median of --repeats after a warm-up, CUDA events); "select+merge / attention" is the
ratio of their sums over the layers (benchmarks/select_merge.py reports the steps). --compile runs the blocks'
token-wise parts and the DPT heads compiled (spark3r.models.blocks.compile_model).
Markdown tables on stdout, JSON in --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
import torch
import torch.nn.functional as F
from tqdm import tqdm

from spark3r.commands.arguments import DTYPES, resolve_device
from spark3r.errors import Spark3rError
from spark3r.files import write_json
from spark3r.models.blocks import compile_model
from spark3r.models.registry import build_model
from spark3r.reduce import (
    kv_count,
    merge_queries,
    merge_slots,
    model_flops,
    query_count,
    select_kv,
    unmerge,
)
from spark3r.reduce.attention import is_dense, merge_metric
from spark3r.reduce.flops import linear_flops_per_token
from spark3r.schedule import apply_schedule, load_schedule, shipped_schedule

_spec = importlib.util.spec_from_file_location("benchmarks_foundation", HERE / "foundation.py")
foundation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(foundation)
_spec = importlib.util.spec_from_file_location("benchmarks_provenance", HERE / "provenance.py")
provenance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(provenance)
measure, run_trunk = foundation.measure, foundation.run_trunk

# The FLOP model's block lists (other than the global ones) by the stage that runs them. DA3's local blocks run in
# both: those before the first local + global pair in prepare ("encoder"), the others as trunk steps.
GROUP_STAGES = {
    "aggregator.patch_embed.blocks": "encoder", "encoder.blocks": "encoder",
    "aggregator.frame_blocks": "frame blocks", "decoder (frame)": "frame blocks",
    "aggregator.inter_frame_blocks (register)": "frame blocks", "blocks (local)": "encoder + frame blocks",
    "camera_head.trunk": "heads", "point/conf/camera_decoder.blocks": "heads",
}
STAGES = ("encoder", "frame blocks", "global blocks", "global attention modules", "select+merge", "heads")
END_TO_END = ("encoder", "frame blocks", "global blocks", "heads")  # the stages that add up to end to end
TERA = 1e12


def elapsed(device: torch.device, fn) -> float:
    """Seconds of one fn() call: CUDA events on a GPU (the device is synchronised), perf_counter elsewhere."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def median_seconds(device: torch.device, fn, repeats: int) -> float:
    """Median seconds of `repeats` fn() calls after one warm-up call."""
    fn()
    return statistics.median(elapsed(device, fn) for _ in range(max(1, repeats)))


class ModuleTimer:
    """Total time spent inside `modules` (forward pre-hook to forward hook): CUDA events or perf_counter."""

    def __init__(self, modules, device: torch.device):
        self.device = device
        self.spans: list = []
        self.handles = [h for m in modules for h in (m.register_forward_pre_hook(self._start),
                                                      m.register_forward_hook(self._stop))]

    def _now(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, module, args):
        self.spans.append([self._now(), None])

    def _stop(self, module, args, output):
        self.spans[-1][1] = self._now()

    def take(self) -> float:
        """Seconds recorded since the last take()."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            seconds = sum(start.elapsed_time(stop) for start, stop in self.spans) / 1000.0
        else:
            seconds = sum(stop - start for start, stop in self.spans)
        self.spans = []
        return seconds

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def timed_run(model, images, device, assembled: bool, attention: ModuleTimer | None) -> dict:
    """One run of encoder, trunk (step by step, or assembled) and heads: seconds per stage, peak GiB, and each stage's
    peak GiB ("stage_peaks_gib", on CUDA; a trunk stage's is the largest of its steps')."""
    state, encoder_s, encoder_peak = measure(device, lambda: model.prepare(images))
    seconds = {"encoder": encoder_s, "frame blocks": 0.0, "global blocks": 0.0}
    stage_peaks = {"encoder": [encoder_peak], "frame blocks": [], "global blocks": [], "heads": []}
    if attention is not None:
        attention.take()
    if assembled:
        finished, rows = run_trunk(model, state, False, device)
        del state
        scale = model.config.depth
        seconds["frame blocks"], seconds["global blocks"] = scale * rows[0]["seconds"], scale * rows[1]["seconds"]
        # the assembled trunk's peak (its largest block's, plus the taps it would hold) counts as the global blocks'
        stage_peaks["frame blocks"], stage_peaks["global blocks"] = [rows[0]["peak_gib"]], [rows[-1]["peak_gib"]]
    else:
        finished, scale = state, 1
        del state  # each step's input goes once the step has run, as in the model's forward
        for step in range(model.num_steps):
            finished, step_s, peak = measure(device, lambda: model.run_steps(finished, step + 1))
            stage = "global blocks" if step in model.global_layer_steps else "frame blocks"
            seconds[stage] += step_s
            stage_peaks[stage].append(peak)
    if attention is not None:
        seconds["global attention modules"] = scale * attention.take()
    finished = finished.heads_only()  # as the model's forward: the residual stream goes before the heads
    _, seconds["heads"], decode_peak = measure(device, lambda: model.decode(finished, images, model.decode_dtype()))
    stage_peaks["heads"].append(decode_peak)
    stage_peaks = {stage: max(peaks) for stage, peaks in stage_peaks.items() if peaks and None not in peaks}
    return {"seconds": seconds, "peak_gib": max(stage_peaks.values()) if stage_peaks else None,
            "stage_peaks_gib": stage_peaks}


def run_model(model, images, repeats, device, handle=None, assembled=False, time_attention=True,
              enough_s=float("inf")) -> dict:
    """Encoder + trunk ("aggregator") and heads of one clip, fastest of `repeats` runs (no more once a run takes
    `enough_s` seconds end to end): seconds, per-stage seconds of that run, and the largest peak GiB of all runs, whole
    and per stage ("stages_peak_gib")."""
    if handle is not None:
        handle.set_layout(model.adapter.layout(images))
    attention = ModuleTimer(model.adapter.modules(model), device) if time_attention else None
    runs = []
    try:
        while len(runs) < max(1, repeats) and (not runs or sum(runs[-1]["seconds"][s] for s in END_TO_END) < enough_s):
            runs.append(timed_run(model, images, device, assembled, attention))
    finally:
        if attention is not None:
            attention.remove()
    best = min(runs, key=lambda run: sum(run["seconds"][s] for s in ("encoder", "frame blocks", "global blocks")))
    stages = best["seconds"]
    aggregator = stages["encoder"] + stages["frame blocks"] + stages["global blocks"]
    peaks = [run["peak_gib"] for run in runs if run["peak_gib"] is not None]
    stage_peaks = {stage: max(run["stage_peaks_gib"][stage] for run in runs) for stage in best["stage_peaks_gib"]}
    return {"aggregator_s": aggregator, "end_to_end_s": aggregator + stages["heads"],
            "peak_gib": max(peaks) if peaks else None, "stages_s": stages, "stages_peak_gib": stage_peaks}


def random_heads(attn, layout, count, device, dtype, generator) -> list[torch.Tensor]:
    """`count` random tensors [1, h, S*P, D] shaped like one global layer's q, k, v, drawn in order from `generator`."""
    shape = (1, attn.num_heads, layout.tokens, attn.head_dim)
    return [torch.randn(shape, device=device, dtype=dtype, generator=generator) for _ in range(count)]


SELECT_MERGE_STEPS = ("select K/V", "metric", "slots", "merge queries", "attention", "unmerge")


def select_merge_timing(attn, layout, reduction, repeats, device, dtype) -> dict:
    """One reduced global layer on random q, k, v [1, h, S*P, D]: median seconds of each of SELECT_MERGE_STEPS the
    reduction runs, each timed alone (CUDA events); "select_merge_s" sums every step but the attention, "attention_s"
    is the attention on the reduced tensors. The dense attention is `dense_attention_seconds`' (once per layout: at 1000
    VGGT-1B frames one call takes about 17 s)."""
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = random_heads(attn, layout, 3, device, dtype, generator)
    x = torch.randn(1, layout.tokens, attn.num_heads * attn.head_dim, device=device, dtype=dtype,
                    generator=generator) if reduction.similarity == "input" else None
    n_q, prune = query_count(layout, reduction), kv_count(layout, reduction) < layout.tokens
    kept_k, kept_v = select_kv(k, v, layout, reduction) if prune else (k, v)
    merging = n_q < layout.tokens
    metric = merge_metric(reduction, k, x) if merging else None
    slot = merge_slots(metric, layout, reduction) if merging else None
    merged = merge_queries(q, slot, n_q) if merging else q
    out = F.scaled_dot_product_attention(merged, kept_k, kept_v)
    projected = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)  # un-merged after the projection, as rows
    steps = {"select K/V": (lambda: select_kv(k, v, layout, reduction)) if prune else None,
             "metric": (lambda: merge_metric(reduction, k, x)) if merging else None,
             "slots": (lambda: merge_slots(metric, layout, reduction)) if merging else None,
             "merge queries": (lambda: merge_queries(q, slot, n_q)) if merging else None,
             "attention": lambda: F.scaled_dot_product_attention(merged, kept_k, kept_v),
             "unmerge": (lambda: unmerge(projected, slot)) if merging else None}
    seconds = {name: median_seconds(device, fn, repeats) for name, fn in steps.items() if fn is not None}
    return {"steps_s": seconds, "select_merge_s": sum(value for name, value in seconds.items() if name != "attention"),
            "attention_s": seconds["attention"], "queries": n_q, "keys": kept_k.shape[2]}


def dense_attention_seconds(attn, layout, repeats, device, dtype) -> float:
    """Median seconds of the dense attention of one global layer on random q, k, v [1, h, S*P, D]."""
    q, k, v = random_heads(attn, layout, 3, device, dtype, torch.Generator(device).manual_seed(0))
    return median_seconds(device, lambda: F.scaled_dot_product_attention(q, k, v), repeats)


def select_merge_costs(model, layout, schedule, repeats, device, dtype) -> list[dict]:
    """select_merge_timing for each distinct non-dense reduction of `schedule` (its repr and a short label), with the
    layers that use it."""
    attn = model.adapter.modules(model)[0]
    layers = defaultdict(list)
    for layer, reduction in enumerate(schedule.reductions(layout.frames)):
        if not is_dense(layout, reduction):
            layers[reduction].append(layer)
    return [{"layers": indices, "reduction": repr(reduction),
             "label": f"K/V keep {reduction.kv_keep:.3g}, query merge {reduction.query_merge}",
             **select_merge_timing(attn, layout, reduction, repeats, device, dtype)}
            for reduction, indices in tqdm(layers.items(), desc="select+merge", unit="reduction", leave=False)]


def stage_flops(model, flop_config, frames, schedule=None) -> dict[str, tuple[float, float]]:
    """The FLOP model's (matrix-product, attention) TFLOP per stage (STAGES), for any model family.

    Attention is QK^T and AV; matrix products are the rest: the blocks' linear layers, K/V selection + query merging,
    and the work outside blocks (patch embedding, head convolutions and MLPs), which is counted in "heads". "frame
    blocks" are the trunk's steps that are not global layers; block lists are assigned by GROUP_STAGES.
    """
    flops = model_flops(flop_config, frames, schedule)
    stages = {stage: [0.0, 0.0] for stage in STAGES}
    trunk_steps = model.num_steps - len(model.global_layer_steps)
    for group in flop_config.groups:
        linear = flops.group_linear[group.name]
        attention = flops.groups[group.name] - linear
        if group.sequence == "global":
            shares = {"global blocks": 1.0}
            mlp = group.count * frames * group.tokens_per_frame * (linear_flops_per_token(group) - 8.0 * group.width**2)
            module_linear = linear - mlp  # qkv + proj (on the merged queries where they merge)
            stages["global attention modules"][0] += module_linear
            stages["global attention modules"][1] += attention
        elif GROUP_STAGES.get(group.name) == "encoder + frame blocks":
            shares = {"frame blocks": trunk_steps / group.count, "encoder": 1.0 - trunk_steps / group.count}
        elif group.name in GROUP_STAGES:
            shares = {GROUP_STAGES[group.name]: 1.0}
        else:
            raise Spark3rError(f"the FLOP model's block list {group.name!r} has no stage: add it to "
                               "benchmarks/speed.py's GROUP_STAGES")
        for stage, share in shares.items():
            stages[stage][0] += share * linear
            stages[stage][1] += share * attention
    for stage in ("global blocks", "global attention modules", "select+merge"):
        stages[stage][0] += flops.overhead
    stages["heads"][0] += flops.other
    return {stage: (linear / TERA, attention / TERA) for stage, (linear, attention) in stages.items()}


def stage_tflop(model, flop_config, frames, schedule=None) -> dict[str, float]:
    """The FLOP model's TFLOP per stage (STAGES): `stage_flops`' two parts added."""
    return {stage: sum(parts) for stage, parts in stage_flops(model, flop_config, frames, schedule).items()}


def profile_workload_tflop(model, flop_config, frames: int, levels: int, clips: int) -> tuple[float, float]:
    """The FLOP model's (matrix-product, attention) TFLOP of an exact profile-layers run: per clip one dense forward
    and, for each global layer and each of `levels` resumed (non-dense) levels, the trunk resumed after that layer plus
    the heads. The reduced layer itself, the local deviations and the caching are not counted: a lower bound."""
    stages = stage_flops(model, flop_config, frames)
    global_steps = sorted(model.global_layer_steps)
    later_steps = sum(model.num_steps - 1 - step for step in global_steps)  # trunk steps after each global layer
    later_global = sum(len(global_steps) - 1 - index for index in range(len(global_steps)))
    later_frame = later_steps - later_global
    frame_steps = model.num_steps - len(global_steps)

    def resumed(part: int) -> float:
        frame = stages["frame blocks"][part] / frame_steps if frame_steps else 0.0
        return (later_global * stages["global blocks"][part] / len(global_steps) + later_frame * frame
                + len(global_steps) * stages["heads"][part])

    return tuple(clips * (sum(stages[stage][part] for stage in END_TO_END) + levels * resumed(part))
                 for part in (0, 1))


def select_merge_total(costs: list[dict]) -> tuple[float | None, float | None]:
    """(seconds of selection + merging summed over the layers of `costs` (select_merge_costs), its ratio to the
    reduced attention's seconds over the same layers); (None, None) without costs."""
    if not costs:
        return None, None
    select_merge = sum(len(cost["layers"]) * cost["select_merge_s"] for cost in costs)
    return select_merge, select_merge / sum(len(cost["layers"]) * cost["attention_s"] for cost in costs)


def benchmark(model, frames, size, schedules, repeats, dense_max_frames, device, dtype,
              time_attention=True) -> list[dict]:
    """Rows for one clip length: dense first, then every schedule."""
    images = torch.rand(1, frames, 3, size, size, device=device)
    layout = model.adapter.layout(images)
    flop_config = model.flop_config(size, size)
    dense_flops = model_flops(flop_config, frames)
    assembled = frames > dense_max_frames
    dense = run_model(model, images, repeats, device, assembled=assembled, time_attention=time_attention)
    note = "assembled from one frame + one global block" if assembled else "measured"
    rows = [{"frames": frames, "schedule": "dense", **dense, "speedup_end_to_end": 1.0, "speedup_aggregator": 1.0,
             "flop_speedup": 1.0, "global_attention_flop_fraction": 1.0, "select_merge_over_attention": None,
             "select_merge_layers": [], "stages_tflop": stage_tflop(model, flop_config, frames), "note": note}]
    for name, schedule in schedules.items():
        with apply_schedule(model, schedule) as handle:
            timing = run_model(model, images, repeats, device, handle, time_attention=time_attention)
        costs = select_merge_costs(model, layout, schedule, repeats, device, dtype)
        select_merge, ratio = select_merge_total(costs)
        if select_merge is not None:
            timing["stages_s"]["select+merge"] = select_merge
        reduced_flops = model_flops(flop_config, frames, schedule)
        rows.append({
            "frames": frames, "schedule": name, **timing,
            "speedup_end_to_end": dense["end_to_end_s"] / timing["end_to_end_s"],
            "speedup_aggregator": dense["aggregator_s"] / timing["aggregator_s"],
            "flop_speedup": dense_flops.total / reduced_flops.total,
            "global_attention_flop_fraction": reduced_flops.global_attention / dense_flops.global_attention,
            "select_merge_over_attention": ratio, "select_merge_layers": costs,
            "stages_tflop": stage_tflop(model, flop_config, frames, schedule), "note": "measured",
        })
    return rows


def number(value, digits=2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| frames | schedule | aggregator (s) | end to end (s) | peak (GiB) | speed-up e2e | speed-up aggregator | "
        "FLOP-model speed-up | global-attn FLOP fraction | select+merge / attention | note |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['frames']} | {row['schedule']} | {number(row['aggregator_s'], 3)} | "
            f"{number(row['end_to_end_s'], 3)} | {number(row['peak_gib'])} | {number(row['speedup_end_to_end'])}x | "
            f"{number(row['speedup_aggregator'])}x | {number(row['flop_speedup'])}x | "
            f"{number(row['global_attention_flop_fraction'], 4)} | {number(row['select_merge_over_attention'], 3)} | "
            f"{row['note']} |"
        )
    return "\n".join(lines)


def breakdown_markdown(rows: list[dict]) -> str:
    """Where the time goes: per stage, measured seconds and share of end to end, FLOP-model TFLOP and share, TFLOP/s.
    Indented stages are part of the stage above them."""
    lines = [
        "| frames | schedule | stage | time (s) | share of time | FLOP model (TFLOP) | share of FLOPs | TFLOP/s |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    labels = {"global attention modules": "  of which attention modules", "select+merge": "    of which select+merge"}
    for row in rows:
        total_flop = sum(row["stages_tflop"][stage] for stage in END_TO_END)
        for stage in STAGES:
            seconds, tflop = row["stages_s"].get(stage), row["stages_tflop"][stage]
            rate = tflop / seconds if seconds else None
            share = seconds / row["end_to_end_s"] if seconds is not None else None
            lines.append(
                f"| {row['frames']} | {row['schedule']} | {labels.get(stage, stage)} | {number(seconds, 3)} | "
                f"{number(share, 3)} | {tflop:.4g} | {number(tflop / total_flop, 3)} | {number(rate, 1)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vggt-1b")
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 100, 300, 1000])
    parser.add_argument("--size", type=int, default=518, help="square frame size in pixels")
    parser.add_argument("--schedule", type=Path, nargs="+", default=None,
                        help="schedule files (default: schedules/<model>-paper.yaml and -uniform.yaml)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs per measurement (the fastest run is kept; select+merge: the median)")
    parser.add_argument("--dense-max-frames", type=int, default=100,
                        help="longest clip whose dense trunk runs whole; longer ones are assembled per block")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="trunk autocast dtype")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true",
                        help="run the blocks' token-wise parts and the DPT heads compiled (blocks.compile_model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    paths = args.schedule or [path for rule in ("paper", "uniform") if (path := shipped_schedule(args.model, rule))]
    schedules = {path.stem: load_schedule(path) for path in paths}

    torch.manual_seed(args.seed)
    model = build_model(args.model, device).eval().requires_grad_(False)
    model.compute_dtype = DTYPES[args.dtype]
    if args.compile:
        compile_model(model)
    options = dict(size=args.size, schedules=schedules, dense_max_frames=args.dense_max_frames, device=device,
                   dtype=DTYPES[args.dtype])
    rows = []
    with torch.inference_mode():
        benchmark(model, 2, repeats=1, **options)  # warm-up
        for frames in args.frames:
            rows += benchmark(model, frames, repeats=args.repeats, **options)
            print(f"done: {frames} frames", file=sys.stderr)
    print(markdown(rows))
    print()
    print(breakdown_markdown(rows))
    write_json(args.out, {
        **provenance.record(__file__, argv, device), "model": args.model, "size": args.size, "dtype": args.dtype,
        "device": str(device), "repeats": args.repeats, "dense_max_frames": args.dense_max_frames,
        "compile": args.compile,
        "schedules": {name: str(path) for name, path in zip(schedules, paths)}, "rows": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
