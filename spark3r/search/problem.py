"""The search problem: a profile's predicted deviation and the FLOPs of every per-layer choice (the Optuna objective
that samples it is in spark3r.search.study).

The predicted deviation of a schedule is the sum over global layers of `kv[metric](keep_l) + query[metric](merge_l)`,
each read off the profile's per-layer table and interpolated linearly in log(level) between measured levels (clamped
to the end levels outside them). Costs come from `spark3r.reduce.flops` at the budget's frame count.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from spark3r.errors import ParameterError, Spark3rError
from spark3r.models.base import FlopConfig
from spark3r.profiler.format import Profile
from spark3r.profiler.run import ProfileOptions
from spark3r.reduce.flops import layer_attention_flops, layer_overhead_flops, model_flops, skipped_projection_flops
from spark3r.reduce.reduction import Reduction
from spark3r.schedule import BUDGET_OF, Budget, KVSpec, LayerSpec, QuerySpec, Schedule

STRIDE_METHODS = ("frame_stride", "grid")  # methods that use the integer factor round(1 / keep)


def interpolate(table: np.ndarray, levels: Sequence[float], at: Sequence[float]) -> np.ndarray:
    """Per-layer values of `table` [L, n] (column j measured at levels[j]) at the levels `at` [m] -> [L, m].

    Linear in log(level) between measured levels; the end levels' values outside them.
    """
    order = np.argsort(levels)
    x = np.log(np.asarray(levels, dtype=np.float64)[order])
    targets = np.log(np.asarray(at, dtype=np.float64))
    return np.stack([np.interp(targets, x, row[order]) for row in np.asarray(table, dtype=np.float64)])


def kv_levels(measured: Sequence[float], extra_per_gap: int, method: str) -> tuple[float, ...]:
    """The K/V keep levels to offer, descending: the measured ones plus `extra_per_gap` geometric steps in each gap
    between neighbours (snapped to 1 / integer factor for the stride methods; duplicates dropped)."""
    measured = sorted(set(float(keep) for keep in measured), reverse=True)
    levels = set(measured)
    for high, low in zip(measured, measured[1:]):
        for keep in np.geomspace(high, low, extra_per_gap + 2)[1:-1]:
            levels.add(1.0 / round(1.0 / keep) if method in STRIDE_METHODS else float(keep))
    return tuple(sorted(levels, reverse=True))


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: per global layer, an index into `kv_keep` and one into `query_merge`."""

    kv: tuple[int, ...]
    query: tuple[int, ...]


