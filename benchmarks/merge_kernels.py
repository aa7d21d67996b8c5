"""Kernels for the steps of query merging, timed beside each other on one global layer's random q, k, v at --frames
frames, each checked against the torch path on the same inputs:

* the keys' similarity metric (their mean over heads as unit rows): the torch path (`merge.torch_key_metric`: the mean,
  then the normalisation) and the fused kernel (`fused.key_metric`, k read once);
* the source -> destination similarity and its max: the torch path (`merge.torch_best_destinations`) at the shipped
  SIMILARITY_CHUNK_ELEMENTS and at larger chunks, and the fused Triton kernel (`fused.best_destinations`, no
  similarity matrix written) as shipped (autotuned over `fused.BEST_DESTINATIONS_BLOCKS`) and at each of those tilings;
* the mean of each slot's queries: the torch path (one head at a time, scatter_add in fp32), one index_add over all
  heads [B, N, h*D] in fp32, a segment mean (`torch.segment_reduce`) over the tokens sorted by slot, and the fused
  kernel (`fused.merge_queries`);
* un-merging: a gather over heads [B, h, N, D] (as before the projection moved ahead of it) and the shipped row copy of
  the projected outputs [B, N, C] (`merge.unmerge`);
* the whole reduced attention of the layer on the fused path against the torch path, beside the bf16 path's own noise
  (the torch path in bf16 against it in fp32).

    python benchmarks/merge_kernels.py --model vggt-1b --frames 1000 --out $OUT/merge-kernels-vggt-1b-1000.json
    python benchmarks/merge_kernels.py --model vggt-tiny --frames 8 --device cpu --out /tmp/merge-kernels.json

A kernel is the default in spark3r/reduce/merge.py only where it equals the torch path (similarity: same max to the
compute dtype's rounding; merging: within the bf16 path's own noise) and is faster on the GPU; this script is how that
is decided. Each row: median seconds of --repeats calls after a warm-up, the extra peak memory over the inputs, and the
largest difference from the shipped step.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from unittest import mock
from pathlib import Path

import torch

from spark3r.commands.arguments import DTYPES, resolve_device
from spark3r.models.registry import build_model
from spark3r.reduce import merge
from spark3r.reduce.attention import reduced_attention
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


def fused_module(device: torch.device):
    """spark3r.reduce.fused on a CUDA device with Triton, else None (its rows are then left out)."""
    return merge.fused_kernels(torch.empty(1, 1, device=device))


MERGES = {"scatter_add per head (torch path)": merge.torch_merge_queries, "index_add over all heads": merge_index_add,
          "segment mean over sorted tokens": merge_segment_mean}  # the torch candidates


def merges(device: torch.device) -> dict:
    """MERGES, and the fused kernel where it runs."""
    fused = fused_module(device)
    return dict(MERGES) if fused is None else {**MERGES, "fused Triton kernel": fused.merge_queries}


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
    """One global layer's random q and k [1, h, N, D], its unit metric (keys averaged over heads), the slots and the first
    full group's sources and destinations [1, G, n, d] as `merge.group_slots` takes them."""
    attn = model.adapter.modules(model)[0]
    q, k = speed.random_heads(attn, layout, 2, device, dtype, torch.Generator(device).manual_seed(0))
    metric = merge.key_metric(k)
    slot = merge.merge_slots(metric, layout, reduction)
    cell = merge.merge_cell(layout, reduction)
    groups, group = merge.group_spans(layout.frames, reduction.group_frames)[0]
    size = group * layout.tokens_per_frame
    unit = metric[:, : groups * size].reshape(1, groups, size, -1)
    destinations, sources = merge.group_positions(layout, group, cell, device)
    return {"q": q, "k": k, "slot": slot, "n_q": merge.query_count(layout, reduction), "sources": unit[:, :, sources],
            "destinations": unit[:, :, destinations], "layout": layout, "reduction": reduction}


