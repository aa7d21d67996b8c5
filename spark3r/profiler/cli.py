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

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from spark3r.cli import ArgumentParser, add_runtime_args, command, resolve_device, resolve_dtype
from spark3r.data.clips import open_clips
from spark3r.errors import Spark3rError
from spark3r.evaluate.deviation import DEFAULT_WEIGHTS
from spark3r.models.base import ReconstructionModel
from spark3r.models.loading import find_weights, find_weights_file, load_model
from spark3r.models.registry import get_entry, resolve_model_name
from spark3r.profiler.aggregate import build_profile
from spark3r.profiler.distributed import (
    barrier,
    close_distributed,
    init_distributed,
    launch_ranks,
    rank_device,
    shard,
)
from spark3r.profiler.format import Profile, save_profile
from spark3r.profiler.lengths import combine, levels_at
from spark3r.profiler.plot import save_heatmap
from spark3r.profiler.run import ProfileOptions, profile_clip, profile_levels, sample_schedules
from spark3r.profiler.store import ClipResult, load_clip, save_clip
from spark3r.reduce import KV_METHODS

DEFAULT_KV_KEEP = "0.5,0.25,0.125,0.0625,0.03125"
DEFAULT_QUERY_MERGE = "1,2,3,4"
CAMERA_TERMS = ("camera_center", "camera_rotation_deg", "focal")


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
    parser.add_argument("--kv-frames", default=None,
                        help="K/V levels in kept frames, e.g. 1,2,4,8,16: at S frames, N means keep 1/ceil(S/N) "
                             "(a schedule's kv: {frames: N}); profiled beside the --kv-keep fractions")
    parser.add_argument("--frames", default=None,
                        help="frames per clip (the first N; synthetic clips are generated at that length), or "
                             "several lengths, e.g. 16,32,64, each profiled; default: the shortest clip (8 for "
                             "synthetic clips)")
    parser.add_argument("--kv-method", default="frame_stride", choices=KV_METHODS, help="K/V pruning method")
    parser.add_argument("--no-reference-frame", dest="keep_reference_frame", action="store_false",
                        help="do not keep frame 0's K/V whole (grid, random and key_norm methods)")
    parser.add_argument("--group-frames", type=int, default=20, help="query merging group size in frames")
    parser.add_argument("--score-weights", default="depth=1,points=1,cameras=1",
                        help="weights of the deviation terms in the combined score (default: %(default)s)")
    parser.add_argument("--additivity", type=int, default=6,
                        help="random multi-layer schedules measured per clip for the additivity check")
    parser.add_argument("--level-batch", type=int, default=8,
                        help="levels of one layer run as one batched forward (lower it if memory runs out)")
    parser.add_argument("--out", default=None, help="output folder (default: profiles/<model>/)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout instead of the table")
    add_runtime_args(parser)
    return parser


def check_counts(args) -> None:
    for flag, value, least in (("--group-frames", args.group_frames, 1),
                               ("--additivity", args.additivity, 0), ("--level-batch", args.level_batch, 1)):
        if value is not None and value < least:
            raise Spark3rError(f"{flag} is {value}: give a whole number >= {least}")


def weights_identity(weights: str, entry) -> str:
    """Which weights a run used: "none", or the resolved file with its size and modification time (so "auto" finding
    a new file, or a file replaced in place, is a change of options and cached clips are not reused)."""
    if weights == "none":
        return "none"
    path = (find_weights(entry) if weights == "auto" else find_weights_file(weights)).resolve()
    stat = path.stat()
    return f"{path} ({stat.st_size} bytes, mtime_ns {stat.st_mtime_ns})"


def profiled_weights(identity: str) -> str:
    """The weights a profile was made with, from its `weights_identity`: "none" or the file's path; one sentence if
    the file has since gone or changed."""
    if " (" not in identity:
        return identity
    path = identity.rsplit(" (", 1)[0]
    if not Path(path).is_file() or weights_identity(path, None) != identity:
        raise Spark3rError(f"the profile was made with weights {identity}, which is gone or has changed since: pass "
                           "--weights for the weights to verify with, or profile again")
    return path


