"""The exact optimum of the predicted objective under a FLOP budget: a multiple-choice knapsack.

Each global layer picks one option (a K/V level, or a (K/V, query) pair with per-layer query merging); deviations and
FLOPs add over layers. Dynamic programming over FLOPs discretised into `resolution` units of the budget: rounding every
option's FLOPs *down* gives a relaxation whose optimum bounds the true optimum from below (and is the optimum when it
truly meets the budget); rounding them *up* gives a schedule that truly meets the budget. The resolution grows until
the best schedule meets the bound (the optimum is then proven), or to `max_resolution`, where the gap is reported.
With one global merge level, each level is solved in turn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from spark3r.errors import ParameterError
from spark3r.search.problem import Candidate, SearchProblem

RELATIVE_TOLERANCE = 1e-9
SAFETY = 1e-12  # shrink the capacity of the feasible (rounded-up) pass by this fraction against float round-off


@dataclass(frozen=True)
class KnapsackResult:
    """The best candidate found, its objective and FLOPs fraction, and a proven lower bound on the optimum."""

    candidate: Candidate
    deviation: float
    flops_fraction: float
    lower_bound: float
    resolution: int

    @property
    def exact(self) -> bool:
        return self.deviation - self.lower_bound <= RELATIVE_TOLERANCE * max(1.0, abs(self.deviation))


def _options(problem: SearchProblem) -> list[tuple[np.ndarray, np.ndarray, Callable[[int], tuple[int, int]]]]:
    """(values [L, c], flops [L, c], option index -> (kv, query) index) per independent sub-problem."""
    if problem.per_layer_query:
        n_q = len(problem.query_merge)
        layers = problem.global_layers
        values = (problem.kv_deviation[:, :, None] + problem.query_deviation[:, None, :]).reshape(layers, -1)
        return [(values, problem.layer_flops.reshape(layers, -1), lambda option: divmod(option, n_q))]
    return [(problem.kv_deviation + problem.query_deviation[:, [k]], problem.layer_flops[:, :, k],
             lambda option, k=k: (option, k)) for k in range(len(problem.query_merge))]


def _solve(values: np.ndarray, weights: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """DP over integer weights [L, c] with capacity `resolution`.

    Returns best [resolution + 1] (least total value with total weight <= b) and choice [L, resolution + 1].
    """
    layers, n_options = values.shape
    best = np.zeros(resolution + 1)
    choice = np.zeros((layers, resolution + 1), dtype=np.int32)
    for layer in range(layers):
        candidates = np.full((n_options, resolution + 1), np.inf)
        for option in range(n_options):
            weight = weights[layer, option]
            if weight <= resolution:
                candidates[option, weight:] = best[: resolution + 1 - weight] + values[layer, option]
        choice[layer] = candidates.argmin(axis=0)
        best = candidates[choice[layer], np.arange(resolution + 1)]
    return best, choice


def _backtrack(choice: np.ndarray, weights: np.ndarray, capacity: int) -> list[int]:
    picks = []
    for layer in reversed(range(choice.shape[0])):
        option = int(choice[layer, capacity])
        picks.append(option)
        capacity -= int(weights[layer, option])
    return picks[::-1]


def least_value_levels(values: np.ndarray, weights: np.ndarray, capacity: int) -> list[int] | None:
    """One option per layer (values and integer weights [L, c]) of least summed value with summed weight <=
    `capacity`, or None if no choice fits."""
    best, choice = _solve(values, weights, capacity)
    if not np.isfinite(best[capacity]):
        return None
    return _backtrack(choice, weights, capacity)


def _to_candidate(picks: list[int], index) -> Candidate:
    pairs = [index(option) for option in picks]
    return Candidate(tuple(int(kv) for kv, _ in pairs), tuple(int(query) for _, query in pairs))


def solve_knapsack(problem: SearchProblem, resolution: int = 2048,
                   max_resolution: int = 2**17) -> KnapsackResult:
    """The candidate of least predicted deviation whose FLOPs fraction is at most the problem's budget."""
    budget = problem.budget
    cheapest = problem.cheapest()
    cheapest_fraction = problem.flops_fraction(cheapest)
    if budget < cheapest_fraction:
        raise ParameterError(f"budget {budget:g} is below the cheapest schedule the profile's levels allow "
                             f"({cheapest_fraction:.4g} of dense {problem.budget_of.replace('_', ' ')} FLOPs at "
                             f"{problem.frames} frames): raise `budget` or profile lower K/V keep and higher merge "
                             "levels", "budget")
    capacity = budget * problem.dense_flops - problem.fixed_flops
    while True:
        unit = capacity / resolution
        best, lower_bound = cheapest, math.inf
        for values, flops, index in _options(problem):
            down = np.floor(flops / unit).astype(np.int64)
            up = np.ceil(flops / (unit * (1 - SAFETY))).astype(np.int64)
            for weights in (down, up):
                totals, choice = _solve(values, weights, resolution)
                if weights is down:
                    lower_bound = min(lower_bound, totals[resolution])
                if np.isfinite(totals[resolution]):
                    candidate = _to_candidate(_backtrack(choice, weights, resolution), index)
                    feasible = problem.feasible(candidate)
                    if feasible and problem.deviation(candidate) < problem.deviation(best):
                        best = candidate
        result = KnapsackResult(best, problem.deviation(best), problem.flops_fraction(best), float(lower_bound),
                                resolution)
        if result.exact or resolution >= max_resolution:
            return result
        resolution *= 4


def pareto_front(problem: SearchProblem, points: int = 4096) -> list[tuple[float, float, Candidate]]:
    """The (FLOPs fraction, predicted deviation, candidate) points of least deviation for their cost, cheapest first.

    One DP over the whole cost range with `points` cost units (rounded up), backtracked at every unit.
    """
    capacity = problem.layer_flops.max(axis=(1, 2)).sum()
    unit = capacity / points
    found = {}
    for values, flops, index in _options(problem):
        up = np.ceil(flops / (unit * (1 - SAFETY))).astype(np.int64)
        best, choice = _solve(values, up, points)
        for budget_units in np.flatnonzero(np.isfinite(best) & np.r_[True, best[1:] < best[:-1]]):
            candidate = _to_candidate(_backtrack(choice, up, int(budget_units)), index)
            found[candidate] = (problem.flops_fraction(candidate), problem.deviation(candidate))
    front, least = [], math.inf
    for candidate, (fraction, deviation) in sorted(found.items(), key=lambda item: item[1]):
        if deviation < least:
            front.append((fraction, deviation, candidate))
            least = deviation
    return front
