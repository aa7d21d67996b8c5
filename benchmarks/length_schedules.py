"""Profile on short clips, search and check at the deployment length: length-aware schedules vs the paper's rule and
the best uniform schedule, on held-out clips with ground truth.

    python benchmarks/length_schedules.py --device cuda          # -> benchmarks/results/length-schedules.{md,json}
    OMP_NUM_THREADS=2 python benchmarks/length_schedules.py --profile-frames 8,16 --frames 32 --held-out \
        synthetic:4:300:walk --random 6 --out /tmp/length-small    # a small CPU run

1. `profile-layers --frames P1,P2,.. --kv-frames ..` on the calibration clips (every profiled length <= 64 frames).
2. Budgets: the paper's rule's fraction of dense global-attention FLOPs at the deployment length F (--frames), and
   2x and 0.5x that. At each: searched = `search-schedule --budget B --frames F` (with --verify K on the --replica
   clips at F frames when K > 0); uniform = one K/V frame count and one merge factor on every layer, FLOPs within 5% of
   the searched schedule's, the best of them (measured on the --replica clips like the searched one's candidates when
   K > 0, else predicted); paper = the paper's rule (at 2x and 0.5x its K/V frame count and merge factor rescaled to
   FLOPs within 5% of the searched schedule's).
3. Every schedule on the --held-out clips at F frames: deviation from dense (the profile's score) and ground-truth
   errors (depth AbsRel, ATE, AUC@30), paired over clips with the Wilcoxon signed-rank test (two-sided; gain / loss
   when p < 0.05).
4. Prediction at F: Spearman between the length model's predicted and the measured mean deviation of --random random
   length-aware schedules.
5. With --deployment-profile (a profile-layers run at F frames on other clips), where the prediction errs: the length
   model's single-layer deviations at F against that profile's, layer by layer, and the random schedules' measured
   deviation against the sum of that profile's own single-layer laws (fitted at F alone), which shows how far
   layers' deviations add up.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
import tiny_schedules as tiny  # noqa: E402  (measuring and ground-truth errors: shared with that benchmark)

from spark3r.commands.arguments import command, resolve_device, resolve_dtype  # noqa: E402
from spark3r.errors import Spark3rError  # noqa: E402
from spark3r.files import write_atomic  # noqa: E402
from spark3r.models.loading import load_model  # noqa: E402
from spark3r.models.registry import resolve_model_name  # noqa: E402
from spark3r.commands import profile_layers as profiler_cli  # noqa: E402
from spark3r.profiler.aggregate import spearman  # noqa: E402
from spark3r.profiler.format import Profile, load_profile  # noqa: E402
from spark3r.profiler.length_model import LengthModel, fit_cells, fit_error  # noqa: E402
from spark3r.profiler.lengths import cells, length_entry, mean_table  # noqa: E402
from spark3r.reduce import global_attention_fraction  # noqa: E402
from spark3r.schedule import KVSpec, LayerSpec, QuerySpec, Schedule, load_schedule, paper_schedule  # noqa: E402
from spark3r.commands import search_schedule as search_cli  # noqa: E402
from spark3r.search.pipeline import find_paper_rule  # noqa: E402
from spark3r.search.lengths import kv_frame_levels, profile_length_model, schedule_deviation  # noqa: E402

SIGNIFICANCE = 0.05
EQUAL_FLOPS = 0.05
PAPER_SENSITIVE_OF_24 = (11, 16)  # VGGT-1B's sensitive tier, scaled to other layer counts
METRICS = ("score", "abs_rel", "ate", "auc30")
LOWER_IS_BETTER = {"score": True, "abs_rel": True, "ate": True, "auc30": False}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vggt-tiny")
    parser.add_argument("--weights", default="auto", help="checkpoint path, auto (shipped) or none (random)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or auto")
    parser.add_argument("--profile-frames", default="16,32,64", help="profile-layers --frames (each <= 64)")
    parser.add_argument("--kv-frames", default="1,2,4,8,16", help="profile-layers --kv-frames")
    parser.add_argument("--kv-keep", default="0.5,0.25", help="profile-layers --kv-keep")
    parser.add_argument("--query-merge", default="1,2,3,4", help="profile-layers --query-merge")
    parser.add_argument("--calib", default="synthetic:8:100:walk", help="calibration clips")
    parser.add_argument("--replica", default="synthetic:4:200:walk", help="clips of --verify and the uniform's pick")
    parser.add_argument("--held-out", default="synthetic:16:300:walk", help="clips every schedule is measured on")
    parser.add_argument("--frames", type=int, default=256, help="the deployment length F")
    parser.add_argument("--budget-scales", default="2,1,0.5", help="budgets as multiples of the paper rule's FLOPs")
    parser.add_argument("--verify", type=int, default=4, help="search-schedule --verify K (0: the predicted best)")
    parser.add_argument("--random", type=int, default=20, help="random schedules of the prediction check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deployment-profile", default=None, metavar="PROFILE",
                        help="a profile-layers run at --frames frames (profile.json, or a results JSON holding one): "
                             "where the length model's prediction errs there")
    parser.add_argument("--work", default="runs/length-schedules")
    parser.add_argument("--out", default="benchmarks/results/length-schedules", help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    args.model = resolve_model_name(args.model)
    lengths = [int(s) for s in args.profile_frames.split(",")]
    if max(lengths) >= args.frames:
        raise Spark3rError(f"--profile-frames {args.profile_frames} must be shorter than --frames {args.frames}")
    return args


def run_json(entry, argv: list[str], commands: list[str], name: str) -> dict:
    commands.append(shlex.join([name, *argv]))
    return tiny.run_json(name, entry, argv)


def search_once(argv: list[str], out: Path, commands: list[str]) -> dict:
    """`search-schedule argv` writing `out` -> its summary, unless an earlier run of the same argv wrote it (its summary
    beside it, returned)."""
    summary = out.with_suffix(".search.json")
    if out.is_file() and summary.is_file():
        earlier = json.loads(summary.read_text())
        if earlier["argv"] == argv:
            commands.append(shlex.join(["search-schedule", *argv]))
            return earlier["summary"]
    result = run_json(search_cli.main, argv, commands, "search-schedule")
    write_atomic(summary, (json.dumps({"argv": argv, "summary": result}, indent=1, default=str) + "\n").encode())
    return json.loads(summary.read_text())["summary"]


def verification(summary: dict) -> dict | None:
    """What `search-schedule --verify` measured on the replica clips: the predicted best candidates and the best
    uniform schedule (each kv_frames, query_merge, measured_deviation), and the deviation of the one it exported; None
    without --verify."""
    measured = summary.get("verified")
    if not measured:
        return None
    uniform = summary["uniform_best"]
    candidates = [entry for entry in measured if (entry["kv_frames"], entry["query_merge"])
                  != (uniform["kv_frames"], uniform["query_merge"])]
    return {"candidates": candidates, "uniform": {key: uniform[key] for key in ("kv_frames", "query_merge",
                                                                              "measured_deviation")},
            "exported": min(entry["measured_deviation"] for entry in measured)}


def runtime(args) -> list[str]:
    return ["--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed)]


def paper_rule(model: str, layers: int) -> Schedule:
    """The shipped paper-rule schedule of the model, or the rule with VGGT-1B's sensitive tier 11-16 of 24 scaled to
    `layers` (rounded half up)."""
    shipped = find_paper_rule(model)
    if shipped is not None and load_schedule(shipped).global_layers == layers:
        return load_schedule(shipped)
    first, last = (math.floor(index * layers / 24 + 0.5) for index in PAPER_SENSITIVE_OF_24)
    return paper_schedule(model, layers, list(range(first, last + 1)))


def rescaled_paper(rule: Schedule, frames: int, merges: list[int], target: float, flop_config) -> Schedule:
    """The rule with its K/V frame count N and its merge factor at `frames` replaced by those giving FLOPs nearest to
    `target` (the rule's own merge first, then the nearest others)."""
    own = rule.resolve(0, frames).query_merge
    best = None
    for merge in sorted(merges, key=lambda m: (abs(m - own), m)):
        for kept in range(1, frames + 1):
            default = replace(rule.default, kv=replace(rule.default.kv, frames=kept),
                              query=replace(rule.default.query, merge=merge))
            schedule = replace(rule, default=default, provenance={**rule.provenance, "rescaled_kv_frames": kept,
                                                                  "rescaled_merge": merge})
            error = abs(global_attention_fraction(flop_config, frames, schedule) / target - 1)
            if best is None or error < best[0]:
                best = (error, schedule)
        if best[0] <= EQUAL_FLOPS:
            break
    return best[1]


def uniform_schedule(model: str, layers: int, kept: int | None, merge: int, reduction: dict) -> Schedule:
    kv = KVSpec(keep=1.0) if kept is None else KVSpec(frames=kept)
    default = LayerSpec(kv=replace(kv, method="frame_stride", keep_reference_frame=reduction.get("keep_reference_frame",
                                                                                                 True)),
                        query=QuerySpec(merge=merge, group_frames=reduction.get("group_frames", 20)))
    return Schedule(model, layers, default, provenance={"rule": "uniform", "kv_frames": kept, "merge": merge})


def uniform_options(args, layers, merges, reduction, target, flop_config) -> list[Schedule]:
    """Every uniform schedule (one K/V frame count N <= F, one merge) with FLOPs within 5% of `target`."""
    options = {}
    for merge in merges:
        for kept in range(1, args.frames + 1):
            schedule = uniform_schedule(args.model, layers, kept, merge, reduction)
            fraction = global_attention_fraction(flop_config, args.frames, schedule)
            key = (tuple(schedule.reductions(args.frames)))
            if abs(fraction / target - 1) <= EQUAL_FLOPS:
                options.setdefault(key, schedule)
    return list(options.values())


def random_schedules(args, layers, merges, reduction, count: int) -> list[Schedule]:
    """Random length-aware schedules: layer l keeps a random K/V frame count with probability (i + 1) / count."""
    rng = np.random.default_rng(args.seed + 1)
    levels = [n for n in kv_frame_levels((args.frames,)) if n is not None]
    schedules = []
    for row in range(count):
        merge = int(rng.choice(merges))
        kept = [int(rng.choice(levels)) if rng.random() < (row + 1) / count else None for _ in range(layers)]
        base = uniform_schedule(args.model, layers, None, merge, reduction)
        overrides = {layer: LayerSpec(kv=KVSpec(frames=n)) for layer, n in enumerate(kept) if n is not None}
        schedules.append(replace(base, layers=overrides, provenance={"rule": "random", "kv_frames": kept,
                                                                     "merge": merge}))
    return schedules


def deployment_profile(path: str | None, model: str, frames: int) -> Profile | None:
    """The --deployment-profile (None without one), which must profile `model` at `frames` frames with the score."""
    if path is None:
        return None
    at_length = load_profile(path)
    if (at_length.model, at_length.frames) != (model, frames) or "score" not in at_length.kv:
        raise Spark3rError(f"--deployment-profile {path} profiles {at_length.model} at {at_length.frames} frames: give "
                           f"a profile-layers run of {model} at --frames {frames}")
    return at_length


def check_options(at_length: Profile, profile: Profile) -> None:
    """The deployment profile must reduce and score as the study's profile does."""
    differing = [key for key in ("kv_method", "keep_reference_frame", "group_frames", "score_weights")
                 if at_length.options.get(key) != profile.options.get(key)]
    if differing or at_length.global_layers != profile.global_layers:
        raise Spark3rError(f"--deployment-profile was profiled with other {', '.join(differing) or 'layers'} than "
                           "the length study's profile: profile it with the same options")


def prediction_errors(length_model: LengthModel, at_length: Profile, schedules: list[Schedule], measured: list[float],
                      flop_config, frames: int) -> dict:
    """Where the length model errs at `frames`, against `at_length`, a profile there on other clips.

    kv_ratio [L, K]: the model's predicted over the profiled single-layer deviation at each reduced K/V level
    (kv_frames [K] kept); query_ratio [L, M] the same at each merge > 1 (query_merge [M]); kv, query: fit_error of
    those cells. summed [n]: the sum over layers of the profile's own single-layer laws (fitted at `frames` alone) for
    each of `schedules`, against their `measured` [n] deviation (measured_over_summed, summed_spearman).
    """
    entry = length_entry(at_length)
    kept, merges = np.asarray(entry["kv_frames"]), np.asarray(entry["query_merge"])
    kv_cells, query_cells = kept < frames, merges > 1
    profiled_kv = mean_table(entry, "kv", "score")[:, kv_cells]
    profiled_query = mean_table(entry, "query", "score")[:, query_cells]
    predicted_kv = length_model.kv_deviation(frames, kept[kv_cells])
    predicted_query = length_model.query_deviation(frames, merges[query_cells])
    own = LengthModel("score", *fit_cells(*cells([entry], "score")), (frames,), {})
    summed = [schedule_deviation(own, schedule, flop_config, frames) for schedule in schedules]
    return {"clips": [clip["name"] for clip in at_length.clips], "sha256": at_length.sha256,
            "kv_frames": kept[kv_cells].tolist(), "query_merge": merges[query_cells].tolist(),
            "kv_ratio": ratio_table(predicted_kv, profiled_kv),
            "query_ratio": ratio_table(predicted_query, profiled_query),
            "kv": fit_error(predicted_kv, profiled_kv), "query": fit_error(predicted_query, profiled_query),
            "summed": summed, "measured_over_summed": ratio_table(np.asarray([measured]), np.asarray([summed]))[0],
            "summed_spearman": spearman(measured, summed)}


def ratio_table(numerator: np.ndarray, denominator: np.ndarray) -> list[list[float | None]]:
    """numerator / denominator [L, K] as lists, None where the denominator is not positive."""
    return [[float(a / b) if b > 0 else None for a, b in zip(top, bottom)]
            for top, bottom in zip(numerator.tolist(), denominator.tolist())]


def paired(first: list[float], second: list[float], lower_is_better: bool) -> dict:
    """Wilcoxon signed-rank test (two-sided) of per-clip values; ratio of means and clips where `first` is better."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    better = (first < second) if lower_is_better else (first > second)
    worse = (first > second) if lower_is_better else (first < second)
    differences = first - second
    p = float(stats.wilcoxon(first, second).pvalue) if np.any(differences != 0) else 1.0
    ratio = float(first.mean() / second.mean()) if second.mean() != 0 else None
    gain = (ratio is not None) and ((ratio < 1) if lower_is_better else (ratio > 1))
    verdict = "same" if not np.any(differences != 0) else \
        ("gain" if gain else "loss") if p < SIGNIFICANCE else "no significant difference"
    return {"ratio": ratio, "better": int(better.sum()), "worse": int(worse.sum()), "clips": len(first), "p": p,
            "verdict": verdict}


def mean_score(model, clips, schedules: dict, score_weights, cache: Path) -> dict[str, float]:
    rows = tiny.measure(model, clips, schedules, score_weights, ground_truth=False, desc="replica", cache=cache)
    return {name: float(np.mean([row["score"] for row in rows[name]])) for name in schedules}


def load_clips(spec: str, args, device) -> list:
    return [clip.to(device) for clip in tiny.load_clips(spec, args.model, args.frames)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, seconds, commands = time.perf_counter(), {}, []
    mark = [started]

    def clock(stage):
        now = time.perf_counter()
        seconds[stage] = seconds.get(stage, 0.0) + now - mark[0]
        mark[0] = now
        print(f"length_schedules: {stage} {now - started:.0f} s from the start", file=sys.stderr)

    at_length = deployment_profile(args.deployment_profile, args.model, args.frames)
    work = Path(args.work)
    profile_argv = ["--model", args.model, "--calib", args.calib, "--frames", args.profile_frames, "--kv-frames",
                    args.kv_frames, "--kv-keep", args.kv_keep, "--query-merge", args.query_merge, "--additivity",
                    "0", "--weights", args.weights, "--out", str(work / "profile"), *runtime(args)]
    summary = run_json(profiler_cli.main, profile_argv, commands, "profile-layers")
    profile_path = Path(summary["profile"])
    profile = load_profile(profile_path)
    clock("profile")

    device = resolve_device(args.device)
    model = load_model(args.model, weights=args.weights, device=device, dtype=resolve_dtype(args.dtype, device),
                       seed=args.seed)
    layers, flop_config = profile.global_layers, model.flop_config(*profile.image_hw)
    reduction = {key: profile.options[key] for key in ("keep_reference_frame", "group_frames") if key in profile.options}
    score_weights = profile.options.get("score_weights")
    length_model = profile_length_model(profile, "score")
    if at_length is not None:
        check_options(at_length, profile)
    rule = paper_rule(args.model, layers)
    rule_fraction = global_attention_fraction(flop_config, args.frames, rule)
    merges = [m for m in profile.query_merge]
    replica = load_clips(args.replica, args, device) if args.verify else []
    held_out = load_clips(args.held_out, args, device)
    clock("clips")
    # measured rows, per clip, of these weights in this dtype on this device: a rerun resumes from them
    _, weights_sha = provenance.weights_digest(args.model, args.weights)
    measured = work / "measured" / hashlib.sha256(json.dumps([weights_sha, args.dtype, device.type]).encode()
                                                  ).hexdigest()[:12]

    plans = []
    for scale in (float(s) for s in args.budget_scales.split(",")):
        budget = min(1.0, scale * rule_fraction)
        out = work / "schedules" / f"{args.model}-x{scale:g}.yaml"
        search_argv = ["--profile", str(profile_path), "--budget", f"{budget:.6g}", "--frames", str(args.frames),
                       "--out", str(out), *runtime(args)]
        if args.verify:
            search_argv += ["--verify", str(args.verify), "--calib", args.replica]
        summary = search_once(search_argv, out, commands)
        searched = load_schedule(out)
        target = global_attention_fraction(flop_config, args.frames, searched)
        clock("search")
        options = uniform_options(args, layers, merges, reduction, target, flop_config)
        if not options:
            raise Spark3rError(f"no uniform schedule has FLOPs within 5% of the searched {target:.4g}")
        predicted = sorted(options, key=lambda s: schedule_deviation(length_model, s, flop_config, args.frames))
        if args.verify:
            scores = mean_score(model, replica, {str(i): s for i, s in enumerate(predicted[: args.verify])},
                                score_weights, measured)
            uniform = predicted[int(min(scores, key=scores.get))]
        else:
            uniform = predicted[0]
        paper = rule if scale == 1 else rescaled_paper(rule, args.frames, merges, target, flop_config)
        plans.append({"scale": scale, "budget": budget,
                      "schedules": {"searched": searched, "uniform": uniform, "paper": paper},
                      "uniform_options": len(options), "verification": verification(summary)})
        clock("baselines")

    randoms = random_schedules(args, layers, merges, reduction, args.random)
    everything = {f"{plan['scale']:g} {name}": schedule for plan in plans
                  for name, schedule in plan["schedules"].items()}
    everything.update({f"random {i}": schedule for i, schedule in enumerate(randoms)})
    rows = tiny.measure(model, held_out, everything, score_weights, ground_truth=True, desc="held-out",
                        cache=measured)
    clock("held-out")

    def entry(name, schedule):
        per_clip = {metric: [row[metric] for row in rows[name]] for metric in METRICS}
        return {"flops_fraction": global_attention_fraction(flop_config, args.frames, schedule),
                "predicted": schedule_deviation(length_model, schedule, flop_config, args.frames),
                "measured": {metric: float(np.mean(values)) for metric, values in per_clip.items()},
                "per_clip": per_clip, "schedule": schedule.to_dict()}

    budgets = []
    for plan in plans:
        entries = {name: entry(f"{plan['scale']:g} {name}", s) for name, s in plan["schedules"].items()}
        versus = {f"searched vs {other}": {metric: paired(entries["searched"]["per_clip"][metric],
                                                          entries[other]["per_clip"][metric], LOWER_IS_BETTER[metric])
                                           for metric in METRICS} for other in ("uniform", "paper")}
        budgets.append({"scale": plan["scale"], "budget": plan["budget"], "uniform_options": plan["uniform_options"],
                        "verification": plan["verification"], "schedules": entries, "versus": versus})
    random_rows = [entry(f"random {i}", s) for i, s in enumerate(randoms)]
    prediction = {"spearman": spearman([r["measured"]["score"] for r in random_rows],
                                       [r["predicted"] for r in random_rows]),
                  "schedules": [{key: r[key] for key in ("flops_fraction", "predicted")}
                                | {"measured": r["measured"]["score"]} for r in random_rows]}
    if at_length is not None:
        prediction["deployment_profile"] = prediction_errors(length_model, at_length, randoms,
                                                             [r["measured"]["score"] for r in random_rows],
                                                             flop_config, args.frames)
    result = {
        **provenance.record(__file__, argv, device), **provenance.weights_identity(args.model, args.weights),
        "commands": commands,
        "settings": {key: getattr(args, key) for key in ("model", "weights", "profile_frames", "kv_frames", "kv_keep",
                                                          "query_merge", "calib", "replica", "held_out", "frames",
                                                          "budget_scales", "verify", "random", "seed", "dtype",
                                                          "deployment_profile")},
        "global_layers": layers, "paper_rule_fraction": rule_fraction, "paper_rule": rule.to_dict(),
        "length_model": {"form": profile.length_model["score"]["form"], "held_out": length_model.held_out},
        "dense": tiny.mean_rows(rows["dense"]), "budgets": budgets, "prediction": prediction,
        "seconds": {**seconds, "total": time.perf_counter() - started},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_suffix(".json"), (json.dumps(result, indent=1, default=str) + "\n").encode())
    write_atomic(out.with_suffix(".md"), report(result).encode())
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)
    return result


def _n(value, digits=4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(result: dict) -> str:
    settings, held = result["settings"], result["length_model"]["held_out"]
    lines = [f"# {settings['model']}: profiled at {settings['profile_frames']} frames, searched and checked at "
             f"{settings['frames']} frames", "",
             f"Made by `{result['command']}` ({result['created']}, git {result['commit']}, torch {result['torch']}, "
             f"{result['device_name']}; weights {settings['weights']}, {result['global_layers']} global layers). It ran:", "",
             *[f"    {c}" for c in result["commands"]], "",
             f"Clips: calibration `{settings['calib']}` (cut/generated at each profiled length), --verify and uniform "
             f"pick `{settings['replica']}`, held-out `{settings['held_out']}`, all at {settings['frames']} frames "
             "except the calibration. Deviation = the profile's score (relative depth + points + camera terms, from "
             "the dense model's outputs).", "",
             f"Length model: {result['length_model']['form']}. Fitted on {held['fitted_on']} frames, at the held-out "
             f"{held['frames']} frames: RMSE of log {_n(held['all']['rmse_log'], 3)}, median relative error "
             f"{_n(held['all']['median_relative_error'], 3)}, Spearman {_n(held['all']['spearman'], 3)}.", "",
             f"The paper's rule at {settings['frames']} frames spends {result['paper_rule_fraction']:.4f} of dense global "
             f"attention FLOPs; budgets are {', '.join(s + 'x' for s in settings['budget_scales'].split(','))} "
             "that.", "",
             "| budget | schedule | FLOPs | predicted | deviation | depth AbsRel | ATE | AUC@30 |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    dense = result["dense"]
    lines.append(f"| - | dense | 1.0000 | 0 | 0 | {_n(dense.get('abs_rel'))} | {_n(dense.get('ate'))} | "
                 f"{_n(dense.get('auc30'))} |")
    for entry in result["budgets"]:
        for name, row in entry["schedules"].items():
            m = row["measured"]
            lines.append(f"| {entry['scale']:g}x ({entry['budget']:.4f}) | {name} | {row['flops_fraction']:.4f} | "
                         f"{row['predicted']:.4f} | {m['score']:.4f} | {m['abs_rel']:.4f} | {m['ate']:.4f} | "
                         f"{m['auc30']:.4f} |")
    lines += ["", "Paired over the held-out clips (Wilcoxon signed-rank, two-sided; gain / loss when p < "
              f"{SIGNIFICANCE}); ratio = searched mean / baseline mean, better = clips where the searched is better:",
              "", "| budget | comparison | metric | ratio | better / clips | p | verdict |",
              "|---:|---|---|---:|---:|---:|---|"]
    for entry in result["budgets"]:
        for pair, metrics in entry["versus"].items():
            for metric, v in metrics.items():
                lines.append(f"| {entry['scale']:g}x | {pair} | {metric} | {_n(v['ratio'], 3)} | {v['better']} / "
                             f"{v['clips']} | {v['p']:.3g} | {v['verdict']} |")
    verified = [entry for entry in result["budgets"] if entry.get("verification")]
    if verified:
        lines += ["", f"Verified (`--verify {settings['verify']}` on `{settings['replica']}`): measured deviation "
                  "there of the predicted best candidates and of the best uniform schedule, and of the one exported:",
                  ""]
        lines += [f"- {entry['scale']:g}x: candidates "
                  + (", ".join(f"{c['measured_deviation']:.4f}" for c in entry["verification"]["candidates"])
                     or "none apart from the uniform")
                  + f"; uniform {entry['verification']['uniform']['measured_deviation']:.4f}; exported "
                  f"{entry['verification']['exported']:.4f}" for entry in verified]
    tightest = min(result["budgets"], key=lambda entry: entry["budget"])
    ratios = {pair: v["score"]["ratio"] for pair, v in tightest["versus"].items()}
    never_worse = all(v["score"]["verdict"] != "loss" for entry in result["budgets"] for v in entry["versus"].values())
    lines += ["", f"Goal at the tightest budget ({tightest['scale']:g}x): deviation at least 25% lower than both "
              "baselines: " + ", ".join(f"{pair} {_n(ratio, 3)}" for pair, ratio in ratios.items())
              + f" -> {'met' if all(r is not None and r <= 0.75 for r in ratios.values()) else 'not met'}; never "
              f"significantly worse at any budget: {'yes' if never_worse else 'no'}."]
    prediction = result["prediction"]
    lines += ["", f"Prediction at {settings['frames']} frames: Spearman {_n(prediction['spearman'], 3)} between the "
              f"length model's predicted and the measured mean deviation of {len(prediction['schedules'])} random "
              "length-aware schedules (bar 0.9).", ""]
    if "deployment_profile" in prediction:
        lines += [errors_paragraph(prediction, settings), ""]
    lines += ["Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items()) + ".", ""]
    return "\n".join(lines)


def errors_paragraph(prediction: dict, settings: dict) -> str:
    """Where the length model errs at the deployment length, from `prediction["deployment_profile"]`."""
    check, frames = prediction["deployment_profile"], settings["frames"]

    def by_level(levels, table, unit):
        columns = [[row[j] for row in table if row[j] is not None] for j in range(len(levels))]
        return ", ".join(f"{level:g}{unit}: {np.mean(column):.2f}" for level, column in zip(levels, columns) if column)

    def extremes(table):
        values = [(value, layer) for layer, row in enumerate(table) for value in row if value is not None]
        (low, low_layer), (high, high_layer) = min(values), max(values)
        return f"from {low:.2f} (layer {low_layer}) to {high:.2f} (layer {high_layer})"

    share = [value for value in check["measured_over_summed"] if value is not None]
    return (f"Where the prediction errs, against a profile at {frames} frames on {len(check['clips'])} other clips "
            f"(`{settings['deployment_profile']}`): the length model's single-layer K/V deviation over the profiled "
            f"one, mean over layers by frames kept, is {by_level(check['kv_frames'], check['kv_ratio'], '')} "
            f"({extremes(check['kv_ratio'])}; Spearman over cells {_n(check['kv']['spearman'], 3)}); its query "
            f"deviation by merge factor {by_level(check['query_merge'], check['query_ratio'], 'x')} "
            f"({extremes(check['query_ratio'])}; Spearman {_n(check['query']['spearman'], 3)}). The sum over layers of "
            f"that profile's own single-layer laws ranks the {len(share)} random schedules at Spearman "
            f"{_n(check['summed_spearman'], 3)} (the length model: {_n(prediction['spearman'], 3)}); their measured "
            f"deviation is {min(share):.2f} to {max(share):.2f} (median {np.median(share):.2f}) of that sum, so "
            f"layers' deviations add up to {'less' if np.median(share) < 1 else 'more'} than their sum.")


@command
def run(argv=None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run())
