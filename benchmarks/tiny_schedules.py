"""vggt-tiny on CPU: is the layer profile stable, and does the searched schedule beat uniform and two-tier schedules?

    OMP_NUM_THREADS=2 python benchmarks/tiny_schedules.py          # -> benchmarks/results/tiny-schedules.{md,json}

One command regenerates everything (run it again whenever the shipped weights change):

1. Stability (profile-layers): `profile-layers` on two disjoint sets of generated clips (--calib, --replica) and the
   Spearman rank correlation between the two runs of each global layer's end-to-end score at one K/V level
   (--fixed-keep) and averaged over the K/V levels (bar: >= 0.8), with each run's additivity and query vs K/V
   asymmetry checks.
2. Search vs baselines (search-schedule): at each budget (fraction of dense global-attention FLOPs), schedules are
   measured on held-out generated clips (--held-out) against the dense model (deviation) and the ground truth:
   - searched: `search-schedule` on the --calib profile (it picks one query merge factor for all layers), which
     runs its --verify best predicted candidates on the --replica clips and exports the best measured one;
   - uniform >= (and uniform <=): the searched query merge and one K/V keep on every layer, with the least FLOPs at
     or above the searched schedule's (the most FLOPs at or below it; the stride levels are coarse);
   - two-tier: the paper's procedure. A probe on the calibration clips runs every layer at K/V factor --probe-base
     and one layer at a time at --probe-factor; a layer whose score exceeds --threshold x the base is sensitive.
     Sensitive layers keep 1/r, the others 1/(3r); queries are merged as mildly as the budget allows (the least
     profiled merge factor m at which K/V pruning can reach the budget), and r gives the most FLOPs within it;
   - searched at r_Q = m and its uniforms: the same search on the profile restricted to query merge {1, m}, so
     that per-layer K/V allocation is compared at the two-tier's query merge.
   Each schedule's predicted score is also read off profile B, which the search never saw.
3. The Optuna study's best against the exact knapsack optimum of the same predicted objective, for every search.

K/V is pruned by frame stride throughout (keep 1/r keeps every r-th frame). Intermediate files (profiles, schedules,
Optuna journals) go to <work>/<digest of the weights and the profiling options>/, so a rerun with the same weights and
options resumes and anything else starts afresh. Frames default to 16: at 8 frames the stride levels stop at keep 1/8
(0.19 of the FLOPs, as the special tokens of every frame are always kept) and budget 0.05 leaves a single schedule.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

from spark3r.commands import profile_layers as profiler_cli
from spark3r.commands import search_schedule as search_cli
from spark3r.commands.arguments import command
from spark3r.data.clip import Clip
from spark3r.data.clips import open_clips
from spark3r.errors import Spark3rError
from spark3r.evaluate.deviation import DEFAULT_WEIGHTS, DenseReference
from spark3r.evaluate.metrics import camera_metrics, depth_metrics
from spark3r.models.base import FlopConfig
from spark3r.models.loading import load_model
from spark3r.models.registry import get_entry, resolve_model_name
from spark3r.profiler.aggregate import spearman
from spark3r.files import write_json
from spark3r.profiler.format import STATISTICS, MetricTable, Profile, load_profile, save_profile
from spark3r.profiler.run import ProfileOptions, finite_outputs
from spark3r.reduce import global_attention_fraction
from spark3r.schedule import PAPER_KV_METHOD, KVSpec, LayerSpec, QuerySpec, Schedule, load_schedule, reduced
from spark3r.search.problem import predicted_deviation

_spec = importlib.util.spec_from_file_location("benchmarks_provenance",
                                              Path(__file__).resolve().parent / "provenance.py")
provenance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(provenance)

CAMERA_TERMS = ("camera_center", "camera_rotation_deg", "focal")
STABILITY_METRICS = ("score", "depth", "points")
SPEARMAN_BAR = 0.8
SIGNIFICANCE = 0.05
ROWS = {  # schedule key -> table name ({m}: the two-tier's query merge)
    "searched": "searched",
    "uniform": "uniform >=",
    "uniform_below": "uniform <=",
    "searched_at_m": "searched, r_Q = {m}",
    "uniform_at_m": "uniform >=, r_Q = {m}",
    "uniform_at_m_below": "uniform <=, r_Q = {m}",
    "two_tier": "two-tier (paper), r_Q = {m}",
}
PAIRS = (("searched", "uniform"), ("searched", "uniform_below"), ("searched_at_m", "uniform_at_m"),
         ("searched_at_m", "uniform_at_m_below"), ("searched_at_m", "two_tier"), ("searched", "two_tier"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vggt-tiny")
    parser.add_argument("--weights", default="auto", help="as profile-layers --weights (auto: the shipped weights)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (every clip of every part)")
    parser.add_argument("--calib", default="synthetic:16:100", help="calibration clips: profile A, search, probe")
    parser.add_argument("--replica", default="synthetic:16:200", help="disjoint clips for profile B (stability)")
    parser.add_argument("--held-out", default="synthetic:16:300", help="clips the schedules are measured on")
    parser.add_argument("--kv-keep", default=profiler_cli.DEFAULT_KV_KEEP, help="profile-layers --kv-keep")
    parser.add_argument("--query-merge", default=profiler_cli.DEFAULT_QUERY_MERGE, help="profile-layers --query-merge")
    parser.add_argument("--additivity", type=int, default=6, help="profile-layers --additivity")
    parser.add_argument("--score-weights", default="depth=1,points=1,cameras=1",
                        help="profile-layers --score-weights (also the held-out score)")
    parser.add_argument("--fixed-keep", type=float, default=0.125, help="K/V level of the fixed-level Spearman")
    parser.add_argument("--budgets", default="0.25,0.1,0.05", help="fractions of dense global-attention FLOPs")
    parser.add_argument("--trials", type=int, default=2000, help="search-schedule --trials")
    parser.add_argument("--sampler", default="mutation", help="search-schedule --sampler")
    parser.add_argument("--verify", type=int, default=8,
                        help="search-schedule --verify K on the --replica clips (0: export the predicted best)")
    parser.add_argument("--probe-base", type=int, default=2, help="K/V reduction factor of every layer in the probe")
    parser.add_argument("--probe-factor", type=int, default=16, help="K/V reduction factor of the probed layer")
    parser.add_argument("--threshold", type=float, default=1.05,
                        help="a layer is sensitive when its probe score exceeds this x the base score")
    parser.add_argument("--insensitive-factor", type=int, default=3,
                        help="K/V reduction of the insensitive layers relative to the sensitive ones")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/tiny-schedules", help="folder of the intermediate files")
    parser.add_argument("--out", default="benchmarks/results/tiny-schedules",
                        help="results path without suffix: writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    args.budgets = parse_budgets(args.budgets)
    for name, least in (("frames", 2), ("probe_base", 2), ("probe_factor", 3), ("insensitive_factor", 1),
                        ("threads", 1), ("trials", 1)):
        if getattr(args, name) < least:
            raise Spark3rError(f"--{name.replace('_', '-')} is {getattr(args, name)}: give a whole number >= {least}")
    if args.probe_factor <= args.probe_base:
        raise Spark3rError(f"--probe-factor {args.probe_factor} must exceed --probe-base {args.probe_base}: the probed "
                           "layer is reduced harder than the others")
    return args


def parse_budgets(text: str) -> list[float]:
    """"0.25,0.1" -> [0.25, 0.1]; each in (0, 1]."""
    try:
        budgets = [float(item) for item in text.split(",")]
    except ValueError:
        raise Spark3rError(f"--budgets {text!r} is not a comma-separated list of numbers: write e.g. 0.25,0.1") \
            from None
    if any(not 0 < budget <= 1 for budget in budgets):
        raise Spark3rError(f"--budgets {text!r} holds a value outside (0, 1]: each budget is a fraction of FLOPs")
    return budgets


# ------------------------------------------------------------------------------------------------- running commands


def run_json(name: str, entry: Callable[[list[str]], int], argv: list[str]) -> dict:
    """Run a console entry point in this process with --json and return what it prints; stderr passes through."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = entry([*argv, "--json"])
    if code:
        raise Spark3rError(f"{name} {shlex.join(argv)} exited with code {code}: see its message above")
    return json.loads(stdout.getvalue())


