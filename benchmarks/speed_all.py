"""Every family's speed in one run on one GPU: the device's ceilings, dense and paper-rule seconds per stage at each
length beside the FLOP model's TFLOP and prediction, peak memory, and the profile-layers time.

    python benchmarks/speed_all.py --out benchmarks/results/speed-all.json
    python benchmarks/speed_all.py --only vggt-1b/1000/dense --out benchmarks/results/speed-all.json   # one row

Random weights, --dtype autocast, each model at its default size (--size: square frames of that side), --blocks
compiled (default: the blocks' token-wise parts and the DPT heads through torch.compile, `compile_model`; each length
gets one untimed paper-rule forward first, which compiles its shapes, and its time is kept as "warm_up_s") or eager;
--head-dtype compute runs the speed rows' dense heads in the compute dtype (opt-in; `load_model(head_dtype=...)`), in a
file of its own (e.g. --out benchmarks/results/speed-all-compute-heads.json). In order:

1. Ceilings, measured first: an [N, N] x [N, N] matrix product (N = --ceiling-matmul) in the compute dtype and in
   fp32 (the heads run fp32; torch's float32 matmul precision is recorded), and F.scaled_dot_product_attention on q, k,
   v [1, 16, --ceiling-tokens, 64] under each SDPA backend (flash, cuDNN, memory-efficient) and under torch's own
   choice; a backend that raises is recorded as unavailable, with its error. Medians of CEILING_REPEATS calls after a
   warm-up (CUDA events).
2. For each of --models at each of --frames, the dense model and the shipped paper schedule (`models.paper_rule`,
   spark3r/schedules/). "measured whole": encoder, every trunk step and the heads of one forward, each synchronised
   (speed.py's `run_model`: fastest of --repeats runs; a run of ENOUGH_S or more is not repeated), the global attention
   modules timed inside it by CUDA events and, under the schedule, selection + merging timed alone per distinct
   reduction (speed.py's `select_merge_costs`). "assembled": a dense clip longer than --dense-whole allows, from
   models.py's `benchmark` (encoder, every non-global step and one global step measured, the global step counted once
   per global layer; the heads timed on --head-frames frames and scaled; the peak is the largest measured part's, a
   lower bound). Beside every stage: the FLOP model's TFLOP (speed.py's `stage_flops`; "frame blocks" are every trunk
   step that is not a global layer) and the achieved TFLOP/s.
3. profile-layers per family (profile_layers.py's engine): --profile-clips clips of --profile-frames frames, timed;
   the goal's workload of 8 clips is extrapolated where fewer were run (`goal_clips_seconds`), and says so.

Predictions, recomputed whenever the file is written: "at ceiling" = a stage's matrix-product TFLOP at the measured
matrix-product ceiling (compute dtype) plus its attention TFLOP at the fastest attention backend's ceiling; "% of
ceiling" = that time over the measured time; "at dense rates" (paper rows) = each stage's TFLOP at the TFLOP/s the same
stage reached in the dense row of the same model and length; a profile row's "FLOP model at ceiling" = the FLOP
model's count of an exact profile of the goal's clips at the ceilings (`speed.profile_workload_tflop`, a lower bound).

Resumable: the ceilings and every finished row are written to --out (and the table to --out with suffix .md) as soon
as they are measured, atomically; a rerun skips what the file holds. --only MODEL, MODEL/FRAMES, MODEL/FRAMES/dense,
MODEL/FRAMES/paper or MODEL/profile picks rows, to split the work over several calls; a row that ran out of memory is
kept as such. The settings that change what a row measures (device, dtype, blocks, head dtype, size, repeats, head
frames, ceiling and profile workloads, seed) must match the file's. Each row names the call that measured it
("measured_by": command, commit, time); the file's own command and commit are the latest call's.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from spark3r.commands.arguments import DTYPES, ArgumentParser, command, resolve_device
from spark3r.errors import ParameterError
from spark3r.files import check_output_file
from spark3r.models.base import HEAD_DTYPES
from spark3r.models.blocks import compile_model
from spark3r.models.registry import build_model, get_entry
from spark3r.profiler.run import resumed_columns
from spark3r.reduce import model_flops
from spark3r.schedule import apply_schedule

HERE = Path(__file__).resolve().parent


def sibling(name: str):
    """The module benchmarks/<name>.py."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


models, profile_layers, provenance, speed, whole_peaks = (
    sibling(name) for name in ("models", "profile_layers", "provenance", "speed", "whole_peaks"))

FAMILIES = ["vggt-1b", "pi3", "da3-giant", "vggt-omega"]
SCHEDULES = ("dense", "paper")
BLOCK_MODES = ("compiled", "eager")
BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")  # SDPBackend names; "default": torch's pick
ATTENTION_HEADS, HEAD_DIM = 16, 64
CEILING_REPEATS = 20
ENOUGH_S = 10.0  # a whole run this long is timed once: its noise is well under 1%
TERA = 1e12
STAGE_LABELS = {"frame blocks": "frame / non-global blocks", "global attention modules": "  of which attention modules",
                "select+merge": "    of which select+merge"}


