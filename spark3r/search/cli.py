"""search-schedule: the per-layer schedule with the least predicted deviation under a FLOP budget.

    search-schedule --budget 0.1                      # newest profiles/*/profile.json -> schedules/<model>-b0.1.yaml
    search-schedule --profile P --budget 0.1 --trials 4000 --verify 5 --calib synthetic:4:100
    search-schedule --budget 0.01 --frames 100,300,1000   # a profile of several lengths: spark3r.search.deploy

First the exact optimum of the predicted objective (multiple-choice knapsack), then an Optuna study warm-started with it
(resumable: the same command continues it; several workers can share it), optionally the best candidates measured on
held-out clips; the chosen schedule is written as YAML with a plot beside it.
"""
from __future__ import annotations

import datetime
import json
import shlex
import signal
import sys
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import optuna

from spark3r.cli import ArgumentParser, add_runtime_args, command, resolve_device, resolve_dtype
from spark3r.errors import Spark3rError
from spark3r.models.registry import build_model, resolve_model_name
from spark3r.profiler.format import PROFILE_JSON, Profile, load_profile
from spark3r.reduce.flops import global_attention_fraction, model_fraction
from spark3r.schedule import BUDGET_OF, Budget, Schedule, load_schedule, save_schedule
from spark3r.search.knapsack import KnapsackResult, pareto_front, solve_knapsack
from spark3r.search.lengths import parse_lengths
from spark3r.search.objective import Candidate, SearchProblem, build_problem, candidate_schedule, predicted_deviation
from spark3r.search.study import (
    SAMPLERS, WARM_START, default_study_name, is_feasible, join_study, make_sampler, open_study, problem_key,
    completed, ranked_candidates, run_study,
)

