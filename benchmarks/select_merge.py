"""Where the reduced attention's own work goes: K/V selection, the merge metric, the slots, query merging, the attention
on the reduced tensors and un-merging, each timed alone on one global layer's random q, k, v, beside the dense
attention of the same layer (timed once per run: at 1000 VGGT-1B frames one call takes about 17 s).

    python benchmarks/select_merge.py --model vggt-1b --frames 1000      # -> benchmarks/results/select-merge-vggt-1b-1000.{json,md}
    python benchmarks/select_merge.py --model vggt-tiny --frames 8 --device cpu --out /tmp/select-merge.json

For each distinct non-dense reduction of the schedule (default: the model's shipped paper rule) at --frames frames:
median seconds of --repeats calls after a warm-up (CUDA events on a GPU; the dense attention --dense-repeats calls), in
the compute dtype. The issue's goal is
selection + merging (everything but the attention) at most 5% of the reduced attention.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402
import speed  # noqa: E402
import whole_peaks  # noqa: E402

from spark3r.commands.arguments import DTYPES, resolve_device  # noqa: E402
from spark3r.models.registry import build_model  # noqa: E402
from spark3r.schedule import load_schedule, shipped_schedule  # noqa: E402

STEPS = speed.SELECT_MERGE_STEPS


def markdown(result: dict) -> str:
    lines = [f"# Selection and merging of the reduced attention: {result['model']}, {result['frames']} frames", "",
             f"`{result['command']}` (git {result['commit']}, {result['device_name']}, torch {result['torch']}, "
             f"{result['dtype']}, {result['created']}). One global layer's random q, k, v [1, {result['heads']}, "
             f"{result['tokens']}, {result['head_dim']}]; medians of {result['repeats']} calls after a warm-up; each "
             "step measured alone.", "",
             "| reduction | layers | queries | keys | " + " | ".join(f"{step} (ms)" for step in STEPS)
             + " | dense attention (ms) | select+merge / attention |",
             "|---|---|---:|---:|" + "---:|" * (len(STEPS) + 2)]
    dense = result["dense_attention_s"]
    for row in result["rows"]:
        cells = [f"{1e3 * row['steps_s'][step]:.2f}" if step in row["steps_s"] else "-" for step in STEPS]
        lines.append(f"| {row['label']} | {', '.join(map(str, row['layers']))} | {row['queries']} | {row['keys']} | "
                     + " | ".join(cells) + f" | {1e3 * dense:.2f} | "
                     f"{row['select_merge_s'] / row['attention_s']:.3f} |")
    total_own, share = speed.select_merge_total(result["rows"])
    lines += ["", f"Over the layers: selection + merging {total_own:.3f} s, {share:.3f} of the reduced attention's time "
                  f"(the issue's goal: at most 0.05, {'met' if share <= 0.05 else 'not met'}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vggt-1b")
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--size", type=int, default=None, help="square input size (default: the model's)")
    parser.add_argument("--schedule", default=None, help="schedule YAML (default: the model's shipped paper rule)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense-repeats", type=int, default=1, help="timed calls of the dense attention (after one "
                                                                     "warm-up)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--out", default=None, help="JSON path, markdown beside it "
                                                    "(default: benchmarks/results/select-merge-<model>-<frames>.json)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model = build_model(args.model, device="meta")
    size = (args.size,) * 2 if args.size else whole_peaks.default_size(model, args.model)
    layout = model.adapter.layout(torch.empty(1, args.frames, 3, *size, device="meta"))
    schedule = load_schedule(args.schedule or shipped_schedule(args.model, "paper"))
    rows = speed.select_merge_costs(model, layout, schedule, args.repeats, device, DTYPES[args.dtype])
    attn = model.adapter.modules(model)[0]
    dense = speed.dense_attention_seconds(attn, layout, args.dense_repeats, device, DTYPES[args.dtype])
    result = {**provenance.record(__file__, argv, device), "model": args.model, "frames": args.frames,
              "size": list(size), "dtype": args.dtype, "repeats": args.repeats, "dense_repeats": args.dense_repeats,
              "heads": attn.num_heads, "tokens": layout.tokens, "head_dim": attn.head_dim, "dense_attention_s": dense, "rows": rows}
    provenance.publish(args.out, HERE / "results" / f"select-merge-{args.model}-{args.frames}.json", result,
                       markdown(result))
    return result


if __name__ == "__main__":
    main()
