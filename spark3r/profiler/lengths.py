"""Profiles at several clip lengths: K/V levels in kept frames, the per-length tables and their length model.

`profile-layers --frames 16,32,64 --kv-frames 1,2,4,8,16` profiles each length into `<out>/frames-<S>/` (a complete
profile of its own) and combines them here into `<out>/profile.json`: its main tables are those of the longest length
(so every reader of a one-length profile reads it unchanged), `by_length` holds every length's tables with the kept
K/V frames of each level, and `length_model` the fitted per-layer power law of each metric
(spark3r.profiler.length_model).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from spark3r.errors import ParameterError, Spark3rError
from spark3r.models.base import FrameLayout
from spark3r.profiler.format import STATISTICS, MetricTable, Profile
from spark3r.profiler.run import PHASES, ProfileOptions
from spark3r.profiler.length_model import Cells, LengthModel, fit_length_model
from spark3r.reduce import Reduction, kv_count

LOCAL = ("local_rel_l2", "local_cos")  # attention-output metrics: not modelled over lengths


def levels_at(frames: int, kv_keep: tuple[float, ...], kv_frames: tuple[int, ...]) -> tuple[float, ...]:
    """The K/V keep levels profiled at `frames` frames: the fractions and, for each N of `kv_frames`, the keep of a
    schedule's `kv: {frames: N}` there, 1 / ceil(S / N); descending from the dense 1.0."""
    return tuple(sorted({1.0, *kv_keep, *(1.0 / math.ceil(frames / n) for n in kv_frames)}, reverse=True))


def kept_frames(layout: FrameLayout, reduction: Reduction) -> float:
    """Frames' worth of patches whose K/V a reduction keeps: (kept tokens - special tokens) / patches per frame."""
    return (kv_count(layout, reduction) - layout.frames * layout.n_special) / layout.patches_per_frame


def length_entry(profile: Profile) -> dict:
    """One length's line of `by_length`: its clips, levels (with kept frames) and tables."""
    layout = profile.frame_layout
    options = ProfileOptions.of_profile(profile)
    return {"frames": profile.frames, "clips": list(profile.clips), "kv_keep": list(profile.kv_keep),
            "kv_frames": [kept_frames(layout, options.reduction(keep)) for keep in profile.kv_keep],
            "query_merge": list(profile.query_merge),
            "kv": {metric: table.to_dict() for metric, table in profile.kv.items()},
            "query": {metric: table.to_dict() for metric, table in profile.query.items()}}


def mean_table(entry: dict, kind: str, metric: str) -> np.ndarray:
    return np.asarray(entry[kind][metric]["mean"], dtype=np.float64)


def cells(by_length: list[dict], metric: str) -> tuple[Cells, Cells]:
    """Every (length, level) cell of `metric` in `by_length`, K/V and query."""
    def gather(kind: str, levels: str) -> Cells:
        frames = np.concatenate([np.full(len(entry[levels]), entry["frames"], dtype=np.float64) for entry in by_length])
        level = np.concatenate([np.asarray(entry[levels], dtype=np.float64) for entry in by_length])
        value = np.concatenate([mean_table(entry, kind, metric) for entry in by_length], axis=1)
        return Cells(frames, level, value)

    return gather("kv", "kv_frames"), gather("query", "query_merge")


def combine(profiles: list[Profile]) -> Profile:
    """One profile of several lengths (one profile per length, distinct lengths, same model and levels' options)."""
    profiles = sorted(profiles, key=lambda profile: profile.frames)
    lengths = [profile.frames for profile in profiles]
    if len(set(lengths)) != len(lengths):
        raise ParameterError(f"`frames` lists a length twice ({lengths}): give distinct clip lengths", "frames")
    longest = profiles[-1]
    by_length = [length_entry(profile) for profile in profiles]
    metrics = [metric for metric in longest.metrics if metric not in LOCAL
               and all(metric in profile.kv and metric in profile.query for profile in profiles)]
    models = {metric: fit_length_model(metric, *cells(by_length, metric)).to_dict() for metric in metrics}
    timings = {key: sum(profile.timings.get(key, 0) for profile in profiles) for key in (*PHASES, "clips")}
    timings["ranks"] = longest.timings.get("ranks", 1)
    return dataclasses.replace(longest, by_length=by_length, length_model=models, timings=timings, versions={},
                               created="", sha256="")


def length_models(profile: Profile, source: str = "profile") -> dict[str, LengthModel]:
    """The validated length models of a profile, by metric ({} for a profile of one length)."""
    for entry in profile.by_length:
        for kind, levels in (("kv", "kv_frames"), ("query", "query_merge")):
            for metric, table in entry.get(kind, {}).items():
                shape = np.asarray(table.get("mean", []), dtype=np.float64).shape
                if shape != (profile.global_layers, len(entry.get(levels, []))):
                    raise Spark3rError(f"{source} by_length[{entry.get('frames')}].{kind}.{metric} has shape "
                                       f"{list(shape)}, not {profile.global_layers} layers x its levels: rerun "
                                       "profile-layers")
    return {metric: LengthModel.from_dict(doc, profile.global_layers, f"{source} length_model.{metric}")
            for metric, doc in profile.length_model.items()}


def length_table(entry: dict, kind: str, metric: str) -> MetricTable:
    """A `by_length` entry's table as a MetricTable."""
    return MetricTable(**{name: np.asarray(entry[kind][metric][name], dtype=np.float64) for name in STATISTICS})
