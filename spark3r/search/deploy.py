"""search-schedule on a profile of several clip lengths: a length-aware schedule for the lengths a user deploys at.

    search-schedule --budget 0.01 --frames 1000          # within 1% of dense global attention FLOPs at 1000 frames
    search-schedule --budget 0.05 --frames 100,300,1000 --verify 4 --calib clips/

The search (spark3r.search.lengths) is exact per length and needs no Optuna study; --verify K runs the K best
candidates on held-out clips of the longest deployment length and exports the best measured one.
"""
from __future__ import annotations

import datetime
import json
import shlex
from pathlib import Path

import numpy as np

from spark3r.cli import resolve_device, resolve_dtype
from spark3r.errors import Spark3rError
from spark3r.models.base import FlopConfig
from spark3r.profiler.format import Profile
from spark3r.reduce.flops import global_attention_fraction, model_fraction
from spark3r.schedule import Budget, Schedule, load_schedule, save_schedule
from spark3r.search.lengths import (
    DEFAULT_LENGTHS, REPORT_LENGTHS, LengthCandidate, LengthProblem, best_uniform, build_length_problem,
    parse_lengths, profile_length_model, schedule_deviation, search,
)


def describe(schedule: Schedule, model, flop_config: FlopConfig, lengths: list[int], budget_of: str) -> dict:
    """FLOPs fraction and predicted deviation of a schedule at each length."""
    fraction = global_attention_fraction if budget_of == "global_attention" else model_fraction
    return {"flops_fraction": {str(s): float(fraction(flop_config, s, schedule)) for s in lengths},
            "deviation": {str(s): schedule_deviation(model, schedule, flop_config, s) for s in lengths}}


def levels(problem: LengthProblem, candidate: LengthCandidate) -> dict:
    return {"kv_frames": [problem.kv_frames[j] for j in candidate.kv],
            "query_merge": {str(s): problem.query_merge[k] for s, k in zip(problem.lengths, candidate.merge)}}


def run(args, profile: Profile, profile_path: Path, flop_config: FlopConfig, paper_rule: Path | None) -> dict:
    """Search, optionally verify, export; returns the summary (what --json prints)."""
    stated = args.frames is not None
    lengths = parse_lengths(args.frames) if stated else DEFAULT_LENGTHS
    model = profile_length_model(profile, args.metric, f"profile {profile_path}")
    problem = build_length_problem(profile, flop_config, lengths, budget_of=args.budget_of, metric=args.metric)
    ranked = search(problem, args.budget)
    if not ranked:
        lightest = LengthCandidate((0,) * problem.global_layers, (len(problem.query_merge) - 1,) * len(lengths))
        cheapest = float(problem.flops_fractions(lightest).max())
        raise Spark3rError(f"no schedule meets budget {args.budget:g} at every length of {list(lengths)} frames (the "
                           f"cheapest reaches {cheapest:.4g}): raise --budget or profile higher query merge levels")
    chosen, measured = ranked[0], {}
    if args.verify:
        chosen, measured = verify(args, profile, problem, ranked[: args.verify], max(lengths))
    shown = sorted({*(entry["frames"] for entry in profile.by_length), *REPORT_LENGTHS, *lengths})
    schedule = problem.schedule(chosen)
    rows = {"chosen": {**levels(problem, chosen), **describe(schedule, model, flop_config, shown, args.budget_of)}}
    if chosen in measured:
        rows["chosen"]["measured_deviation"] = measured[chosen]
    uniform = best_uniform(problem, args.budget)
    if uniform is not None:
        rows["uniform_best"] = {**levels(problem, uniform),
                                **describe(problem.schedule(uniform), model, flop_config, shown, args.budget_of)}
    if paper_rule is not None:
        rule = load_schedule(paper_rule)
        if rule.global_layers == profile.global_layers:
            rows["paper_rule"] = {"schedule": str(paper_rule),
                                  **describe(rule, model, flop_config, shown, args.budget_of)}
    out = Path(args.out) if args.out else Path("schedules") / f"{profile.model}-b{args.budget:g}-f{lengths[-1]}.yaml"
    predicted = {f"{name}_at_{s}": round(rows["chosen"][key][str(s)], 8)
                 for s in lengths for name, key in (("flops_fraction", "flops_fraction"), ("deviation", "deviation"))}
    schedule = problem.schedule(chosen, budget=Budget(args.budget, args.budget_of, max(lengths)), predicted=predicted,
                                provenance=provenance(args, profile, profile_path, lengths, model, measured.get(chosen)))
    header = (f"search-schedule: least predicted deviation ({args.metric}) of {profile.model} within {args.budget:g} "
              f"of dense {args.budget_of.replace('_', ' ')} FLOPs at each of {', '.join(map(str, lengths))} frames, "
              f"predicted by the length model of a profile at {profile_lengths(profile)} frames.\n"
              f"Made by: {remade_command(args, profile_path, out)}")
    save_schedule(schedule, out, header=header)
    return {"profile": str(profile_path), "model": profile.model, "budget": args.budget, "budget_of": args.budget_of,
            "metric": args.metric, "frames": list(lengths), "frames_stated": stated,
            "profiled_frames": profile_lengths(profile), "length_model": {"form": profile.length_model[args.metric]
                                                                            ["form"], "held_out": model.held_out},
            "candidates": len(ranked), **rows,
            "verified": [{**levels(problem, c), "measured_deviation": value} for c, value in measured.items()],
            "schedule": str(out)}