def profile_argv(args, calib: str, out: Path) -> list[str]:
    return ["--model", args.model, "--calib", calib, "--frames", str(args.frames), "--weights", args.weights,
            "--kv-keep", args.kv_keep, "--query-merge", args.query_merge, "--additivity", str(args.additivity),
            "--score-weights", args.score_weights, "--out", str(out), "--device", "cpu", "--dtype", "fp32",
            "--seed", str(args.seed)]


def search_argv(args, profile: Path, budget: float, out: Path) -> list[str]:
    verify = ["--verify", str(args.verify), "--calib", args.replica] if args.verify else []
    return ["--profile", str(profile), "--budget", f"{budget:g}", "--trials", str(args.trials), "--sampler",
            args.sampler, *verify, "--out", str(out), "--device", "cpu", "--dtype", "fp32", "--seed", str(args.seed)]


def load_clips(spec: str, model: str, frames: int) -> list[Clip]:
    """Clips preprocessed as profile-layers preprocesses them for `model`."""
    entry = get_entry(model)
    return open_clips(spec, preprocess=entry.recipe(), max_frames=frames, frames=frames)


def restrict_query(profile: Profile, merge: int, source: Path) -> Profile:
    """`profile` with only the query merge levels 1 and `merge` (its additivity and asymmetry checks left out)."""
    columns = [j for j, level in enumerate(profile.query_merge) if level in (1, merge)]
    query = {metric: MetricTable(*(getattr(table, name)[:, columns] for name in STATISTICS))
             for metric, table in profile.query.items()}
    return dataclasses.replace(profile, query_merge=[profile.query_merge[j] for j in columns], query=query,
                               additivity={}, asymmetry={}, versions={}, created="", sha256="",
                               options={**profile.options, "restricted_from": str(source)})


# ------------------------------------------------------------------------------------------------------- stability


def level_column(levels: list[float], level: float) -> int:
    for column, value in enumerate(levels):
        if math.isclose(value, level):
            return column
    raise Spark3rError(f"--fixed-keep {level:g} is not among the profiled K/V levels {levels}: pick one of them")