def metric_rows(inputs: dict, device, repeats: int) -> list[dict]:
    """The keys' metric by the torch path and by the fused kernel: time, extra memory, and against the torch path the
    largest difference and the share of equal entries."""
    k = inputs["k"]
    reference = merge.torch_key_metric(k)
    kernels = {"torch path (mean, then normalise)": merge.torch_key_metric}
    fused = fused_module(device)
    if fused is not None:
        kernels["fused Triton kernel"] = fused.key_metric
    rows = []
    for name, fn in kernels.items():
        metric = fn(k)
        seconds, extra = peak_seconds(device, lambda: fn(k), repeats)
        rows.append({"kernel": name, "seconds": seconds, "extra_gib": extra,
                     "max_abs_diff": (metric.float() - reference.float()).abs().max().item(),
                     "same": (metric == reference).float().mean().item()})
    return rows


def similarity_rows(inputs: dict, device, repeats: int) -> list[dict]:
    sources, destinations = inputs["sources"], inputs["destinations"]
    reference = merge.torch_best_destinations(sources, destinations, CHUNKS[0])
    kernels = {f"torch, chunk 2^{chunk.bit_length() - 1}": functools.partial(merge.torch_best_destinations,
                                                                             chunk_elements=chunk) for chunk in CHUNKS}
    fused = fused_module(device)
    if fused is not None:
        kernels["fused Triton kernel (autotuned)"] = fused.best_destinations
        for blocks in fused.BEST_DESTINATIONS_BLOCKS:
            kernels["fused Triton kernel, BLOCK_M {} BLOCK_N {}, {} warps, {} stages".format(*blocks)] = (
                functools.partial(fused.best_destinations, blocks=blocks))
    rows = []
    for name, fn in kernels.items():
        values, indices = fn(sources, destinations)
        seconds, extra = peak_seconds(device, lambda: fn(sources, destinations), repeats)
        rows.append({"kernel": name, "seconds": seconds, "extra_gib": extra,
                     "max_abs_diff": (values.float() - reference[0].float()).abs().max().item(),
                     "same_index": (indices == reference[1]).float().mean().item()})
    return rows


