"""`profile-layers`: how sensitive each global attention layer is to K/V pruning and query merging.

    profile-layers --model vggt-tiny --calib synthetic:8
    profile-layers --model vggt-tiny --calib synthetic:8 --frames 8,16,32 --kv-frames 1,2,4,8
    torchrun --nproc-per-node 8 profile-layers --model vggt-1b --calib clips/ --weights model.safetensors

Writes <out>/profile.json, profile.npz and heatmap.png (default out: profiles/<model>/), one result file per clip in
<out>/clips/ so an interrupted run resumes with the same command, and a short table on stdout (--json: a JSON summary).
With several --frames, each length is profiled into <out>/frames-<S>/ and <out>/profile.json combines them with a
per-layer model of deviation against kept K/V frames, query merge and clip length (spark3r.profiler.lengths).
"""
from __future__ import annotations

import json
import sys
import math
from pathlib import Path

from spark3r.commands.arguments import (ArgumentParser, add_compile_arg, add_runtime_args, command, resolve_device,
                                        resolve_dtype)
from spark3r.errors import Spark3rError
from spark3r.evaluate.deviation import DEFAULT_WEIGHTS
from spark3r.models.base import HEAD_DTYPES
from spark3r.profiler.pipeline import ProfileRequest, profile_layers
from spark3r.profiler.run import RESUMES, ProfileOptions
from spark3r.reduce import DEFAULT_KV_METHOD, KV_METHODS

DEFAULT_KV_KEEP = "0.5,0.25,0.125,0.0625,0.03125"
DEFAULT_QUERY_MERGE = "1,2,3,4"
CAMERA_TERMS = ("camera_center", "camera_rotation_deg", "focal")
# library parameters whose flag is not --parameter-name
FLAGS = {"additivity_schedules": "--additivity", "out_dir": "--out", "max_frames": "--frames"}


def parse_kv_keep(text: str) -> tuple[float, ...]:
    """"0.5,0.25" -> (1.0, 0.5, 0.25): the dense level 1.0 is always included; each value in (0, 1]."""
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise Spark3rError(f"--kv-keep {text!r} is not a comma-separated list of numbers: write e.g. 0.5,0.25") \
                from None
        if not 0 < value <= 1 or not math.isfinite(value):
            raise Spark3rError(f"--kv-keep level {item} is out of range: each keep must lie in (0, 1], e.g. 0.25")
        values.append(value)
    return tuple(sorted({1.0, *values}, reverse=True))


def parse_counts(text: str, flag: str) -> tuple[int, ...]:
    """"16,32,64" -> (16, 32, 64): distinct whole numbers >= 1, ascending."""
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() and int(item) >= 1 for item in items):
        raise Spark3rError(f"{flag} {text!r} must list whole numbers >= 1, e.g. 16,32,64")
    return tuple(sorted({int(item) for item in items}))


def parse_query_merge(text: str) -> tuple[int, ...]:
    """"2,4" -> (1, 2, 4): the dense level 1 is always included; each value an integer >= 1."""
    values = []
    for item in text.split(","):
        if not item.strip().isdigit():
            raise Spark3rError(f"--query-merge {text!r} must list whole numbers >= 1, e.g. 1,2,3,4")
        value = int(item)
        if value < 1:
            raise Spark3rError(f"--query-merge level {value} is out of range: each merge factor must be at least 1")
        values.append(value)
    return tuple(sorted({1, *values}))


