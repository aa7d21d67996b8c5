"""A whole search-schedule run: the exact optimum of the predicted objective (multiple-choice knapsack), an Optuna
study warm-started with it (resumable: the same request continues it; several workers can share it), optionally the
best candidates measured on held-out clips; the chosen schedule is written as YAML with a plot beside it."""
from __future__ import annotations

import datetime
import shlex
import signal
import sys
import threading
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import optuna
import torch

from spark3r.errors import ParameterError
from spark3r.files import check_output_file
from spark3r.models.base import FlopConfig
from spark3r.models.loading import identified_weights
from spark3r.models.registry import build_model, resolve_model_name
from spark3r.profiler.format import PROFILE_JSON, Profile, load_profile
from spark3r.reduce.flops import global_attention_fraction, model_fraction
from spark3r.schedule import PAPER_KV_METHOD, Budget, Schedule, load_schedule, save_schedule, shipped_schedule
from spark3r.profiler.run import ProfileOptions
from spark3r.search.deploy import search_lengths
from spark3r.search.knapsack import KnapsackResult, pareto_front, solve_knapsack
from spark3r.search.problem import (
    Candidate, SearchProblem, build_problem, candidate_schedule, check_budget, predicted_deviation,
)
from spark3r.search.lengths import deployment_lengths
from spark3r.search.study import (
    WARM_START, completed, default_study_name, is_feasible, join_study, make_sampler, open_study, problem_key,
    ranked_candidates, run_study,
)

LONG_FRAMES = 1000  # the summary also gives every schedule's FLOPs fraction at this many frames
PROFILES_DIR = Path("profiles")
SCHEDULES_DIR = Path("schedules")


@dataclass(frozen=True)
class SearchRequest:
    """What to search: the least predicted `metric` deviation within `budget` (a fraction of dense `budget_of` FLOPs
    at `frames` frames, default the profile's clip length), from `profile` (default: the newest profiles/*/). On a
profile of several clip lengths `frames` may name several deployment lengths (default DEFAULT_LENGTHS) and the search
is length-aware (spark3r.search.deploy).

    sampler / trials / seed: the Optuna study, kept in `storage` (default <out>.journal) under `study` (default
    <model>-b<budget>-<digest>). verify: measure this many best candidates and the best uniform one on the held-out
    clips `calib` with `weights` (default: those the profile used), preprocessed as the profile's clips (or at
    `size`), `max_frames` frames spread over each (default: the profile's frame count) or every `every`-th. model:
    refuse a profile made for another model. out: the schedule
    YAML (default schedules/<model>-b<budget>.yaml). device / dtype / compiled: how `verify` runs the model
    (`load_model`; compiled: blocks and DPT heads through torch.compile).
    """

    budget: float
    profile: str | None = None
    frames: int | tuple[int, ...] | None = None
    budget_of: str = "global_attention"
    sampler: str = "mutation"
    trials: int = 2000
    metric: str = "score"
    per_layer_query: bool = False
    kv_extra_levels: int = 0
    verify: int = 0
    calib: str | None = None
    size: int | None = None
    every: int | None = None
    max_frames: int | None = None
    weights: str | None = None
    model: str | None = None
    storage: str | None = None
    study: str | None = None
    out: str | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    compiled: bool = False


@dataclass
class SearchRun:
    """One search as it ran: the request, the profile, the problem at the budget's frame count and at LONG_FRAMES,
    the knapsack optimum, the study and how many trials ran here."""

    request: SearchRequest
    profile: Profile
    profile_path: Path
    problem: SearchProblem
    long: SearchProblem
    flop_config: FlopConfig
    knapsack: KnapsackResult
    study: optuna.Study
    storage: str
    ran: int


def check_request(request: SearchRequest) -> None:
    check_budget(request.budget)
    for parameter, value, least in (("trials", request.trials, 1), ("verify", request.verify, 0),
                                    ("kv_extra_levels", request.kv_extra_levels, 0)):
        if value < least:
            raise ParameterError(f"`{parameter}` is {value}: give a whole number >= {least}", parameter)
    if request.frames is not None:
        deployment_lengths(request.frames)
    if request.verify and not request.calib:
        raise ParameterError("`verify` needs held-out clips: add `calib` DIR (or synthetic:N[:SEED])", "verify",
                             "calib")


