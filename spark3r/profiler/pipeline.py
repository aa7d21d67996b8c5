"""A whole profile-layers run: load the model and the calibration clips, measure every clip (sharded across torchrun
ranks, resumable through the per-clip files), merge them into a profile and write it with its heatmap."""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from spark3r.data.clip import Clip
from spark3r.data.clips import fit_clips, open_clips
from spark3r.errors import ParameterError, Spark3rError
from spark3r.files import check_output_folder
from spark3r.evaluate.deviation import DEFAULT_WEIGHTS
from spark3r.models.base import HEAD_DTYPES, ReconstructionModel
from spark3r.models.loading import load_model, weights_identity
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
from spark3r.profiler.run import (
    RESUMES, ProfileOptions, profile_clip, profile_levels, sample_schedules,
)
from spark3r.profiler.store import ClipResult, load_clip, save_clip


@dataclass(frozen=True)
class ProfileRequest:
    """What to profile: `model` (registry name or alias) on the clip spec `calib`, `frames` frames spread over each
    clip (synthetic clips: rendered with that many; default: all, cut to the shortest clip; several lengths: each is
    profiled) or every `every`-th, preprocessed at `size` (the side of a square image; default: the model's), at the
    levels and settings of `options` and, at each length, the K/V keep of each count in `kv_frames` of kept frames;
    written to `out` (default profiles/<model>/). `compiled`: the model's blocks and DPT heads run through
    torch.compile (`load_model`; each new input shape compiles once); a speed option, so it is not part of the
    profile's options and a folder profiled eagerly resumes compiled and vice versa."""

    model: str
    calib: str
    options: ProfileOptions
    weights: str = "auto"
    frames: int | tuple[int, ...] | None = None
    kv_frames: tuple[int, ...] = ()
    every: int | None = None
    size: int | None = None
    out: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    compiled: bool = False


@dataclass
class ProfileOutcome:
    """The profile written (on the main rank) and where profile.json lies."""

    profile: Profile
    path: Path


def check_request(request: ProfileRequest) -> None:
    options = request.options
    lengths = [] if request.frames is None else [request.frames] if isinstance(request.frames, int) else request.frames
    for parameter, values in (("frames", lengths), ("kv_frames", request.kv_frames)):
        if any(value < 1 for value in values):
            raise ParameterError(f"`{parameter}` is {values}: give whole numbers >= 1", parameter)
    for parameter, value, least in (("group_frames", options.group_frames, 1),
                                    ("additivity_schedules", options.additivity_schedules, 0),
                                    ("level_batch", options.level_batch, 1)):
        if value is not None and value < least:
            raise ParameterError(f"`{parameter}` is {value}: give a whole number >= {least}", parameter)
    if options.head_dtype not in HEAD_DTYPES:
        raise ParameterError(f"`head_dtype` is {options.head_dtype!r}: use one of {', '.join(HEAD_DTYPES)}",
                             "head_dtype")
    if options.resume not in RESUMES:
        raise ParameterError(f"`resume` is {options.resume!r}: use one of {', '.join(RESUMES)}", "resume")


def load_calibration(spec: str, recipe: str, frames: int | None,
                     every: int | None = None) -> tuple[list[tuple[Clip, str]], int, list[str]]:
    """The calibration clips cut to one frame count and brought to one image size (`fit_clips`: the first clip's),
    each with its digest (copies counted once), that count, and notes for the user."""
    clips = open_clips(spec, preprocess=recipe, max_frames=frames, every=every, frames=frames)
    if not clips:
        raise ParameterError(f"`calib` {spec} holds no clips: pass a folder of clips, one clip or synthetic:N", "calib")
    notes = []
    if frames is None:
        frames = min(clip.frames for clip in clips)
        if any(clip.frames != frames for clip in clips):
            notes.append(f"clips have different lengths: every clip is cut to the shortest, {frames} frames")
            clips = [clip.select(range(frames)) for clip in clips]
    short = [clip for clip in clips if clip.frames < frames]
    if short:
        raise ParameterError(f"clip {short[0].name} has only {short[0].frames} frames but `frames` {frames} was asked: "
                             "lower `frames` or use longer clips", "frames")
    clips = fit_clips(clips)  # one image size for the profile: other sizes are resized and centre-cropped to the first
    unique, seen = [], {}
    for clip in clips:
        sha = clip.fingerprint()
        if sha in seen:
            notes.append(f"clip {clip.name} is a copy of {seen[sha]}: counted once")
        else:
            seen[sha] = clip.name
            unique.append((clip, sha))
    return unique, frames, notes