# ---------------------------------------------------------------------------------------------------- ceilings

def matmul_ceiling(side: int, dtype: torch.dtype, device: torch.device) -> dict:
    """TFLOP/s of one [side, side] x [side, side] matrix product in `dtype` (median seconds)."""
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(side, side, device=device, dtype=dtype, generator=generator) for _ in range(2))
    seconds = speed.median_seconds(device, lambda: a @ b, CEILING_REPEATS)
    return {"shape": [side, side, side], "seconds": seconds, "tflops": 2.0 * side**3 / seconds / TERA}


def attention_ceiling(tokens: int, dtype: torch.dtype, device: torch.device, backend: str) -> dict:
    """TFLOP/s of F.scaled_dot_product_attention on q, k, v [1, 16, tokens, 64] under SDPA backend `backend`
    ("default": no choice made); {"available": False, "error": ...} where the backend is missing or raises."""
    if backend != "default" and not hasattr(SDPBackend, backend):
        return {"available": False, "error": f"torch {torch.__version__} has no SDPBackend.{backend}"}
    generator = torch.Generator(device).manual_seed(0)
    shape = (1, ATTENTION_HEADS, tokens, HEAD_DIM)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=generator) for _ in range(3))
    choice = contextlib.nullcontext() if backend == "default" else sdpa_kernel(getattr(SDPBackend, backend))
    try:
        with choice:
            seconds = speed.median_seconds(device, lambda: F.scaled_dot_product_attention(q, k, v), CEILING_REPEATS)
    except RuntimeError as error:
        return {"available": False, "error": str(error).strip().splitlines()[0]}
    flop = 4.0 * ATTENTION_HEADS * tokens**2 * HEAD_DIM  # QK^T and AV
    return {"available": True, "shape": list(shape), "seconds": seconds, "tflops": flop / seconds / TERA}


def measure_ceilings(settings: dict, device: torch.device) -> dict:
    """The matrix-product ceilings (compute dtype and fp32) and the attention ceiling of every SDPA backend."""
    dtypes = dict.fromkeys([settings["dtype"], "fp32"])
    with torch.inference_mode():
        return {
            "matmul": {name: matmul_ceiling(settings["ceiling_matmul"], DTYPES[name], device) for name in dtypes},
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "attention": {backend: attention_ceiling(settings["ceiling_tokens"], DTYPES[settings["dtype"]], device,
                                                     backend) for backend in (*BACKENDS, "default")},
        }


def backend_label(backend: str) -> str:
    return "torch's choice" if backend == "default" else backend


def fastest_attention(ceilings: dict) -> tuple[str, dict] | None:
    """(backend, its entry) of the fastest available attention ceiling; None when no backend ran."""
    available = [item for item in ceilings["attention"].items() if item[1]["available"]]
    return max(available, key=lambda item: item[1]["tflops"]) if available else None


# ---------------------------------------------------------------------------------------------------- rows

def speed_row(model, name: str, frames: int, schedule: str, size: tuple[int, int], whole: bool, settings: dict,
              device: torch.device) -> dict:
    """One row: `model` dense or under its paper rule on `frames` random frames [1, S, 3, H, W] of `size`, measured
    whole or (dense) assembled: seconds and the FLOP model's (total, attention) TFLOP per stage, peak GiB."""
    paper = models.paper_rule(model) if schedule == "paper" else None
    row = {"kind": "speed", "model": name, "frames": frames, "schedule": schedule, "size": list(size),
           "how": "measured whole" if whole else "assembled"}
    try:
        if whole:
            images = torch.rand(1, frames, 3, *size, device=device)
            with (apply_schedule(model, paper) if paper else contextlib.nullcontext()) as handle:
                timing = speed.run_model(model, images, settings["repeats"], device, handle, enough_s=ENOUGH_S)
            row.update(timing, note="encoder, each trunk step and the heads synchronised")
            if paper:
                costs = speed.select_merge_costs(model, model.adapter.layout(images), paper, settings["repeats"],
                                                 device, DTYPES[settings["dtype"]])
                select_merge, ratio = speed.select_merge_total(costs)
                if select_merge is not None:
                    row["stages_s"]["select+merge"] = select_merge
                row.update(select_merge_layers=costs, select_merge_over_attention=ratio)
        else:
            parts = models.benchmark(model, frames, size, settings["head_frames"], device, settings["repeats"])
            stages = {"encoder": parts["encoder_s"], "frame blocks": parts["other_steps_s"],
                      "global blocks": parts["dense_global_s"], "heads": parts["heads_s"]}
            peaks = [p for p in (parts["encoder_peak_gib"], parts["dense_global_step_peak_gib"]) if p is not None]
            row.update(stages_s=stages, aggregator_s=parts["dense_s"] - parts["heads_s"], end_to_end_s=parts["dense_s"],
                       peak_gib=max(peaks) if peaks else None,
                       note=f"{parts['note']} (benchmarks/models.py); peak: the largest measured part's")
    except torch.cuda.OutOfMemoryError:
        row.update(out_of_memory=True, note="out of memory")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    flop_config = model.flop_config(*size)
    flops = speed.stage_flops(model, flop_config, frames, paper)
    row.update(stages_tflop={stage: sum(parts) for stage, parts in flops.items()},
               stages_attention_tflop={stage: parts[1] for stage, parts in flops.items()},
               total_tflop=model_flops(flop_config, frames, paper).total / TERA)
    return row