def stability(first: Profile, second: Profile, fixed_keep: float) -> dict:
    """Spearman rank correlations between two profiles of each global layer's sensitivity.

    For each metric of STABILITY_METRICS both profiles hold: the layer's mean at K/V keep `fixed_keep`, its mean over
    the non-dense K/V levels and over the non-dense query merge levels; for the score also each K/V level alone and
    all (layer, K/V level) cells together.
    """
    shared = {clip["sha256"] for clip in first.clips} & {clip["sha256"] for clip in second.clips}
    if shared:
        raise Spark3rError(f"the two profiles share {len(shared)} clip(s): profile disjoint clip sets (other seeds)")
    if first.kv_keep != second.kv_keep or first.query_merge != second.query_merge:
        raise Spark3rError("the two profiles were measured at different levels: profile both with the same options")
    column = level_column(first.kv_keep, fixed_keep)
    per_layer, rho = {}, {}
    for metric in (m for m in STABILITY_METRICS if m in first.kv and m in second.kv):
        kv = [profile.kv[metric].mean for profile in (first, second)]
        query = [profile.query[metric].mean for profile in (first, second)]
        for name, pair in ((f"kv_keep_{fixed_keep:g}", [table[:, column] for table in kv]),
                           ("kv_mean", [table[:, 1:].mean(axis=1) for table in kv]),
                           ("query_mean", [table[:, 1:].mean(axis=1) for table in query])):
            per_layer[f"{metric}.{name}"] = [values.tolist() for values in pair]
            rho[f"{metric}.{name}"] = spearman(*pair)
    kv = [profile.kv["score"].mean for profile in (first, second)]
    return {
        "fixed_keep": fixed_keep, "per_layer": per_layer, "spearman": rho,
        "spearman_per_kv_level": {f"{keep:g}": spearman(kv[0][:, j], kv[1][:, j])
                                  for j, keep in enumerate(first.kv_keep) if j},
        "spearman_kv_cells": spearman(kv[0][:, 1:].ravel(), kv[1][:, 1:].ravel()),
    }


def checks(profile: Profile) -> dict:
    """The additivity and asymmetry checks profile-layers recorded."""
    keys = ("measured", "predicted_sum", "spearman")
    return {"additivity": {key: profile.additivity.get(key) for key in keys}, "asymmetry": profile.asymmetry}


# --------------------------------------------------------------------------------------------------------- schedules


def stride_schedule(model: str, factors: list[int], query_merge: int, reduction: dict, rule: str) -> Schedule:
    """Frame-stride K/V factor r (keep 1/r) per layer and one query merge factor as a schedule; the most common
    factor is the default. `reduction`: the profile's keep_reference_frame, group_frames and similarity."""
    default_factor = Counter(factors).most_common(1)[0][0]
    default = LayerSpec(
        kv=KVSpec(keep=1.0 / default_factor, method="frame_stride",
                  keep_reference_frame=reduction.get("keep_reference_frame", True)),
        query=QuerySpec(merge=query_merge, group_frames=reduction.get("group_frames", 20),
                        similarity=reduction.get("similarity")))
    layers = {layer: LayerSpec(kv=KVSpec(keep=1.0 / factor)) for layer, factor in enumerate(factors)
              if factor != default_factor}
    return Schedule(model, len(factors), default, layers, provenance={"rule": rule})


def two_tier_factors(layers: int, sensitive: list[int], factor: int, insensitive_factor: int) -> list[int]:
    """K/V factor r on the sensitive layers, insensitive_factor * r on the others."""
    return [factor if layer in sensitive else insensitive_factor * factor for layer in range(layers)]


def factors_of(schedule: Schedule, frames: int) -> tuple[list[int], int]:
    """(K/V reduction factor of every layer, the query merge factor) at `frames` frames; one merge for all layers."""
    reductions = schedule.reductions(frames)
    merges = {r.query_merge for r in reductions}
    if len(merges) != 1:
        raise Spark3rError("the schedule merges queries per layer: search with one query merge level for all layers")
    return [r.kv_factor for r in reductions], merges.pop()


def fractions(flop_config: FlopConfig, frames: int, build: Callable[[int], Schedule]) -> list[tuple[float, int]]:
    """(global-attention FLOPs fraction, r) of `build(r)` for r = 1..frames (larger r keep the same one frame)."""
    return [(global_attention_fraction(flop_config, frames, build(r)), r) for r in range(1, frames + 1)]


def least_at_or_above(options: list[tuple[float, int]], target: float) -> tuple[float, int, bool]:
    """The option of least fraction >= target (smallest r on ties), else r = 1; (fraction, r, reached)."""
    above = [option for option in options if option[0] >= target * (1 - 1e-12)]
    if not above:
        return (*min(options, key=lambda option: option[1]), False)
    return (*min(above), True)


def most_within(options: list[tuple[float, int]], budget: float) -> tuple[float, int] | None:
    """The option of largest fraction <= budget (smallest r on ties), or None."""
    within = [option for option in options if option[0] <= budget * (1 + 1e-12)]
    return max(within, key=lambda option: (option[0], -option[1])) if within else None