def profile_layers(request: ProfileRequest) -> ProfileOutcome | None:
    """Profile, write <out>/profile.json, profile.npz and heatmap.png, and return them; None on the ranks other than
    the main one of a torchrun launch. With several `frames`, each length is profiled into <out>/frames-<S>/ and
    <out>/profile.json combines them with their length model (spark3r.profiler.lengths). Notes go to stderr (on the
    main rank), with a progress bar."""
    check_request(request)
    started = time.perf_counter()
    ranks = launch_ranks()
    device = rank_device(request.device, ranks)
    name = resolve_model_name(request.model)
    entry = get_entry(name)
    out = check_output_folder(request.out if request.out else Path("profiles") / name, "out")
    recipe = entry.recipe(request.size)
    calibrations = [load_calibration(request.calib, recipe, frames, request.every) for frames in lengths_of(request)]
    model = load_model(name, weights=request.weights, device=device, dtype=request.dtype, seed=request.options.seed,
                       compiled=request.compiled)
    if not isinstance(model, ReconstructionModel):
        raise Spark3rError(f"model {name} does not run as trunk steps, so it cannot be profiled: use one of "
                           "spark3r's model classes")
    init_distributed(ranks, device)
    folders = [out / f"frames-{frames}" for _, frames, _ in calibrations] if len(calibrations) > 1 else [out]
    profiles = [profile_length(request, model, name, ranks, device, calibration, recipe, folder)
                for calibration, folder in zip(calibrations, folders)]
    close_distributed(ranks)
    if not ranks.is_main:
        return None
    if len(profiles) > 1:
        for (profile, raw), folder in zip(profiles, folders):
            save_length(profile, raw, folder, started)
        profile, raw = combine([profile for profile, _ in profiles]), profiles[-1][1]
    else:
        profile, raw = profiles[0]
    absent = [term for term in DEFAULT_WEIGHTS if term not in profile.metrics]
    if absent:
        print(f"note: {', '.join(absent)} left out of the profile: the model does not output them or its dense "
              "outputs for them are not finite (random weights give a zero field of view)", file=sys.stderr)
    return ProfileOutcome(profile, save_length(profile, raw, out, started))


def lengths_of(request: ProfileRequest) -> tuple[int | None, ...]:
    """The clip lengths to profile, ascending: (None,) for the shortest clip's."""
    if request.frames is None:
        return (None,)
    if isinstance(request.frames, int):
        return (request.frames,)
    return tuple(sorted(set(request.frames)))


def save_length(profile: Profile, raw: dict, out: Path, started: float) -> Path:
    """Write a profile with its raw arrays and heat map into `out`; returns the path of profile.json."""
    profile.timings["wall"] = time.perf_counter() - started
    path = save_profile(profile, out, raw)
    save_heatmap(profile, out / "heatmap.png")
    return path


def profile_length(request: ProfileRequest, model: ReconstructionModel, name: str, ranks, device: torch.device,
                   calibration: tuple[list[tuple[Clip, str]], int, list[str]], recipe: str,
                   out: Path) -> tuple[Profile, dict] | None:
    """Profile one length's calibration clips at the request's levels and its `kv_frames` levels there, keeping
    per-clip results in `out` (so a rerun resumes); the profile and its raw arrays (None on ranks other than the main
    one)."""
    clips, frames, notes = calibration
    images0 = clips[0][0].images
    layout = model.adapter.layout(images0)
    base = request.options
    options, level_notes = profile_levels(
        layout, dataclasses.replace(base, kv_keep=levels_at(frames, base.kv_keep, request.kv_frames)))
    identity = {"model": name, "weights": weights_identity(request.weights, get_entry(name)),
                "dtype": str(request.dtype).removeprefix("torch."), "frames": frames, "preprocess": recipe,
                "image_hw": list(images0.shape[-2:]), **options.identity()}
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
