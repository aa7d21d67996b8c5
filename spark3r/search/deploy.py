"""A search-schedule run on a profile of several clip lengths: a length-aware schedule for the lengths a user deploys
at (e.g. `frames=(100, 300, 1000)`), exported as YAML.

The search (spark3r.search.lengths) is exact per length and needs no Optuna study; `verify` K runs the K best
candidates and the best uniform one on held-out clips of the longest deployment length and exports the best measured
one.
"""
from __future__ import annotations

import datetime
import shlex
from pathlib import Path

import numpy as np

from spark3r.errors import ParameterError
from spark3r.files import check_output_file
from spark3r.models.base import FlopConfig
from spark3r.models.loading import identified_weights
from spark3r.profiler.format import Profile
from spark3r.reduce.flops import global_attention_fraction, model_fraction
from spark3r.schedule import Budget, Schedule, load_schedule, save_schedule
from spark3r.search.lengths import (
    DEFAULT_LENGTHS, REPORT_LENGTHS, LengthCandidate, LengthProblem, best_uniform, build_length_problem,
    deployment_lengths, profile_length_model, schedule_deviation, search,
)


def describe(schedule: Schedule, model, flop_config: FlopConfig, lengths: list[int], budget_of: str) -> dict:
    """FLOPs fraction and predicted deviation of a schedule at each length."""
    fraction = global_attention_fraction if budget_of == "global_attention" else model_fraction
    return {"flops_fraction": {str(s): float(fraction(flop_config, s, schedule)) for s in lengths},
            "deviation": {str(s): schedule_deviation(model, schedule, flop_config, s) for s in lengths}}


def levels(problem: LengthProblem, candidate: LengthCandidate) -> dict:
    return {"kv_frames": [problem.kv_frames[j] for j in candidate.kv],
            "query_merge": {str(s): problem.query_merge[k] for s, k in zip(problem.lengths, candidate.merge)}}


def search_lengths(request, profile: Profile, profile_path: Path, flop_config: FlopConfig,
                   paper_rule: Path | None) -> dict:
    """Search `profile` (of several lengths) as `request` (a spark3r.search.pipeline.SearchRequest) asks, at its
    deployment lengths (default DEFAULT_LENGTHS), optionally verify, export the schedule; returns the summary, with
    `paper_rule` (a schedule file, or None) beside it."""
    stated = request.frames is not None
    lengths = deployment_lengths(request.frames) if stated else DEFAULT_LENGTHS
    model = profile_length_model(profile, request.metric, f"profile {profile_path}")
    problem = build_length_problem(profile, flop_config, lengths, budget_of=request.budget_of, metric=request.metric)
    ranked = search(problem, request.budget)
    if not ranked:
        lightest = LengthCandidate((0,) * problem.global_layers, (len(problem.query_merge) - 1,) * len(lengths))
        cheapest = float(problem.flops_fractions(lightest).max())
        raise ParameterError(f"no schedule meets budget {request.budget:g} at every length of {list(lengths)} frames (the "
                             f"cheapest reaches {cheapest:.4g}): raise `budget` or profile higher query merge levels",
                             "budget")
    chosen, measured = ranked[0], {}
    uniform = best_uniform(problem, request.budget)
    if request.verify:
        chosen, measured = verify(request, profile, problem, ranked[: request.verify], uniform, max(lengths))
    shown = sorted({*(entry["frames"] for entry in profile.by_length), *REPORT_LENGTHS, *lengths})
    schedule = problem.schedule(chosen)
    rows = {"chosen": {**levels(problem, chosen), **describe(schedule, model, flop_config, shown, request.budget_of)}}
    if chosen in measured:
        rows["chosen"]["measured_deviation"] = measured[chosen]
    if uniform is not None:
        rows["uniform_best"] = {**levels(problem, uniform),
                                **describe(problem.schedule(uniform), model, flop_config, shown, request.budget_of)}
        if uniform in measured:
            rows["uniform_best"]["measured_deviation"] = measured[uniform]
    if paper_rule is not None:
        rule = load_schedule(paper_rule)
        if rule.global_layers == profile.global_layers:
            rows["paper_rule"] = {"schedule": str(paper_rule),
                                  **describe(rule, model, flop_config, shown, request.budget_of)}
    default_out = Path("schedules") / f"{profile.model}-b{request.budget:g}-f{lengths[-1]}.yaml"
    out = check_output_file(request.out if request.out else default_out, "out")
    predicted = {f"{name}_at_{s}": round(rows["chosen"][key][str(s)], 8)
                 for s in lengths for name, key in (("flops_fraction", "flops_fraction"), ("deviation", "deviation"))}
    schedule = problem.schedule(chosen, budget=Budget(request.budget, request.budget_of, max(lengths)), predicted=predicted,
                                provenance=provenance(request, profile, profile_path, lengths, model, measured.get(chosen)))
    header = (f"search-schedule: least predicted deviation ({request.metric}) of {profile.model} within {request.budget:g} "
              f"of dense {request.budget_of.replace('_', ' ')} FLOPs at each of {', '.join(map(str, lengths))} frames, "
              f"predicted by the length model of a profile at {profile_lengths(profile)} frames.\n"
              f"Made by: {remade_command(request, profile_path, out, lengths)}")
    save_schedule(schedule, out, header=header)
    return {"length_aware": True, "profile": str(profile_path), "model": profile.model, "budget": request.budget,
            "budget_of": request.budget_of, "metric": request.metric, "frames": list(lengths), "frames_stated": stated,
            "profiled_frames": profile_lengths(profile), "length_model": {"form": profile.length_model[request.metric]
                                                                            ["form"], "held_out": model.held_out},
            "candidates": len(ranked), **rows,
            "verified": [{**levels(problem, c), "measured_deviation": value} for c, value in measured.items()],
            "schedule": str(out)}


