"""Does decoding the dense heads in the compute dtype change the profile? The same clips profiled twice, heads in fp32
(profile-layers' default, as upstream) and in the compute dtype (`profile-layers --head-dtype compute`), compared.

    python benchmarks/profile_head_dtype.py     # VGGT-1B, random weights, bf16, cuda, 1 clip x 32 frames: ~6 min, H200
    python benchmarks/profile_head_dtype.py --model vggt-tiny --device cpu --frames 4 --size 112 --out /tmp/hd.json

Both profiles run through `spark3r.profiler.run.profile_clip`, the engine profile-layers uses, on clips prepared as
profile-layers prepares them (`--calib`, default one generated clip), after one untimed dense forward and decode in each
head dtype (so neither pays the first-call costs). Reported, on the end-to-end score averaged over the clips
([L, levels] per kind):

* per level column: Spearman over the L layers of the fp32 and compute-dtype scores (the layer ranking at that level);
* per layer mean: Spearman of each layer's score averaged over every non-dense level;
* the largest and the median relative difference |compute - fp32| / fp32 over all non-dense cells, per metric;
* each profile's wall time, phase times and GPU peak.

Decision (`decide`): `--head-dtype compute` becomes profile-layers' default only if, on VGGT-1B, (1) every Spearman
above (each level column's and the per-layer mean's) is at least 0.99 (`passes_rule`, the issue's rule: the ranking
within each level), (2) no level's score moves by more than 10% in any layer (the search adds scores across layers and
trades query levels against K/V levels, so their values matter, not only their ranking) and (3) it decodes at least
10% faster; otherwise fp32 stays the default and the compute dtype an opt-in flag with this file's numbers. Writes
JSON (with provenance) and a markdown table beside it (default benchmarks/results/profile-head-dtype-<model>.{json,md});
`--render JSON` rewrites the markdown of an existing JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from spark3r.commands.arguments import DTYPES, resolve_device
from spark3r.commands.profile_layers import DEFAULT_KV_KEEP, DEFAULT_QUERY_MERGE, parse_kv_keep, parse_query_merge
from spark3r.files import write_atomic
from spark3r.models.base import HEAD_DTYPES
from spark3r.models.loading import load_model
from spark3r.models.registry import get_entry, resolve_model_name
from spark3r.profiler.aggregate import spearman
from spark3r.profiler.pipeline import load_calibration
from spark3r.profiler.run import PHASES, ProfileOptions, profile_clip, profile_levels

_spec = importlib.util.spec_from_file_location("benchmarks_provenance",
                                              Path(__file__).resolve().parent / "provenance.py")
provenance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(provenance)

RESULTS = Path(__file__).resolve().parent / "results"
THRESHOLD = 0.99
SCORE_TOLERANCE = 0.10  # largest relative change of a level's score in any layer
DECODE_SAVING = 0.10  # smallest share of the fp32 decode time the compute dtype must save


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vggt-1b")
    parser.add_argument("--weights", default="none", help="as profile-layers --weights (default: random)")
    parser.add_argument("--calib", default="synthetic:1", help="as profile-layers --calib")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=None, help="preprocessing size (default: the model's)")
    parser.add_argument("--kv-keep", default=DEFAULT_KV_KEEP)
    parser.add_argument("--query-merge", default=DEFAULT_QUERY_MERGE)
    parser.add_argument("--additivity", type=int, default=6)
    parser.add_argument("--level-batch", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path, the markdown beside it "
                                                    "(default: benchmarks/results/profile-head-dtype-<model>.json)")
    parser.add_argument("--render", default=None, metavar="JSON", help="only rewrite the markdown of this JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        write_atomic(Path(args.render).with_suffix(".md"), markdown(result).encode())
        return result
    device = resolve_device(args.device)
    name = resolve_model_name(args.model)
    clips, frames, notes = load_calibration(args.calib, get_entry(name).recipe(args.size), args.frames)
    model = load_model(name, weights=args.weights, device=device, dtype=DTYPES[args.dtype], seed=args.seed)
    images = [clip.images.to(device) for clip, _ in clips]
    options, level_notes = profile_levels(model.adapter.layout(images[0]), ProfileOptions(
        kv_keep=parse_kv_keep(args.kv_keep), query_merge=parse_query_merge(args.query_merge),
        additivity_schedules=args.additivity, level_batch=args.level_batch, seed=args.seed))
    for note in notes + level_notes:
        print(f"note: {note}", file=sys.stderr)
    variants = {head_dtype: dataclasses.replace(options, head_dtype=head_dtype) for head_dtype in HEAD_DTYPES}
    with torch.inference_mode():  # untimed: kernels selected and memory pools grown for both head dtypes
        finished = model.run_steps(model.prepare(images[0][None]))
        for variant in variants.values():
            model.decode(finished, images[0][None], variant.decode_dtype(model))
        del finished
    profiles = {head_dtype: run_profile(model, images, variant, device) for head_dtype, variant in variants.items()}
    result = {
        **provenance.record(__file__, argv, device), "model": name, "weights": args.weights, "dtype": args.dtype,
        "calib": args.calib, "clips": [clip.name for clip, _ in clips], "frames": frames,
        "image_hw": list(images[0].shape[-2:]), "global_layers": model.adapter.num_global_layers,
        "kv_keep": list(options.kv_keep), "query_merge": list(options.query_merge), "additivity": args.additivity,
        "level_batch": args.level_batch, "threshold": THRESHOLD,
        "comparison": compare(profiles["fp32"].pop("tables"), profiles["compute"].pop("tables"), options),
        "profiles": profiles,
    }
    provenance.publish(args.out, RESULTS / f"profile-head-dtype-{name}.json", result, markdown(result))
    return result


def run_profile(model, images: list[torch.Tensor], options: ProfileOptions, device: torch.device) -> dict:
    """Profile every clip with `options`: phase seconds summed over clips, wall seconds, GPU peak (GiB, None on CPU)
    and "tables", each metric's "kv_<metric>" [L, K_kv] / "query_<metric>" [L, K_q] averaged over the clips."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = dict.fromkeys(PHASES, 0.0)
    arrays = []
    started = time.perf_counter()
    for index, clip in enumerate(images):
        measured = profile_clip(model, clip, options)
        arrays.append(measured.arrays)
        for phase, value in measured.timings.items():
            seconds[phase] += value
        print(f"heads {options.head_dtype}: clip {index + 1}/{len(images)} at {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
    wall = time.perf_counter() - started
    tables = {key: np.mean([clip[key] for clip in arrays], axis=0) for key in arrays[0]
              if key.startswith(("kv_", "query_"))}
    return {"head_dtype": options.head_dtype, "decode_dtype": str(options.decode_dtype(model)).removeprefix("torch."),
            "wall_seconds": wall, "seconds": seconds,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "tables": tables}


def relative_differences(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """|other - reference| / |reference| per cell (0 where both are 0, inf where only the reference is)."""
    difference = np.abs(other - reference)
    scale = np.abs(reference)
    return np.divide(difference, scale, out=np.where(difference > 0, np.inf, 0.0), where=scale > 0)


def compare(fp32: dict[str, np.ndarray], compute: dict[str, np.ndarray], options: ProfileOptions) -> dict:
    """The Spearman values and relative differences of the module docstring, the scores themselves, and the verdict."""
    levels = {"kv": [f"K/V keep {keep:g}" for keep in options.kv_keep],
              "query": [f"query merge {merge}" for merge in options.query_merge]}
    per_level = []
    for kind in ("kv", "query"):
        reference, other = fp32[f"{kind}_score"], compute[f"{kind}_score"]
        for column in range(1, reference.shape[1]):
            per_level.append({"level": levels[kind][column], "spearman": spearman(reference[:, column],
                                                                                  other[:, column]),
                              "max_relative_difference": float(relative_differences(reference[:, column],
                                                                                    other[:, column]).max())})

    def layer_means(tables):
        return np.concatenate([tables["kv_score"][:, 1:], tables["query_score"][:, 1:]], axis=1).mean(axis=1)

    mean_rho = spearman(layer_means(fp32), layer_means(compute))
    metrics = {}
    for key in fp32:
        kind, metric = key.split("_", 1)
        differences = relative_differences(fp32[key][:, 1:], compute[key][:, 1:])
        entry = metrics.setdefault(metric, {"max": 0.0, "median": []})
        entry["max"] = max(entry["max"], float(differences.max()))
        entry["median"].extend(differences.ravel().tolist())
    metrics = {metric: {"max_relative_difference": entry["max"],
                        "median_relative_difference": float(np.median(entry["median"]))}
               for metric, entry in metrics.items()}
    rhos = [row["spearman"] for row in per_level] + [mean_rho]
    return {
        "per_level": per_level, "layer_mean_spearman": mean_rho,
        "min_spearman": None if None in rhos else min(rhos),
        "passes_rule": None not in rhos and min(rhos) >= THRESHOLD,
        "metrics": metrics,
        "scores": {head_dtype: {kind: tables[f"{kind}_score"].tolist() for kind in ("kv", "query")}
                   for head_dtype, tables in (("fp32", fp32), ("compute", compute))},
    }


def decide(result: dict) -> dict:
    """The module docstring's decision from a result: the default head dtype and why."""
    comparison, profiles = result["comparison"], result["profiles"]
    largest = max(comparison["per_level"], key=lambda row: row["max_relative_difference"])
    decode = {head_dtype: profiles[head_dtype]["seconds"]["decode"] for head_dtype in ("fp32", "compute")}
    saving = 1 - decode["compute"] / decode["fp32"] if decode["fp32"] else 0.0
    reasons = [reason for failed, reason in (
        (not comparison["passes_rule"], "the layer ranking changes"),
        (largest["max_relative_difference"] > SCORE_TOLERANCE, "level scores move by more than the tolerance"),
        (saving < DECODE_SAVING, "it saves too little decode time")) if failed]
    return {"default": "fp32" if reasons else "compute", "reasons": reasons, "decode_s": decode,
            "decode_saving": saving, "largest_score_change": largest["max_relative_difference"],
            "largest_at": largest["level"]}


def _rho(value) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def markdown(result: dict) -> str:
    comparison, profiles = result["comparison"], result["profiles"]
    compute_dtype = profiles["compute"]["decode_dtype"]
    lines = [
        f"# profile-layers with the dense heads in fp32 and in {compute_dtype}: {result['model']}",
        "",
        f"Device: {result['device_name']}, PyTorch {result['torch']}, {result['created']}, commit {result['commit']}. "
        f"Model {result['model']} (weights {result['weights']}, trunk {result['dtype']}); clips {result['calib']} "
        f"({len(result['clips'])}) x {result['frames']} frames at {result['image_hw'][0]}x{result['image_hw'][1]}; "
        f"{result['global_layers']} global layers x K/V keep {result['kv_keep']} + query merge "
        f"{result['query_merge']}, {result['additivity']} additivity schedules, level batch {result['level_batch']}.",
        "",
        "Command:",
        "",
        f"    {result['command']}",
        "",
        f"Layer ranking of the end-to-end score (mean over clips), fp32 heads against {compute_dtype} heads:",
        "",
        "| level | Spearman over layers | max relative difference |",
        "|---|---:|---:|",
    ]
    lines += [f"| {row['level']} | {_rho(row['spearman'])} | {row['max_relative_difference']:.3g} |"
              for row in comparison["per_level"]]
    lines += [f"| per-layer mean over all levels | {_rho(comparison['layer_mean_spearman'])} | |", "",
              "| metric | max relative difference | median |", "|---|---:|---:|"]
    lines += [f"| {metric} | {entry['max_relative_difference']:.3g} | {entry['median_relative_difference']:.3g} |"
              for metric, entry in comparison["metrics"].items()]
    lines += ["", f"| phase | fp32 heads (s) | {compute_dtype} heads (s) |", "|---|---:|---:|"]
    lines += [f"| {phase} | {profiles['fp32']['seconds'][phase]:.1f} | {profiles['compute']['seconds'][phase]:.1f} |"
              for phase in profiles["fp32"]["seconds"]]
    lines.append(f"| **wall** | **{profiles['fp32']['wall_seconds']:.1f}** | "
                 f"**{profiles['compute']['wall_seconds']:.1f}** |")
    if profiles["fp32"]["peak_gib"] is not None:
        lines.append(f"| GPU peak (GiB) | {profiles['fp32']['peak_gib']:.1f} | {profiles['compute']['peak_gib']:.1f} |")
    verdict = "passes" if comparison["passes_rule"] else "fails"
    decision = decide(result)
    lines += ["", f"The issue's rule (every Spearman above at least {result['threshold']}): this run {verdict} it "
                  f"(smallest Spearman {_rho(comparison['min_spearman'])}). The largest relative change of a level's "
                  f"score in any layer is {decision['largest_score_change']:.3g} ({decision['largest_at']}; allowed "
                  f"{SCORE_TOLERANCE:g}), and decoding in {compute_dtype} takes {decision['decode_s']['compute']:.1f} s "
                  f"against {decision['decode_s']['fp32']:.1f} s in fp32 ({decision['decode_saving']:+.0%} saved; "
                  f"needed {DECODE_SAVING:.0%}). Default head dtype: **{decision['default']}**"
                  + ("." if decision["default"] == "compute" else
                     f" (`--head-dtype compute` stays opt-in: {', '.join(decision['reasons'])})."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