def mildest_merge(flop_config: FlopConfig, frames: int, levels: list[int], layers: int, budget: float,
                  reduction: dict, model: str) -> int:
    """The least query merge level at which frame-stride K/V pruning (down to one frame) reaches `budget`."""
    for merge in sorted(levels):
        cheapest = stride_schedule(model, [frames] * layers, merge, reduction, "cheapest")
        if global_attention_fraction(flop_config, frames, cheapest) <= budget:
            return merge
    raise Spark3rError(f"budget {budget:g} is below every schedule of the profiled query merge levels {levels}: raise "
                       "the budget or profile higher --query-merge levels")


# ------------------------------------------------------------------------------------------------------ measuring


def schedule_key(schedule: Schedule, frames: int) -> tuple:
    return tuple(schedule.reductions(frames))


def cached_rows_name(clip: Clip, schedule_keys, ground_truth: bool, score_weights: dict) -> str:
    """File name of one clip's measured rows: a digest of its pixels and of what was measured on it."""
    identity = json.dumps([clip.fingerprint(), sorted(schedule_keys), ground_truth, score_weights])
    return f"{hashlib.sha256(identity.encode()).hexdigest()[:20]}.json"


@torch.inference_mode()
def measure(model, clips: list[Clip], schedules: dict[str, Schedule], score_weights: dict, ground_truth: bool,
            desc: str, cache: Path | None = None) -> dict[str, list[dict]]:
    """Per schedule, per clip: `output_deviation` from the dense run plus "cameras" (the weighted camera terms) and,
    with `ground_truth`, the errors against the clip's truth; "dense" holds the dense run's errors. Schedules that
    reduce alike run once. Outputs that are not finite in the dense run are not compared.

    With `cache` (a folder for one model's weights, dtype and device), each clip's rows are written there as it is
    measured and read back on the next run, so an interrupted benchmark resumes at the clip it stopped on."""
    frames = clips[0].frames
    distinct = {}
    for name, schedule in schedules.items():
        distinct.setdefault(schedule_key(schedule, frames), (name, schedule))
    keys = {key: repr(key) for key in distinct}
    per_clip = []
    for clip in tqdm(clips, desc=desc, unit="clip", file=sys.stderr, leave=False):
        stored = None if cache is None else Path(cache) / cached_rows_name(clip, keys.values(), ground_truth,
                                                                           score_weights)
        if stored is not None and stored.is_file():
            per_clip.append(json.loads(stored.read_text()))
            continue
        images = clip.images[None]
        dense = finite_outputs(model(images))
        rows = {"dense": ground_truth_errors(dense, clip) if ground_truth else {}}
        reference = DenseReference(dense)
        for key, (_, schedule) in distinct.items():
            with reduced(model, schedule):
                outputs = {name: value for name, value in model(images).items() if name in dense}
            row = reference.deviation(outputs, score_weights)
            row["cameras"] = sum(score_weights.get(term, DEFAULT_WEIGHTS[term]) * row[term]
                                 for term in CAMERA_TERMS if term in row)
            if ground_truth:
                row.update(ground_truth_errors(outputs, clip))
            rows[keys[key]] = row
        if stored is not None:
            write_json(stored, rows)
        per_clip.append(rows)
    measured = {"dense": [rows["dense"] for rows in per_clip]}
    measured.update({name: [rows[keys[schedule_key(schedule, frames)]] for rows in per_clip]
                     for name, schedule in schedules.items()})
    return measured


def ground_truth_errors(outputs: dict[str, torch.Tensor], clip: Clip) -> dict[str, float]:
    """Depth Abs Rel (one median scale per clip, as evaluate-schedule) and camera errors against the clip's truth."""
    errors = {"abs_rel": depth_metrics(outputs["depth"][0], clip.depth, align="sequence")["abs_rel"]}
    cameras = camera_metrics(outputs["extrinsics"][0], clip.extrinsics)
    errors.update({key: cameras[key] for key in ("rpe_rot", "ate", "auc30")})
    return errors


def mean_rows(rows: list[dict]) -> dict[str, float]:
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]} if rows and rows[0] else {}


def probe(model, clips: list[Clip], args, reduction: dict, score_weights: dict) -> dict:
    """The paper's sensitivity probe: every layer at K/V factor `probe_base`, one layer at a time at `probe_factor`
    (no query merging); a layer is sensitive when its mean score exceeds `threshold` x the base schedule's."""
    layers = model.adapter.num_global_layers
    base = [args.probe_base] * layers
    schedules = {"base": stride_schedule(args.model, base, 1, reduction, "probe")}
    for layer in range(layers):
        factors = list(base)
        factors[layer] = args.probe_factor
        schedules[f"layer {layer}"] = stride_schedule(args.model, factors, 1, reduction, "probe")
    rows = measure(model, clips, schedules, score_weights, ground_truth=False, desc="probe")
    score = {name: float(np.mean([row["score"] for row in rows[name]])) for name in schedules}
    if score["base"] <= 0:
        raise Spark3rError(f"the probe's base schedule (K/V factor {args.probe_base}) does not move the outputs, so no "
                           "degradation ratio exists: raise --probe-base")
    ratio = [score[f"layer {layer}"] / score["base"] for layer in range(layers)]
    return {"base_factor": args.probe_base, "probe_factor": args.probe_factor, "threshold": args.threshold,
            "base_score": score["base"], "layer_score": [score[f"layer {layer}"] for layer in range(layers)],
            "ratio": ratio, "sensitive": [layer for layer, value in enumerate(ratio) if value > args.threshold]}


