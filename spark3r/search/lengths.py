"""Length-aware schedules: per layer a number of K/V frames, a query merge factor per length band, within a FLOP
budget at every deployment length, predicted by the profile's length model (spark3r.profiler.length_model).

A candidate keeps N_l frames of K/V on layer l (a schedule's `kv: {frames: N}`: keep 1 / ceil(S / N) at S frames; or
all of them) and merges queries by m_b in band b (`query.merge: {S_1: m_1, ..., else: m_n}`: band b holds the lengths
up to the b-th deployment length S_b, the last band everything beyond). Its predicted deviation at S is the sum over
layers of the fitted single-layer K/V and query deviations there; the objective is the mean over the deployment
lengths. The FLOPs of a layer depend only on its levels, so for a fixed merge per band the search is a
multiple-choice knapsack with one constraint per length: it is solved exactly for each length's constraint alone
(FLOPs rounded up to 1/`RESOLUTION` of that budget, so the result truly meets it), and where the result breaks another
length's budget, again with that budget scaled down (bisection) until it meets them all. Merge factors may only grow
with the length (the paper's rule does the same), and every non-decreasing choice of them is tried.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from spark3r.errors import ParameterError, Spark3rError
from spark3r.models.base import FlopConfig
from spark3r.profiler.format import Profile
from spark3r.profiler.length_model import LengthModel
from spark3r.profiler.lengths import kept_frames, length_models
from spark3r.profiler.run import ProfileOptions
from spark3r.reduce.flops import frame_layout, layer_attention_flops, layer_overhead_flops, model_flops
from spark3r.schedule import BUDGET_OF, KVSpec, LayerSpec, QuerySpec, Schedule, Stepped
from spark3r.search.knapsack import SAFETY, least_value_levels

DEFAULT_LENGTHS = (1000,)  # the deployment length when --frames is not given (the paper's headline length)
REPORT_LENGTHS = (100, 300, 1000)  # the summary's lengths beside the profiled and deployment ones
KV_FRAME_LEVELS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
RESOLUTION = 1024
BISECTIONS = 12


def parse_lengths(text: str) -> tuple[int, ...]:
    """"100,300,1000" -> (100, 300, 1000): distinct whole numbers >= 1, ascending."""
    items = [item.strip() for item in str(text).split(",")]
    if not all(item.isdigit() and int(item) >= 1 for item in items):
        raise ParameterError(f"`frames` {text!r} must list whole numbers of frames >= 1, e.g. 1000 or 100,300,1000",
                             "frames")
    return tuple(sorted({int(item) for item in items}))


def deployment_lengths(frames: int | tuple[int, ...]) -> tuple[int, ...]:
    """One length or several -> distinct lengths, ascending; each must be >= 1."""
    lengths = (frames,) if isinstance(frames, int) else tuple(frames)
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise ParameterError(f"`frames` is {frames}: give whole numbers of frames >= 1, e.g. 1000 or (100, 300, 1000)",
                             "frames")
    return tuple(sorted(set(lengths)))


@dataclass(frozen=True)
class LengthCandidate:
    """kv [L]: an index into `kv_frames` per layer; merge [n_lengths]: an index into `query_merge` per band."""

    kv: tuple[int, ...]
    merge: tuple[int, ...]


@dataclass
class LengthProblem:
    """Every choice's predicted deviation and FLOPs at each deployment length.

    kv_frames [J]: K/V levels in kept frames (None: all K/V); query_merge [K]: merge levels, from 1.
    kv_deviation [n, L, J], query_deviation [n, L, K]: predicted single-layer deviation at each length.
    layer_flops [n, J, K]: the budgeted FLOPs of one layer at each length; fixed_flops, dense_flops [n].
    """

    model: str
    lengths: tuple[int, ...]
    budget_of: str
    metric: str
    kv_frames: tuple[int | None, ...]
    query_merge: tuple[int, ...]
    kv_deviation: np.ndarray
    query_deviation: np.ndarray
    layer_flops: np.ndarray
    fixed_flops: np.ndarray
    dense_flops: np.ndarray
    options: ProfileOptions

    @property
    def global_layers(self) -> int:
        return self.kv_deviation.shape[1]

    def deviations(self, candidate: LengthCandidate) -> np.ndarray:
        """Predicted deviation at each deployment length [n]."""
        layers = np.arange(self.global_layers)
        kv = self.kv_deviation[:, layers, candidate.kv].sum(axis=1)
        query = np.array([self.query_deviation[s, :, k].sum() for s, k in enumerate(candidate.merge)])
        return kv + query

    def deviation(self, candidate: LengthCandidate) -> float:
        return float(self.deviations(candidate).mean())

    def flops_fractions(self, candidate: LengthCandidate) -> np.ndarray:
        """FLOPs fraction at each deployment length [n]."""
        kv = np.asarray(candidate.kv)
        layer = np.array([self.layer_flops[s, kv, k].sum() for s, k in enumerate(candidate.merge)])
        return (self.fixed_flops + layer) / self.dense_flops

    def schedule(self, candidate: LengthCandidate, **extra) -> Schedule:
        """The schedule of `candidate`: the most common K/V level as the default, the other layers as overrides."""
        levels = [self.kv_frames[j] for j in candidate.kv]
        default = max(sorted(set(levels), key=lambda n: math.inf if n is None else n), key=levels.count)
        options = self.options

        def kv_spec(frames: int | None, **settings) -> KVSpec:
            return KVSpec(keep=1.0, **settings) if frames is None else KVSpec(frames=frames, **settings)

        spec = LayerSpec(kv=kv_spec(default, method=options.kv_method,
                                    keep_reference_frame=options.keep_reference_frame),
                         query=QuerySpec(merge=merge_steps(self.lengths, [self.query_merge[k] for k in candidate.merge]),
                                         group_frames=options.group_frames))
        layers = {layer: LayerSpec(kv=kv_spec(frames)) for layer, frames in enumerate(levels) if frames != default}
        return Schedule(model=self.model, global_layers=self.global_layers, default=spec, layers=layers, **extra)


def merge_steps(lengths: tuple[int, ...], merges: list[int]) -> int | Stepped:
    """The merge factor of each band as a schedule value: one integer, or a step map with a threshold wherever the
    factor changes ((100, 300, 1000), [1, 2, 2] -> {100: 1, else: 2})."""
    if len(set(merges)) == 1:
        return merges[0]
    steps = tuple((length, merge) for length, merge, following in zip(lengths, merges, merges[1:]) if merge != following)
    return Stepped(steps, merges[-1])


def kv_frame_levels(lengths: tuple[int, ...]) -> tuple[int | None, ...]:
    """The K/V frame counts offered: KV_FRAME_LEVELS below the longest deployment length, then all K/V (None)."""
    return (*(n for n in KV_FRAME_LEVELS if n < max(lengths)), None)


def kv_keep(frames: int, kept: int | None) -> float:
    """The keep of `kv: {frames: kept}` at `frames` frames (1 for all K/V)."""
    return 1.0 if kept is None else 1.0 / math.ceil(frames / kept)


def profile_length_model(profile: Profile, metric: str, source: str = "profile") -> LengthModel:
    models = length_models(profile, source)
    if not models:
        raise Spark3rError(f"{source} was profiled at one clip length ({profile.frames} frames), so it cannot predict "
                           "other lengths: profile several, e.g. profile-layers --frames 16,32,64 --kv-frames 1,2,4,8")
    if metric not in models:
        raise ParameterError(f"{source} has no length model of {metric!r}: pick `metric` from {', '.join(models)}",
                             "metric")
    return models[metric]


def build_length_problem(profile: Profile, flop_config: FlopConfig, lengths: tuple[int, ...], *,
                         budget_of: str = "global_attention", metric: str = "score") -> LengthProblem:
    """The length-aware search problem of a profile of several lengths, at the deployment `lengths`."""
    if budget_of not in BUDGET_OF:
        raise ParameterError(f"`budget_of` must be one of {', '.join(BUDGET_OF)}, got {budget_of!r}", "budget_of")
    model = profile_length_model(profile, metric)
    options = ProfileOptions.of_profile(profile)
    kv_levels, merges = kv_frame_levels(lengths), tuple(sorted(profile.query_merge))
    kv_deviation = np.empty((len(lengths), profile.global_layers, len(kv_levels)))
    query_deviation = np.empty((len(lengths), profile.global_layers, len(merges)))
    costs = np.empty((len(lengths), len(kv_levels), len(merges)))
    fixed, dense = np.empty(len(lengths)), np.empty(len(lengths))
    for s, frames in enumerate(lengths):
        layout = frame_layout(flop_config, frames)
        kept = [kept_frames(layout, options.reduction(kv_keep(frames, n))) for n in kv_levels]
        kv_deviation[s] = model.kv_deviation(frames, kept)
        query_deviation[s] = model.query_deviation(frames, merges)
        for j, n in enumerate(kv_levels):
            for k, merge in enumerate(merges):
                reduction = options.reduction(kv_keep(frames, n), merge)
                costs[s, j, k] = layer_attention_flops(flop_config, frames, reduction)
                if budget_of == "model":
                    costs[s, j, k] += layer_overhead_flops(flop_config, frames, reduction)
        dense_layer = layer_attention_flops(flop_config, frames)
        dense[s] = model_flops(flop_config, frames).total if budget_of == "model" \
            else profile.global_layers * dense_layer
        fixed[s] = dense[s] - profile.global_layers * dense_layer if budget_of == "model" else 0.0
    return LengthProblem(profile.model, tuple(lengths), budget_of, metric, kv_levels, merges, kv_deviation,
                         query_deviation, costs, fixed, dense, options)


def merge_choices(problem: LengthProblem) -> list[tuple[int, ...]]:
    """Every non-decreasing merge level index per band."""
    return list(itertools.combinations_with_replacement(range(len(problem.query_merge)), len(problem.lengths)))


def _least(values: np.ndarray, costs: np.ndarray, capacity: float) -> list[int] | None:
    """The per-layer levels [L] of least summed value with summed cost <= capacity (costs [J] the same for every
    layer, rounded up to 1/RESOLUTION of the capacity), or None if none fits."""
    if capacity <= 0:
        return None
    weights = np.ceil(costs / (capacity / RESOLUTION * (1 - SAFETY))).astype(np.int64)
    weights = np.broadcast_to(weights, values.shape)
    return least_value_levels(values, weights, RESOLUTION)


def search(problem: LengthProblem, budget: float) -> list[LengthCandidate]:
    """Candidates within `budget` at every deployment length, least predicted deviation first (distinct)."""
    capacity = budget * problem.dense_flops - problem.fixed_flops
    found: set[LengthCandidate] = set()
    for merge in merge_choices(problem):
        values = problem.kv_deviation.mean(axis=0)
        costs = [problem.layer_flops[s, :, k] for s, k in enumerate(merge)]
        for primary in range(len(problem.lengths)):
            low, high, scale = 0.0, 1.0, 1.0
            for _ in range(BISECTIONS + 1):
                picks = _least(values, costs[primary], scale * capacity[primary])
                candidate = None if picks is None else LengthCandidate(tuple(picks), merge)
                if candidate is not None and (problem.flops_fractions(candidate) <= budget).all():
                    found.add(candidate)
                    if scale == 1.0:
                        break
                    low = scale
                else:
                    high = scale
                scale = (low + high) / 2
    return sorted(found, key=lambda candidate: (problem.deviation(candidate), candidate.merge, candidate.kv))


def best_uniform(problem: LengthProblem, budget: float) -> LengthCandidate | None:
    """The candidate with one K/V level on every layer (and merges per band) of least deviation within budget."""
    uniform = [LengthCandidate((j,) * problem.global_layers, merge)
               for j in range(len(problem.kv_frames)) for merge in merge_choices(problem)]
    feasible = [candidate for candidate in uniform if (problem.flops_fractions(candidate) <= budget).all()]
    return min(feasible, key=problem.deviation, default=None)


def schedule_deviation(model: LengthModel, schedule: Schedule, flop_config: FlopConfig, frames: int) -> float:
    """Predicted deviation of any schedule at `frames` frames: the sum of its layers' fitted deviations there."""
    layout = frame_layout(flop_config, frames)
    total = 0.0
    for layer, reduction in enumerate(schedule.reductions(frames)):
        total += float(model.kv_deviation(frames, kept_frames(layout, reduction))[layer])
        total += float(model.query_deviation(frames, reduction.query_merge)[layer])
    return total
