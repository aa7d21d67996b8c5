"""How a layer's deviation changes with the clip length: a per-layer power law fitted to profiles of several lengths.

For clip length S, a layer whose K/V keeps n frames' worth of patches (n < S), or whose queries are merged by m > 1:

    kv deviation    d = exp(a) * S^b * n^c * (1 - n/S)^e          (log-linear in 1, log S, log n, log(1 - n/S))
    query deviation d = exp(a) * S^b * (1 - 1/m)^e                 (log-linear in 1, log S, log(1 - 1/m))

fitted by least squares on log d over every profiled (length, level) cell with d > 0 (log 0 is undefined); a dense
level (n >= S or m = 1) predicts 0. A feature that does not vary over the fitted cells (e.g. log S when one length is
fitted) gets exponent 0. The fit error is measured on the longest profiled length, fitted on the others.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spark3r.errors import Spark3rError
from spark3r.profiler.aggregate import spearman

LOG_ZERO = -1000.0  # the intercept of a layer that never deviates: exp(-1000) is exactly 0.0 in float64
KV_FEATURES = ("1", "log S", "log n", "log(1 - n/S)")
QUERY_FEATURES = ("1", "log S", "log(1 - 1/m)")
FORM = ("per layer: kv deviation = exp(a) S^b n^c (1 - n/S)^e (n: frames of K/V kept, S: clip length); query "
        "deviation = exp(a) S^b (1 - 1/m)^e (m: query merge factor); least squares on log deviation")


@dataclass(frozen=True)
class Cells:
    """Profiled single-layer deviations of one kind: frames [n], level [n] (kept K/V frames, or merge factor) and
    value [L, n] (deviation of each layer at each cell)."""

    frames: np.ndarray
    level: np.ndarray
    value: np.ndarray

    def where(self, mask: np.ndarray) -> "Cells":
        return Cells(self.frames[mask], self.level[mask], self.value[:, mask])


def kv_design(frames, kept) -> np.ndarray:
    """Features [..., 4] of K/V cells (kept < frames)."""
    frames, kept = np.broadcast_arrays(np.asarray(frames, dtype=np.float64), np.asarray(kept, dtype=np.float64))
    return np.stack([np.ones_like(frames), np.log(frames), np.log(kept), np.log1p(-kept / frames)], axis=-1)


def query_design(frames, merge) -> np.ndarray:
    """Features [..., 3] of query cells (merge > 1)."""
    frames, merge = np.broadcast_arrays(np.asarray(frames, dtype=np.float64), np.asarray(merge, dtype=np.float64))
    return np.stack([np.ones_like(frames), np.log(frames), np.log1p(-1.0 / merge)], axis=-1)


def fit_log_linear(design: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Per-layer least squares of log value on the features: design [n, p], value [L, n] -> coefficients [L, p].

    Each layer uses its cells with value > 0; columns after the first (the intercept) that are constant over those
    cells get coefficient 0. A layer with no positive cell predicts 0 everywhere (intercept LOG_ZERO).
    """
    layers, features = value.shape[0], design.shape[1]
    coefficients = np.zeros((layers, features))
    for layer in range(layers):
        positive = value[layer] > 0
        if not positive.any():
            coefficients[layer, 0] = LOG_ZERO
            continue
        rows = design[positive]
        varying = [0] + [j for j in range(1, features) if np.ptp(rows[:, j]) > 1e-12]
        solution, *_ = np.linalg.lstsq(rows[:, varying], np.log(value[layer, positive]), rcond=None)
        coefficients[layer, varying] = solution
    return coefficients


def evaluate(coefficients: np.ndarray, design: np.ndarray, reduced: np.ndarray) -> np.ndarray:
    """exp(design @ coefficients) per layer where `reduced`, else 0: coefficients [L, p], design [..., p] -> [L, ...]."""
    log_value = np.einsum("lp,...p->l...", coefficients, np.where(np.isfinite(design), design, 0.0))
    return np.where(reduced, np.exp(log_value), 0.0)


