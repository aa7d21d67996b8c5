"""Verification: run the best candidates for real on held-out clips and measure their deviation from the dense model.

The best uniform schedule within the budget is always among the candidates (`with_uniform`): the predicted deviation
of a schedule that reduces every layer can be far off (per-layer deviations do not add up exactly, and a length model
extrapolates), so a search never exports a schedule that measures worse than the uniform one on the verify clips."""
from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm import tqdm

from spark3r.data.clip import Clip
from spark3r.data.clips import fit_clips, open_clips
from spark3r.errors import ParameterError
from spark3r.evaluate.deviation import DenseReference
from spark3r.models.loading import load_model
from spark3r.models.registry import get_entry
from spark3r.profiler.format import Profile
from spark3r.profiler.run import ProfileOptions, finite_outputs
from spark3r.schedule import Schedule, check_model, reduced


def with_uniform(candidates: list, uniform) -> list:
    """`candidates` (the best predicted first) and the best uniform candidate `uniform` (None: none fits the budget)
    after them when it is not among them already."""
    return [*candidates, uniform] if uniform is not None and uniform not in candidates else list(candidates)


def held_out_clips(profile: Profile, calib: str, size: int | None = None, every: int | None = None,
                   max_frames: int | None = None, frames: int | None = None) -> list[Clip]:
    """The clips of `calib`, preprocessed as the profile's were (or at `size`, the side of a square image), at
    `frames` frames (default: the profile's; spread over each clip, `max_frames` of them, or every `every`-th);
    calibration clips of the profile, at any profiled length, are refused."""
    entry = get_entry(profile.model)
    recipe = entry.recipe(size) if size is not None else profile.options.get("preprocess", entry.recipe())
    frames = profile.frames if frames is None else frames
    if every is None and max_frames is None:
        max_frames = frames
    clips = fit_clips(open_clips(calib, preprocess=recipe, max_frames=max_frames, every=every, frames=frames))
    short = [clip for clip in clips if every is None and clip.frames < max_frames]
    if short:
        raise ParameterError(f"`calib` clip {short[0].name} has {short[0].frames} frames, fewer than the {max_frames} "
                             "to verify at: pass longer clips", "calib")
    if not clips:
        raise ParameterError(f"`calib` {calib} holds no clips: pass a folder of clips, one clip or synthetic:N[:SEED]",
                             "calib")
    profiled_clips = [*profile.clips, *(clip for entry in profile.by_length for clip in entry.get("clips", []))]
    profiled = {clip.get("sha256") for clip in profiled_clips}
    names = {clip.get("name") for clip in profiled_clips} if frames != profile.frames else set()
    reused = [clip.name for clip in clips if clip.fingerprint() in profiled or clip.name in names]
    if reused:
        raise ParameterError(f"`calib` clip {reused[0]} was used to make the profile, so it is not held out: pass "
                             "other clips (e.g. synthetic:N with another seed)", "calib")
    return clips


@torch.inference_mode()
def measure(profile: Profile, schedules: list[Schedule], clips: list[Clip], *, device: torch.device,
            dtype: torch.dtype, weights: str | None, seed: int, metric: str, compiled: bool = False,
            progress: bool = True) -> np.ndarray:
    """Measured `metric` deviation [n_schedules, n_clips] of each schedule from the dense model on each clip, with the
    model loaded on `device` in `dtype`, its blocks and DPT heads through torch.compile if `compiled` (`load_model`).

    As when profiling, outputs that are not finite in the dense run are left out of the comparison."""
    model = load_model(profile.model, weights=weights, device=device, dtype=dtype, seed=seed, compiled=compiled)
    adapter = model.adapter
    for schedule in schedules:
        check_model(schedule, adapter.model_name, adapter.num_global_layers)
    score_weights = ProfileOptions.of_profile(profile).score_weights or None
    measured = np.empty((len(schedules), len(clips)))
    with tqdm(total=len(clips) * (len(schedules) + 1), desc="verify", unit="forward", file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for column, clip in enumerate(clips):
            images = clip.images.to(device)[None]
            reference = DenseReference({key: value.float() for key, value in finite_outputs(model(images)).items()})
            bar.update(1)
            for row, schedule in enumerate(schedules):
                with reduced(model, schedule):
                    outputs = {key: value.float() for key, value in model(images).items() if key in reference.dense}
                deviation = reference.deviation(outputs, score_weights)
                if metric not in deviation:
                    raise ParameterError(f"verifying measures end-to-end deviation, which has no {metric!r}: use "
                                         f"`metric` {' or '.join(sorted(deviation))}", "metric")
                measured[row, column] = deviation[metric]
                bar.update(1)
    return measured