@dataclass
class SearchProblem:
    """Every per-layer choice with its predicted deviation and its FLOPs at `frames` frames.

    kv_keep [n_kv]: offered K/V keep levels, descending from 1.0; query_merge [n_q]: merge levels, ascending from 1.
    kv_deviation [L, n_kv], query_deviation [L, n_q]: predicted deviation of each layer at each level.
    layer_flops [L, n_kv, n_q]: FLOPs of layer l at (keep j, merge k) that the budget counts.
    fixed_flops: budgeted FLOPs no choice changes; dense_flops: the dense total the budget is a fraction of.
    per_layer_query: every layer picks its own merge level (else one level for all layers).
    budget: the largest allowed FLOPs fraction (`within` gives the same problem under another budget).
    options: what the profile was measured with: every layer's Reduction is `options.reduction(keep, merge)`.
    """

    model: str
    frames: int
    budget_of: str
    metric: str
    kv_keep: tuple[float, ...]
    query_merge: tuple[int, ...]
    per_layer_query: bool
    kv_deviation: np.ndarray
    query_deviation: np.ndarray
    layer_flops: np.ndarray
    fixed_flops: float
    dense_flops: float
    options: ProfileOptions
    budget: float = 1.0

    @property
    def global_layers(self) -> int:
        return self.kv_deviation.shape[0]

    def deviation(self, candidate: Candidate) -> float:
        layers = np.arange(self.global_layers)
        return float(self.kv_deviation[layers, candidate.kv].sum()
                     + self.query_deviation[layers, candidate.query].sum())

    def flops_fraction(self, candidate: Candidate) -> float:
        layers = np.arange(self.global_layers)
        return float((self.fixed_flops + self.layer_flops[layers, candidate.kv, candidate.query].sum())
                     / self.dense_flops)

    def feasible(self, candidate: Candidate) -> bool:
        """The candidate's FLOPs fraction is within the budget."""
        return self.flops_fraction(candidate) <= self.budget

    def within(self, budget: float) -> "SearchProblem":
        """This problem under another budget."""
        return replace(self, budget=check_budget(budget))

    def cheapest(self) -> Candidate:
        """The candidate of least FLOPs."""
        layers = self.global_layers
        if self.per_layer_query:
            flat = self.layer_flops.reshape(layers, -1).argmin(axis=1)
            kv, query = np.divmod(flat, len(self.query_merge))
            return Candidate(tuple(int(j) for j in kv), tuple(int(k) for k in query))
        query = int(self.layer_flops.min(axis=1).sum(axis=0).argmin())
        return Candidate(tuple(int(j) for j in self.layer_flops[:, :, query].argmin(axis=1)), (query,) * layers)

    def uniform(self, kv_index: int, query_index: int) -> Candidate:
        """Every layer at the same K/V and query level."""
        return Candidate((kv_index,) * self.global_layers, (query_index,) * self.global_layers)

    def params(self, candidate: Candidate) -> dict:
        """The Optuna parameters of `candidate` (level values, not indices)."""
        params = {f"kv_keep.{layer}": self.kv_keep[index] for layer, index in enumerate(candidate.kv)}
        if self.per_layer_query:
            params.update({f"query_merge.{layer}": self.query_merge[index]
                           for layer, index in enumerate(candidate.query)})
        else:
            params["query_merge"] = self.query_merge[candidate.query[0]]
        return params

    def candidate(self, params: dict) -> Candidate:
        """The candidate of Optuna parameters written by `params`."""
        kv = tuple(self.kv_keep.index(params[f"kv_keep.{layer}"]) for layer in range(self.global_layers))
        if self.per_layer_query:
            query = tuple(self.query_merge.index(params[f"query_merge.{layer}"]) for layer in range(self.global_layers))
        else:
            query = (self.query_merge.index(params["query_merge"]),) * self.global_layers
        return Candidate(kv, query)

    def reductions(self, candidate: Candidate) -> list[Reduction]:
        """The Reduction of every global layer."""
        return [self.options.reduction(kv_keep=self.kv_keep[kv], query_merge=self.query_merge[query])
                for kv, query in zip(candidate.kv, candidate.query)]


def check_budget(budget: float) -> float:
    if not 0 < budget <= 1:
        raise ParameterError(f"`budget` {budget:g} is not a fraction of dense FLOPs: give a number in (0, 1], "
                             "e.g. `budget` 0.1", "budget")
    return budget