def profile_lengths(profile: Profile) -> list[int]:
    return [entry["frames"] for entry in profile.by_length]


def verify(request, profile: Profile, problem: LengthProblem, candidates: list[LengthCandidate],
           uniform: LengthCandidate | None, frames: int) -> tuple[LengthCandidate, dict]:
    """Measure `candidates` and the best uniform candidate on held-out clips of `frames` frames; the best measured
    one and every measurement."""
    from spark3r.search.verify import held_out_clips, measure, with_uniform

    candidates = with_uniform(candidates, uniform)
    clips = held_out_clips(profile, request.calib, frames=frames)
    weights = request.weights if request.weights is not None else identified_weights(profile.options.get("weights", "auto"))
    deviations = measure(profile, [problem.schedule(c) for c in candidates], clips, device=request.device,
                         dtype=request.dtype, compiled=request.compiled, weights=weights,
                         seed=profile.options.get("seed", request.seed), metric=request.metric).mean(axis=1)
    return candidates[int(np.argmin(deviations))], {c: float(v) for c, v in zip(candidates, deviations)}


def provenance(request, profile: Profile, profile_path: Path, lengths, model, measured: float | None) -> dict:
    record = {"profile": str(profile_path), "profile_sha256": profile.sha256, "profiled_frames": profile_lengths(profile),
              "deployment_frames": list(lengths), "metric": request.metric, "search": "knapsack per length",
              "length_model_held_out_rmse_log": model.held_out.get("all", {}).get("rmse_log"),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if measured is not None:
        record.update({"measured_deviation": round(measured, 8), "verify_clips": request.calib,
                       "verify_frames": max(lengths), "verified_candidates": request.verify})
    return record


def remade_command(request, profile_path: Path, out: Path, lengths: tuple[int, ...]) -> str:
    parts = ["search-schedule", "--profile", str(profile_path), "--budget", f"{request.budget:g}", "--budget-of",
             request.budget_of, "--metric", request.metric, "--out", str(out)]
    if request.frames is not None:
        parts += ["--frames", ",".join(map(str, lengths))]
    if request.verify:
        parts += ["--verify", str(request.verify), "--calib", request.calib]
    return shlex.join(parts)