def warm_up(model, frames: int, size: tuple[int, int], device: torch.device) -> float:
    """Seconds of one untimed paper-rule forward on `frames` random frames, which compiles the graphs of that length's
    shapes (the compiled parts see the same shapes dense, and the paper rule's attention is fast)."""
    images = torch.rand(1, frames, 3, *size, device=device)
    start = time.perf_counter()
    with apply_schedule(model, models.paper_rule(model)):
        model(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def profile_row(name: str, side: int, settings: dict, device: torch.device) -> dict:
    """profile-layers' time on `name` (profile_layers.py, random weights): --profile-clips clips of --profile-frames
    frames at side x side; the goal's clip count extrapolated where fewer ran (`goal_clips_seconds`)."""
    clips = settings["profile_clips"]
    result = profile_layers.main([
        "--model", name, "--clips", str(clips), "--frames", str(settings["profile_frames"]), "--size", str(side),
        "--device", str(device), "--dtype", settings["dtype"], "--seed", str(settings["seed"]),
        *(["--compile"] if settings.get("blocks") == "compiled" else []),
        *shlex.split(settings["profile_options"])])
    goal = profile_layers.GOAL_WORKLOAD["clips"]
    per_clip = statistics.mean(result["seconds_per_clip"])
    goal_s, how = goal_clips_seconds(result["wall_seconds"], result["seconds_per_clip"], goal)
    return {
        "kind": "profile", "model": name, "frames": settings["profile_frames"], "size": side, "clips": clips,
        "global_layers": result["global_layers"], "kv_levels": len(result["kv_keep"]),
        "query_levels": len(result["query_merge"]), "additivity": result["additivity"],
        "level_batch": result["level_batch"], "resume_levels": result["resume_levels"],
        "seconds": result["wall_seconds"], "seconds_per_clip": per_clip,
        "phases_s": result["seconds"], "peak_gib": result["peak_gib"], "goal_clips": goal,
        "goal_clips_s": goal_s, "how": how,
    }


def goal_clips_seconds(wall_s: float, clip_s: list[float], goal: int) -> tuple[float, str]:
    """(seconds, how) of the goal's `goal` clips from a run of len(clip_s) clips that took `wall_s`: measured, or the
    clips not run at the mean of the clips after the first (the first loads kernels and, under compiled blocks,
    compiles), or with one clip run, at its time (an upper estimate)."""
    ran = len(clip_s)
    if ran >= goal:
        return wall_s, "measured"
    if ran == 1:
        return goal * clip_s[0], (f"1 clip measured, the other {goal - 1} at its time "
                                  "(an upper estimate: it is the first)")
    later = statistics.mean(clip_s[1:])
    return wall_s + (goal - ran) * later, f"{ran} clips measured, the other {goal - ran} at the mean of clips 2-{ran}"


# ---------------------------------------------------------------------------------------------------- predictions

def stage_predictions(row: dict, ceilings: dict | None, dense: dict | None, dtype: str) -> dict:
    """Per stage and end to end: seconds at the ceilings (and the measured share of them) and, given the dense row of
    the same model and length, at the dense row's per-stage TFLOP/s (a stage the FLOP model counts no work in, in
    either row, at its dense time); None where an input is missing."""
    seconds, tflop, attention = row.get("stages_s") or {}, row["stages_tflop"], row["stages_attention_tflop"]
    fastest = fastest_attention(ceilings) if ceilings else None
    at_ceiling = fraction = None
    if fastest is not None:
        matmul_rate, attention_rate = ceilings["matmul"][dtype]["tflops"], fastest[1]["tflops"]
        at_ceiling = {stage: (tflop[stage] - attention[stage]) / matmul_rate + attention[stage] / attention_rate
                      for stage in tflop}
        fraction = {stage: at_ceiling[stage] / seconds[stage] for stage in at_ceiling if seconds.get(stage)}
    at_dense = None
    if dense is not None and dense.get("stages_s") and row is not dense:
        dense_s, dense_tflop = dense["stages_s"], dense["stages_tflop"]
        at_dense = {stage: dense_s[stage] * (tflop[stage] / dense_tflop[stage] if dense_tflop[stage] else 1.0)
                    for stage in tflop if stage in dense_s and (dense_tflop[stage] or not tflop[stage])}

    def end_to_end(times):
        return sum(times[stage] for stage in speed.END_TO_END) if times and all(
            stage in times for stage in speed.END_TO_END) else None

    return {"ceiling_s": at_ceiling, "ceiling_fraction": fraction, "dense_rate_s": at_dense,
            "ceiling_end_to_end_s": end_to_end(at_ceiling), "dense_rate_end_to_end_s": end_to_end(at_dense)}


def profile_seconds_at_ceiling(row: dict, ceilings: dict | None, dtype: str) -> float | None:
    """Seconds of the profile workload of a profile row's goal clips at the ceilings, with the levels it resumed
    (`speed.profile_workload_tflop`, a lower bound); None without ceilings."""
    fastest = fastest_attention(ceilings) if ceilings else None
    if fastest is None:
        return None
    model = build_model(row["model"], "meta")
    resume = row.get("resume_levels", "all")
    resumed = len(resumed_columns(row["kv_levels"], resume)) + len(resumed_columns(row["query_levels"], resume))
    matmul, attention = speed.profile_workload_tflop(model, model.flop_config(row["size"], row["size"]),
                                                     row["frames"], resumed, row["goal_clips"])
    return matmul / ceilings["matmul"][dtype]["tflops"] + attention / fastest[1]["tflops"]


def with_predictions(results: dict) -> dict:
    """`results` with every speed row's "predicted" (stage_predictions), speed-up and FLOP-model speed-up over the
    dense row of its model and length."""
    dense = {(row["model"], row["frames"]): row for row in results["rows"]
             if row["kind"] == "speed" and row["schedule"] == "dense"}
    for row in results["rows"]:
        if row["kind"] != "speed":
            continue
        base = dense.get((row["model"], row["frames"]))
        row["predicted"] = stage_predictions(row, results["ceilings"], base, results["settings"]["dtype"])
        measured = base is not None and base.get("end_to_end_s") and row.get("end_to_end_s")
        row["speedup"] = base["end_to_end_s"] / row["end_to_end_s"] if measured else None
        row["flop_speedup"] = base["total_tflop"] / row["total_tflop"] if base is not None else None
    return results


# ---------------------------------------------------------------------------------------------------- the report

def cell(value, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def percent(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


GOAL_FRAMES = 1000
GOAL_SECONDS = {"vggt-1b": 12.0}  # end to end under the paper's rule at GOAL_FRAMES
GOAL_SPEEDUP = {"vggt-1b": 40.0}  # over dense at GOAL_FRAMES; GOAL_SPEEDUP_OTHERS for the other families
GOAL_SPEEDUP_OTHERS = 30.0
GOAL_SELECT_MERGE = 0.05  # selection + merging over the reduced attention
GOAL_PROFILE_S = {"vggt-1b": 300.0}  # profile-layers on the goal workload
GOAL_PREDICTION = 0.10  # each schedule's time within this of the FLOP model at the dense row's per-stage rates
GOAL_CEILING_SHARE = 0.60  # each stage at GOAL_FRAMES at or above this share of its ceiling time


def separate_calls(row: dict, other: dict) -> bool:
    """True when two rows were measured by different speed_all calls (processes): their "measured_by" commands
    differ."""
    return (row.get("measured_by") or {}).get("command") != (other.get("measured_by") or {}).get("command")


def goal_rows(results: dict) -> list[tuple[str, str, str]]:
    """(goal, what the file holds, met / not met / not measured) for each of the issue's goals the rows bear on."""
    rows = [row for row in with_predictions(results)["rows"] if not row.get("out_of_memory")]
    speed_rows = {(row["model"], row["frames"], row["schedule"]): row for row in rows if row["kind"] == "speed"}
    verdict = {True: "met", False: "not met", None: "not measured"}
    goals = []
    for model in sorted({row["model"] for row in rows}):
        paper, dense = speed_rows.get((model, GOAL_FRAMES, "paper")), speed_rows.get((model, GOAL_FRAMES, "dense"))
        if model in GOAL_SECONDS:
            seconds = paper and paper.get("end_to_end_s")
            goals.append((f"{model}, paper rule, {GOAL_FRAMES} frames: at most {GOAL_SECONDS[model]:g} s end to end",
                          cell(seconds, 2, " s"), verdict[None if seconds is None else seconds <= GOAL_SECONDS[model]]))
        want = GOAL_SPEEDUP.get(model, GOAL_SPEEDUP_OTHERS)
        speedup = paper and paper.get("speedup")
        goals.append((f"{model}, paper rule, {GOAL_FRAMES} frames: at least {want:g}x over dense",
                      cell(speedup, 1, "x") + (f" (dense {dense['how']})" if speedup else ""),
                      verdict[None if speedup is None else speedup >= want]))
        shares = [row["select_merge_over_attention"] for key, row in speed_rows.items()
                  if key[0] == model and row.get("select_merge_over_attention") is not None]
        goals.append((f"{model}: selection + merging at most {GOAL_SELECT_MERGE:.0%} of the reduced attention",
                      f"largest {max(shares):.3f}" if shares else "n/a",
                      verdict[None if not shares else max(shares) <= GOAL_SELECT_MERGE]))
        predictions = sorted((frames, row["end_to_end_s"] / row["predicted"]["dense_rate_end_to_end_s"])
                             for (name, frames, schedule), row in speed_rows.items()
                             if name == model and schedule != "dense" and row.get("end_to_end_s")
                             and row["predicted"]["dense_rate_end_to_end_s"])
        goals.append((f"{model}: each schedule's time within {GOAL_PREDICTION:.0%} of the FLOP model at the dense "
                      "row's per-stage rates", ", ".join(f"{frames}: {ratio:.2f}x" for frames, ratio in predictions)
                      or "n/a", verdict[None if not predictions else
                                        all(abs(ratio - 1) <= GOAL_PREDICTION for _, ratio in predictions)]))
        shares = {(schedule, stage): share for (name, frames, schedule), row in speed_rows.items()
                  if name == model and frames == GOAL_FRAMES
                  for stage, share in (row["predicted"]["ceiling_fraction"] or {}).items() if stage in speed.END_TO_END}
        below = [f"{schedule} {stage} {share:.1%}" for (schedule, stage), share in sorted(shares.items())
                 if share < GOAL_CEILING_SHARE]
        goals.append((f"{model}, {GOAL_FRAMES} frames: every stage at or above {GOAL_CEILING_SHARE:.0%} of its "
                      "ceiling time, or a sentence on what bounds it", ("below: " + ", ".join(below)) if below else
                      ("all at or above" if shares else "n/a"), verdict[None if not shares else not below]))
        # an assembled dense row's peak is its largest part's, a lower bound: only dense rows run whole compare. Rows
        # from separate calls are flagged: the allocator's resident memory differs by a few MB between processes
        pairs = [(frames, row["peak_gib"], speed_rows[(model, frames, "dense")]["peak_gib"],
                  separate_calls(row, speed_rows[(model, frames, "dense")]))
                 for (name, frames, schedule), row in speed_rows.items()
                 if name == model and schedule == "paper" and (model, frames, "dense") in speed_rows
                 and speed_rows[(model, frames, "dense")]["how"] == "measured whole"
                 and row.get("peak_gib") is not None
                 and speed_rows[(model, frames, "dense")].get("peak_gib") is not None]
        assembled = sorted(frames for (name, frames, schedule), row in speed_rows.items()
                           if name == model and schedule == "dense" and row["how"] != "measured whole")
        held = ", ".join(f"{frames}: {reduced:.1f} vs {base:.1f} GiB" + (" (separate calls)" if separate else "")
                         for frames, reduced, base, separate in pairs) or "n/a"
        if assembled:
            held += f" (dense at {', '.join(map(str, assembled))} frames assembled: its peak is a lower bound)"
        goals.append((f"{model}: paper rule's peak memory at or below dense at every length (dense run whole)", held,
                      verdict[None if not pairs else all(reduced <= base for _, reduced, base, _ in pairs)]))
        if model in GOAL_PROFILE_S:
            profile = next((row for row in rows if row["kind"] == "profile" and row["model"] == model), None)
            bound = profile and profile_seconds_at_ceiling(profile, results["ceilings"], results["settings"]["dtype"])
            goals.append((f"{model}: profile-layers on {profile_layers.GOAL_WORKLOAD['clips']} clips in at most "
                          f"{GOAL_PROFILE_S[model]:g} s", f"{profile['goal_clips_s']:.0f} s ({profile['how']}"
                          + (f"; the FLOP model's exact profile at the ceilings: {bound:.0f} s" if bound else "") + ")"
                          if profile else "n/a",
                          verdict[None if profile is None else profile["goal_clips_s"] <= GOAL_PROFILE_S[model]]))
    return goals


def profile_compile_note(row: dict, settings: dict) -> str:
    """Under compiled blocks a profile's first clip compiles the shapes it runs: said, with its dense phase's time."""
    if settings.get("blocks") != "compiled":
        return ""
    return (f"; compiled blocks: the first clip compiles its shapes (its dense forward "
            f"{row['phases_s']['dense']:.0f} s, its decodes each level batch's)")


def warm_up_note(row: dict) -> str:
    """The compiling first forward at the row's length, where one ran before it."""
    return f"; first forward at this length (compiling) {row['warm_up_s']:.1f} s" if "warm_up_s" in row else ""


def heads_label(settings: dict) -> str:
    """'fp32 heads' (as upstream) or 'compute-dtype heads' (`--head-dtype compute`)."""
    return "fp32 heads" if setting(settings, "head_dtype") == "fp32" else "compute-dtype heads"


def markdown(results: dict) -> str:
    """The tables: ceilings, end to end, per stage, profile-layers, the issue's goals."""
    settings, ceilings = results["settings"], results["ceilings"]
    commands = sorted({row["measured_by"]["command"] for row in results["rows"]})
    commits = sorted({str(row["measured_by"]["commit"]) for row in results["rows"]})
    lines = [
        f"# Dense and paper-rule speed of every family on one {settings['device_name']}",
        "",
        f"Random weights, {settings['dtype']} autocast, {settings.get('blocks', 'eager')} blocks, "
        f"{heads_label(settings)}, torch "
        f"{results['torch']}, last written {results['created']}. "
        f"Rows measured by {len(commands)} call(s) at commit(s) {', '.join(commits) or 'n/a'}:",
        "",
        *(f"    {line}" for line in commands),
        "",
        "## Ceilings",
        "",
        "| what | shape | TFLOP/s | note |",
        "|---|---|---:|---|",
    ]
    fastest = fastest_attention(ceilings) if ceilings else None
    if ceilings:
        for name, entry in ceilings["matmul"].items():
            note = f"float32 matmul precision {ceilings['float32_matmul_precision']}" if name == "fp32" else ""
            lines.append(f"| matrix product, {name} | {'x'.join(map(str, entry['shape']))} | "
                         f"{entry['tflops']:.1f} | {note} |")
        for backend, entry in ceilings["attention"].items():
            label = backend_label(backend)
            if entry["available"]:
                lines.append(f"| attention, {label} | {entry['shape']} | {entry['tflops']:.1f} | |")
            else:
                lines.append(f"| attention, {label} | | n/a | unavailable: {entry['error']} |")
        lines += ["", f"Fastest attention backend here: {backend_label(fastest[0]) if fastest else 'none ran'}. "
                      f"\"at ceiling\" = matrix-product TFLOP at the {settings['dtype']} matrix-product ceiling + "
                      "attention TFLOP at the fastest backend's (the heads run in fp32, so their ceiling time is the "
                      "time they would take in the compute dtype); \"at dense rates\" = each stage's TFLOP at the "
                      "TFLOP/s that stage reached in the dense row of the same model and length."]
    speed_rows = [row for row in results["rows"] if row["kind"] == "speed"]
    lines += [
        "", "## End to end", "",
        "| model | frames | schedule | how | end to end (s) | at ceiling (s) | % of ceiling | at dense rates (s) | "
        "measured / at dense rates | speed-up | FLOP-model speed-up | peak (GiB) | select+merge / attention | note |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in speed_rows:
        predicted, measured = row["predicted"], row.get("end_to_end_s")
        ceiling, at_dense = predicted["ceiling_end_to_end_s"], predicted["dense_rate_end_to_end_s"]
        lines.append(
            f"| {row['model']} | {row['frames']} | {row['schedule']} | {row['how']} | {cell(measured)} | "
            f"{cell(ceiling)} | {percent(ceiling / measured if ceiling and measured else None)} | {cell(at_dense)} | "
            f"{cell(measured / at_dense if measured and at_dense else None)} | {cell(row['speedup'], 1, 'x')} | "
            f"{cell(row['flop_speedup'], 1, 'x')} | {cell(row.get('peak_gib'), 1)} | "
            f"{cell(row.get('select_merge_over_attention'), 3)} | {row['note']}{warm_up_note(row)} |")
    lines += [
        "", "## Per stage", "",
        "Indented stages are part of the stage above them. A stage's peak is the allocator's high-water mark during "
        "it (a trunk stage's: its largest step's), tensors held from earlier stages included; an assembled row's "
        "are its measured parts'.", "",
        "| model | frames | schedule | stage | time (s) | FLOP model (TFLOP) | of which attention | TFLOP/s | "
        "at ceiling (s) | % of ceiling | at dense rate (s) | peak (GiB) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in speed_rows:
        seconds, predicted = row.get("stages_s") or {}, row["predicted"]
        for stage in speed.STAGES:
            if stage not in seconds and stage in ("global attention modules", "select+merge"):
                continue
            tflop, time = row["stages_tflop"][stage], seconds.get(stage)
            lines.append(
                f"| {row['model']} | {row['frames']} | {row['schedule']} | {STAGE_LABELS.get(stage, stage)} | "
                f"{cell(time, 3)} | {tflop:.4g} | {row['stages_attention_tflop'][stage]:.4g} | "
                f"{cell(tflop / time if time else None, 1)} | "
                f"{cell((predicted['ceiling_s'] or {}).get(stage), 3)} | "
                f"{percent((predicted['ceiling_fraction'] or {}).get(stage))} | "
                f"{cell((predicted['dense_rate_s'] or {}).get(stage), 3)} | "
                f"{cell((row.get('stages_peak_gib') or {}).get(stage), 1)} |")
    lines += [
        "", "## profile-layers", "",
        "The FLOP model's time for the goal's clips is that of an exact profile at the ceilings (`profile_seconds_at_"
        "ceiling`): per clip a dense forward and, per global layer and non-dense level, the trunk resumed after the "
        "layer and the heads decoded; the reduced layer, the local deviations and the caching are left out, so it is "
        "a lower bound on any profile that resumes every level.", "",
        "| model | clips x frames | size | layers x levels | measured (s) | per clip (s) | goal clips | for them (s) | "
        "FLOP model for them at ceiling (s) | peak (GiB) | how |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in results["rows"]:
        if row["kind"] == "profile":
            lines.append(
                f"| {row['model']} | {row['clips']} x {row['frames']} | {row['size']} | {row['global_layers']} x "
                f"({row['kv_levels']} K/V + {row['query_levels']} query) | {row['seconds']:.1f} | "
                f"{row['seconds_per_clip']:.1f} | {row['goal_clips']} | {row['goal_clips_s']:.1f} | "
                f"{cell(profile_seconds_at_ceiling(row, results['ceilings'], settings['dtype']), 0)} | "
                f"{cell(row['peak_gib'], 1)} | {row['how']}{profile_compile_note(row, settings)} |")
    lines += ["", "## Against the issue's goals", "", "| goal | this file | verdict |", "|---|---|---|"]
    lines += [f"| {goal} | {held} | {verdict} |" for goal, held, verdict in goal_rows(results)]
    return "\n".join(lines) + "\n"


def save(path: Path, results: dict) -> None:
    """--out (JSON, predictions recomputed) and its .md table, each written atomically."""
    provenance.write_result(path, with_predictions(results), markdown(results))


# ---------------------------------------------------------------------------------------------------- the run

SETTING_DEFAULTS = {"head_dtype": "fp32"}  # what files written before a setting existed were measured with


def setting(settings: dict, key: str):
    """A stored setting, or its SETTING_DEFAULTS value in a file older than it."""
    return settings.get(key, SETTING_DEFAULTS.get(key))


def load_results(path: Path, settings: dict) -> dict:
    """The results file at `path`, or a new one; a sentence if it is not one of this benchmark's or was measured
    with other settings."""
    if not path.exists():
        return {"settings": settings, "ceilings": None, "rows": []}
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = None
    if not isinstance(results, dict) or not {"settings", "ceilings", "rows"} <= results.keys():
        raise ParameterError(f"`out` {path} is not a results file of benchmarks/speed_all.py: give another path",
                             "out")
    stored = results["settings"]
    differing = [f"{key} {setting(stored, key)!r} there, {value!r} here" for key, value in settings.items()
                 if setting(stored, key) != value]
    if differing:
        raise ParameterError(f"`out` {path} holds rows measured with other settings ({'; '.join(differing)}): run "
                             "with its settings to resume it, or give another path", "out")
    return results


def dense_whole_limits(entries: list[str], names: list[str]) -> dict[str, int]:
    """--dense-whole entries MAX (every model) and MODEL:MAX -> per model, the longest clip whose dense model runs
    whole (longer ones are assembled)."""
    default, limits = 0, {}
    for entry in entries:
        name, _, value = entry.rpartition(":")
        if not value.isdigit():
            raise ParameterError(f"`dense_whole` entry {entry!r} is neither MAX nor MODEL:MAX: give clip lengths such "
                                 "as 300 or vggt-1b:1000", "dense_whole")
        if name:
            limits[get_entry(name).name] = int(value)
        else:
            default = int(value)
    return {name: limits.get(name, default) for name in names}


def row_key(kind: str, model: str, frames: int, schedule: str | None) -> tuple:
    return kind, model, frames, schedule


def check_only(patterns: list[str], names: list[str], frames: list[int], profile: bool) -> None:
    """A sentence unless every --only pattern is MODEL[/FRAMES[/dense|paper]] or MODEL/profile of this run."""
    for pattern in patterns:
        model, *rest = pattern.split("/")
        valid = model in names and (
            not rest
            or (rest == ["profile"] and profile)
            or (len(rest) <= 2 and rest[0] in map(str, frames) and (len(rest) == 1 or rest[1] in SCHEDULES)))
        if not valid:
            raise ParameterError(
                f"`only` pattern {pattern!r} names no row of this run: use MODEL, MODEL/FRAMES, MODEL/FRAMES/dense, "
                f"MODEL/FRAMES/paper or MODEL/profile with a model of {', '.join(names)} and a length of "
                f"{', '.join(map(str, frames))}{'' if profile else ' (profiles are off: --profile-clips 0)'}", "only")


def selected(key: tuple, patterns: list[str]) -> bool:
    """Whether --only `patterns` (none: everything) pick the row `key`."""
    kind, model, frames, schedule = key
    names = [model, f"{model}/profile"] if kind == "profile" else [
        model, f"{model}/{frames}", f"{model}/{frames}/{schedule}"]
    return not patterns or any(pattern in names for pattern in patterns)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="benchmarks/speed_all.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=FAMILIES)
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--dense-whole", nargs="+", default=["300", "vggt-1b:1000"],
                        help="MAX or MODEL:MAX: the dense model runs whole up to MAX frames (a MODEL:MAX entry for "
                             "that model), longer clips are assembled")
    parser.add_argument("--only", nargs="+", default=[],
                        help="MODEL, MODEL/FRAMES, MODEL/FRAMES/dense|paper or MODEL/profile: measure only these rows")
    parser.add_argument("--size", type=int, default=None, help="square frame side (default: each model's size)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="trunk autocast dtype")
    parser.add_argument("--head-dtype", default="fp32", choices=HEAD_DTYPES,
                        help="the speed rows' dense heads: fp32 (as upstream) or compute (opt-in; profile rows take "
                             "profile-layers' own --head-dtype through --profile-options)")
    parser.add_argument("--blocks", default="compiled", choices=BLOCK_MODES,
                        help="compiled: the blocks' token-wise parts and the DPT heads run through torch.compile "
                             "(spark3r.models.blocks.compile_model), warmed up at each length first; eager: as "
                             "without it")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="whole runs per row, the fastest kept")
    parser.add_argument("--head-frames", type=int, default=100, help="frames the heads of an assembled row run on")
    parser.add_argument("--ceiling-matmul", type=int, default=8192, help="side N of the N^3 matrix-product ceiling")
    parser.add_argument("--ceiling-tokens", type=int, default=32768, help="sequence length of the attention ceiling")
    parser.add_argument("--profile-clips", type=int, default=1, help="clips per profile (0: no profiles)")
    parser.add_argument("--profile-frames", type=int, default=profile_layers.GOAL_WORKLOAD["frames"])
    parser.add_argument("--profile-options", default="",
                        help="further benchmarks/profile_layers.py flags, e.g. \"--kv-keep 0.5 --additivity 1\"")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed-all.json"))
    return parser.parse_args(argv)


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = check_output_file(args.out, "out")
    names = [get_entry(name).name for name in args.models]
    limits = dense_whole_limits(args.dense_whole, names)
    check_only(args.only, names, args.frames, args.profile_clips > 0)
    device = resolve_device(args.device)
    record = provenance.record(__file__, argv, device)
    settings = {
        "device_name": record["device_name"], "dtype": args.dtype, "blocks": args.blocks,
        "head_dtype": args.head_dtype, "size": args.size,
        "repeats": args.repeats,
        "head_frames": args.head_frames, "ceiling_matmul": args.ceiling_matmul, "ceiling_tokens": args.ceiling_tokens,
        "profile_clips": args.profile_clips, "profile_frames": args.profile_frames,
        "profile_options": args.profile_options, "seed": args.seed,
    }
    results = load_results(out, settings)
    sizes = {name: (args.size,) * 2 if args.size else whole_peaks.default_size(build_model(name, "meta"), name)
             for name in names}
    if args.profile_clips > 0:
        for name, (height, width) in sizes.items():
            if height != width and selected(row_key("profile", name, args.profile_frames, None), args.only):
                raise ParameterError(f"profile-layers takes square frames, and {name} runs at {height}x{width}: "
                                     "pass --size", "size")
    measured_by = {key: record[key] for key in ("command", "commit")}

    def add(row: dict) -> None:
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        results["rows"].append({**row, "measured_by": {**measured_by, "created": created}})
        order = {name: index for index, name in enumerate(names)}
        results["rows"].sort(key=lambda r: (order.get(r["model"], len(order)), r["model"], r["kind"] == "profile",
                                            r["frames"], SCHEDULES.index(r["schedule"]) if r["kind"] == "speed" else 0))
        results.update(record)
        save(out, results)

    if results["ceilings"] is None:
        results["ceilings"] = measure_ceilings(settings, device)
        results.update(record)
        save(out, results)
        print(f"done: ceilings ({record['device_name']})", file=sys.stderr)
    done = {row_key(row["kind"], row["model"], row["frames"], row.get("schedule")) for row in results["rows"]}
    for name in names:
        plan = [row_key("speed", name, frames, schedule) for frames in args.frames for schedule in SCHEDULES]
        plan += [row_key("profile", name, args.profile_frames, None)] if args.profile_clips > 0 else []
        todo = [key for key in plan if key not in done and selected(key, args.only)]
        if not todo:
            continue
        size = sizes[name]
        whole = {key: key[3] == "paper" or key[2] <= limits[name] for key in todo if key[0] == "speed"}
        if whole:
            torch.manual_seed(args.seed)
            model = build_model(name, device).eval().requires_grad_(False)
            model.compute_dtype, model.head_dtype = DTYPES[args.dtype], args.head_dtype
            if args.blocks == "compiled":
                compile_model(model)
            warm_up_s = {}
            with torch.inference_mode():
                if args.blocks == "eager":  # compiled blocks are warmed up at each length instead
                    for schedule, runs_whole in sorted({(key[3], whole[key]) for key in whole}):  # at 2 frames
                        speed_row(model, name, 2, schedule, size, runs_whole, settings, device)
                for key, runs_whole in whole.items():
                    if args.blocks == "compiled" and key[2] not in warm_up_s:
                        warm_up_s[key[2]] = warm_up(model, key[2], size, device)
                    row = speed_row(model, name, key[2], key[3], size, runs_whole, settings, device)
                    if key[2] in warm_up_s:
                        row["warm_up_s"] = warm_up_s[key[2]]
                    add(row)
                    print(f"done: {name} {key[2]} frames {key[3]} ({row['how']}): {cell(row.get('end_to_end_s'))} s "
                          "end to end", file=sys.stderr)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if todo[-1][0] == "profile":
            add(profile_row(name, size[0], settings, device))
            print(f"done: {name} profile-layers", file=sys.stderr)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