LONG_FRAMES = 1000  # the summary also gives every schedule's FLOPs fraction at this many frames
PROFILES_DIR = Path("profiles")
SCHEDULES_DIR = Path("schedules")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="search-schedule", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None,
                        help="profile.json (or its folder); default: the newest profiles/*/profile.json here")
    parser.add_argument("--budget", type=float, required=True,
                        help="largest allowed fraction of dense FLOPs, in (0, 1]")
    parser.add_argument("--frames", default=None,
                        help="deployment length(s) at which the budget is counted, e.g. 1000 or 100,300,1000 "
                             "(several need a profile of several lengths); default: 1000 for a profile of several "
                             "lengths, else the profile's clip length")
    parser.add_argument("--budget-of", default="global_attention", choices=BUDGET_OF,
                        help="what the budget is a fraction of: global attention (QK^T and AV) or the whole model")
    parser.add_argument("--sampler", default="mutation", choices=SAMPLERS,
                        help="mutation: evolution around the best trials (fast); tpe, nsga2, gp: Optuna's")
    parser.add_argument("--trials", type=int, default=2000, help="total trials the study should hold")
    parser.add_argument("--metric", default="score", help="profile metric to minimise")
    parser.add_argument("--per-layer-query", action="store_true",
                        help="a query merge level per layer (default: one level for all layers)")
    parser.add_argument("--kv-extra-levels", type=int, default=0,
                        help="K/V keep levels offered between each pair of measured ones (interpolated)")
    parser.add_argument("--verify", type=int, default=0, metavar="K",
                        help="measure the K best candidates on the --calib clips (cut to the longest --frames for a "
                             "profile of several lengths) and export the best measured one")
    parser.add_argument("--calib", default=None,
                        help="held-out clips for --verify (folder, clip or synthetic:N[:SEED])")
    parser.add_argument("--weights", default=None, help="weights for --verify (default: those the profile used)")
    parser.add_argument("--model", default=None, help="refuse a profile made for another model")
    parser.add_argument("--storage", default=None,
                        help="study storage: a journal file path or a database URL (default: <out>.journal)")
    parser.add_argument("--study", default=None, help="study name (default: <model>-b<budget>-<problem digest>)")
    parser.add_argument("--out", default=None, help="schedule YAML (default: schedules/<model>-b<budget>.yaml)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    add_runtime_args(parser)
    return parser


def check_args(args) -> None:
    if not 0 < args.budget <= 1:
        raise Spark3rError(f"--budget {args.budget:g} is not a fraction of dense FLOPs: give a number in (0, 1], "
                           "e.g. --budget 0.1")
    for flag, value, least in (("--trials", args.trials, 1), ("--verify", args.verify, 0),
                               ("--kv-extra-levels", args.kv_extra_levels, 0)):
        if value < least:
            raise Spark3rError(f"{flag} is {value}: give a whole number >= {least}")
    if args.verify and not args.calib:
        raise Spark3rError("--verify needs held-out clips: add --calib DIR (or synthetic:N[:SEED])")


def newest_profile(root: Path = PROFILES_DIR) -> Path:
    """The most recently written profiles/*/profile.json."""
    found = sorted(root.glob(f"*/{PROFILE_JSON}"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise Spark3rError(f"no profile given and none found under {root}/: run profile-layers first or pass "
                           "--profile PATH")
    return found[-1]


def paper_rule_of(profile: Profile) -> Path | None:
    """The paper's rule to compare with: shipped for the model and comparable (the profile prunes by frame stride)."""
    if profile.options.get("kv_method", "frame_stride") != "frame_stride":
        return None
    return find_paper_rule(profile.model)


def find_paper_rule(model: str) -> Path | None:
    """The shipped paper-rule schedule of `model` (schedules/<model>-paper.yaml here or in the source tree)."""
    package = Path(__file__).resolve().parents[1]
    for folder in (SCHEDULES_DIR, package / "schedules", package.parent / "schedules"):
        path = folder / f"{model}-paper.yaml"
        if path.is_file():
            return path
    return None


def flops_fraction_of(schedule: Schedule, flop_config, frames: int, budget_of: str) -> float:
    fraction = global_attention_fraction if budget_of == "global_attention" else model_fraction
    return float(fraction(flop_config, frames, schedule))


def best_uniform(problem: SearchProblem, budget: float) -> tuple[Candidate | None, list[tuple[float, float]]]:
    """The uniform candidate (one K/V and one query level for all layers) of least deviation within the budget, and
    (fraction, deviation) of every uniform candidate."""
    points, best = [], None
    for kv in range(len(problem.kv_keep)):
        for query in range(len(problem.query_merge)):
            candidate = problem.uniform(kv, query)
            fraction, deviation = problem.flops_fraction(candidate), problem.deviation(candidate)
            points.append((fraction, deviation))
            if fraction <= budget and (best is None or deviation < problem.deviation(best)):
                best = candidate
    return best, points


def describe(problem: SearchProblem, long: SearchProblem, candidate: Candidate, measured: dict) -> dict:
    """A candidate's predicted deviation, FLOPs fractions, levels and (if verified) measured deviation."""
    row = {"deviation": problem.deviation(candidate), "flops_fraction": problem.flops_fraction(candidate),
           f"flops_fraction_at_{LONG_FRAMES}": long.flops_fraction(candidate),
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


def remade_command(args, profile_path: Path, out: Path, storage: str, study_name: str) -> str:
    """The command line that reproduces (or resumes) this search."""
    parts = ["search-schedule", "--profile", str(profile_path), "--budget", f"{args.budget:g}", "--budget-of",
             args.budget_of, "--sampler", args.sampler, "--trials", str(args.trials), "--metric", args.metric,
             "--seed", str(args.seed), "--storage", storage, "--study", study_name, "--out", str(out)]
    if args.frames is not None:
        parts += ["--frames", str(args.frames)]
    if args.per_layer_query:
        parts.append("--per-layer-query")
    if args.kv_extra_levels:
        parts += ["--kv-extra-levels", str(args.kv_extra_levels)]
    if args.verify:
        parts += ["--verify", str(args.verify), "--calib", args.calib]
    return shlex.join(parts)


def table(result: dict) -> str:
    """The short human summary."""
    n = result["frames"]
    lines = [f"search-schedule: {result['model']}, budget {result['budget']:g} of dense "
             f"{result['budget_of'].replace('_', ' ')} FLOPs at {n} frames"
             f"{'' if result['frames_stated'] else ' (the profile clip length, the default: pass --frames)'}; "
             f"profile {result['profile']}",
             f"{'':34} {'deviation':>10} {f'FLOPs@{n}':>10} {f'FLOPs@{LONG_FRAMES}':>11} {'measured':>9}"]
    paper = result["paper_rule"]
    rows = [("knapsack optimum" + (" (exact)" if result["knapsack"]["exact"] else " (not proven)"), result["knapsack"]),
            (f"optuna best of {result['trials']['sampled']} sampled trials", result["optuna_best"]),
            ("best uniform schedule", result["uniform_best"]),
            ("paper's rule" + (" (*)" if paper and paper["beyond_profile"] else ""), paper),
            ("chosen", result["chosen"])]
    for name, row in rows:
        if row is None:
            continue
        measured = row.get("measured_deviation")
        lines.append(f"{name:34} {row['deviation']:10.5f} {row['flops_fraction']:10.4f} "
                     f"{row[f'flops_fraction_at_{LONG_FRAMES}']:11.4f} "
                     f"{'' if measured is None else format(measured, '9.5f'):>9}")
    if paper and paper["beyond_profile"]:
        lines.append(f"(*) at {n} frames the paper's rule reduces beyond the profile's levels: its deviation is "
                     "read at the end levels, an underestimate")
    chosen = result["chosen"]
    lines.append("layer  " + " ".join(f"{layer:>6}" for layer in range(len(chosen["kv_keep"]))))
    lines.append("kv     " + " ".join(f"{keep:6.3g}" for keep in chosen["kv_keep"]))
    lines.append("query  " + " ".join(f"{merge:6d}" for merge in chosen["query_merge"]))
    trials = result["trials"]
    lines.append(f"study {result['study']} in {result['storage']}: {trials['total']} trials ({trials['ran']} run now, "
                 f"{trials['feasible']} within budget)")
    lines.append(f"wrote {result['schedule']} and {result['plot']}")
    return "\n".join(lines)


def interrupt_on_sigterm() -> None:
    """Treat SIGTERM (kill, job schedulers) like Ctrl-C, so the trials run so far are written before exiting."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    interrupt_on_sigterm()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    profile_path = Path(args.profile) if args.profile else newest_profile()
    if not args.profile:
        print(f"using the newest profile {profile_path}", file=sys.stderr)
    profile = load_profile(profile_path)
    wanted = resolve_model_name(args.model) if args.model is not None else profile.model
    if wanted != profile.model:
        raise Spark3rError(f"profile {profile_path} was made for {profile.model}, not {wanted}: pass a profile of "
                           f"that model or --model {profile.model}")
    flop_config = build_model(profile.model, device="meta").flop_config(*profile.image_hw)
    if profile.by_length:
        from spark3r.search import deploy

        deploy.print_result(deploy.run(args, profile, profile_path, flop_config, paper_rule_of(profile)), args.json)
        return 0
    lengths = None if args.frames is None else parse_lengths(args.frames)
    if lengths is not None and len(lengths) > 1:
        raise Spark3rError(f"--frames {args.frames} names several lengths, but profile {profile_path} was measured at "
                           "one: profile several (profile-layers --frames 16,32,64 --kv-frames 1,2,4,8)")
    options = dict(frames=None if lengths is None else lengths[0], budget_of=args.budget_of, metric=args.metric,
                   per_layer_query=args.per_layer_query, kv_extra_levels=args.kv_extra_levels)
    problem = build_problem(profile, flop_config, **options)
    long = build_problem(profile, flop_config, **{**options, "frames": LONG_FRAMES})
    knapsack = solve_knapsack(problem, args.budget)

    out = Path(args.out) if args.out else SCHEDULES_DIR / f"{profile.model}-b{args.budget:g}.yaml"
    storage = args.storage or str(out.with_suffix(".journal"))
    study_name = args.study or default_study_name(problem, args.budget, profile.sha256, args.sampler)
    study = open_study(storage, study_name, problem_key(problem, args.budget, profile.sha256))
    worker, rank = join_study(study, {"sampler": args.sampler, "seed": args.seed})
    ran = run_study(study, problem, args.budget, args.trials, make_sampler(args.sampler, args.seed + rank), worker,
                    warm_start=knapsack.candidate)
    ranked = [candidate for candidate, _, _ in ranked_candidates(study, problem, args.budget)] or [knapsack.candidate]
    sampled = ranked_candidates(study, problem, args.budget, exclude_source=WARM_START)
    chosen, measured = ranked[0], {}
    if args.verify:
        chosen, measured = verify_best(args, profile, problem, ranked[: args.verify])

    result = summarize(args, profile, profile_path, problem, long, knapsack, study, storage, sampled, chosen, measured,
                       flop_config, ran)
    schedule = candidate_schedule(
        problem, chosen, budget=Budget(args.budget, args.budget_of, problem.frames),
        predicted={"deviation": round(problem.deviation(chosen), 8),
                   "flops_fraction": round(problem.flops_fraction(chosen), 6),
                   f"flops_fraction_at_{LONG_FRAMES}": round(long.flops_fraction(chosen), 6)},
        provenance=provenance(args, profile, profile_path, study_name, storage, knapsack, result, measured.get(chosen)))
    header = (f"search-schedule: least predicted deviation ({args.metric}) of {profile.model} within "
              f"{args.budget:g} of dense {args.budget_of.replace('_', ' ')} FLOPs at {problem.frames} frames.\n"
              f"Made by: {remade_command(args, profile_path, out, storage, study_name)}")
    save_schedule(schedule, out, header=header)
    result["schedule"], result["plot"] = str(out), str(out.with_suffix(".png"))
    plot(result, problem, study, args.budget)
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


def verify_best(args, profile: Profile, problem: SearchProblem,
                candidates: list[Candidate]) -> tuple[Candidate, dict[Candidate, float]]:
    """Measure `candidates` on the held-out clips; the best measured one and every candidate's mean deviation."""
    from spark3r.profiler.cli import profiled_weights
    from spark3r.search.verify import held_out_clips, measure

    device = resolve_device(args.device)
    clips = held_out_clips(profile, args.calib)
    schedules = [candidate_schedule(problem, candidate) for candidate in candidates]
    weights = args.weights if args.weights is not None else profiled_weights(profile.options.get("weights", "auto"))
    deviations = measure(profile, schedules, clips, device=device, dtype=resolve_dtype(args.dtype, device),
                         weights=weights, seed=profile.options.get("seed", args.seed),  # random weights as profiled
                         metric=args.metric).mean(axis=1)
    best = int(np.argmin(deviations))
    return candidates[best], {candidate: float(value) for candidate, value in zip(candidates, deviations)}


def summarize(args, profile, profile_path, problem, long, knapsack: KnapsackResult, study, storage, sampled, chosen,
              measured, flop_config, ran) -> dict:
    """Everything --json prints (the table shows most of it)."""
    uniform, _ = best_uniform(problem, args.budget)
    paper = None
    paper_path = paper_rule_of(profile)
    if paper_path is not None:
        rule = load_schedule(paper_path)
        if rule.global_layers == profile.global_layers:
            # resolved at the budget's frame count, like its FLOPs, so both describe one set of per-layer levels
            reductions = rule.reductions(problem.frames)
            paper = {"schedule": str(paper_path),
                     "deviation": predicted_deviation(profile, rule, args.metric, frames=problem.frames),
                     "beyond_profile": any(r.kv_keep < min(profile.kv_keep) or r.query_merge > max(profile.query_merge)
                                           for r in reductions),
                     "flops_fraction": flops_fraction_of(rule, flop_config, problem.frames, args.budget_of),
                     f"flops_fraction_at_{LONG_FRAMES}": flops_fraction_of(rule, flop_config, LONG_FRAMES,
                                                                           args.budget_of)}
    trials = completed(study)
    return {
        "profile": str(profile_path), "model": profile.model, "budget": args.budget, "budget_of": args.budget_of,
        "frames": problem.frames, "frames_stated": args.frames is not None, "metric": args.metric,
        "knapsack": {**describe(problem, long, knapsack.candidate, measured), "exact": knapsack.exact,
                     "lower_bound": knapsack.lower_bound},
        "optuna_best": describe(problem, long, sampled[0][0], measured) if sampled else None,
        "uniform_best": describe(problem, long, uniform, measured) if uniform is not None else None,
        "paper_rule": paper,
        "chosen": describe(problem, long, chosen, measured),
        "verified": [describe(problem, long, candidate, measured) for candidate in measured],
        "trials": {"total": len(trials), "ran": ran, "sampled": len([t for t in trials
                                                                     if t.user_attrs.get("source") != WARM_START]),
                   "feasible": sum(is_feasible(trial) for trial in trials)},
        "study": study.study_name, "storage": storage,
    }


def provenance(args, profile: Profile, profile_path: Path, study_name: str, storage: str, knapsack: KnapsackResult,
               result: dict, measured_deviation: float | None) -> dict:
    record = {
        "profile": str(profile_path), "profile_sha256": profile.sha256,
        "clips": [clip.get("name") for clip in profile.clips], "metric": args.metric, "spark3r": spark3r_version(),
        "sampler": args.sampler, "trials": result["trials"]["total"], "seed": args.seed, "study": study_name,
        "storage": storage, "knapsack_deviation": round(knapsack.deviation, 8), "knapsack_exact": knapsack.exact,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if measured_deviation is not None:
        record.update({"measured_deviation": round(measured_deviation, 8), "verify_clips": args.calib,
                       "verified_candidates": args.verify})
    return record


def plot(result: dict, problem: SearchProblem, study, budget: float) -> None:
    from spark3r.search.plot import save_search_plot

    within, over = [], []
    for trial in completed(study):
        candidate = problem.candidate(trial.params)
        (within if is_feasible(trial) else over).append((problem.flops_fraction(candidate), trial.value))
    _, uniform = best_uniform(problem, budget)
    front = [(fraction, deviation) for fraction, deviation, _ in pareto_front(problem)]
    paper = result["paper_rule"]
    chosen = result["chosen"]
    save_search_plot(result["plot"], front=front, trials=within, infeasible=over, uniform=uniform,
                     chosen=(chosen["flops_fraction"], chosen["deviation"]), budget=budget,
                     paper=None if paper is None else (paper["flops_fraction"], paper["deviation"]),
                     title=f"{problem.model}: predicted {problem.metric} vs FLOPs at {problem.frames} frames",
                     xlabel=f"fraction of dense {problem.budget_of.replace('_', ' ')} FLOPs at {problem.frames} frames")


if __name__ == "__main__":
    sys.exit(main())
