"""From per-clip measurements to the profile's tables: spread over clips, additivity check, query/KV asymmetry."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from spark3r.evaluate.deviation import DEFAULT_WEIGHTS
from spark3r.models.base import FrameLayout
from spark3r.profiler.format import MetricTable, Profile
from spark3r.profiler.run import PHASES
from spark3r.profiler.store import ClipResult


def summarize(per_clip: np.ndarray) -> MetricTable:
    """Mean, sample std and 95% confidence half-width (t-distribution) over clips: [clips, L, K] -> [L, K] each.

    With one clip the spread is not measured: std and ci95 are 0.
    """
    per_clip = np.asarray(per_clip, dtype=np.float64)
    clips = per_clip.shape[0]
    mean = per_clip.mean(axis=0)
    if clips < 2:
        return MetricTable(mean=mean, std=np.zeros_like(mean), ci95=np.zeros_like(mean))
    std = per_clip.std(axis=0, ddof=1)
    ci95 = stats.t.ppf(0.975, clips - 1) * std / math.sqrt(clips)
    return MetricTable(mean=mean, std=std, ci95=ci95)


def spearman(measured: np.ndarray, predicted: np.ndarray) -> float | None:
    """Spearman rank correlation of two 1-D arrays; None when it is undefined (fewer than 3 points or a constant)."""
    measured, predicted = np.asarray(measured, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if measured.size < 3 or np.ptp(measured) == 0 or np.ptp(predicted) == 0:
        return None
    return float(stats.spearmanr(measured, predicted).statistic)


def predicted_sum(kv_table: np.ndarray, query_table: np.ndarray, kv_index: np.ndarray,
                  query_index: np.ndarray) -> np.ndarray:
    """Sum over layers of single-layer deviations for each schedule.

    kv_table [..., L, K_kv], query_table [..., L, K_q]; kv_index, query_index [n_schedules, L] level indices
    -> [..., n_schedules].
    """
    layers = np.arange(kv_index.shape[1])
    return kv_table[..., layers, kv_index].sum(axis=-1) + query_table[..., layers, query_index].sum(axis=-1)


def additivity_summary(kv_index: np.ndarray, query_index: np.ndarray, kv_keep: list[float], query_merge: list[int],
                       measured: np.ndarray, kv_score: np.ndarray, query_score: np.ndarray) -> dict:
    """Measured vs predicted (sum of single-layer) deviation of multi-layer schedules.

    measured [clips, n_schedules]; kv_score [clips, L, K_kv], query_score [clips, L, K_q] (the profiled metric).
    """
    measured_mean = np.asarray(measured, dtype=np.float64).mean(axis=0)
    predicted = predicted_sum(kv_score, query_score, kv_index, query_index).mean(axis=0)
    return {
        "schedules": [{"kv_keep": [kv_keep[i] for i in kv_row], "query_merge": [query_merge[i] for i in query_row]}
                      for kv_row, query_row in zip(kv_index.tolist(), query_index.tolist())],
        "measured": measured_mean.tolist(),
        "predicted_sum": predicted.tolist(),
        "spearman": spearman(measured_mean, predicted),
    }


def kv_at_keep(kv_mean: np.ndarray, kv_keep: list[float], keep: float) -> np.ndarray:
    """Interpolate a [L, K_kv] table at `keep`, linear in log(keep) between measured levels -> [L]."""
    order = np.argsort(kv_keep)
    log_keep = np.log(np.asarray(kv_keep, dtype=np.float64)[order])
    return np.array([np.interp(math.log(keep), log_keep, row[order]) for row in kv_mean])


def asymmetry_summary(kv_mean: np.ndarray, kv_keep: list[float], query_mean: np.ndarray,
                      query_merge: list[int], metric: str = "score") -> dict:
    """Query merging vs K/V pruning at equal token-reduction factor r (merge r vs keep 1/r), averaged over layers.

    Factors are the query merge levels > 1 whose 1/r lies inside the measured K/V range (K/V interpolated in log keep).
    """
    factors = [merge for merge in query_merge if merge > 1 and 1.0 / merge >= min(kv_keep)]
    query_rows, kv_rows = [], []
    for merge in factors:
        query_rows.append(query_mean[:, query_merge.index(merge)])
        kv_rows.append(kv_at_keep(kv_mean, kv_keep, 1.0 / merge))
    query_avg = [float(row.mean()) for row in query_rows]
    kv_avg = [float(row.mean()) for row in kv_rows]
    return {
        "metric": metric,
        "factors": factors,
        "query_mean": query_avg,
        "kv_mean": kv_avg,
        "query_over_kv": [q / k if k > 0 else None for q, k in zip(query_avg, kv_avg)],
        "layers_query_worse": [int((q > k).sum()) for q, k in zip(query_rows, kv_rows)],
    }


def metric_names(results: list[ClipResult]) -> list[str]:
    """The metrics every clip measured ("kv_<metric>" arrays), local ones first and "score" last."""
    order = ("local_rel_l2", "local_cos", *DEFAULT_WEIGHTS, "score")
    return [metric for metric in order if all(f"kv_{metric}" in result.arrays for result in results)]


def build_profile(results: list[ClipResult], *, model: str, global_layers: int, image_hw: tuple[int, int],
                  layout: FrameLayout, kv_keep: list[float], query_merge: list[int], options: dict,
                  kv_index: np.ndarray, query_index: np.ndarray,
                  metric: str = "score") -> tuple[Profile, dict[str, np.ndarray]]:
    """The profile of per-clip results (in clip order) and its raw per-clip arrays for profile.npz.

    kv_index, query_index [n_schedules, L]: the additivity schedules the clips were measured with.
    """
    metrics = metric_names(results)
    raw = {f"{kind}_{name}": np.stack([result.arrays[f"{kind}_{name}"] for result in results])
           for kind in ("kv", "query") for name in metrics}
    raw.update({f"additivity_{name}": np.stack([result.arrays[f"additivity_{name}"] for result in results])
                for name in metrics if name not in ("local_rel_l2", "local_cos")})
    kv = {name: summarize(raw[f"kv_{name}"]) for name in metrics}
    query = {name: summarize(raw[f"query_{name}"]) for name in metrics}
    timings = {phase: float(sum(result.timings.get(phase, 0.0) for result in results)) for phase in PHASES}
    timings["clips"] = len(results)
    profile = Profile(
        model=model, global_layers=global_layers, frames=layout.frames, image_hw=tuple(image_hw),
        layout={"n_special": layout.n_special, "grid_h": layout.grid_h, "grid_w": layout.grid_w},
        clips=[result.clip_entry() for result in results], options=options, kv_keep=list(kv_keep),
        query_merge=list(query_merge), metrics=metrics, kv=kv, query=query,
        additivity=additivity_summary(kv_index, query_index, kv_keep, query_merge, raw[f"additivity_{metric}"],
                                      raw[f"kv_{metric}"], raw[f"query_{metric}"]) if len(kv_index) else {},
        asymmetry=asymmetry_summary(kv[metric].mean, list(kv_keep), query[metric].mean, list(query_merge), metric),
        timings=timings,
    )
    raw["clip_sha256"] = np.array([result.sha256 for result in results])
    raw["additivity_kv_index"], raw["additivity_query_index"] = kv_index, query_index
    return profile, raw