def parse_score_weights(text: str) -> dict[str, float]:
    """"depth=1,points=1,cameras=1" -> output_deviation weights of every term.

    Terms are those of spark3r.evaluate.deviation; "cameras=w" scales all camera terms (centre, rotation, focal) by w
    from their defaults (rotation counted in radians). Terms not named keep their defaults.
    """
    weights = dict(DEFAULT_WEIGHTS)
    names = ", ".join(["cameras", *DEFAULT_WEIGHTS])
    for item in text.split(","):
        name, equals, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not equals or not math.isfinite(weight) or weight < 0:
            raise Spark3rError(f"--score-weights item {item!r} is malformed: write name=weight with a number >= 0, "
                               "e.g. depth=1,points=1,cameras=1")
        if name == "cameras":
            weights.update({term: weight * DEFAULT_WEIGHTS[term] for term in CAMERA_TERMS})
        elif name in DEFAULT_WEIGHTS:
            weights[name] = weight
        else:
            raise Spark3rError(f"--score-weights names an unknown term {name!r}: use {names}")
    if not any(weights.values()):
        raise Spark3rError("--score-weights gives every term weight 0: the score would be 0, give one a weight > 0")
    return weights


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="profile-layers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="registry name or alias, e.g. vggt-1b, vggt-tiny, da3")
    parser.add_argument("--calib", required=True,
                        help="calibration clips: a folder of clips, one clip, or synthetic:N[:SEED]")
    parser.add_argument("--weights", default="auto",
                        help="checkpoint file or folder, 'auto' (shipped or Hugging Face cache) or 'none' (random)")
    parser.add_argument("--kv-keep", default=DEFAULT_KV_KEEP,
                        help="K/V keep fractions to sweep, in (0, 1]; the dense 1.0 is always added "
                             "(default: %(default)s)")
    parser.add_argument("--query-merge", default=DEFAULT_QUERY_MERGE,
                        help="query merge factors to sweep, >= 1; 1 (dense) is always added (default: %(default)s)")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--frames", default=None,
                          help="frames per clip, spread over the whole clip (synthetic clips: rendered with N), or "
                               "several lengths, e.g. 16,32,64, each profiled; default: all, cut to the shortest clip "
                               "(8 for synthetic clips)")
    sampling.add_argument("--every", type=int, default=None, metavar="N", help="every N-th frame of each clip")
    parser.add_argument("--size", type=int, default=None,
                        help="preprocessing size in pixels, the side of a square image (default: the model's)")
    parser.add_argument("--kv-frames", default=None,
                        help="K/V levels in kept frames, e.g. 1,2,4,8,16: at S frames, N means keep 1/ceil(S/N) "
                             "(a schedule's kv: {frames: N}); profiled beside the --kv-keep fractions")
    parser.add_argument("--kv-method", default=DEFAULT_KV_METHOD, choices=KV_METHODS, help="K/V pruning method")
    parser.add_argument("--no-reference-frame", dest="keep_reference_frame", action="store_false",
                        help="do not keep frame 0's K/V whole (grid, random and key_norm methods)")
    parser.add_argument("--group-frames", type=int, default=20, help="query merging group size in frames")
    parser.add_argument("--score-weights", default="depth=1,points=1,cameras=1",
                        help="weights of the deviation terms in the combined score (default: %(default)s)")
    parser.add_argument("--additivity", type=int, default=6,
                        help="random multi-layer schedules measured per clip for the additivity check")
    parser.add_argument("--level-batch", type=int, default=8,
                        help="levels of one layer run as one batched forward (lower it if memory runs out)")
    parser.add_argument("--head-dtype", default="fp32", choices=HEAD_DTYPES,
                        help="dtype the dense heads decode in, for the dense reference and every level alike: fp32 "
                             "(as upstream) or compute (the --dtype the trunk runs in: faster; its effect on the "
                             "profile is measured by benchmarks/profile_head_dtype.py; camera heads stay fp32) "
                             "(default: %(default)s)")
    parser.add_argument("--resume-levels", default="all", choices=RESUMES,
                        help="levels resumed end to end: all; alternate (every other level of each kind from the "
                             "strongest, and the mildest: 5 of the default 8); ends (the mildest and the strongest of "
                             "each kind: 4 of 8); or strongest (the strongest level of each kind: 2 of 8). The others "
                             "come from their local deviation scaled by the resumed levels' end-to-end / local ratio; "
                             "benchmarks/results/profile-screening-*.md measures what it keeps (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output folder (default: profiles/<model>/)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout instead of the table")
    add_runtime_args(parser)
    add_compile_arg(parser)
    return parser


@command(flags=FLAGS)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = ProfileOptions(
        kv_keep=parse_kv_keep(args.kv_keep), query_merge=parse_query_merge(args.query_merge),
        kv_method=args.kv_method, keep_reference_frame=args.keep_reference_frame, group_frames=args.group_frames,
        score_weights=parse_score_weights(args.score_weights), additivity_schedules=args.additivity,
        level_batch=args.level_batch, seed=args.seed, head_dtype=args.head_dtype, resume=args.resume_levels)
    frames = None if args.frames is None else parse_counts(args.frames, "--frames")
    kv_frames = () if args.kv_frames is None else parse_counts(args.kv_frames, "--kv-frames")
    device = resolve_device(args.device)
    outcome = profile_layers(ProfileRequest(model=args.model, calib=args.calib, options=options,
                                            weights=args.weights, frames=frames, kv_frames=kv_frames,
                                            every=args.every, size=args.size, out=args.out, device=device,
                                            dtype=resolve_dtype(args.dtype, device), compiled=args.compile))
    if outcome is None:  # a torchrun rank other than the main one
        return 0
    if args.json:
        print(json.dumps(summary(outcome.profile, outcome.path), indent=1))
    else:
        print(table(outcome.profile, outcome.path))
    return 0


