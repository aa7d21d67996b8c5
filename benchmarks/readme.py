"""Rebuild the README's result sections from benchmarks/results/*.json.

    python benchmarks/readme.py            # rewrite README.md from the result files
    python benchmarks/readme.py --check    # exit 1, naming the sections, when README.md disagrees with the files

README.md holds each generated section between `<!-- results:NAME -->` and `<!-- /results:NAME -->`. A section is one
function of the results folder that returns its Markdown, registered with `@section("NAME")`: adding a section is that
function plus the two markers in README.md. Every table row says how its numbers were obtained: measured (one run timed
or evaluated whole) or assembled (summed from separately timed parts).
"""
from __future__ import annotations

import argparse
import difflib
import functools
import hashlib
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_head_dtype  # noqa: E402  (its `decide` is the one place the head-dtype rule is written)
import profile_screening  # noqa: E402  (its GOAL_SPEARMAN: the bar a profile shortcut is held to)
import models  # noqa: E402  (its PAPER_SPEEDUP: the paper's own speed-ups)
import speed_all  # noqa: E402  (its `setting`: what a results file was measured with)
import block_profile  # noqa: E402  (its `kernel_shares`: device time per kernel class)
import speed  # noqa: E402  (its END_TO_END: the stages that add up to end to end)
import length_schedules  # noqa: E402  (its `errors_paragraph`: where a length study's prediction errs)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "benchmarks" / "results"
MARKERS = re.compile(r"(<!-- results:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)
OPENING = re.compile(r"<!-- results:([a-z0-9-]+) -->")

MODEL_NAMES = {"vggt-1b": "VGGT-1B", "pi3": "pi3", "da3-giant": "DA3-giant", "vggt-omega": "VGGT-Omega"}

SECTIONS: dict[str, Callable[[Path], str]] = {}


class ReadmeError(Exception):
    """The README's markers do not fit the registered sections."""


def section(name: str) -> Callable[[Callable[[Path], str]], Callable[[Path], str]]:
    """Register `build(results folder) -> Markdown` as the generated text between the markers of `name`."""

    def register(build: Callable[[Path], str]) -> Callable[[Path], str]:
        SECTIONS[name] = build
        return build

    return register


def load(results: Path, name: str) -> dict:
    return json.loads((results / name).read_text())


def gpu(record: dict) -> str:
    """The short name of the device a result ran on: "NVIDIA H100 80GB HBM3" -> "H100"."""
    return record["device_name"].removeprefix("NVIDIA ").split()[0]


def prose(text: str, indent: str = "") -> str:
    """A paragraph (or, with indent, a list item) wrapped at the README's 120 columns."""
    return textwrap.fill(text, width=120, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def rebuild(text: str, results: Path) -> str:
    """`text` (a README) with every registered section regenerated from `results`."""
    found = OPENING.findall(text)
    unknown = sorted(set(found) - set(SECTIONS))
    if unknown:
        raise ReadmeError(f"README.md has markers for {', '.join(unknown)}, which no function in "
                          "benchmarks/readme.py generates: add one with @section or remove the markers")
    missing = [name for name in SECTIONS if name not in found]
    if missing:
        raise ReadmeError(f"README.md has no <!-- results:{missing[0]} --> ... <!-- /results:{missing[0]} --> "
                          "markers: add them where the section belongs")

    def fill(match: re.Match) -> str:
        body = SECTIONS[match["name"]](results).strip("\n")
        return f"{match[1]}{body}\n{match[4]}"

    rebuilt, count = MARKERS.subn(fill, text)
    if count != len(found):
        raise ReadmeError("README.md has an opening results marker without its closing one: close every section "
                          "with <!-- /results:NAME -->")
    return rebuilt


def stale_sections(text: str, rebuilt: str) -> list[str]:
    """Names of the sections whose text differs between the README and its rebuild."""
    current = {match["name"]: match["body"] for match in MARKERS.finditer(text)}
    return [match["name"] for match in MARKERS.finditer(rebuilt) if current.get(match["name"]) != match["body"]]


# ----------------------------------------------------------------------------------------------- speed and memory


@section("speed")
def speed_section(results: Path) -> str:
    """The latest run of each configuration of the one-GPU benchmark (`speed_all_lines`), then where the earlier runs
    are."""
    latest = dict(speed_all_lines(results))
    lines = ["| what | result | how |", "|---|---|---|", *(latest[key] for key in sorted(latest, key=speed_order))]
    earlier = [name for name in SPEED_ALL_RUNS if (results / name).is_file()]
    return "\n".join(lines + ["", prose(
        "Each row is the latest run of its configuration (model, schedule, blocks, heads, GPU; for profiles the "
        "options). Every run, in the order measured, with its stages, ceilings and the issue's goals: "
        + ", ".join(f"`{name[:-5]}.md`" for name in earlier) + " in `benchmarks/results/`."), "",
        *stage_bounds(results), *autotuned_heads(results)])


BOUNDS_RUN = "speed-all-memory.json"  # the latest run of the paper rule at 1000 frames with compiled blocks
BOUNDS_PROFILES = {"vggt-1b": "block-profile-vggt-1b-1000-c6bac26.json",  # block_profile.py runs by model
                   "da3-giant": "block-profile-da3-giant-1000-c6bac26.json"}
BOUND_PARTS = {  # stage: (block-profile part, label), the first one a profile holds
    "encoder": [("encoder block, compiled", "compiled encoder block")],
    "frame blocks": [("frame block, compiled", "compiled frame block")],
    "global blocks": [("global block, compiled", "compiled global block")],
    "heads": [("heads, compiled", "compiled call of the DPT heads (fp32)"),
              ("heads", "call of the DPT heads (fp32, eager)")]}


def stage_bounds(results: Path) -> list[str]:
    """What bounds each stage of BOUNDS_RUN's paper-rule rows at speed_all's GOAL_FRAMES that runs below its
    GOAL_CEILING_SHARE of the ceiling (the share speed_all stored with the row): the share of the matching
    block-profile part's kernel time in memory-bound kernels (which the FLOP model does not count), and where the
    compute-bound kernels alone would put the stage."""
    if not (results / BOUNDS_RUN).is_file():
        return []
    run = load(results, BOUNDS_RUN)
    items = []
    for row in run["rows"]:
        if row["kind"] != "speed" or row["schedule"] != "paper" or row["frames"] != speed_all.GOAL_FRAMES:
            continue
        name = BOUNDS_PROFILES.get(row["model"])
        profile = load(results, name) if name else None
        for stage in speed.END_TO_END:
            share = row["predicted"]["ceiling_fraction"][stage]
            if share >= speed_all.GOAL_CEILING_SHARE:
                continue
            part, label = next(((part, label) for part, label in BOUND_PARTS[stage]
                                if profile is not None and part in profile["kernels"]), (None, None))
            if part is None:
                items.append(f"- {row['model']} {stage}, {share:.0%} of its ceiling: not in a block profile yet.")
                continue
            shares = block_profile.kernel_shares(profile["kernels"][part])
            memory = 1 - sum(shares[label] for label in block_profile.COMPUTE_KERNELS)
            tf32 = stage == "heads" and profile["tf32"]["cudnn"]
            items.append(prose(
                f"- {row['model']} {stage}, {share:.0%} of its ceiling: {memory:.0%} of the kernel time of a {label} "
                f"(`{name[:-5]}.md`) is in memory-bound kernels (normalisation, upsampling, elementwise and copies), "
                f"which the FLOP model does not count; its compute-bound kernels alone would put the stage at "
                f"{share / (1 - memory):.0%}" + (", and its convolutions run in TF32, as upstream's fp32 heads do, "
                                                 "at half the bf16 rate" if tf32 else "") + ".", indent="  "))
    if not items:
        return []
    return [prose(f"What bounds each stage below {speed_all.GOAL_CEILING_SHARE:.0%} of its ceiling at "
                  f"{speed_all.GOAL_FRAMES} frames under the paper rule (`{BOUNDS_RUN[:-5]}.md`; the shares come from "
                  "one profiled call of each part, measured whole):"), "", *items]


AUTOTUNE_PROFILES = {"vggt-1b": "block-profile-vggt-1b-1000-a84dfe5.json",  # block_profile.py runs that timed
                     "da3-giant": "block-profile-da3-giant-1000-a84dfe5.json"}  # the autotuned heads, by model


def autotuned_heads(results: Path) -> list[str]:
    """Whether cuDNN's autotuned convolution algorithms speed up the compiled fp32 heads (AUTOTUNE_PROFILES): the
    times with and without, the outputs' largest relative distance, and what follows for the default."""
    runs = {model: load(results, name) for model, name in AUTOTUNE_PROFILES.items() if (results / name).is_file()}
    if not runs:
        return []
    gains = {model: run["times_s"]["heads, compiled"] / run["times_s"]["heads, compiled, cuDNN autotuned"] - 1
             for model, run in runs.items()}
    distance = max(max(run["autotuned heads vs shipped"].values()) for run in runs.values())
    times = "; ".join(f"{model} {run['times_s']['heads, compiled, cuDNN autotuned']:.3f} s against "
                      f"{run['times_s']['heads, compiled']:.3f} s (`{AUTOTUNE_PROFILES[model][:-5]}.md`, "
                      f"{gpu(run)})" for model, run in runs.items())
    within = max(gains.values()) < 0.03
    outputs = ("the outputs are identical" if distance == 0 else
               f"the outputs differ by at most {distance:.1e} (relative L2)")
    return ["", prose("cuDNN's autotuned convolution algorithms (`torch.backends.cudnn.benchmark`) "
                      + ("leave the compiled fp32 heads within 3% of their time" if within else
                         "speed up the compiled fp32 heads by " + ", ".join(f"{gain:.0%} ({model})"
                                                                            for model, gain in gains.items()))
                      + f", medians of whole calls: {times}; {outputs}, so "
                      + ("the heads keep cuDNN's default algorithms." if within else "they could become the default."))]


def speed_order(key: tuple) -> tuple:
    """Speed rows (dense, then paper rule; compiled and fp32 heads first) before profiles, by model family."""
    if key[0] == "speed":
        _, model, schedule, blocks, head_dtype, device = key
        return (0, list(MODEL_NAMES).index(model), schedule != "dense", blocks != "compiled", head_dtype != "fp32",
                device)
    _, model, options, blocks, device = key
    return (1, list(MODEL_NAMES).index(model), options, blocks != "compiled", device)


HEADS_NOISE_FILE = "block-profile-vggt-1b-1000-h100.json"  # the first block profile with bf16-head noise rows


@section("compute-heads")
def compute_heads_section(results: Path) -> str:
    """What `--head-dtype compute` costs in fidelity: each model's relative L2 distance from fp32 outputs with the
    trunk in bf16, and with the dense heads in bf16 too (block_profile's noise rows)."""
    data = load(results, HEADS_NOISE_FILE)
    models = {"vggt-tiny": f"vggt-tiny ({tiny_weights(data.get('weights_sha256'))} weights)",
              "vggt-1b": "VGGT-1B (random weights)"}
    keys = ("depth", "points")
    lines = [prose(
        "`--head-dtype compute` (on `reconstruct` and `evaluate-schedule`; from Python `load_model(..., "
        "head_dtype=\"compute\")`) runs the dense heads in the trunk's `--dtype` instead of fp32 as upstream (the camera "
        "heads stay fp32). It is opt-in because it moves the outputs beyond the bf16 trunk's own noise: relative L2 "
        f"distance from the fp32 model's outputs ({gpu(data)}, `benchmarks/results/{HEADS_NOISE_FILE[:-5]}.md`):"), "",
        "| model | frames | " + " | ".join(f"{key}: bf16 trunk | {key}: bf16 trunk and heads" for key in keys)
        + " | how |", "|---|---:|" + "---:|" * (2 * len(keys)) + "---|"]
    for row in data["noise"]:
        lines.append(f"| {models[row['model']]} | {row['frames']} | "
                     + " | ".join(f"{row[f'bf16 vs fp32 {key}']:.1e} | {row[f'bf16 with bf16 heads vs fp32 {key}']:.1e}"
                                  for key in keys) + " | measured, random images |")
    heads = {}
    for name in HEADS_TIME_FILES:
        run = load(results, name)
        row = next(row for row in run["rows"] if row.get("kind") == "speed" and row["frames"] == 1000)
        heads[speed_all.setting(run["settings"], "head_dtype")] = (row, run["settings"]["device_name"], name)
    (fp32, device, fp32_name), (compute, _, compute_name) = heads["fp32"], heads["compute"]
    lines += ["", prose(
        f"Time: the heads of {MODEL_NAMES[fp32['model']]} + paper rule at {fp32['frames']} frames take "
        f"{compute['stages_s']['heads']:.2f} s in the compute dtype against {fp32['stages_s']['heads']:.2f} s in fp32, "
        f"{compute['end_to_end_s']:.1f} s against {fp32['end_to_end_s']:.1f} s end to end (measured whole, {device}, "
        f"`{compute_name}` and `{fp32_name}`).")]
    return "\n".join(lines)


# the two speed_all runs that differ only in --head-dtype (their heads stage is the compute-dtype time)
HEADS_TIME_FILES = ("speed-all-h100-fp32-heads-e216bab.json", "speed-all-h100-compute-heads-e216bab.json")


# every run of benchmarks/speed_all.py the README's speed table shows, in this order
SPEED_ALL_RUNS = ("speed-all-eager.json", "speed-all.json", "speed-all-h100.json",
                  "speed-all-h100-compute-heads.json", "speed-all-h100-profile-alternate.json",
                  "speed-all-h100-profile-alternate-compute-heads.json", "speed-all-h100-compute-heads-rerun.json",
                  "speed-all-h100-compute-heads-write.json", "speed-all-h100-compute-heads-write-rerun.json",
                  "speed-all-h100-compute-heads-uv.json", "speed-all-h100-fp32-heads-e216bab.json",
                  "speed-all-h100-compute-heads-e216bab.json",
                  "speed-all-h100-profile-alternate-compute-heads-reference.json",
                  "speed-all-h100-fp32-heads-metric.json", "speed-all-spans.json", "speed-all-memory.json")


def speed_all_lines(results: Path) -> list[tuple[tuple, str]]:
    """(configuration, table row) for the 1000-frame rows and profiles of every run of the one-GPU benchmark
    (SPEED_ALL_RUNS, in the order measured): each with the FLOP model's time at the measured ceilings, and a paper
    row's speed-up over the dense row of its file beside the FLOP model's and the paper's own."""
    lines = []
    for name in SPEED_ALL_RUNS:
        if not (results / name).is_file():
            continue
        data = load(results, name)
        blocks = data["settings"].get("blocks", "eager")
        head_dtype = speed_all.setting(data["settings"], "head_dtype")
        heads = "" if head_dtype == "fp32" else ", dense heads in the compute dtype (opt-in)"
        device = data["settings"]["device_name"]
        for row in data["rows"]:
            if row.get("kind") != "speed" or row["frames"] != 1000 or row.get("out_of_memory"):
                continue
            ceiling = (row.get("predicted") or {}).get("ceiling_end_to_end_s")
            paper = models.PAPER_SPEEDUP.get(row["model"])
            lines.append((("speed", row["model"], row["schedule"], blocks, head_dtype, device),
                f"| {MODEL_NAMES[row['model']]} {'+ paper rule' if row['schedule'] == 'paper' else row['schedule']}, "
                f"1000 frames, {blocks} blocks{heads} ({device}, `benchmarks/speed_all.py`) | "
                f"{row['end_to_end_s']:.1f} s end to end"
                + (f" (the FLOP model at the measured ceilings: {ceiling:.1f} s)" if ceiling else "")
                + (f", {row['speedup']:.1f}x over dense (FLOP model: {row['flop_speedup']:.1f}x"
                   + (f"; paper: {paper}" if paper else "") + ")"
                   if row["schedule"] != "dense" and row.get("speedup") else "")
                + f", {row['peak_gib']:.1f} GiB peak"
                + (" (its largest measured part's: a lower bound)" if row["how"] != "measured whole" else "")
                + f" | {row['how']} at {row['measured_by']['commit'][:7]} (`{name}`; stages and goals in "
                f"`{name[:-5]}.md`) |"))
        options = speed_all.setting(data["settings"], "profile_options")
        for row in data["rows"]:
            if row.get("kind") == "profile":
                lines.append((("profile", row["model"], options, blocks, device),
                    f"| profile-layers on {MODEL_NAMES[row['model']]}, {row['global_layers']} layers x "
                    f"{row['kv_levels'] + row['query_levels']} levels, {row['clips']} x {row['frames']} frames, "
                    f"{blocks} blocks{f' (`{options}`)' if options else ''} ({device}, "
                    "`benchmarks/speed_all.py`) | "
                    f"{row['seconds_per_clip']:.0f} s per clip; {row['goal_clips']} clips: {row['goal_clips_s']:.0f} s"
                    + (" (the first clip compiles its shapes)" if blocks == "compiled" else "")
                    + f" | {row['how']} at {row['measured_by']['commit'][:7]} (`{name}`) |"))
    return lines


# ----------------------------------------------------------------------------------------------- the tiny model

TINY_COLUMNS = (("abs_rel", "depth AbsRel", 3), ("delta_1.25", "delta<1.25", 3),
                ("rotation_deg", "rotation err (deg)", 2),
                ("translation", "translation err", 3), ("ate", "ATE", 3), ("auc30", "AUC@30", 3))
TINY_ROWS = {"model": "vggt-tiny", "frame_only": "vggt-tiny, frame-only global attention",
             "trivial": "constant depth / identity cameras"}


@section("head-dtype")
def head_dtype_section(results: Path) -> str:
    data = load(results, "profile-head-dtype-vggt-1b.json")
    decision, comparison = profile_head_dtype.decide(data), data["comparison"]
    compute = data["profiles"]["compute"]["decode_dtype"]
    how = "measured, one profile each" + (f" ({data['note']})" if data.get("note") else "")
    lines = [prose(f"On {data['model']} (random weights, {data['device_name']}; "
                   "`benchmarks/results/profile-head-dtype-vggt-1b.md`):"), "",
             f"| | fp32 heads | {compute} heads | how |", "|---|---:|---:|---|",
             f"| decode (s) | {decision['decode_s']['fp32']:.1f} | {decision['decode_s']['compute']:.1f} | {how} |",
             f"| smallest Spearman of a level's layer ranking against fp32 | 1 | {comparison['min_spearman']:.3f} | "
             "measured |",
             f"| largest relative change of a level's score | 0 | {decision['largest_score_change']:.3g} "
             f"({decision['largest_at']}) | measured |", "",
             f"The default is therefore **{decision['default']}**"
             + ("." if decision["default"] == "compute" else f": {_join(decision['reasons'])}.")]
    return "\n".join(lines)


SCREENING_RUNS = ("profile-screening-vggt-tiny-32.json", "profile-screening-vggt-tiny-256.json",
                  "profile-screening-vggt-tiny-s8-32.json", "profile-screening-vggt-tiny-s8-256.json")
BUNDLED_TINY = REPO / "spark3r" / "weights" / "vggt-tiny.safetensors"
TINY_STAGES = {  # vggt-tiny's trained weights by sha256 (stages: benchmarks/results/train-vggt-tiny-long.md)
    "ba992cafff3df7fe91d7a65af5515f098f0c1dc26998388b07d01ab92738cc09": "the 6 + 6 model",
    "a4a0e13b956e6956ab86e2c08ea68c18f6e296002ac6c137de2633d6787a07d7": "stage 1",
    "5099ea1298fc34029c023bc5073bbcb765f8716e72f7335664920a5fbcd561a7": "stage 2",
    "06ac28a2b90c5a97704347d6a8f2bd0322852d2dba619d9fd871f30497f31e56": "stage 7",
    "8a90c92d72b2620b7508ccc39a85cdaa84bec1b18fff13d9488d0e4b8c464998": "stage 8",
}


@functools.cache
def bundled_tiny_sha() -> str:
    return hashlib.sha256(BUNDLED_TINY.read_bytes()).hexdigest()


def tiny_weights(sha: str | None, weights: str = "auto") -> str:
    """The trained vggt-tiny weights of sha256 `sha` ("stage 8, shipped", "stage 2"); for a result that recorded no
    hash, the file `weights` it named, or "weights not recorded"."""
    if sha is None:
        return "weights not recorded" if weights == "auto" else f"`{Path(weights).name}`"
    name = TINY_STAGES.get(sha, f"weights {sha[:12]}")
    return f"{name}, shipped" if sha == bundled_tiny_sha() else name


def profiled(data: dict, option: str) -> str:
    """The value of `option` (e.g. "--calib") in the profile command of a profile_screening run."""
    words = data["profile_command"].split()
    return words[words.index(option) + 1]


def screened_weights(data: dict) -> str:
    """The weights a profile_screening run profiled (`tiny_weights` of the --weights its profile command names)."""
    return tiny_weights(data.get("weights_sha256"), profiled(data, "--weights"))


@section("profile-screening")
def profile_screening_section(results: Path) -> str:
    runs = [load(results, name) for name in SCREENING_RUNS]
    kind = {"kv": "K/V keep", "query": "query merge"}
    how = "measured: profile-layers run on the same clips with every level resumed and screened"
    lines = [prose("On the trained vggt-tiny, against resuming every level (each column one run of "
                   "`benchmarks/profile_screening.py`; its markdown beside the JSON in `benchmarks/results/`):"), "",
             "| | " + " | ".join(f"{data['frames']} frames, `{profiled(data, '--calib')}`, {screened_weights(data)}, "
                                 f"{data['device_name']}" for data in runs) + " | how |",
             "|---|" + "---:|" * len(runs) + "---|"]

    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(data) for data in runs) + f" | {how} |"

    def screen_of(data: dict, resume: str) -> dict | None:
        return next((screen for screen in data["screens"] if screen["resume"] == resume), None)

    def per_screen(resume: str, cell) -> Callable[[dict], str]:
        return lambda data: "n/a" if (screen := screen_of(data, resume)) is None else cell(data, screen)

    resumes = list(dict.fromkeys(screen["resume"] for data in runs for screen in data["screens"]))
    for resume in resumes:
        lines += [row(f"{resume}: levels resumed per layer", per_screen(
                      resume, lambda data, screen: f"{sum(r['resumed'] for r in screen['rows'])} "
                                                   f"(of {len(screen['rows'])})")),
                  row(f"{resume}: resume + decode, against all levels (s)", per_screen(
                      resume, lambda data, screen: f"{data['all_s']:.1f} -> {screen['seconds']:.1f} "
                                                   f"({screen['seconds'] / data['all_s']:.2f})")),
                  row(f"{resume}: whole profile, against all levels (s)", per_screen(
                      resume, lambda data, screen: f"{data['all_wall_s']:.1f} -> {screen['wall_s']:.1f} "
                                                   f"({screen['wall_s'] / data['all_wall_s']:.2f})")),
                  row(f"{resume}: lowest Spearman of an estimated level's layer ranking, its largest score change",
                      per_screen(resume, lambda data, screen: worst_estimate(screen, kind)))]
    verdicts, bar = [], profile_screening.GOAL_SPEARMAN
    for resume in resumes:
        lows = [(data, min(r["spearman"] for r in screen["rows"])) for data in runs
                if (screen := screen_of(data, resume)) is not None]
        saved = ", ".join(f"{1 - screen['seconds'] / data['all_s']:.0%} at {data['frames']} frames "
                          f"({screened_weights(data)})"
                          for data in runs if (screen := screen_of(data, resume)) is not None)
        verdicts.append(f"`--resume-levels {resume}` keeps every level's layer ranking at Spearman "
                        + ", ".join(f"{low:.3f} or more at {data['frames']} frames ({screened_weights(data)})"
                                    for data, low in lows)
                        + f" (at or above the bar of {bar} in {sum(low >= bar for _, low in lows)} of {len(lows)} "
                        f"runs) and saves {saved} of resume + decode.")
    lines += ["", prose(" ".join(verdicts) + " Screening stays opt-in: it is measured on vggt-tiny only.")]
    return "\n".join(lines)


def worst_estimate(screen: dict, kind: dict) -> str:
    """The estimated level with the lowest Spearman of one screen: its Spearman, largest change and name."""
    estimated = [r for r in screen["rows"] if not r["resumed"]]
    worst = min(estimated, key=lambda r: r["spearman"])
    return f"{worst['spearman']:.3f}, {worst['max_rel_diff']:.0%} ({kind[worst['kind']]} {worst['level']:g})"


@section("tiny-model")
def tiny_model_section(results: Path) -> str:
    evaluation = load(results, "eval-vggt-tiny.json")
    frames = evaluation["frames"][0]
    length = evaluation["lengths"][str(frames)]
    scores = length["results"]
    lines = [prose(f"vggt-tiny ({tiny_weights(evaluation.get('weights_sha256'))}) evaluated on {length['count']} "
                   f"held-out clips of {frames} frames at {length['size'][0]} px, "
                   f"`{evaluation['clips']}` "
                   f"(`{evaluation['command']}`, {evaluation['device_name']}; "
                   "`benchmarks/results/eval-vggt-tiny.json`):"),
             "",
             "| | " + " | ".join(label for _, label, _ in TINY_COLUMNS) + " | how |",
             "|---|" + "---:|" * len(TINY_COLUMNS) + "---|"]
    for row, label in TINY_ROWS.items():
        lines.append(f"| {label} | " + " | ".join(f"{scores[row][key]:.{digits}f}" for key, _, digits in TINY_COLUMNS)
                     + " | measured |")
    model, frame_only, trivial = scores["model"], scores["frame_only"], scores["trivial"]
    depth, rotation = trivial["abs_rel"] / model["abs_rel"], trivial["rotation_deg"] / model["rotation_deg"]
    versus_trivial = (f"It beats the trivial baselines (their depth error is {depth:.1f}x its own, their rotation "
                      f"error {rotation:.1f}x)" if min(depth, rotation) > 1 else
                      f"It does not beat the trivial baselines everywhere (their depth error is {depth:.1f}x its own, "
                      f"their rotation error {rotation:.1f}x)")
    pose = frame_only["rotation_deg"] / model["rotation_deg"]
    carries = ("its global attention carries the pose" if pose > 1 else "its global attention does not carry the pose")
    lines += ["", prose(
        f"{versus_trivial}; {carries}: with every global layer reduced to frame-only attention the rotation error is "
        f"{pose:.1f}x its own, translation {frame_only['translation'] / model['translation']:.1f}x, ATE "
        f"{frame_only['ate'] / model['ate']:.1f}x.")]
    return "\n".join(lines)


SHIPPED_TINY_EVAL = "eval-vggt-tiny-long-s8-cpu.json"  # the bundled weights by length (its weights_sha256 says so)
EARLIER_TINY_EVAL = "eval-vggt-tiny-long-s2-cpu.json"  # stage 2, bundled before them: the same clips on the same CPU


@section("tiny-long")
def tiny_long_section(results: Path) -> str:
    evaluation, earlier = load(results, SHIPPED_TINY_EVAL), load(results, EARLIER_TINY_EVAL)
    lines = [prose(f"Dense quality by clip length of vggt-tiny ({tiny_weights(evaluation['weights_sha256'])}) on "
                   f"{next(iter(evaluation['lengths'].values()))['count']} held-out walks `{evaluation['clips']}` "
                   f"(`{evaluation['command']}`, {evaluation['device_name']}; "
                   f"`benchmarks/results/{SHIPPED_TINY_EVAL}`, "
                   "report `train-vggt-tiny-long.md`):"),
             "",
             "| frames | | " + " | ".join(label for _, label, _ in TINY_COLUMNS) + " | how |",
             "|---:|---|" + "---:|" * len(TINY_COLUMNS) + "---|"]
    for frames, length in evaluation["lengths"].items():
        for row, label in TINY_ROWS.items():
            scores = length["results"][row]
            lines.append(f"| {frames} | {label} | " + " | ".join(f"{scores[key]:.{digits}f}"
                                                             for key, _, digits in TINY_COLUMNS) + " | measured |")
    model = {int(f): entry["results"]["model"] for f, entry in evaluation["lengths"].items()}
    frame_only = {int(f): entry["results"]["frame_only"] for f, entry in evaluation["lengths"].items()}
    before = {int(f): entry["results"]["model"] for f, entry in earlier["lengths"].items()}
    short, long = min(model), max(model)
    held = [f for f in sorted(model) if model[f]["ate"] <= 2 * model[short]["ate"]]
    carried = [f for f in sorted(model) if frame_only[f]["ate"] >= 3 * model[f]["ate"]]
    pose = (f"Pose stays within 2x of its {short}-frame ATE at every length" if max(held) == long else
            f"Pose stays within 2x of its {short}-frame ATE up to {max(held)} frames and not beyond (ATE "
            f"{model[long]['ate'] / model[short]['ate']:.0f}x and rotation error "
            f"{model[long]['rotation_deg'] / model[short]['rotation_deg']:.1f}x at {long} frames)")
    lines += ["", prose(
        f"Depth AbsRel at {long} frames is {model[long]['abs_rel'] / model[short]['abs_rel']:.2f}x its {short}-frame "
        f"value. {pose}; AUC@30 at {long} frames is {model[long]['auc30']:.2f}. Frame-only global attention is at "
        f"least 3x worse in ATE at {_join([str(f) for f in carried]) or 'no length'} frames"
        f"{' only' if carried and len(carried) < len(model) else ''}. "
        f"{tiny_weights(earlier['weights_sha256']).capitalize()}, bundled "
        f"before, had at {long} frames a rotation error of {before[long]['rotation_deg']:.1f} deg against "
        f"{model[long]['rotation_deg']:.1f} now, ATE {before[long]['ate']:.3f} against {model[long]['ate']:.3f} and "
        f"AUC@30 {before[long]['auc30']:.2f} against {model[long]['auc30']:.2f} (`{EARLIER_TINY_EVAL}`).")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- length-aware search

LENGTH_1B_FILE = "length-1b-speed.json"
LENGTH_FILES = {  # the first that exists, with what the reader should know of it
    "length-schedules.json": ".",
    "length-schedules-cpu-small.json": " (a small CPU run of the mechanics; the GPU run replaces it).",
}
LENGTH_METRICS = (("score", "deviation"), ("abs_rel", "AbsRel"), ("ate", "ATE"), ("auc30", "AUC@30"))


@section("length")
def length_section(results: Path) -> str:
    name = next((name for name in LENGTH_FILES if (results / name).is_file()), next(iter(LENGTH_FILES)))
    data = load(results, name)
    settings, fit, prediction = data["settings"], data["length_model"]["held_out"], data["prediction"]
    frames, clips = settings["frames"], data["budgets"][0]["versus"]["searched vs paper"]["score"]["clips"]
    weights = tiny_weights(data.get("weights_sha256"), settings["weights"])
    lines = [prose(f"{data['global_layers']}-layer {settings['model']} ({weights}) "
                   f"profiled at {settings['profile_frames']} "
                   f"frames, searched and measured at {frames} frames on {clips} held-out clips `{settings['held_out']}` "
                   f"(`{data['command']}`, {data['device_name']}; `benchmarks/results/{name}`, with the paired tests "
                   f"in `{name.removesuffix('.json')}.md`):"), "",
             "| budget (x paper rule) | schedule | FLOPs | predicted deviation | "
             + " | ".join(label for _, label in LENGTH_METRICS) + " | how |", "|---:|---|---:|---:|" + "---:|" * 4 + "---|"]
    for budget in data["budgets"]:
        for schedule in ("searched", "paper", "uniform"):
            entry = budget["schedules"][schedule]
            lines.append(f"| {budget['scale']:g}x ({budget['budget']:.4f}) | {schedule} | {entry['flops_fraction']:.4f} "
                         f"| {entry['predicted']:.3f} | "
                         + " | ".join(f"{entry['measured'][key]:.3f}" for key, _ in LENGTH_METRICS)
                         + " | measured on the held-out clips (FLOPs and prediction: the models) |")
    tightest = min(data["budgets"], key=lambda budget: budget["budget"])
    ratios = {versus: tightest["versus"][f"searched vs {versus}"]["score"]["ratio"] for versus in ("paper", "uniform")}
    losses, capped = length_losses(data["budgets"]), capped_budgets(data["budgets"])
    goal = all(ratio <= 0.75 for ratio in ratios.values()) and not losses
    lines += ["", prose(
        f"Length model: fitted on {', '.join(map(str, fit['fitted_on']))} frames, Spearman {fit['all']['spearman']:.2f} "
        f"at the held-out {fit['frames']} frames; at {frames} frames its predictions rank "
        f"{len(prediction['schedules'])} random length-aware schedules with Spearman {prediction['spearman']:.2f} "
        f"against their measured deviation (goal: 0.9). At the tightest budget ({tightest['scale']:g}x) the searched "
        f"schedule's deviation is {ratios['paper']:.3f}x the paper rule's and {ratios['uniform']:.3f}x the best "
        f"uniform schedule's; significantly worse (Wilcoxon, p < 0.05) in "
        f"{_join(losses) if losses else 'no comparison'}"
        + (f" (at {_join(capped)} the budget is the whole dense attention, so the uniform schedule there is the dense "
           "model itself)" if capped else "")
        + f". The issue's goal (at most 0.75x both at the tightest budget, "
        f"never significantly worse) is {'met' if goal else 'not met'} here"
        + LENGTH_FILES[name] + dense_pose_sentence(data) + verify_sentence(data))]
    if "deployment_profile" in prediction:
        lines += ["", prose(length_schedules.errors_paragraph(prediction, settings))]
    for further in LENGTH_FURTHER_RUNS:
        lines += ["", length_run_line(further, load(results, further))]
    return "\n".join(lines + length_1b_lines(results))


def verify_sentence(data: dict) -> str:
    """Where a length study's `search-schedule --verify` exported the best uniform schedule, and where the held-out
    clips reverse the order it measured ("" for a study without verification)."""
    verified = [budget for budget in data["budgets"] if budget.get("verification")]
    if not verified:
        return ""
    settings = data["settings"]
    uniform = [f"{b['scale']:g}x" for b in verified
               if b["verification"]["exported"] == b["verification"]["uniform"]["measured_deviation"]]
    reversed_ = [b for b in verified
                 if b["verification"]["exported"] < b["verification"]["uniform"]["measured_deviation"]
                 and b["versus"]["searched vs uniform"]["score"]["verdict"] == "loss"]
    return (f" Verification (`--verify {settings['verify']}` on `{settings['replica']}`) measured the best uniform "
            f"schedule beside the predicted best and exported it at {_join(uniform) if uniform else 'no budget'}"
            + "".join(f"; at {b['scale']:g}x it measured the searched {b['verification']['exported']:.3f} there "
                      f"against the uniform's {b['verification']['uniform']['measured_deviation']:.3f}, an order the "
                      "held-out clips reverse" for b in reversed_) + ".")


def length_losses(budgets: list[dict]) -> list[str]:
    """Each comparison of a length study's `budgets` where the searched schedule is significantly worse, as
    "<scale>x <baseline> <metric>"."""
    return [f"{budget['scale']:g}x {comparison.removeprefix('searched vs ')} {metric}"
            for budget in budgets for comparison, metrics in budget["versus"].items()
            for metric, test in metrics.items() if test["verdict"] == "loss"]


def capped_budgets(budgets: list[dict]) -> list[str]:
    """The scales ("2x") of a length study's budgets that reach the whole dense attention."""
    return [f"{budget['scale']:g}x" for budget in budgets if budget["budget"] >= 1]


LENGTH_FURTHER_RUNS = ("length-schedules-s8-96.json",  # length_schedules.py on other weights or at other lengths
                       "length-schedules-s2-256.json")


def length_run_line(name: str, data: dict) -> str:
    """One paragraph on a further run of the length study: its weights and length, and the searched schedule's
    deviation against the paper rule's and the best uniform schedule's at each budget below dense."""
    settings = data["settings"]
    shown = [budget for budget in data["budgets"] if budget["budget"] < 1]
    capped, losses = capped_budgets(data["budgets"]), length_losses(shown)
    ratios = {budget["scale"]: {versus: budget["versus"][f"searched vs {versus}"]["score"]["ratio"]
                                for versus in ("paper", "uniform")} for budget in shown}
    return prose(
        f"On {settings['model']} ({tiny_weights(data.get('weights_sha256'), settings['weights'])}) profiled at "
        f"{settings['profile_frames']} frames and measured at {settings['frames']} on `{settings['held_out']}` (dense "
        f"ATE {data['dense']['ate']:.2f}, AUC@30 {data['dense']['auc30']:.2f}; `benchmarks/results/{name}`, "
        f"{data['device_name']}), the searched schedule deviates "
        + ", ".join(f"{ratios[scale]['paper']:.2f}x the paper rule's and {ratios[scale]['uniform']:.2f}x the best "
                    f"uniform schedule's at {scale:g}x" for scale in sorted(ratios))
        + f"; significantly worse (Wilcoxon, p < 0.05) in {_join(losses) if losses else 'no comparison'}"
        + (f" (at {_join(capped)} the budget is the whole dense attention, so no uniform schedule is compared there)"
           if capped else "") + ".")


def dense_pose_sentence(data: dict) -> str:
    """Says when the dense model's own pose at the measured length is too weak for its GT columns to mean much."""
    dense = data.get("dense")
    if not dense or dense["auc30"] >= 0.4:
        return ""
    return (f" The dense model's own pose at {data['settings']['frames']} frames is weak (ATE {dense['ate']:.2f}, "
            f"AUC@30 {dense['auc30']:.2f}; the long-clip vggt-tiny issue), so the deviation from dense decides here "
            "and the ground-truth columns say little.")


def length_1b_lines(results: Path) -> list[str]:
    """The 1000-frame timing of a searched length-aware VGGT-1B schedule against the paper's rule, when measured."""
    if not (results / LENGTH_1B_FILE).is_file():
        return []
    data = load(results, LENGTH_1B_FILE)
    rows = {row["schedule"]: row for row in data["rows"]}
    paper = rows[f"{data['model']}-paper"]
    searched = next(row for name, row in rows.items() if "-searched-" in name)
    ratio = searched["end_to_end_s"] / paper["end_to_end_s"]
    return ["", prose(
        f"On {data['model']} (random weights, {data['device_name']}), a schedule searched for {searched['frames']} "
        f"frames on a profile of clips of at most 32 frames (`benchmarks/length_1b.py`) spends "
        f"{searched['global_attention_flop_fraction']:.4f} of dense global-attention FLOPs against the paper rule's "
        f"{paper['global_attention_flop_fraction']:.4f} and runs {searched['frames']} frames in "
        f"{searched['end_to_end_s']:.2f} s against {paper['end_to_end_s']:.2f} s ({ratio:.3f}x, {searched['note']} "
        f"whole; `benchmarks/results/{LENGTH_1B_FILE}`). The goal, within 10% (the length-aware format costs "
        f"nothing), is {'met' if abs(ratio - 1) <= 0.10 else 'not met'}.")]


# ----------------------------------------------------------------------------------------------- the search


def _levels(schedule: dict) -> str:
    return " ".join(str(factor) for factor in schedule["kv_factor"])


def _over(schedule: dict, budget: float) -> str:
    return ", over budget" if schedule["flops_fraction"] > budget else ""


def _verdict(comparison: dict) -> str:
    """A paired comparison as '**gain** (0.74x, 14/16 clips, p 0.002)'."""
    text = f"{comparison['score_ratio']:.2f}x, {comparison['wins']}/{comparison['clips']} clips"
    if comparison["verdict"] == "gain":
        return f"**gain** ({text}, p {comparison['p_better']:.3f})"
    if comparison["verdict"] == "loss":
        return f"**loss** ({text}, p {comparison['p_worse']:.3f})"
    return f"no significant difference ({text})"


def _budgets_where(budgets: list[dict], comparison: str, verdict: str) -> list[str]:
    return [f"{entry['budget']:g}" for entry in budgets if entry["versus"][comparison]["verdict"] == verdict]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _search_summary(data: dict) -> list[str]:
    budgets, probe = data["budgets"], data["probe"]
    layers = len(probe["ratio"])
    against_two_tier = _budgets_where(budgets, "searched vs two_tier", "gain")
    if len(against_two_tier) == len(budgets):
        two_tier = "the searched schedule beats the paper's two-tier rule at every budget"
    else:
        two_tier = f"the searched schedule beats the paper's two-tier rule at {_join(against_two_tier) or 'no budget'}"
    merges_more = all(entry["schedules"]["searched"]["query_merge"] > entry["two_tier_query_merge"]
                      for entry in budgets)
    if merges_more:
        two_tier += ("; it merges queries more than the two-tier rule at every budget (query merging costs less "
                     "than K/V pruning by the same factor, and the search spends the budget on it)")
    if len(probe["sensitive"]) == layers:
        two_tier += (f", while the paper's probe marks all {layers} layers sensitive, so its schedule is one K/V "
                     "factor on every layer with the mildest merging that meets the budget")
    sentences = [two_tier + "."]
    clauses = []
    for verdict, phrase in (("gain", "per-layer K/V allocation pays off at"),
                            ("no significant difference", "there is no significant difference at"),
                            ("loss", "the uniform schedule deviates less at")):
        where = _budgets_where(budgets, "searched vs uniform", verdict)
        if where:
            clauses.append(f"{phrase} {_join(where)}")
    sentences.append("Against the uniform schedule with the same merging and the least FLOPs at or above the "
                     f"searched ones, {'; '.join(clauses)}.")
    for entry in budgets:
        searched, uniform = entry["schedules"]["searched"], entry["schedules"]["uniform"]
        if entry["versus"]["searched vs uniform"]["verdict"] == "loss":
            sentences.append(
                f"At {entry['budget']:g} that uniform schedule spends "
                f"{uniform['flops_fraction'] / searched['flops_fraction'] - 1:.0%} more FLOPs than the searched one "
                f"({uniform['flops_fraction']:.3f}{_over(uniform, entry['budget'])}), and the profile predicts it "
                f"too deviates less ({uniform['predicted']:.3f} vs "
                f"{searched['predicted']:.3f}).")
    searches = [search for entry in budgets for search in entry["searches"].values()]
    gaps = [search["optuna_best"]["deviation"] / search["knapsack"]["deviation"] - 1 for search in searches]
    exact = sum(search["knapsack"]["exact"] for search in searches)
    if max(gaps) <= 1e-12 and exact == len(searches):
        sentences.append(f"Optuna's best equals the exact knapsack optimum of the predicted objective in all "
                         f"{len(searches)} searches (gap 0.00%).")
    else:
        sentences.append(f"Optuna's own best (its knapsack warm start excluded) comes within {max(gaps):.2%} of the "
                         f"knapsack optimum of the predicted objective in all {len(searches)} searches (the optimum "
                         f"proven exact in {exact} of them).")
    return sentences


@section("search")
def search_section(results: Path) -> str:
    data = load(results, "tiny-schedules.json")
    settings, seconds, budgets = data["settings"], data["seconds"], data["budgets"]
    profiles = data["profiles"]
    stability = data["stability"]["spearman"]
    fixed = settings["fixed_keep"]
    ratios = [ratio for profile in profiles.values() for ratio in
              (m / p for m, p in zip(profile["additivity"]["measured"], profile["additivity"]["predicted_sum"]))]
    asymmetry = {name: profile["asymmetry"] for name, profile in profiles.items()}
    factors = asymmetry["A"]["factors"]
    cached = data.get("work_folder_reused")
    timing = (f"The recorded run ({data['created'][:10]}, git {data['commit'][:12]}"
              f"{' + uncommitted changes' if 'uncommitted' in (data['commit'] or '') else ''}, torch {data['torch']}, "
              f"{data['threads']} CPU threads) took {seconds['total']:.0f} s: profile A {seconds['profile A']:.0f} s "
              f"and profile B {seconds['profile B']:.0f} s"
              + (" (both read from the cache of an earlier run in its work folder; a first run profiles them too)"
                 if cached else "")
              + f", probe {seconds['probe']:.0f} s, search {seconds['search']:.0f} s, held-out "
                f"{seconds['held-out']:.0f} s.")
    dense = data["held_out_dense"]
    lines = [
        prose(f"Measured on vggt-tiny ({tiny_weights(data['weights']['sha256'])}, {len(data['probe']['ratio'])} "
              f"global layers) at {settings['frames']} frames."), "",
        "```bash",
        f"OMP_NUM_THREADS={data['threads']} {data['command']}    "
        "# -> benchmarks/results/tiny-schedules.{md,json}",
        "```", "", prose(timing), "",
        prose(f"Generated clips with ground truth, {settings['frames']} frames at {data['image'].split('x')[0]} px: "
        f"calibration profile A on `{settings['calib']}`, a second profile B on `{settings['replica']}` (disjoint), "
        f"schedules measured on held-out `{settings['held_out']}`; K/V pruned by frame stride."), "",
        prose(f"- **Profile stability** (A vs B): Spearman of the per-layer end-to-end score "
        f"{stability[f'score.kv_keep_{fixed:g}']:.3f} at K/V keep 1/{round(1 / fixed)} and "
        f"{stability['score.kv_mean']:.3f} averaged over K/V levels (bar 0.8). Additivity: rank correlation "
        f"{profiles['A']['additivity']['spearman']:.3f} (A) / {profiles['B']['additivity']['spearman']:.3f} (B) "
        "between measured multi-layer schedules and summed single-layer scores; the effects are sub-additive "
        f"(measured {min(ratios):.2f}-{max(ratios):.2f} of the sum).", "  "),
        prose(f"- **Asymmetry** (mean score over layers): merging queries {' / '.join(f'{f}x' for f in factors)} costs "
        + " and ".join(f"{' / '.join(f'{r:.2f}' for r in asymmetry[name]['query_over_kv'])} ({name})"
                       for name in asymmetry)
        + " of pruning K/V by the same factor; queries are worse than K/V on "
        + " and ".join(f"{' / '.join(str(n) for n in asymmetry[name]['layers_query_worse'])} ({name})"
                       for name in asymmetry)
        + f" of {len(data['probe']['ratio'])} layers.", "  "), "",
        prose("Held-out deviation from dense (the score: relative depth + point + camera deviation; FLOPs as a "
              f"fraction of dense global attention at {settings['frames']} frames). searched = `search-schedule` "
              f"(knapsack warm start + {settings['trials']} Optuna trials, then `--verify {settings['verify']}` on "
              "profile B's clips); uniform = "
              "the searched r_Q with one K/V stride on every layer, the least FLOPs at or above / the most at or below "
              "the searched FLOPs (stride levels are coarse); two-tier = the paper's probe and rule run on vggt-tiny. "
              f"Every number is measured, on the {len(budgets[0]['schedules']['searched']['per_clip_score'])} held-out "
              "clips:"),
        "",
        "| budget | searched (r_Q; K/V stride per layer; FLOPs) | uniform above / below | two-tier (paper) | "
        "searched vs uniform above / below | searched vs two-tier | how |",
        "|---:|---|---|---|---|---|---|",
    ]
    for entry in budgets:
        budget, schedules, versus = entry["budget"], entry["schedules"], entry["versus"]
        searched, above, below, two = (schedules[key] for key in ("searched", "uniform", "uniform_below", "two_tier"))
        lines.append(
            f"| {budget:.2f} | {searched['measured']['score']:.3f} ({searched['query_merge']}; {_levels(searched)}; "
            f"{searched['flops_fraction']:.3f}{_over(searched, budget)}) | {above['measured']['score']:.3f} "
            f"({above['flops_fraction']:.3f}{_over(above, budget)}) / {below['measured']['score']:.3f} "
            f"({below['flops_fraction']:.3f}{_over(below, budget)}) | {two['measured']['score']:.3f} "
            f"(r_Q {two['query_merge']}, r {two['kv_factor'][0]}; {two['flops_fraction']:.3f}{_over(two, budget)}) | "
            f"{_verdict(versus['searched vs uniform'])} / {_verdict(versus['searched vs uniform_below'])} | "
            f"{_verdict(versus['searched vs two_tier'])} | measured |")
    rotation = "; ".join(
        f"{entry['budget']:g}: " + " / ".join(f"{entry['schedules'][key]['measured']['rpe_rot']:.1f}"
                                              for key in ("searched", "uniform", "uniform_below", "two_tier"))
        for entry in budgets)
    lines += ["", prose(f"Ground truth (dense: depth AbsRel {dense['abs_rel']:.3f}, rotation error "
                        f"{dense['rpe_rot']:.1f} deg). Rotation error in degrees of searched / uniform above / uniform "
                        f"below / two-tier: {rotation}."),
              "", prose("What this shows: " + " ".join(_search_summary(data))
                        + " Table and commands: `benchmarks/results/tiny-schedules.md`.")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if README.md disagrees")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    try:
        rebuilt = rebuild(text, args.results)
    except (ReadmeError, OSError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.check:
        if rebuilt != text:
            args.readme.write_text(rebuilt)
        print(f"{args.readme}: {len(SECTIONS)} sections regenerated", file=sys.stderr)
        return 0
    stale = stale_sections(text, rebuilt)
    if stale:
        diff = difflib.unified_diff(text.splitlines(), rebuilt.splitlines(), "README.md", "generated", lineterm="")
        print("\n".join(diff), file=sys.stderr)
        print(f"error: README.md disagrees with benchmarks/results/ in {', '.join(stale)}: run "
              "python benchmarks/readme.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