def unmerge_heads(out: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Un-merging the attention output before the projection, one gather: [B, h, n_q, D] -> [B, h, N, D]."""
    batch, heads, _, head_dim = out.shape
    return out.gather(2, slot[:, None, :, None].expand(batch, heads, slot.shape[1], head_dim))


def unmerge_rows(inputs: dict, device, repeats: int) -> list[dict]:
    """Both un-merges of the same output: the heads' gather, and the shipped row copy of it as [B, n_q, h*D] (the
    projection's layout; the projection itself runs on n_q rows instead of N, which is not timed here). "equal": the
    row copy equals the gather (which is the reference, so equal to itself)."""
    out = torch.randn(inputs["q"].shape[:2] + (inputs["n_q"], inputs["q"].shape[3]), device=device,
                      dtype=inputs["q"].dtype, generator=torch.Generator(device).manual_seed(1))
    as_rows = lambda heads: heads.transpose(1, 2).reshape(heads.shape[0], heads.shape[2], -1)  # noqa: E731
    rows_in, slot = as_rows(out), inputs["slot"]
    equal = bool(torch.equal(merge.unmerge(rows_in, slot), as_rows(unmerge_heads(out, slot))))
    kernels = {"gather over heads [B, h, N, D]": (lambda: unmerge_heads(out, slot), True),
               "row copy of [B, n_q, C] (shipped)": (lambda: merge.unmerge(rows_in, slot), equal)}
    return [{"kernel": name, **dict(zip(("seconds", "extra_gib"), peak_seconds(device, fn, repeats))), "equal": same}
            for name, (fn, same) in kernels.items()]


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def layer_deviation(inputs: dict, device) -> dict | None:
    """The reduced attention of the layer (random q, k, v) on the fused path and on the torch path, each against the
    torch path in fp32: the fused path's deviation beside the bf16 path's own. None without the fused kernels."""
    if fused_module(device) is None:
        return None
    q = inputs["q"]
    generator = torch.Generator(device).manual_seed(2)
    k, v = (torch.randn(q.shape, device=device, dtype=q.dtype, generator=generator) for _ in range(2))
    layout, reduction = inputs["layout"], inputs["reduction"]
    fused = reduced_attention([q, k, v], layout, reduction)
    with mock.patch.dict(os.environ, SPARK3R_FUSED="0"):
        plain = reduced_attention([q, k, v], layout, reduction)
        exact = reduced_attention([q.float(), k.float(), v.float()], layout, reduction)
    return {"fused_vs_torch_rel_l2": relative_l2(fused, plain), "fused_vs_fp32_rel_l2": relative_l2(fused, exact),
            "torch_vs_fp32_rel_l2": relative_l2(plain, exact)}


def merge_rows(inputs: dict, device, repeats: int) -> list[dict]:
    q, slot, n_q = inputs["q"], inputs["slot"], inputs["n_q"]
    shipped = merge.torch_merge_queries(q, slot, n_q).float()
    rows = []
    for name, fn in merges(device).items():
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
             "The keys' metric (mean over heads as unit rows):", "",
             "| kernel | time (ms) | extra memory (GiB) | max abs diff vs torch path | equal entries |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {row['kernel']} | {1e3 * row['seconds']:.2f} | {gib(row['extra_gib'])} | "
              f"{row['max_abs_diff']:.2e} | {row['same']:.4f} |" for row in result.get("metric", [])]
    lines += ["", f"Similarity and max over one span of {result['groups']} groups ({result['sources']} sources x "
             f"{result['destinations']} destinations each):", "",
             "| kernel | time (ms) | extra memory (GiB) | max abs diff vs torch path | same index |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {row['kernel']} | {1e3 * row['seconds']:.2f} | {gib(row['extra_gib'])} | "
              f"{row['max_abs_diff']:.2e} | {row['same_index']:.4f} |" for row in result["similarity"]]
    lines += ["", "Merging the queries:", "",
              "| kernel | time (ms) | extra memory (GiB) | max abs diff vs torch path |", "|---|---:|---:|---:|"]
    lines += [f"| {row['merge']} | failed: {row['error']} | | |" if "error" in row else
              f"| {row['merge']} | {1e3 * row['seconds']:.2f} | {gib(row['extra_gib'])} | {row['max_abs_diff']:.2e} |"
              for row in result["merge"]]
    lines += ["", "Un-merging:", "", "| kernel | time (ms) | extra memory (GiB) | equal to the torch path |",
              "|---|---:|---:|---|"]
    lines += [f"| {row['kernel']} | {1e3 * row['seconds']:.2f} | {gib(row['extra_gib'])} | "
              f"{'yes' if row['equal'] else 'no'} |" for row in result["unmerge"]]
    deviation = result["layer_deviation"]
    if deviation is not None:
        lines += ["", "The layer's reduced attention (random q, k, v), relative L2 deviation: fused path against the "
                      f"torch path {deviation['fused_vs_torch_rel_l2']:.2e}; against the torch path in fp32: fused "
                      f"{deviation['fused_vs_fp32_rel_l2']:.2e}, torch path in {result['dtype']} "
                      f"{deviation['torch_vs_fp32_rel_l2']:.2e} (the {result['dtype']} path's own noise)."]
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
              "metric": metric_rows(inputs, device, args.repeats),
              "similarity": similarity_rows(inputs, device, args.repeats),
              "merge": merge_rows(inputs, device, args.repeats), "unmerge": unmerge_rows(inputs, device, args.repeats),
              "layer_deviation": layer_deviation(inputs, device)}
    provenance.publish(args.out, HERE / "results" / f"merge-kernels-{args.model}-{args.frames}.json", result,
                       markdown(result))
    return result


if __name__ == "__main__":
    main()