def profile_lengths(profile: Profile) -> list[int]:
    return [entry["frames"] for entry in profile.by_length]


def verify(args, profile: Profile, problem: LengthProblem, candidates: list[LengthCandidate],
           frames: int) -> tuple[LengthCandidate, dict]:
    """Measure `candidates` on held-out clips of `frames` frames; the best measured one and every measurement."""
    from spark3r.profiler.cli import profiled_weights
    from spark3r.search.verify import held_out_clips, measure

    device = resolve_device(args.device)
    clips = held_out_clips(profile, args.calib, frames=frames)
    weights = args.weights if args.weights is not None else profiled_weights(profile.options.get("weights", "auto"))
    deviations = measure(profile, [problem.schedule(c) for c in candidates], clips, device=device,
                         dtype=resolve_dtype(args.dtype, device), weights=weights,
                         seed=profile.options.get("seed", args.seed), metric=args.metric).mean(axis=1)
    return candidates[int(np.argmin(deviations))], {c: float(v) for c, v in zip(candidates, deviations)}


def provenance(args, profile: Profile, profile_path: Path, lengths, model, measured: float | None) -> dict:
    record = {"profile": str(profile_path), "profile_sha256": profile.sha256, "profiled_frames": profile_lengths(profile),
              "deployment_frames": list(lengths), "metric": args.metric, "search": "knapsack per length",
              "length_model_held_out_rmse_log": model.held_out.get("all", {}).get("rmse_log"),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if measured is not None:
        record.update({"measured_deviation": round(measured, 8), "verify_clips": args.calib,
                       "verify_frames": max(lengths), "verified_candidates": args.verify})
    return record


def remade_command(args, profile_path: Path, out: Path) -> str:
    parts = ["search-schedule", "--profile", str(profile_path), "--budget", f"{args.budget:g}", "--budget-of",
             args.budget_of, "--metric", args.metric, "--out", str(out)]
    if args.frames is not None:
        parts += ["--frames", args.frames]
    if args.verify:
        parts += ["--verify", str(args.verify), "--calib", args.calib]
    return shlex.join(parts)


def table(result: dict) -> str:
    """The human summary: FLOPs fraction and predicted deviation at the profiled, report and deployment lengths."""
    lengths = result["frames"]
    held = result["length_model"]["held_out"]["all"]
    lines = [f"search-schedule: {result['model']}, budget {result['budget']:g} of dense "
             f"{result['budget_of'].replace('_', ' ')} FLOPs at each deployment length: {', '.join(map(str, lengths))}"
             f" frames" + ("" if result["frames_stated"] else " (the default; pass --frames to choose)"),
             f"profile {result['profile']} at {result['profiled_frames']} frames; length model held out at "
             f"{result['length_model']['held_out']['frames']} frames: RMSE of log {_num(held['rmse_log'])}, median "
             f"relative error {_num(held['median_relative_error'])}, Spearman {_num(held['spearman'])}"]
    shown = list(result["chosen"]["flops_fraction"])
    lines.append(f"{'FLOPs fraction / predicted ' + result['metric'] + ' at S frames':42} "
                 + " ".join(f"{'S=' + s + ('*' if int(s) in lengths else ''):>15}" for s in shown))
    for name, key in (("chosen", "chosen"), ("best uniform (one K/V level)", "uniform_best"),
                      ("paper's rule", "paper_rule")):
        row = result.get(key)
        if row is None:
            continue
        lines.append(f"{name:42} " + " ".join(f"{row['flops_fraction'][s]:7.4f}/{row['deviation'][s]:<7.4f}"
                                               for s in shown))
    chosen = result["chosen"]
    lines.append("* deployment lengths; predictions beyond " + str(max(result["profiled_frames"])) +
                 " frames are the length model's extrapolation")
    lines.append("K/V frames per layer: " + " ".join("all" if n is None else str(n) for n in chosen["kv_frames"]))
    lines.append("query merge per band (up to S frames): " +
                 ", ".join(f"{s}: {m}" for s, m in chosen["query_merge"].items()))
    if "measured_deviation" in chosen:
        lines.append(f"measured {result['metric']} at {max(lengths)} frames on the --verify clips: "
                     f"{chosen['measured_deviation']:.5f} (best of {len(result['verified'])} candidates)")
    lines.append(f"wrote {result['schedule']}")
    return "\n".join(lines)


def _num(value) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def print_result(result: dict, as_json: bool) -> None:
    print(json.dumps(result, indent=1) if as_json else table(result))