def load_calibration(spec: str, recipe: str, frames: int | None) -> tuple[list, int, list[str]]:
    """The calibration clips cut to one frame count, that count, and notes for the user."""
    clips = open_clips(spec, preprocess=recipe, max_frames=frames, frames=frames)
    if not clips:
        raise Spark3rError(f"--calib {spec} holds no clips: pass a folder of clips, one clip or synthetic:N")
    notes = []
    if frames is None:
        frames = min(clip.frames for clip in clips)
        if any(clip.frames != frames for clip in clips):
            notes.append(f"clips have different lengths: every clip is cut to the shortest, {frames} frames")
            clips = [clip.select(range(frames)) for clip in clips]
    short = [clip for clip in clips if clip.frames < frames]
    if short:
        raise Spark3rError(f"clip {short[0].name} has only {short[0].frames} frames but --frames {frames} was asked: "
                           "lower --frames or use longer clips")
    sizes = {(clip.height, clip.width) for clip in clips}
    if len(sizes) > 1:
        listed = ", ".join(f"{height}x{width}" for height, width in sorted(sizes))
        raise Spark3rError(f"the clips have different sizes after preprocessing ({listed}): "
                           "profile clips of one aspect ratio")
    unique, seen = [], {}
    for clip in clips:
        sha = clip.fingerprint()
        if sha in seen:
            notes.append(f"clip {clip.name} is a copy of {seen[sha]}: counted once")
        else:
            seen[sha] = clip.name
            unique.append((clip, sha))
    return unique, frames, notes


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_counts(args)
    lengths = (None,) if args.frames is None else parse_counts(args.frames, "--frames")
    kv_frames = () if args.kv_frames is None else parse_counts(args.kv_frames, "--kv-frames")
    base = ProfileOptions(
        kv_keep=parse_kv_keep(args.kv_keep), query_merge=parse_query_merge(args.query_merge),
        kv_method=args.kv_method, keep_reference_frame=args.keep_reference_frame, group_frames=args.group_frames,
        score_weights=parse_score_weights(args.score_weights), additivity_schedules=args.additivity,
        level_batch=args.level_batch, seed=args.seed)
    started = time.perf_counter()
    ranks = launch_ranks()
    device = rank_device(resolve_device(args.device), ranks)
    name = resolve_model_name(args.model)
    out = Path(args.out) if args.out else Path("profiles") / name
    dtype = resolve_dtype(args.dtype, device)
    model = load_model(name, weights=args.weights, device=device, dtype=dtype, seed=args.seed)
    if not isinstance(model, ReconstructionModel):
        raise Spark3rError(f"model {name} does not run as trunk steps, so it cannot be profiled: use one of "
                           "spark3r's model classes")
    init_distributed(ranks, device)
    folders = [out / f"frames-{frames}" for frames in lengths] if len(lengths) > 1 else [out]
    profiles = [profile_length(args, model, name, ranks, device, dtype, base, frames, kv_frames, folder)
                for frames, folder in zip(lengths, folders)]
    close_distributed(ranks)
    if not ranks.is_main:
        return 0
    if len(lengths) > 1:
        for (profile, raw), folder in zip(profiles, folders):
            save_length(profile, raw, folder, started)
        profile, raw = combine([profile for profile, _ in profiles]), profiles[-1][1]
    else:
        profile, raw = profiles[0]
    path = save_length(profile, raw, out, started)
    absent = [term for term in DEFAULT_WEIGHTS if term not in profile.metrics]
    if absent:
        print(f"note: {', '.join(absent)} left out of the profile: the model does not output them or its dense "
              "outputs for them are not finite (random weights give a zero field of view)", file=sys.stderr)
    if args.json:
        print(json.dumps(summary(profile, path), indent=1))
    else:
        print(table(profile, path))
    return 0


def save_length(profile: Profile, raw: dict, out: Path, started: float) -> Path:
    """Write a profile with its raw arrays and heat map into `out`; returns the path of profile.json."""
    profile.timings["wall"] = time.perf_counter() - started
    path = save_profile(profile, out, raw)
    save_heatmap(profile, out / "heatmap.png")
    return path


def profile_length(args, model: ReconstructionModel, name: str, ranks, device, dtype, base: ProfileOptions,
                   frames: int | None, kv_frames: tuple[int, ...], out: Path) -> tuple[Profile, dict] | None:
    """Profile the calibration clips cut (or generated) at `frames` frames at `base`'s levels and the `kv_frames`
    levels, keeping per-clip results in `out` (so a rerun resumes); the profile and its raw arrays (None on ranks
    other than the main one)."""
    entry = get_entry(name)
    clips, frames, notes = load_calibration(args.calib, f"{entry.preprocess}:{entry.image_width}", frames)
    images0 = clips[0][0].images
    layout = model.adapter.layout(images0)
    options, level_notes = profile_levels(
        layout, dataclasses.replace(base, kv_keep=levels_at(frames, base.kv_keep, kv_frames)))
    identity = {"model": name, "weights": weights_identity(args.weights, entry), "dtype": str(dtype).removeprefix("torch."),
                "frames": frames, "image_hw": list(images0.shape[-2:]), **options.identity()}
    if ranks.is_main:
        for note in notes + level_notes:
            print(f"note: {note}", file=sys.stderr)
    done = {sha: load_clip(out, sha, identity) for _, sha in clips}
    mine = [(clip, sha) for clip, sha in shard(clips, ranks) if done[sha] is None]
    layers = model.adapter.num_global_layers
    with tqdm(total=len(mine) * layers, desc=f"profiling {name} at {frames} frames", unit="layer", file=sys.stderr,
              disable=not ranks.is_main or not mine) as bar:
        for clip, sha in mine:
            measured = profile_clip(model, clip.images.to(device), options, on_layer=bar.update)
            save_clip(ClipResult(clip.name, sha, frames, measured.arrays, measured.timings), out, identity)
    barrier(ranks)
    if not ranks.is_main:
        return None

    results = [load_clip(out, sha, identity) for _, sha in clips]
    missing = [clip.name for (clip, _), result in zip(clips, results) if result is None]
    if missing:
        raise RuntimeError(f"no result for clip {missing[0]} after all ranks finished")
    kv_index, query_index = sample_schedules(options.additivity_schedules, layers, len(options.kv_keep),
                                             len(options.query_merge), options.seed)
    profile, raw = build_profile(
        results, model=name, global_layers=layers, image_hw=tuple(images0.shape[-2:]), layout=layout,
        kv_keep=list(options.kv_keep), query_merge=list(options.query_merge),
        options={key: value for key, value in identity.items()
                 if key not in ("model", "frames", "image_hw", "kv_keep", "query_merge")},
        kv_index=kv_index, query_index=query_index)
    profile.timings["ranks"] = ranks.world_size
    return profile, raw


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