def compare(searched: list[float], baseline: list[float]) -> dict:
    """Paired per-clip scores: mean ratio, clips where the searched schedule deviates less (wins) or more (losses),
    one-sided sign-test p-values for each direction, and a verdict."""
    searched, baseline = np.asarray(searched, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    wins, losses = int((searched < baseline).sum()), int((searched > baseline).sum())
    decided = wins + losses
    p_better = stats.binomtest(wins, decided, 0.5, alternative="greater").pvalue if decided else 1.0
    p_worse = stats.binomtest(losses, decided, 0.5, alternative="greater").pvalue if decided else 1.0
    ratio = float(searched.mean() / baseline.mean()) if baseline.mean() > 0 else 1.0
    if not decided:
        verdict = "same schedule"
    elif ratio < 1 and p_better < SIGNIFICANCE:
        verdict = "gain"
    elif ratio > 1 and p_worse < SIGNIFICANCE:
        verdict = "loss"
    else:
        verdict = "no significant difference"
    return {"score_ratio": ratio, "wins": wins, "losses": losses, "clips": len(searched), "p_better": float(p_better),
            "p_worse": float(p_worse), "verdict": verdict}


# ------------------------------------------------------------------------------------------------------------- main


class Runner:
    """The experiment's state: arguments, work folder, the commands it ran and the seconds each stage took."""

    def __init__(self, args):
        self.args = args
        self.weights_file, self.weights_sha256 = provenance.weights_digest(args.model, args.weights)
        options = [self.weights_sha256, *profile_argv(args, "", Path())]
        self.work = Path(args.work) / hashlib.sha256(json.dumps(options).encode()).hexdigest()[:12]
        self.reused = self.work.exists()  # then profile-layers reads the clips it already profiled from there
        self.commands: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()

    def clock(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._mark
        self._mark = now

    def profile(self, name: str, calib: str) -> tuple[Path, Profile]:
        argv = profile_argv(self.args, calib, self.work / f"profile-{name}")
        self.commands[f"profile {name}"] = shlex.join(["profile-layers", *argv])
        summary = run_json("profile-layers", profiler_cli.main, argv)
        self.clock(f"profile {name}")
        return Path(summary["profile"]), load_profile(summary["profile"])

    def search(self, name: str, profile: Path, budget: float) -> tuple[dict, Schedule]:
        out = self.work / "schedules" / f"{self.args.model}-b{budget:g}-{name}.yaml"
        argv = search_argv(self.args, profile, budget, out)
        self.commands[f"search {name} {budget:g}"] = shlex.join(["search-schedule", *argv])
        summary = run_json("search-schedule", search_cli.main, argv)
        self.clock("search")
        return summary, load_schedule(out)


def budget_schedules(runner: Runner, profile_path: Path, profile: Profile, budget: float, flop_config: FlopConfig,
                     sensitive: list[int], reduction: dict) -> tuple[dict, dict]:
    """The schedules of one budget (keys of ROWS) with their notes, and the two searches' summaries."""
    args, frames, layers = runner.args, runner.args.frames, profile.global_layers

    def uniform(merge: int) -> Callable[[int], Schedule]:
        return lambda factor: stride_schedule(args.model, [factor] * layers, merge, reduction, "uniform")

    def two_tier(factor: int, merge: int) -> Schedule:
        factors = two_tier_factors(layers, sensitive, factor, args.insensitive_factor)
        return stride_schedule(args.model, factors, merge, reduction, "two-tier")

    merge = mildest_merge(flop_config, frames, profile.query_merge, layers, budget, reduction, args.model)
    restricted = save_profile(restrict_query(profile, merge, profile_path), runner.work / f"profile-A-query-{merge}")
    searches = {"searched": runner.search("free", profile_path, budget),
                "searched_at_m": runner.search(f"query-{merge}", restricted, budget)}
    schedules, notes = {}, {}
    for name, uniform_name in (("searched", "uniform"), ("searched_at_m", "uniform_at_m")):
        searched = searches[name][1]
        target = global_attention_fraction(flop_config, frames, searched)
        build = uniform(factors_of(searched, frames)[1])
        options = fractions(flop_config, frames, build)
        _, factor, reached = least_at_or_above(options, target)
        below = most_within(options, target) or min(options)  # the fewest FLOPs if none is within
        schedules[name], schedules[uniform_name], schedules[f"{uniform_name}_below"] = \
            searched, build(factor), build(below[1])
        notes[uniform_name] = {"base_factor": factor, "reaches_searched_flops": reached}
        notes[f"{uniform_name}_below"] = {"base_factor": below[1]}
    within = most_within(fractions(flop_config, frames, lambda factor: two_tier(factor, merge)), budget)
    if within is None:
        raise RuntimeError(f"the two-tier rule cannot reach budget {budget:g} at query merge {merge}")
    schedules["two_tier"] = two_tier(within[1], merge)
    notes["two_tier"] = {"base_factor": within[1]}
    return {"merge": merge, "schedules": schedules, "notes": notes}, {name: summary for name, (summary, _) in
                                                                       searches.items()}


def budget_result(budget: float, plan: dict, searches: dict, rows: dict[str, list[dict]],
                  profiles: tuple[Profile, Profile], flop_config: FlopConfig, frames: int) -> dict:
    """One budget's schedules (levels, FLOPs, predicted and measured scores), paired comparisons and searches."""
    entries = {}
    for name, schedule in plan["schedules"].items():
        kv_factors, merge = factors_of(schedule, frames)
        entries[name] = {"kv_factor": kv_factors, "query_merge": merge,
                         "flops_fraction": global_attention_fraction(flop_config, frames, schedule),
                         "predicted": predicted_deviation(profiles[0], schedule, frames=frames),
                         "predicted_b": predicted_deviation(profiles[1], schedule, frames=frames),
                         "measured": mean_rows(rows[name]), "per_clip_score": [row["score"] for row in rows[name]],
                         **plan["notes"].get(name, {})}
    return {
        "budget": budget, "two_tier_query_merge": plan["merge"], "schedules": entries,
        "versus": {f"{first} vs {second}": compare(entries[first]["per_clip_score"], entries[second]["per_clip_score"])
                   for first, second in PAIRS},
        "searches": {name: {"knapsack": {key: summary["knapsack"][key]
                                         for key in ("deviation", "flops_fraction", "exact", "lower_bound")},
                            "optuna_best": None if summary["optuna_best"] is None else
                            {key: summary["optuna_best"][key] for key in ("deviation", "flops_fraction")},
                            "trials": summary["trials"]} for name, summary in searches.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.model = resolve_model_name(args.model)
    runner = Runner(args)
    started = time.perf_counter()

    (path_a, profile_a), (_, profile_b) = runner.profile("A", args.calib), runner.profile("B", args.replica)
    stable = stability(profile_a, profile_b, args.fixed_keep)
    if ProfileOptions.of_profile(profile_a).kv_method != PAPER_KV_METHOD:
        raise Spark3rError("the baselines prune K/V by frame stride: profile with --kv-method frame_stride")
    reduction = {key: profile_a.options[key] for key in ("keep_reference_frame", "group_frames", "similarity")
                 if key in profile_a.options}
    score_weights = profile_a.options.get("score_weights") or dict(DEFAULT_WEIGHTS)

    model = load_model(args.model, weights=args.weights, device="cpu", dtype=torch.float32, seed=args.seed)
    flop_config = model.flop_config(*profile_a.image_hw)
    calib = load_clips(args.calib, args.model, args.frames)
    if sorted(clip.fingerprint() for clip in calib) != sorted(clip["sha256"] for clip in profile_a.clips):
        raise Spark3rError(f"the clips of --calib {args.calib} differ from profile A's: remove {runner.work} and rerun")
    sensitivity = probe(model, calib, args, reduction, score_weights)
    runner.clock("probe")

    plans = {budget: budget_schedules(runner, path_a, profile_a, budget, flop_config, sensitivity["sensitive"],
                                      reduction) for budget in args.budgets}
    held_out = load_clips(args.held_out, args.model, args.frames)
    profiled = {clip["sha256"] for profile in (profile_a, profile_b) for clip in profile.clips}
    if any(clip.fingerprint() in profiled for clip in held_out):
        raise Spark3rError(f"--held-out {args.held_out} shares clips with the profiles: use another seed")
    everything = {f"{budget:g} {name}": schedule for budget, (plan, _) in plans.items()
                  for name, schedule in plan["schedules"].items()}
    measured = measure(model, held_out, everything, score_weights, ground_truth=True, desc="held-out",
                       cache=runner.work / "measured")
    runner.clock("held-out")

    budgets = [budget_result(budget, plan, searches, {name: measured[f"{budget:g} {name}"] for name in ROWS},
                             (profile_a, profile_b), flop_config, args.frames)
               for budget, (plan, searches) in plans.items()]
    result = {
        **provenance.record(__file__, argv, "cpu"), "commands": runner.commands, "threads": args.threads,
        "work_folder_reused": runner.reused,
        "weights": {"file": runner.weights_file, "sha256": runner.weights_sha256},
        "settings": {key: getattr(args, key) for key in ("model", "frames", "calib", "replica", "held_out", "kv_keep",
                                                          "query_merge", "additivity", "fixed_keep", "budgets",
                                                          "trials", "sampler", "verify", "probe_base", "probe_factor",
                                                          "threshold", "insensitive_factor", "seed")},
        "image": f"{profile_a.image_hw[0]}x{profile_a.image_hw[1]}", "score_weights": score_weights,
        "profiles": {name: {"path": str(runner.work / f"profile-{name}"), "clips": [c["name"] for c in p.clips],
                            "kv_keep": p.kv_keep, "query_merge": p.query_merge, **checks(p)}
                     for name, p in (("A", profile_a), ("B", profile_b))},
        "stability": stable, "probe": sensitivity, "held_out_dense": mean_rows(measured["dense"]),
        "budgets": budgets, "seconds": {**runner.seconds, "total": time.perf_counter() - started},
    }
    out = Path(args.out)
    provenance.write_result(out.with_suffix(".json"), result, report(result))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)
    return result


# ----------------------------------------------------------------------------------------------------------- report


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(result: dict) -> str:
    """The markdown summary of a result."""
    return "\n".join([*_header(result), *_stability(result), *_versus(result), *_optuna(result),
                      "Time: " + ", ".join(f"{stage} {value:.0f} s" for stage, value in result["seconds"].items())
                      + ".", ""])


def _header(result: dict) -> list[str]:
    settings = result["settings"]
    return [
        f"# {settings['model']} on CPU: profile stability and searched schedules vs baselines", "",
        f"Made by `{result['command']}` ({result['created']}, git {result['commit']}, torch "
        f"{result['torch']}, {result['device_name']}, {result['threads']} CPU threads"
        f"{'; profiles read from the cache of an earlier run' if result['work_folder_reused'] else ''}; weights "
        f"{result['weights']['file']}, sha256 "
        f"{result['weights']['sha256'][:12]}). It ran:", "",
        *[f"    {command}" for command in result["commands"].values()], "",
        f"Clips are generated with ground truth, {settings['frames']} frames at {result['image']}: profile A "
        f"(calibration) `{settings['calib']}`, profile B `{settings['replica']}`, held-out `{settings['held_out']}`. "
        "K/V is pruned by frame stride (keep 1/r keeps every r-th frame; every frame's special tokens are always "
        "kept). "
        "A score is `output_deviation`'s: relative depth L1 + relative point L2 + the camera terms (centre, rotation "
        "in radians, focal), each from the dense model's output.", "",
    ]


def _stability(result: dict) -> list[str]:
    settings, stable = result["settings"], result["stability"]
    layers = len(stable["per_layer"]["score.kv_mean"][0])
    fixed = f"kv_keep_{settings['fixed_keep']:g}"
    headline = [stable["spearman"][f"score.{fixed}"], stable["spearman"]["score.kv_mean"]]
    passed = all(value is not None and value >= SPEARMAN_BAR for value in headline)
    describe = {fixed: f"at K/V keep {settings['fixed_keep']:g}", "kv_mean": "averaged over the K/V levels",
                "query_mean": "averaged over the query merge levels"}
    lines = ["## 1. Profile stability (A vs B, disjoint clips)", "",
             f"Spearman rank correlation over the {layers} global layers of each layer's sensitivity in A and in B "
             f"(bar >= {SPEARMAN_BAR}; with {layers} layers, rho >= 0.8 allows a sum of squared rank differences of "
             f"at most {math.floor((1 - SPEARMAN_BAR) * layers * (layers**2 - 1) / 6 + 1e-9)}):", "",
             "| sensitivity | Spearman |", "|---|---:|"]
    for key, value in stable["spearman"].items():
        metric, name = key.split(".", 1)
        lines.append(f"| {metric} {describe[name]} | {_num(value)} |")
    lines += [f"| score at K/V keep {keep} | {_num(value)} |"
              for keep, value in stable["spearman_per_kv_level"].items() if float(keep) != settings["fixed_keep"]]
    lines += [f"| score, all (layer, K/V level) cells | {_num(stable['spearman_kv_cells'])} |", "",
              f"Verdict: the score's ranking {'passes' if passed else 'fails'} the bar at K/V keep "
              f"{settings['fixed_keep']:g} and averaged over the K/V levels.", "",
              f"| layer | A: score at keep {settings['fixed_keep']:g} | B | A: score, K/V mean | B | "
              "A: score, query mean | B |", "|---:|---:|---:|---:|---:|---:|---:|"]
    per_layer = stable["per_layer"]
    for layer in range(layers):
        cells = [per_layer[f"score.{name}"][run][layer] for name in (fixed, "kv_mean", "query_mean") for run in (0, 1)]
        lines.append(f"| {layer} | " + " | ".join(f"{value:.4f}" for value in cells) + " |")
    lines += ["", "The checks profile-layers prints, per profile:", ""]
    for name, profile in result["profiles"].items():
        additivity, asymmetry = profile["additivity"], profile["asymmetry"]
        ratios = ", ".join(f"{measured / summed:.2f}" for measured, summed in
                           zip(additivity["measured"] or [], additivity["predicted_sum"] or []) if summed)
        sides = "; ".join(f"{factor}x fewer tokens: query merge {q:.4f} vs K/V keep 1/{factor} {k:.4f} (queries "
                          f"worse on {worse} of {layers} layers)" for factor, q, k, worse in
                          zip(asymmetry["factors"], asymmetry["query_mean"], asymmetry["kv_mean"],
                              asymmetry["layers_query_worse"]))
        lines.append(f"- {name}: additivity: Spearman {_num(additivity['spearman'])} between the measured and the "
                     f"summed single-layer scores of {len(additivity['measured'] or [])} multi-layer schedules "
                     f"(measured / summed: {ratios}). Asymmetry (mean score over layers): {sides}.")
    return [*lines, ""]


def _versus(result: dict) -> list[str]:
    settings, probe_result = result["settings"], result["probe"]
    lines = [
        "## 2. Searched schedules vs baselines on held-out clips", "",
        f"searched: `search-schedule` on profile A ({settings['sampler']} sampler, {settings['trials']} trials after "
        "the knapsack warm start, one query merge factor r_Q for all layers"
        + (f"; its {settings['verify']} best predicted candidates run on profile B's clips and the best measured one "
           "exported" if settings.get("verify") else "; the predicted best exported") +
        "). uniform >= / <=: the searched r_Q and "
        "one K/V factor on every layer, with the least FLOPs at or above the searched schedule's / the most at or "
        "below it (frame-stride levels are coarse). two-tier: the paper's "
        f"procedure; sensitive layers keep 1/r, the others 1/({settings['insensitive_factor']}r), queries merged as "
        "mildly as the budget allows (r_Q = m: the least profiled merge factor with which K/V pruning reaches the "
        "budget), r giving the most FLOPs within the budget. searched / uniform at r_Q = m: the same search on "
        "profile A restricted to query merge {1, m}, and its uniforms; they compare per-layer K/V allocation at the "
        "two-tier's r_Q.", "",
        f"The paper's probe on the calibration clips: every layer at K/V factor {probe_result['base_factor']} (score "
        f"{probe_result['base_score']:.4f}), one layer at a time at factor {probe_result['probe_factor']}; sensitive "
        f"when the score exceeds {probe_result['threshold']}x the base: layers "
        f"{', '.join(map(str, probe_result['sensitive'])) or 'none'}.", "",
        "| layer | " + " | ".join(str(layer) for layer in range(len(probe_result["ratio"]))) + " |",
        "|---|" + "---:|" * len(probe_result["ratio"]),
        "| probe score / base score | " + " | ".join(f"{value:.3f}" for value in probe_result["ratio"]) + " |", "",
        "Held-out means over the clips (FLOPs: fraction of dense global-attention FLOPs; predicted A / B: the summed "
        "single-layer scores of profile A, which the search used, and of profile B; GT rotation error: RPE-rot, "
        "degrees):", "",
        "| budget | schedule | K/V factor per layer | FLOPs | predicted A | predicted B | score | depth | points | "
        "cameras | GT depth AbsRel | GT rotation error |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dense = result["held_out_dense"]
    lines.append(f"| - | dense | {' '.join(['1'] * len(probe_result['ratio']))} | 1.000 | 0 | 0 | 0 | 0 | 0 | 0 | "
                 f"{dense['abs_rel']:.4f} | {dense['rpe_rot']:.3f} |")
    for entry in result["budgets"]:
        for key, row in entry["schedules"].items():
            m = row["measured"]
            name = ROWS[key].format(m=entry["two_tier_query_merge"])
            if key in ("searched", "uniform", "uniform_below"):
                name += f", r_Q = {row['query_merge']}"
            short = "" if row.get("reaches_searched_flops", True) else " (under the searched)"
            lines.append(f"| {entry['budget']:g} | {name} | {' '.join(map(str, row['kv_factor']))} | "
                         f"{row['flops_fraction']:.3f}{short} | {row['predicted']:.4f} | {row['predicted_b']:.4f} | "
                         f"{m['score']:.4f} | {m['depth']:.4f} | {m['points']:.4f} | {m['cameras']:.4f} | "
                         f"{m['abs_rel']:.4f} | {m['rpe_rot']:.3f} |")
    lines += ["", "Paired over the held-out clips: mean score ratio, clips where the first deviates less (wins), "
              f"one-sided sign test; gain or loss when p < {SIGNIFICANCE}:", "",
              "| budget | comparison | score ratio | wins / clips | p | verdict |", "|---:|---|---:|---:|---:|---|"]
    for entry in result["budgets"]:
        merge = entry["two_tier_query_merge"]
        for pair, versus in entry["versus"].items():
            first, second = (ROWS[key].format(m=merge) for key in pair.split(" vs "))
            p = versus["p_better"] if versus["score_ratio"] <= 1 else versus["p_worse"]
            lines.append(f"| {entry['budget']:g} | {first} vs {second} | {versus['score_ratio']:.3f} | "
                         f"{versus['wins']} / {versus['clips']} | {p:.3f} | {versus['verdict']} |")
    return [*lines, ""]


def _optuna(result: dict) -> list[str]:
    lines = ["## 3. Optuna's best vs the exact knapsack optimum (predicted score on profile A)", "",
             "| budget | search | knapsack optimum | proven exact | Optuna best (warm start excluded) | gap | "
             "sampled trials |", "|---:|---|---:|---|---:|---:|---:|"]
    for entry in result["budgets"]:
        for name, search in entry["searches"].items():
            knapsack, best = search["knapsack"], search["optuna_best"]
            label = ROWS[name].format(m=entry["two_tier_query_merge"])
            if best is None:
                best_text, gap = "none within the budget", "n/a"
            else:
                best_text = f"{best['deviation']:.5f}"
                difference = best["deviation"] - knapsack["deviation"]
                gap = f"{difference / knapsack['deviation']:+.2%}" if knapsack["deviation"] > 0 \
                    else f"{difference:+.2g}"
            lines.append(f"| {entry['budget']:g} | {label} | {knapsack['deviation']:.5f} | "
                         f"{'yes' if knapsack['exact'] else 'no'} | {best_text} | {gap} | "
                         f"{search['trials']['sampled']} |")
    return [*lines, ""]


@command
def run(argv: list[str] | None = None) -> int:
    """The script's entry point: `main`, with bad input reported in one line and exit code 2."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run())