def newest_profile(root: Path = PROFILES_DIR) -> Path:
    """The most recently written profiles/*/profile.json."""
    found = sorted(root.glob(f"*/{PROFILE_JSON}"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise ParameterError(f"no profile given and none found under {root}/: run profile-layers first or pass "
                             "`profile` PATH", "profile")
    return found[-1]


def find_paper_rule(model: str) -> Path | None:
    """The paper-rule schedule of `model`: schedules/<model>-paper.yaml in the working folder, else the shipped one."""
    local = SCHEDULES_DIR / f"{model}-paper.yaml"
    return local if local.is_file() else shipped_schedule(model)


def flops_fraction_of(schedule: Schedule, flop_config: FlopConfig, frames: int, budget_of: str) -> float:
    fraction = global_attention_fraction if budget_of == "global_attention" else model_fraction
    return float(fraction(flop_config, frames, schedule))


def best_uniform(problem: SearchProblem) -> tuple[Candidate | None, list[tuple[float, float]]]:
    """The uniform candidate (one K/V and one query level for all layers) of least deviation within the budget, and
    (fraction, deviation) of every uniform candidate."""
    points, best = [], None
    for kv in range(len(problem.kv_keep)):
        for query in range(len(problem.query_merge)):
            candidate = problem.uniform(kv, query)
            fraction, deviation = problem.flops_fraction(candidate), problem.deviation(candidate)
            points.append((fraction, deviation))
            if fraction <= problem.budget and (best is None or deviation < problem.deviation(best)):
                best = candidate
    return best, points


def describe(run: SearchRun, candidate: Candidate, measured: dict) -> dict:
    """A candidate's predicted deviation, FLOPs fractions, levels and (if verified) measured deviation."""
    problem = run.problem
    row = {"deviation": problem.deviation(candidate), "flops_fraction": problem.flops_fraction(candidate),
           f"flops_fraction_at_{LONG_FRAMES}": run.long.flops_fraction(candidate),
           "kv_keep": [problem.kv_keep[index] for index in candidate.kv],
           "query_merge": [problem.query_merge[index] for index in candidate.query]}
    if candidate in measured:
        row["measured_deviation"] = measured[candidate]
    return row


def spark3r_version() -> str:
    try:
        return version("spark3r")
    except PackageNotFoundError:
        return "unknown"


def remade_command(request: SearchRequest, profile_path: Path, out: Path, storage: str, study_name: str) -> str:
    """The search-schedule command line that reproduces (or resumes) this search."""
    parts = ["search-schedule", "--profile", str(profile_path), "--budget", f"{request.budget:g}", "--budget-of",
             request.budget_of, "--sampler", request.sampler, "--trials", str(request.trials), "--metric",
             request.metric, "--seed", str(request.seed), "--storage", storage, "--study", study_name, "--out",
             str(out)]
    if request.frames is not None:
        parts += ["--frames", ",".join(map(str, deployment_lengths(request.frames)))]
    if request.per_layer_query:
        parts.append("--per-layer-query")
    if request.kv_extra_levels:
        parts += ["--kv-extra-levels", str(request.kv_extra_levels)]
    if request.verify:
        parts += ["--verify", str(request.verify), "--calib", request.calib]
        for flag, value in (("--size", request.size), ("--every", request.every), ("--max-frames", request.max_frames)):
            if value is not None:
                parts += [flag, str(value)]
    return shlex.join(parts)


def interrupt_on_sigterm() -> None:
    """Treat SIGTERM (kill, job schedulers) like Ctrl-C, so the trials run so far are written before exiting."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def search_schedule(request: SearchRequest) -> dict:
    """Search, write the chosen schedule (YAML) and its plot, and return the summary of the search: the knapsack
    optimum, Optuna's best, the best uniform schedule, the paper's rule and the chosen one, each with its predicted
    deviation and FLOPs fractions, the trials and where the schedule and plot were written."""
    check_request(request)
    interrupt_on_sigterm()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    profile_path = Path(request.profile) if request.profile else newest_profile()
    if not request.profile:
        print(f"using the newest profile {profile_path}", file=sys.stderr)
    profile = load_profile(profile_path)
    wanted = resolve_model_name(request.model) if request.model is not None else profile.model
    if wanted != profile.model:
        raise ParameterError(f"profile {profile_path} was made for {profile.model}, not {wanted}: pass a profile of "
                             f"that model or `model` {profile.model}", "model")
    flop_config = build_model(profile.model, device="meta").flop_config(*profile.image_hw)
    if profile.by_length:
        paper_rule = (find_paper_rule(profile.model)
                      if ProfileOptions.of_profile(profile).kv_method == PAPER_KV_METHOD else None)
        return search_lengths(request, profile, profile_path, flop_config, paper_rule)
    lengths = None if request.frames is None else deployment_lengths(request.frames)
    if lengths is not None and len(lengths) > 1:
        raise ParameterError(f"`frames` {list(lengths)} names several lengths, but profile {profile_path} was measured "
                             "at one: profile several (profile-layers --frames 16,32,64 --kv-frames 1,2,4,8)", "frames")
    options = dict(budget=request.budget, frames=None if lengths is None else lengths[0], budget_of=request.budget_of, metric=request.metric,
                   per_layer_query=request.per_layer_query, kv_extra_levels=request.kv_extra_levels)
    problem = build_problem(profile, flop_config, **options)
    long = build_problem(profile, flop_config, **{**options, "frames": LONG_FRAMES})
    knapsack = solve_knapsack(problem)

    default_out = SCHEDULES_DIR / f"{profile.model}-b{request.budget:g}.yaml"
    out = check_output_file(request.out if request.out else default_out, "out")
    storage = request.storage or str(out.with_suffix(".journal"))
    # the study's identity is what the profile measured, so rerunning profile-layers from its cache resumes the study
    study_name = request.study or default_study_name(problem, profile.measurement_sha256, request.sampler)
    study = open_study(storage, study_name, problem_key(problem, profile.measurement_sha256))
    worker, rank = join_study(study, {"sampler": request.sampler, "seed": request.seed})
    ran = run_study(study, problem, request.trials, make_sampler(request.sampler, request.seed + rank), worker,
                    warm_start=knapsack.candidate)
    run = SearchRun(request, profile, profile_path, problem, long, flop_config, knapsack, study, storage, ran)
    ranked = [candidate for candidate, _, _ in ranked_candidates(study, problem)] or [knapsack.candidate]
    chosen, measured = ranked[0], {}
    if request.verify:
        chosen, measured = verify_best(run, ranked[: request.verify], best_uniform(problem)[0])

    result = summarize(run, chosen, measured)
    schedule = candidate_schedule(
        problem, chosen, budget=Budget(request.budget, request.budget_of, problem.frames),
        predicted={"deviation": round(problem.deviation(chosen), 8),
                   "flops_fraction": round(problem.flops_fraction(chosen), 6),
                   f"flops_fraction_at_{LONG_FRAMES}": round(long.flops_fraction(chosen), 6)},
        provenance=provenance(run, study_name, result, measured.get(chosen)))
    header = (f"search-schedule: least predicted deviation ({request.metric}) of {profile.model} within "
              f"{request.budget:g} of dense {request.budget_of.replace('_', ' ')} FLOPs at {problem.frames} frames.\n"
              f"Made by: {remade_command(request, profile_path, out, storage, study_name)}")
    save_schedule(schedule, out, header=header)
    result["schedule"], result["plot"] = str(out), str(out.with_suffix(".png"))
    plot(result, problem, study)
    return result


def verify_best(run: SearchRun, candidates: list[Candidate],
                uniform: Candidate | None) -> tuple[Candidate, dict[Candidate, float]]:
    """Measure `candidates` and the best uniform candidate on the held-out clips; the best measured one and every
    candidate's mean deviation."""
    from spark3r.search.verify import held_out_clips, measure, with_uniform

    request, profile = run.request, run.profile
    candidates = with_uniform(candidates, uniform)
    clips = held_out_clips(profile, request.calib, request.size, request.every, request.max_frames)
    schedules = [candidate_schedule(run.problem, candidate) for candidate in candidates]
    weights = (request.weights if request.weights is not None
               else identified_weights(profile.options.get("weights", "auto")))
    deviations = measure(profile, schedules, clips, device=request.device, dtype=request.dtype,
                         compiled=request.compiled, weights=weights,
                         seed=profile.options.get("seed", request.seed),  # random weights as profiled
                         metric=request.metric).mean(axis=1)
    best = int(np.argmin(deviations))
    return candidates[best], {candidate: float(value) for candidate, value in zip(candidates, deviations)}


def paper_rule_row(run: SearchRun) -> dict | None:
    """The shipped paper-rule schedule of the profile's model as the summary describes it, if there is one that the
    profile's K/V method and layer count fit."""
    profile, problem, request = run.profile, run.problem, run.request
    paper_path = find_paper_rule(profile.model)
    if paper_path is None or problem.options.kv_method != PAPER_KV_METHOD:
        return None
    rule = load_schedule(paper_path)
    if rule.global_layers != profile.global_layers:
        return None
    # resolved at the budget's frame count, like its FLOPs, so both describe one set of per-layer levels
    reductions = rule.reductions(problem.frames)
    return {"schedule": str(paper_path),
            "deviation": predicted_deviation(profile, rule, request.metric, frames=problem.frames),
            "beyond_profile": any(r.kv_keep < min(profile.kv_keep) or r.query_merge > max(profile.query_merge)
                                  for r in reductions),
            "flops_fraction": flops_fraction_of(rule, run.flop_config, problem.frames, request.budget_of),
            f"flops_fraction_at_{LONG_FRAMES}": flops_fraction_of(rule, run.flop_config, LONG_FRAMES,
                                                                  request.budget_of)}


def summarize(run: SearchRun, chosen: Candidate, measured: dict[Candidate, float]) -> dict:
    """The summary `search_schedule` returns (before the schedule and plot paths are added)."""
    request, problem, study = run.request, run.problem, run.study
    uniform, _ = best_uniform(problem)
    sampled = ranked_candidates(study, problem, exclude_source=WARM_START)
    trials = completed(study)
    return {
        "profile": str(run.profile_path), "model": run.profile.model, "budget": request.budget,
        "budget_of": request.budget_of, "frames": problem.frames, "frames_stated": request.frames is not None,
        "metric": request.metric,
        "knapsack": {**describe(run, run.knapsack.candidate, measured), "exact": run.knapsack.exact,
                     "lower_bound": run.knapsack.lower_bound},
        "optuna_best": describe(run, sampled[0][0], measured) if sampled else None,
        "uniform_best": describe(run, uniform, measured) if uniform is not None else None,
        "paper_rule": paper_rule_row(run),
        "chosen": describe(run, chosen, measured),
        "verified": [describe(run, candidate, measured) for candidate in measured],
        "trials": {"total": len(trials), "ran": run.ran, "sampled": len([t for t in trials
                                                                         if t.user_attrs.get("source") != WARM_START]),
                   "feasible": sum(is_feasible(trial) for trial in trials)},
        "study": study.study_name, "storage": run.storage,
    }


def provenance(run: SearchRun, study_name: str, result: dict, measured_deviation: float | None) -> dict:
    request, profile = run.request, run.profile
    record = {
        "profile": str(run.profile_path), "profile_sha256": profile.sha256,
        "clips": [clip.get("name") for clip in profile.clips], "metric": request.metric, "spark3r": spark3r_version(),
        "sampler": request.sampler, "trials": result["trials"]["total"], "seed": request.seed, "study": study_name,
        "storage": run.storage, "knapsack_deviation": round(run.knapsack.deviation, 8),
        "knapsack_exact": run.knapsack.exact,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if measured_deviation is not None:
        record.update({"measured_deviation": round(measured_deviation, 8), "verify_clips": request.calib,
                       "verified_candidates": request.verify})
    return record


def plot(result: dict, problem: SearchProblem, study: optuna.Study) -> None:
    from spark3r.search.plot import save_search_plot

    within, over = [], []
    for trial in completed(study):
        candidate = problem.candidate(trial.params)
        (within if is_feasible(trial) else over).append((problem.flops_fraction(candidate), trial.value))
    _, uniform = best_uniform(problem)
    front = [(fraction, deviation) for fraction, deviation, _ in pareto_front(problem)]
    paper = result["paper_rule"]
    chosen = result["chosen"]
    save_search_plot(result["plot"], front=front, trials=within, infeasible=over, uniform=uniform,
                     chosen=(chosen["flops_fraction"], chosen["deviation"]), budget=problem.budget,
                     paper=None if paper is None else (paper["flops_fraction"], paper["deviation"]),
                     title=f"{problem.model}: predicted {problem.metric} vs FLOPs at {problem.frames} frames",
                     xlabel=f"fraction of dense {problem.budget_of.replace('_', ' ')} FLOPs at {problem.frames} frames")