def summary(profile, path: Path) -> dict:
    """What --json prints: where the profile is, its shape, the score tables and the checks."""
    return {
        "profile": str(path), "model": profile.model, "clips": len(profile.clips), "frames": profile.frames,
        "image_hw": list(profile.image_hw), "levels": {"kv_keep": profile.kv_keep, "query_merge": profile.query_merge},
        "score": {"kv": profile.kv["score"].mean.tolist(), "query": profile.query["score"].mean.tolist()},
        "additivity": {key: profile.additivity.get(key) for key in ("measured", "predicted_sum", "spearman")},
        "asymmetry": profile.asymmetry, "timings": profile.timings,
        "lengths": [entry["frames"] for entry in profile.by_length],
        "length_model": {metric: {key: model[key] for key in ("form", "kv", "query", "held_out")}
                         for metric, model in profile.length_model.items()},
    }


def length_lines(profile) -> list[str]:
    """The length model's fit error at the held-out length, per metric fitted (none for a one-length profile)."""
    lines = []
    for metric, model in profile.length_model.items():
        held = model["held_out"]
        errors = "; ".join(f"{kind} RMSE of log {_num(held[kind]['rmse_log'])}, median relative error "
                           f"{_num(held[kind]['median_relative_error'])}, Spearman {_num(held[kind]['spearman'])}"
                           for kind in ("kv", "query"))
        lines.append(f"length model ({metric}), fitted on {held['fitted_on']} frames, predicting {held['frames']}: "
                     f"{errors}")
    if lines:
        lines.insert(0, f"profiled at {[entry['frames'] for entry in profile.by_length]} frames; the tables above are "
                        f"those at {profile.frames}. {profile.length_model[next(iter(profile.length_model))]['form']}")
    return lines


def _num(value) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def table(profile, path: Path) -> str:
    """A short human summary: mean score per layer and level, the asymmetry and additivity checks, timings."""
    kv, query = profile.kv["score"].mean, profile.query["score"].mean
    kv_head = " ".join(f"{keep:>8g}" for keep in profile.kv_keep[1:])
    query_head = " ".join(f"{merge:>8d}" for merge in profile.query_merge[1:])
    lines = [f"{profile.model}: {len(profile.clips)} clip(s) x {profile.frames} frames at "
             f"{profile.image_hw[0]}x{profile.image_hw[1]} -> {path}",
             "mean end-to-end score by global layer", f"layer | K/V keep {kv_head} | query merge {query_head}"]
    for layer in range(profile.global_layers):
        lines.append(f"{layer:>5} |          {' '.join(f'{v:8.4f}' for v in kv[layer, 1:])} |             "
                     f"{' '.join(f'{v:8.4f}' for v in query[layer, 1:])}")
    asym = profile.asymmetry
    for factor, q, k in zip(asym.get("factors", []), asym.get("query_mean", []), asym.get("kv_mean", [])):
        lines.append(f"asymmetry at {factor}x fewer tokens: query merge {q:.4f} vs K/V keep 1/{factor} {k:.4f} "
                     "(mean score over layers)")
    if profile.additivity:
        rho = profile.additivity["spearman"]
        rho_text = "undefined" if rho is None else f"{rho:.3f}"
        lines.append(f"additivity: Spearman {rho_text} between measured and summed single-layer scores of "
                     f"{len(profile.additivity['measured'])} schedules")
    lines += length_lines(profile)
    timings = profile.timings
    phases = ", ".join(f"{phase} {timings[phase]:.1f}s" for phase in ("dense", "cache", "local", "resume", "decode",
                                                                      "additivity"))
    lines.append(f"time: {phases}; wall {timings['wall']:.1f}s on {timings['ranks']} rank(s)")
    return "\n".join(lines)



if __name__ == "__main__":
    sys.exit(main())
