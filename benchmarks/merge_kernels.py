"""Candidate kernels for the two largest steps of query merging, timed beside the shipped ones on one global layer's
random q, k at --frames frames, each checked against the shipped step on the same inputs:

* the source -> destination similarity and its max (`merge.best_destinations`), with larger chunks than the shipped
  SIMILARITY_CHUNK_ELEMENTS (fewer, larger matrix products; the chunk is the only extra memory);
* the mean of each slot's queries (`merge.merge_queries`: one head at a time, scatter_add in fp32), as one index_add
  over all heads [B, N, h*D] in fp32, and as a segment mean (`torch.segment_reduce`) over the tokens sorted by slot.

    python benchmarks/merge_kernels.py --model vggt-1b --frames 1000 --out $OUT/merge-kernels-vggt-1b-1000.json
    python benchmarks/merge_kernels.py --model vggt-tiny --frames 8 --device cpu --out /tmp/merge-kernels.json

The winner replaces the shipped step in spark3r/reduce/merge.py only where it equals it (similarity: same max to the
compute dtype's rounding; merging: within the bf16 path's own noise) and is faster on the GPU; this script is how that
is decided. Each row: median seconds of --repeats calls after a warm-up, the extra peak memory over the inputs, and the
largest difference from the shipped step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from spark3r.commands.arguments import DTYPES, resolve_device
from spark3r.models.registry import build_model
from spark3r.reduce import merge
from spark3r.schedule import load_schedule, shipped_schedule

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402
import speed  # noqa: E402
import whole_peaks  # noqa: E402

CHUNKS = (2**26, 2**28, 2**30)  # similarity entries per chunk; the first is the shipped SIMILARITY_CHUNK_ELEMENTS


def merge_index_add(q: torch.Tensor, slot: torch.Tensor, n_q: int) -> torch.Tensor:
    """Mean of each slot's queries in one index_add over all heads: q [B, h, N, D], slot [B, N] -> [B, h, n_q, D]."""
    batch, heads, tokens, head_dim = q.shape
    accumulate = torch.promote_types(q.dtype, torch.float32)
    rows = q.transpose(1, 2).reshape(batch, tokens, heads * head_dim).to(accumulate)
    merged = q.new_empty(batch, heads, n_q, head_dim)
    for b in range(batch):
        sums = torch.zeros(n_q, heads * head_dim, dtype=accumulate, device=q.device).index_add_(0, slot[b], rows[b])
        counts = torch.bincount(slot[b], minlength=n_q).to(accumulate)[:, None]
        merged[b] = sums.div_(counts).reshape(n_q, heads, head_dim).transpose(0, 1)
    return merged


def merge_segment_mean(q: torch.Tensor, slot: torch.Tensor, n_q: int) -> torch.Tensor:
    """Mean of each slot's queries as a segment mean over the tokens sorted by slot: [B, h, N, D] -> [B, h, n_q, D]."""
    batch, heads, tokens, head_dim = q.shape
    merged = q.new_empty(batch, heads, n_q, head_dim)
    for b in range(batch):
        order = torch.argsort(slot[b], stable=True)
        lengths = torch.bincount(slot[b], minlength=n_q)
        merged[b] = torch.segment_reduce(q[b][:, order], "mean", lengths=lengths.expand(heads, n_q).contiguous(),
                                         axis=1)
    return merged


MERGES = {"scatter_add per head (shipped)": merge.merge_queries, "index_add over all heads": merge_index_add,
          "segment mean over sorted tokens": merge_segment_mean}


def peak_seconds(device: torch.device, fn, repeats: int) -> tuple[float, float | None]:
    """(median seconds, GiB allocated above the memory in use before the call; None off CUDA)."""
    if device.type != "cuda":
        return speed.median_seconds(device, fn, repeats), None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = speed.median_seconds(device, fn, repeats)
    return seconds, (torch.cuda.max_memory_allocated() - before) / 2**30


def layer_inputs(model, layout, reduction, device, dtype) -> dict:
    """One global layer's random q [1, h, N, D], its unit metric (keys averaged over heads), the slots and the first
    full group's sources and destinations [1, G, n, d] as `merge.group_slots` takes them."""
    attn = model.adapter.modules(model)[0]
    q, k = speed.random_heads(attn, layout, 2, device, dtype, torch.Generator(device).manual_seed(0))
    metric = k.mean(dim=1)
    del k
    slot = merge.merge_slots(metric, layout, reduction)
    cell = merge.merge_cell(layout, reduction)
    groups, group = merge.group_spans(layout.frames, reduction.group_frames)[0]
    size = group * layout.tokens_per_frame
    unit = F.normalize(metric.float(), dim=-1).to(dtype)[:, : groups * size].reshape(1, groups, size, -1)
    destinations, sources = merge.group_positions(layout, group, cell, device)
    return {"q": q, "slot": slot, "n_q": merge.query_count(layout, reduction), "sources": unit[:, :, sources],
            "destinations": unit[:, :, destinations]}


