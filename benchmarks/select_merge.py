"""Where the reduced attention's own work goes: K/V selection, the merge metric, the slots, query merging, the attention
on the reduced tensors and un-merging, each timed alone on one global layer's random q, k, v, beside the dense
attention of the same layer.

    python benchmarks/select_merge.py --model vggt-1b --frames 1000      # -> benchmarks/results/select-merge-vggt-1b-1000.{json,md}
    python benchmarks/select_merge.py --model vggt-tiny --frames 8 --device cpu --out /tmp/select-merge.json

For each distinct non-dense reduction of the schedule (default: the model's shipped paper rule) at --frames frames:
median seconds of --repeats calls after a warm-up (CUDA events on a GPU), in the compute dtype. The issue's goal is
selection + merging (everything but the attention) at most 5% of the reduced attention.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from spark3r.commands.arguments import DTYPES, resolve_device
from spark3r.files import write_atomic, write_json
from spark3r.models.base import FrameLayout
from spark3r.models.registry import build_model
from spark3r.reduce import is_dense, kv_count, query_count
from spark3r.reduce.kv import select_kv
from spark3r.reduce.merge import merge_queries, merge_slots, unmerge
from spark3r.schedule import load_schedule, shipped_schedule

HERE = Path(__file__).resolve().parent


def sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


speed, provenance, whole_peaks = sibling("speed"), sibling("provenance"), sibling("whole_peaks")
STEPS = ("select K/V", "metric", "slots", "merge queries", "attention", "unmerge")


def step_seconds(shape: tuple[int, int, int, int], layout: FrameLayout, reduction, repeats: int,
                 device: torch.device, dtype: torch.dtype) -> dict:
    """Median seconds of each of STEPS (those the reduction runs) and of the dense attention, on q, k, v of `shape`."""
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=generator) for _ in range(3))
    n_q, prune = query_count(layout, reduction), kv_count(layout, reduction) < layout.tokens
    kept_k, kept_v = select_kv(k, v, layout, reduction) if prune else (k, v)
    metric = k.mean(dim=1)
    slot = merge_slots(metric, layout, reduction) if n_q < layout.tokens else None
    merged = merge_queries(q, slot, n_q) if slot is not None else q
    out = F.scaled_dot_product_attention(merged, kept_k, kept_v)
    steps = {"select K/V": (lambda: select_kv(k, v, layout, reduction)) if prune else None,
             "metric": (lambda: k.mean(dim=1)) if slot is not None else None,
             "slots": (lambda: merge_slots(metric, layout, reduction)) if slot is not None else None,
             "merge queries": (lambda: merge_queries(q, slot, n_q)) if slot is not None else None,
             "attention": lambda: F.scaled_dot_product_attention(merged, kept_k, kept_v),
             "unmerge": (lambda: unmerge(out, slot)) if slot is not None else None}
    seconds = {name: speed.median_seconds(device, fn, repeats) for name, fn in steps.items() if fn is not None}
    dense = speed.median_seconds(device, lambda: F.scaled_dot_product_attention(q, k, v), repeats)
    own = sum(value for name, value in seconds.items() if name != "attention")
    return {"queries": n_q, "keys": kept_k.shape[2], "seconds": seconds, "dense_attention_s": dense,
            "select_merge_s": own, "select_merge_over_attention": own / seconds["attention"]}


def markdown(result: dict) -> str:
    lines = [f"# Selection and merging of the reduced attention: {result['model']}, {result['frames']} frames", "",
             f"`{result['command']}` (git {result['commit']}, {result['device_name']}, torch {result['torch']}, "
             f"{result['dtype']}, {result['created']}). One global layer's random q, k, v [1, {result['heads']}, "
             f"{result['tokens']}, {result['head_dim']}]; medians of {result['repeats']} calls after a warm-up; each "
             "step measured alone.", "",
             "| reduction | layers | queries | keys | " + " | ".join(f"{step} (ms)" for step in STEPS)
             + " | dense attention (ms) | select+merge / attention |",
             "|---|---|---:|---:|" + "---:|" * (len(STEPS) + 2)]
    for row in result["rows"]:
        cells = [f"{1e3 * row['seconds'][step]:.2f}" if step in row["seconds"] else "-" for step in STEPS]
        lines.append(f"| {row['label']} | {', '.join(map(str, row['layers']))} | {row['queries']} | {row['keys']} | "
                     + " | ".join(cells) + f" | {1e3 * row['dense_attention_s']:.2f} | "
                     f"{row['select_merge_over_attention']:.3f} |")
    total_own = sum(row["select_merge_s"] * len(row["layers"]) for row in result["rows"])
    total_attention = sum(row["seconds"]["attention"] * len(row["layers"]) for row in result["rows"])
    share = total_own / total_attention if total_attention else float("nan")
    lines += ["", f"Over the layers: selection + merging {total_own:.3f} s against {total_attention:.3f} s of reduced "
                  f"attention ({share:.3f}; the issue's goal: at most 0.05, {'met' if share <= 0.05 else 'not met'}).",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vggt-1b")
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--size", type=int, default=None, help="square input size (default: the model's)")
    parser.add_argument("--schedule", default=None, help="schedule YAML (default: the model's shipped paper rule)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--out", default=None, help="JSON path, markdown beside it "
                                                    "(default: benchmarks/results/select-merge-<model>-<frames>.json)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model = build_model(args.model, device="meta")
    size = (args.size,) * 2 if args.size else whole_peaks.default_size(model, args.model)
    layout = model.adapter.layout(torch.empty(1, args.frames, 3, *size, device="meta"))
    attn = model.adapter.modules(model)[0]
    schedule = load_schedule(args.schedule or shipped_schedule(args.model, "paper"))
    layers: dict = {}
    for layer, reduction in enumerate(schedule.reductions(args.frames)):
        if not is_dense(layout, reduction):
            layers.setdefault(reduction, []).append(layer)
    shape = (1, attn.num_heads, layout.tokens, attn.head_dim)
    rows = [{"reduction": repr(reduction), "label": f"K/V keep {reduction.kv_keep:.3g}, query merge "
                                                     f"{reduction.query_merge}", "layers": indices,
             **step_seconds(shape, layout, reduction, args.repeats, device, DTYPES[args.dtype])}
            for reduction, indices in layers.items()]
    result = {**provenance.record(__file__, argv, device), "model": args.model, "frames": args.frames,
              "size": list(size), "dtype": args.dtype, "repeats": args.repeats, "heads": attn.num_heads,
              "tokens": layout.tokens, "head_dim": attn.head_dim, "rows": rows}
    out = Path(args.out) if args.out else HERE / "results" / f"select-merge-{args.model}-{args.frames}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    write_atomic(out.with_suffix(".md"), markdown(result).encode())
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