def build_problem(profile: Profile, flop_config: FlopConfig, *, budget: float = 1.0, frames: int | None = None,
                  budget_of: str = "global_attention", metric: str = "score", per_layer_query: bool = False,
                  kv_extra_levels: int = 0) -> SearchProblem:
    """The search problem of `profile` under `budget` (a fraction of the dense `budget_of` FLOPs) with FLOPs counted
    at `frames` frames (default: the profile's clip length)."""
    check_budget(budget)
    frames = profile.frames if frames is None else frames
    if frames < 1:
        raise ParameterError(f"`frames` must be a positive number of frames, got {frames}", "frames")
    if budget_of not in BUDGET_OF:
        raise ParameterError(f"`budget_of` must be one of {', '.join(BUDGET_OF)}, got {budget_of!r}", "budget_of")
    if metric not in profile.kv or metric not in profile.query:
        raise ParameterError(f"the profile has no {metric!r} tables: pick `metric` from {', '.join(profile.metrics)}",
                             "metric")
    options = ProfileOptions.of_profile(profile)
    keep_levels = kv_levels(profile.kv_keep, kv_extra_levels, options.kv_method)
    merge_levels = tuple(sorted(profile.query_merge))
    costs = np.empty((len(keep_levels), len(merge_levels)))
    for j, keep in enumerate(keep_levels):
        for k, merge in enumerate(merge_levels):
            reduction = options.reduction(kv_keep=keep, query_merge=merge)
            costs[j, k] = layer_attention_flops(flop_config, frames, reduction)
            if budget_of == "model":  # the merging layer's projection runs on its merged queries
                costs[j, k] += (layer_overhead_flops(flop_config, frames, reduction)
                                - skipped_projection_flops(flop_config, frames, reduction))
    layers = profile.global_layers
    dense_layer = layer_attention_flops(flop_config, frames)
    if budget_of == "model":
        dense = model_flops(flop_config, frames).total
        fixed = dense - layers * dense_layer
    else:
        dense, fixed = layers * dense_layer, 0.0
    return SearchProblem(
        model=profile.model, frames=frames, budget_of=budget_of, metric=metric, kv_keep=keep_levels,
        query_merge=merge_levels, per_layer_query=per_layer_query,
        kv_deviation=interpolate(profile.kv[metric].mean, profile.kv_keep, keep_levels),
        query_deviation=interpolate(profile.query[metric].mean, profile.query_merge, merge_levels),
        layer_flops=np.broadcast_to(costs, (layers, *costs.shape)).copy(), fixed_flops=float(fixed),
        dense_flops=float(dense), options=options, budget=budget)


def predicted_deviation(profile: Profile, schedule: Schedule, metric: str = "score",
                        frames: int | None = None) -> float:
    """The profile's predicted deviation of `schedule`, resolved at `frames` frames (default: the profile's clip
    length); levels beyond the measured ones take the end level's value."""
    if schedule.model != profile.model or schedule.global_layers != profile.global_layers:
        raise Spark3rError(f"the schedule is for {schedule.model} ({schedule.global_layers} global layers) but the "
                           f"profile for {profile.model} ({profile.global_layers}): use a profile of the same model")
    reductions = schedule.reductions(profile.frames if frames is None else frames)
    keep = interpolate(profile.kv[metric].mean, profile.kv_keep, [r.kv_keep for r in reductions])
    merge = interpolate(profile.query[metric].mean, profile.query_merge, [r.query_merge for r in reductions])
    layers = np.arange(profile.global_layers)
    return float(keep[layers, layers].sum() + merge[layers, layers].sum())


def candidate_schedule(problem: SearchProblem, candidate: Candidate, budget: Budget | None = None,
                       predicted: dict | None = None, provenance: dict | None = None) -> Schedule:
    """The schedule of `candidate`: the most common level pair as the default, the other layers as overrides."""
    kv = [problem.kv_keep[index] for index in candidate.kv]
    merge = [problem.query_merge[index] for index in candidate.query]
    default_keep = max(sorted(set(kv), reverse=True), key=kv.count)
    default_merge = max(sorted(set(merge)), key=merge.count)
    options = problem.options
    default = LayerSpec(kv=KVSpec(keep=default_keep, method=options.kv_method,
                                  keep_reference_frame=options.keep_reference_frame),
                        query=QuerySpec(merge=default_merge, group_frames=options.group_frames))
    layers = {}
    for layer, (keep, layer_merge) in enumerate(zip(kv, merge)):
        override = LayerSpec(kv=KVSpec(keep=keep if keep != default_keep else None),
                             query=QuerySpec(merge=layer_merge if layer_merge != default_merge else None))
        if override != LayerSpec():
            layers[layer] = override
    return Schedule(model=problem.model, global_layers=problem.global_layers, default=default, layers=layers,
                    budget=budget, predicted=dict(predicted or {}), provenance=dict(provenance or {}))