@dataclass(frozen=True)
class LengthModel:
    """The fitted per-layer power laws of one metric. kv [L, 4], query [L, 3]: coefficients on KV_FEATURES /
    QUERY_FEATURES; fitted_lengths: the clip lengths fitted; held_out: the fit error at a profiled length left out."""

    metric: str
    kv: np.ndarray
    query: np.ndarray
    fitted_lengths: tuple[int, ...]
    held_out: dict

    @property
    def global_layers(self) -> int:
        return self.kv.shape[0]

    def kv_deviation(self, frames, kept) -> np.ndarray:
        """Predicted deviation [L, ...] of each layer alone keeping `kept` frames of K/V at clip length `frames`."""
        frames, kept = np.broadcast_arrays(np.asarray(frames, dtype=np.float64), np.asarray(kept, dtype=np.float64))
        kept = np.minimum(kept, frames)
        with np.errstate(divide="ignore"):
            return evaluate(self.kv, kv_design(frames, kept), kept < frames)

    def query_deviation(self, frames, merge) -> np.ndarray:
        """Predicted deviation [L, ...] of each layer alone with its queries merged by `merge` at `frames`."""
        frames, merge = np.broadcast_arrays(np.asarray(frames, dtype=np.float64), np.asarray(merge, dtype=np.float64))
        with np.errstate(divide="ignore"):
            return evaluate(self.query, query_design(frames, merge), merge > 1)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "form": FORM, "kv_features": list(KV_FEATURES),
                "query_features": list(QUERY_FEATURES), "kv": self.kv.tolist(), "query": self.query.tolist(),
                "fitted_lengths": list(self.fitted_lengths), "held_out": self.held_out}

    @classmethod
    def from_dict(cls, doc: dict, global_layers: int, source: str = "profile") -> "LengthModel":
        try:
            kv = np.asarray(doc["kv"], dtype=np.float64)
            query = np.asarray(doc["query"], dtype=np.float64)
            model = cls(str(doc["metric"]), kv, query, tuple(int(s) for s in doc["fitted_lengths"]),
                        dict(doc.get("held_out") or {}))
        except (TypeError, ValueError, KeyError):
            raise Spark3rError(f"{source} has a malformed length_model: rerun profile-layers") from None
        if kv.shape != (global_layers, len(KV_FEATURES)) or query.shape != (global_layers, len(QUERY_FEATURES)):
            raise Spark3rError(f"{source} length_model.{model.metric} has coefficients of shape {list(kv.shape)} and "
                               f"{list(query.shape)}, not {global_layers} layers x {len(KV_FEATURES)} and "
                               f"{len(QUERY_FEATURES)}: rerun profile-layers")
        return model


def fit_cells(kv: Cells, query: Cells) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients [L, 4] and [L, 3] of K/V and query cells (dense cells are left out)."""
    kv = kv.where(kv.level < kv.frames)
    query = query.where(query.level > 1)
    return (fit_log_linear(kv_design(kv.frames, kv.level), kv.value),
            fit_log_linear(query_design(query.frames, query.level), query.value))


def fit_error(predicted: np.ndarray, measured: np.ndarray) -> dict:
    """RMSE of the natural log (cells where both are > 0), median relative error and Spearman over all cells."""
    predicted, measured = predicted.ravel(), measured.ravel()
    positive = (predicted > 0) & (measured > 0)
    log_error = np.log(predicted[positive]) - np.log(measured[positive])
    relative = np.abs(predicted - measured)[measured > 0] / measured[measured > 0]
    return {"cells": int(measured.size), "rmse_log": float(np.sqrt(np.mean(log_error**2))) if positive.any() else None,
            "median_relative_error": float(np.median(relative)) if relative.size else None,
            "spearman": spearman(measured, predicted)}


def fit_length_model(metric: str, kv: Cells, query: Cells) -> LengthModel:
    """Fit every layer on all cells; the error is that of a fit without the longest length, at the longest length."""
    lengths = sorted({int(s) for s in np.concatenate([kv.frames, query.frames])})
    if len(lengths) < 2:
        raise Spark3rError(f"a length model needs profiles at two clip lengths at least, got {lengths}: pass e.g. "
                           "--frames 16,32,64")
    longest = lengths[-1]
    train = fit_cells(kv.where(kv.frames < longest), query.where(query.frames < longest))
    partial = LengthModel(metric, *train, tuple(lengths[:-1]), {})
    test_kv = kv.where((kv.frames == longest) & (kv.level < kv.frames))
    test_query = query.where((query.frames == longest) & (query.level > 1))
    predicted_kv = partial.kv_deviation(test_kv.frames, test_kv.level)
    predicted_query = partial.query_deviation(test_query.frames, test_query.level)
    held_out = {"frames": longest, "fitted_on": lengths[:-1],
                "kv": fit_error(predicted_kv, test_kv.value), "query": fit_error(predicted_query, test_query.value),
                "all": fit_error(np.concatenate([predicted_kv, predicted_query], axis=1),
                                 np.concatenate([test_kv.value, test_query.value], axis=1))}
    return LengthModel(metric, *fit_cells(kv, query), tuple(lengths), held_out)