def similarity_rows(inputs: dict, device, repeats: int) -> list[dict]:
    sources, destinations = inputs["sources"], inputs["destinations"]
    shipped = merge.best_destinations(sources, destinations, CHUNKS[0])
    rows = []
    for chunk in CHUNKS:
        values, indices = merge.best_destinations(sources, destinations, chunk)
        seconds, extra = peak_seconds(device, lambda: merge.best_destinations(sources, destinations, chunk), repeats)
        rows.append({"chunk_elements": chunk, "seconds": seconds, "extra_gib": extra,
                     "max_abs_diff": (values.float() - shipped[0].float()).abs().max().item(),
                     "same_index": (indices == shipped[1]).float().mean().item()})
    return rows


def merge_rows(inputs: dict, device, repeats: int) -> list[dict]:
    q, slot, n_q = inputs["q"], inputs["slot"], inputs["n_q"]
    shipped = merge.merge_queries(q, slot, n_q).float()
    rows = []
    for name, fn in MERGES.items():
        try:
            merged = fn(q, slot, n_q).float()
            seconds, extra = peak_seconds(device, lambda: fn(q, slot, n_q), repeats)
        except RuntimeError as error:  # a candidate this backend cannot run (or run in memory) is a result too
            rows.append({"merge": name, "error": str(error).splitlines()[0][:200]})
            continue
        rows.append({"merge": name, "seconds": seconds, "extra_gib": extra,
                     "max_abs_diff": (merged - shipped).abs().max().item()})
        del merged
    return rows


def markdown(result: dict) -> str:
    gib = lambda value: "n/a" if value is None else f"{value:.2f}"  # noqa: E731
    lines = [f"# Query-merging kernels: {result['model']}, {result['frames']} frames, {result['reduction']}", "",
             f"`{result['command']}` (git {result['commit']}, {result['device_name']}, torch {result['torch']}, "
             f"{result['dtype']}, {result['created']}). One global layer's random q [1, {result['heads']}, "
             f"{result['tokens']}, {result['head_dim']}], {result['queries']} merged queries; medians of "
             f"{result['repeats']} calls after a warm-up, each step measured alone.", "",
             f"Similarity and max over one span of {result['groups']} groups ({result['sources']} sources x "
             f"{result['destinations']} destinations each):", "",
             "| chunk (entries) | time (ms) | extra memory (GiB) | max abs diff vs shipped | same index |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| 2^{row['chunk_elements'].bit_length() - 1} | {1e3 * row['seconds']:.2f} | {gib(row['extra_gib'])} | "
              f"{row['max_abs_diff']:.2e} | {row['same_index']:.4f} |" for row in result["similarity"]]
    lines += ["", "Merging the queries:", "", "| kernel | time (ms) | extra memory (GiB) | max abs diff vs shipped |",
              "|---|---:|---:|---:|"]
    lines += [f"| {row['merge']} | failed: {row['error']} | | |" if "error" in row else
              f"| {row['merge']} | {1e3 * row['seconds']:.2f} | {gib(row['extra_gib'])} | {row['max_abs_diff']:.2e} |"
              for row in result["merge"]]
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vggt-1b")
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--schedule", default=None, help="schedule YAML (default: the model's shipped paper rule); "
                                                         "its first layer that merges queries is measured")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--out", default=None, help="JSON path, markdown beside it "
                                                    "(default: benchmarks/results/merge-kernels-<model>-<frames>.json)")
    args = parser.parse_args(argv)
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    model = build_model(args.model, device="meta")
    size = whole_peaks.default_size(model, args.model)
    layout = model.adapter.layout(torch.empty(1, args.frames, 3, *size, device="meta"))
    schedule = load_schedule(args.schedule or shipped_schedule(args.model, "paper"))
    reduction = next((r for r in schedule.reductions(layout.frames) if merge.query_count(layout, r) < layout.tokens),
                     None)
    if reduction is None:
        parser.error(f"no layer of the schedule merges queries at {args.frames} frames")
    inputs = layer_inputs(model, layout, reduction, device, dtype)
    attn = model.adapter.modules(model)[0]
    result = {**provenance.record(__file__, argv, device), "model": args.model, "frames": args.frames,
              "dtype": args.dtype, "repeats": args.repeats, "reduction": repr(reduction), "heads": attn.num_heads,
              "tokens": layout.tokens, "head_dim": attn.head_dim, "queries": inputs["n_q"],
              "groups": inputs["sources"].shape[1], "sources": inputs["sources"].shape[2],
              "destinations": inputs["destinations"].shape[2],
              "similarity": similarity_rows(inputs, device, args.repeats), "merge": merge_rows(inputs, device,
                                                                                                args.repeats)}
    provenance.publish(args.out, HERE / "results" / f"merge-kernels-{args.model}-{args.frames}.json", result,
                       markdown(result))
    return result


if __name__ == "__main__":
    main()
