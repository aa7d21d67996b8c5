"""The per-layer schedule with the least predicted deviation under a FLOP budget (`search_schedule` in
spark3r.search.pipeline runs a whole search; the console script search-schedule is spark3r.commands.search_schedule)."""
from spark3r.search.knapsack import KnapsackResult, pareto_front, solve_knapsack
from spark3r.search.problem import (
    Candidate, SearchProblem, build_problem, candidate_schedule, interpolate, predicted_deviation,
)

__all__ = ["Candidate", "KnapsackResult", "SearchProblem", "build_problem", "candidate_schedule", "interpolate",
           "pareto_front", "predicted_deviation", "solve_knapsack"]
