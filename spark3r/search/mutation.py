"""A fast Optuna sampler for ordered categorical levels: evolution around the best feasible trials.

Each trial copies a parent drawn (rank-biased) from the best `elite` trials, feasible before infeasible and then by
value, and moves a few parameters one level up or down. Half of the moves are pairs (one parameter up, another down),
which trade cost between layers and so keep a candidate near the budget. Categorical choices are taken in their given
order, so neighbouring choices must be neighbouring levels. The cost per trial is O(n log n) in the trial count, so
thousands of trials take seconds (TPE grows quadratically).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.search_space import IntersectionSearchSpace
from optuna.trial import FrozenTrial, TrialState


class MutationSampler(optuna.samplers.BaseSampler):
    """Mutation around the elite; random sampling for the first `n_startup_trials` trials and for a fraction
    `restart_prob` of trials later (exploration)."""

    def __init__(self, seed: int | None = None, elite: int = 16, n_startup_trials: int = 10,
                 restart_prob: float = 0.02):
        self._rng = np.random.RandomState(seed)
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._elite = elite
        self._n_startup_trials = n_startup_trials
        self._restart_prob = restart_prob
        self._search_space = IntersectionSearchSpace()
        self._known: set[int] = set()
        self._best: list[tuple[tuple[bool, float, float], int, dict]] = []  # (rank key, number, params), best first
        self._seen: set[tuple] = set()

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._random.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {name: distribution for name, distribution in self._search_space.calculate(study).items()
                if isinstance(distribution, CategoricalDistribution) and len(distribution.choices) > 1}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        new = [past for past in trials if past.number not in self._known]
        for past in new:
            self._known.add(past.number)
            self._seen.add(_params_key(past.params))
        if new:
            self._best = sorted(self._best + [(_rank_key(past), past.number, past.params) for past in new],
                                key=lambda entry: entry[:2])[: self._elite]
        if len(trials) < self._n_startup_trials or self._rng.rand() < self._restart_prob:
            return {}
        _, _, parent = self._best[min(int(len(self._best) * self._rng.rand() ** 2), len(self._best) - 1)]
        if any(name not in parent for name in search_space):
            return {}
        names = sorted(search_space)
        for _ in range(32):
            child = self._mutate({name: parent[name] for name in search_space}, names, search_space)
            if _params_key(child) not in self._seen:
                break
        self._seen.add(_params_key(child))
        return child

    def _mutate(self, params: dict, names: list[str], space: dict[str, CategoricalDistribution]) -> dict:
        for _ in range(min(self._rng.geometric(0.5), len(names))):
            if len(names) > 1 and self._rng.rand() < 0.5:
                first, second = self._rng.choice(len(names), size=2, replace=False)
                step = 1 if self._rng.rand() < 0.5 else -1
                moves = ((names[first], step), (names[second], -step))
            else:
                moves = ((names[self._rng.randint(len(names))], 1 if self._rng.rand() < 0.5 else -1),)
            for name, step in moves:
                choices = space[name].choices
                index = choices.index(params[name]) + step
                params[name] = choices[min(max(index, 0), len(choices) - 1)]
        return params

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)


def _rank_key(trial: FrozenTrial) -> tuple[bool, float, float]:
    """(infeasible, total violation, value): feasible trials first, then by least violation, then by value.

    A trial that never set a constraint counts as infeasible with infinite violation."""
    constraints = trial.constraints
    violation = sum(max(0.0, value) for value in constraints.values()) if constraints else math.inf
    return violation > 0, violation, trial.value


def _params_key(params: dict) -> tuple:
    return tuple(sorted(params.items()))
