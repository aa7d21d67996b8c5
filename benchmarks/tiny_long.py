"""The long-clip vggt-tiny's report: benchmarks/results/train-vggt-tiny-long.md from its result files.

    python benchmarks/tiny_long.py      # reads benchmarks/results/eval-vggt-tiny-long*.json, profile-vggt-tiny-long-*.json

The evaluation files come from `python -m spark3r.commands.train_tiny --evaluate W --clips synthetic:16:1000:walk
--frames 8,32,128,256 --json` (and `--clips synthetic:64:1000 --frames 8`), the profile from `profile-layers --model
vggt-tiny --weights W --calib synthetic:4:2000:walk --frames 32`; the training command is in benchmarks/train_tiny_long.sh.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from spark3r.training.steps import MIXED_ARC_FRAMES

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = (("model", "vggt-tiny (12 + 12 blocks)"), ("frame_only", "frame-only global attention"),
        ("trivial", "constant depth / identity cameras"))
COLUMNS = (("abs_rel", "depth AbsRel", 3), ("rotation_deg", "rot err deg", 2), ("translation", "trans err", 3),
           ("ate", "ATE", 3), ("auc30", "AUC@30", 3))


def evaluation_table(report: dict) -> list[str]:
    lines = ["| frames | | " + " | ".join(label for _, label, _ in COLUMNS) + " |",
             "|---:|---|" + "---:|" * len(COLUMNS)]
    for frames, entry in report["lengths"].items():
        for key, label in ROWS:
            values = entry["results"][key]
            lines.append(f"| {frames} | {label} | " + " | ".join(f"{values[name]:.{digits}f}"
                                                            for name, _, digits in COLUMNS) + " |")
    return lines


def bars(report: dict) -> list[str]:
    """The issue's acceptance bars, each with its numbers and whether it holds."""
    model, frame_only = by_length(report), by_length(report, "frame_only")
    short, long = min(model), max(model)
    checks = [
        (f"ATE at {long} within 2x of {short} frames", model[long]["ate"] / model[short]["ate"], "<= 2"),
        (f"rotation error at {long} within 2x of {short} frames",
         model[long]["rotation_deg"] / model[short]["rotation_deg"], "<= 2"),
        (f"AUC@30 at {long} frames", model[long]["auc30"], ">= 0.4"),
        (f"depth AbsRel at {long} within 1.5x of {short} frames", model[long]["abs_rel"] / model[short]["abs_rel"],
         "<= 1.5"),
        *((f"frame-only / model ATE at {frames} frames", frame_only[frames]["ate"] / model[frames]["ate"], ">= 3")
          for frames in sorted(model) if frames > short),
    ]
    lines = ["| bar | value | needed | holds |", "|---|---:|---|---|"]
    for name, value, needed in checks:
        bound = float(needed.split()[1])
        holds = value <= bound if needed.startswith("<=") else value >= bound
        lines.append(f"| {name} | {value:.2f} | {needed} | {'yes' if holds else '**no**'} |")
    return lines


def asymmetry(profile: dict) -> list[str]:
    summary = profile["asymmetry"]
    score = profile["kv"]["score"]["mean"]
    query = profile["query"]["score"]["mean"]
    keep, merge = profile["levels"]["kv_keep"], profile["levels"]["query_merge"]
    lines = [f"Per layer, end-to-end score (mean over {len(profile['clips'])} clips of {profile['frames']} frames):", "",
             "| layer | " + " | ".join(f"K/V keep 1/{round(1 / k)}" for k in keep[1:]) + " | "
             + " | ".join(f"query merge {m}" for m in merge[1:]) + " |",
             "|---:|" + "---:|" * (len(keep) - 1 + len(merge) - 1)]
    for layer in range(profile["global_layers"]):
        lines.append(f"| {layer} | " + " | ".join(f"{value:.4f}" for value in score[layer][1:]) + " | "
                     + " | ".join(f"{value:.4f}" for value in query[layer][1:]) + " |")
    lines += ["", "| fewer tokens | query merge (mean) | K/V keep (mean) | query / K/V | layers where query merging "
              "costs more |", "|---:|---:|---:|---:|---:|"]
    for factor, q, kv, ratio, worse in zip(summary["factors"], summary["query_mean"], summary["kv_mean"],
                                           summary["query_over_kv"], summary["layers_query_worse"]):
        lines.append(f"| {factor}x | {q:.4f} | {kv:.4f} | {ratio:.2f} | {worse} of {profile['global_layers']} |")
    layers, worse = profile["global_layers"], summary["layers_query_worse"]
    if all(ratio > 1 for ratio in summary["query_over_kv"]):
        return lines + ["", "The paper's asymmetry holds here: at every factor, merging queries costs more than "
                            "pruning K/V by the same factor (mean over layers)."]
    ratios = ", ".join(f"{ratio:.2f}x" for ratio in summary["query_over_kv"])
    factors = ", ".join(f"{f}x" for f in summary["factors"])
    text = (f"The paper's asymmetry does not hold on the mean over layers: merging queries by a factor costs {ratios} "
            f"of what pruning K/V by the same factor ({factors}) costs. Per layer, query merging costs more in "
            f"{', '.join(map(str, worse))} of {layers} layers")
    if min(worse) * 2 <= layers:
        return lines + ["", text + "."]
    factor = summary["factors"][-1]  # most layers show it: name the K/V-sensitive ones that outweigh them
    kv_at, query_at = [round(1 / k) for k in keep].index(factor), merge.index(factor)
    heavy = sorted((layer for layer in range(layers) if score[layer][kv_at] > query[layer][query_at]),
                   key=lambda layer: query[layer][query_at] - score[layer][kv_at])[:3]
    named = f"layer{'s' if len(heavy) > 1 else ''} {', '.join(map(str, sorted(heavy)))}"
    return lines + ["", text + f": most layers show the asymmetry, but the few where K/V pruning costs most ({named} "
                                f"at {factor}x) outweigh them in the mean."]


def spread_table(report: dict) -> list[str]:
    """ATE against the size of the trajectory per clip length: the model's ATE over the identity cameras' (which is
    the RMS spread of the true camera centres about their mean), each a mean over clips, and its ratio to the shortest
    length's."""
    model, trivial = by_length(report), by_length(report, "trivial")
    short = min(model)
    relative = {frames: model[frames]["ate"] / trivial[frames]["ate"] for frames in sorted(model)}
    lines = ["| frames | ATE | trajectory spread (identity-camera ATE) | ATE / spread | against the shortest |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {frames} | {model[frames]['ate']:.3f} | {trivial[frames]['ate']:.3f} | {relative[frames]:.3f} | "
              f"{relative[frames] / relative[short]:.2f} |" for frames in sorted(model)]
    return lines


def trained(log: Path) -> str:
    """'N steps in M min' from the training log's last line."""
    steps, minutes = re.search(r"after (\d+) steps, ([\d.]+) min", log.read_text().strip().splitlines()[-1]).groups()
    return f"{steps} steps in {minutes} min"


HELD_OUT_LINE = re.compile(r"eval step (\d+): .*?\| rot ([\d.]+) deg .*?\| trans ([\d.]+) .*?\| auc30 ([\d.]+)")


def held_out_evals(log: Path) -> list[dict]:
    """Every periodic held-out evaluation in a training log: step, rotation_deg, translation, auc30."""
    return [{"step": int(step), "rotation_deg": float(rotation), "translation": float(translation),
             "auc30": float(auc)} for step, rotation, translation, auc in HELD_OUT_LINE.findall(log.read_text())]


def held_out_table(evals: list[dict]) -> list[str]:
    """A training log's periodic held-out evaluations (`held_out_evals`) as a table."""
    return ["| step | rot err deg | trans err | AUC@30 |", "|---:|---:|---:|---:|",
            *(f"| {row['step']} | {row['rotation_deg']:.2f} | {row['translation']:.3f} | {row['auc30']:.3f} |"
              for row in evals)]


def ended_at(label: str, log: Path) -> str:
    """Where a stage's last held-out evaluation in its training log stood."""
    last = held_out_evals(log)[-1]
    return f"{label} ended at {last['rotation_deg']:.2f} deg, AUC@30 {last['auc30']:.3f} (step {last['step']})."


def arc_share(low: int, high: int) -> float:
    """Share of the steps of a `--path mixed` run on clips of low..high frames that render arcs (StepShape.at)."""
    return 0.5 * max(0, min(high, MIXED_ARC_FRAMES) - low + 1) / (high - low + 1)


def by_length(report: dict, row: str = "model") -> dict[int, dict]:
    """One row's metrics ("model", "frame_only" or "trivial") per clip length of an evaluation report."""
    return {int(frames): entry["results"][row] for frames, entry in report["lengths"].items()}


def breaks(report: dict, middle: dict) -> str:
    """The longest clip length at which the pose bars that fail at the longest length still hold."""
    model = {**by_length(report), **by_length(middle)}
    frame_only = {**by_length(report, "frame_only"), **by_length(middle, "frame_only")}
    short = min(model)
    holds = [f for f in sorted(model) if model[f]["auc30"] >= 0.4 and frame_only[f]["ate"] >= 3 * model[f]["ate"]]
    within = [f for f in sorted(model) if model[f]["ate"] <= 2 * model[short]["ate"]]
    return (f"AUC@30 >= 0.4 with frame-only global attention at least 3x worse in ATE holds up to "
            f"{max(holds) if holds else 'no'} frames (lengths measured: {', '.join(map(str, sorted(model)))}); ATE "
            f"within 2x of its {short}-frame value up to {max(within)} frames. Long-clip schedules can be judged on this "
            f"model up to about {max(holds) if holds else short} frames.")


STAGE3_RUNS = (("2 heads", "s3-h2"), ("4 heads", "s3-h4"))
STAGE3_CHECKPOINT = "benchmarks/checkpoints/vggt-tiny-long-stage3.safetensors"
COMPARED = (("rotation_deg", "rot err deg", 2), ("ate", "ATE", 3), ("auc30", "AUC@30", 3))


def stages_compared(reports: dict[str, dict]) -> list[str]:
    """Per clip length, each metric of COMPARED and frame-only / model ATE for every labelled evaluation report."""
    labels = list(reports)
    lines = ["| frames | " + " | ".join(f"{name}, {label}" for _, name, _ in COMPARED for label in labels)
             + " | " + " | ".join(f"frame-only / model ATE, {label}" for label in labels) + " |",
             "|---:|" + "---:|" * (len(labels) * (len(COMPARED) + 1))]
    model = {label: by_length(report) for label, report in reports.items()}
    frame_only = {label: by_length(report, "frame_only") for label, report in reports.items()}
    for frames in sorted(model[labels[0]]):
        lines.append(f"| {frames} | " + " | ".join(f"{model[label][frames][key]:.{digits}f}" for key, _, digits in
                                                  COMPARED for label in labels)
                     + " | " + " | ".join(f"{frame_only[label][frames]['ate'] / model[label][frames]['ate']:.2f}"
                                          for label in labels) + " |")
    return lines


def stage3(arcs_before: dict[str, dict]) -> list[str]:
    """Stage 3, two runs side by side from stage 2's weights: the same model, and the model with 4 heads of 32
    channels (warm-started by split_heads); not shipped. arcs_before: the 8-frame arc evaluations of stages 1 and 2."""
    logs = {label: held_out_evals(RESULTS / f"train-vggt-tiny-long-{tag}.log") for label, tag in STAGE3_RUNS}
    reports = {label: json.loads((RESULTS / f"eval-vggt-tiny-long-{tag}.json").read_text())
               for label, tag in STAGE3_RUNS}
    arcs = {label: json.loads((RESULTS / f"eval-vggt-tiny-long-{tag}-arc8.json").read_text())
            for label, tag in STAGE3_RUNS}
    before = json.loads((RESULTS / "eval-vggt-tiny-long-s2-cpu.json").read_text())
    shipped = held_out_evals(RESULTS / "train-vggt-tiny-long-256.log")[-1]
    two, four = logs["2 heads"], logs["4 heads"]
    steps = sorted({row["step"] for row in two} | {row["step"] for row in four})
    by_step = {label: {row["step"]: row for row in rows} for label, rows in logs.items()}

    def cells(row: dict | None) -> str:
        return " | ".join("" if row is None else f"{row[key]:.{digits}f}"
                          for key, digits in (("rotation_deg", 2), ("translation", 3), ("auc30", 3)))

    lines = ["| step | rot err deg, 2 heads | trans err, 2 heads | AUC@30, 2 heads | rot err deg, 4 heads | "
             "trans err, 4 heads | AUC@30, 4 heads |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {step} | {cells(by_step['2 heads'].get(step))} | {cells(by_step['4 heads'].get(step))} |"
              for step in steps]
    common = max(set(by_step["2 heads"]) & set(by_step["4 heads"]))
    falling = all(b["rotation_deg"] < a["rotation_deg"] for a, b in zip(two, two[1:]))
    wider_wins = (four[-1]["rotation_deg"] < two[-1]["rotation_deg"]
                  and by_step["4 heads"][common]["rotation_deg"] < by_step["2 heads"][common]["rotation_deg"])
    arc_auc = {label: by_length(report)[8]["auc30"] for label, report in arcs.items()}
    long = max(by_length(before))
    old, new = by_length(before)[long], by_length(reports["2 heads"])[long]
    moved = {name: ("better" if (new[key] > old[key]) == (key == "auc30") else "worse") + f" ({old[key]:.{digits}f} "
             f"-> {new[key]:.{digits}f})" for key, name, digits in COMPARED}
    return [
        "Both from stage 2's weights (shipped then), clips of 2-256 frames with a quarter of the steps short arcs "
        "(`ARC_SHARE=0.25`), run at once on one H200 for 15 min each (each had about half of it):", "",
        "```bash", "# commit 0976556 (its spark3r/weights/vggt-tiny.safetensors: stage 2)",
        "COMMON=\"MINUTES=15 INIT=spark3r/weights/vggt-tiny.safetensors MAX_FRAMES=256 FRAMES_PER_STEP=1024 LR=3e-4 "
        "WARMUP=100 SEED=3 ARC_SHARE=0.25 WORKERS=7\"",
        "env RUN=/root/h2 $COMMON bash benchmarks/train_tiny_long.sh",
        "# 4 heads of 32 channels: a copy of the tree whose VGGT_TINY has num_heads=4; --init splits the shipped "
        "heads (split_heads)", "cd /tmp/h4 && env RUN=/root/h4 $COMMON bash benchmarks/train_tiny_long.sh", "```", "",
        f"Logs `train-vggt-tiny-long-s3-h2.log` ({trained(RESULTS / 'train-vggt-tiny-long-s3-h2.log')}) and "
        f"`train-vggt-tiny-long-s3-h4.log` ({trained(RESULTS / 'train-vggt-tiny-long-s3-h4.log')}). Their periodic "
        "held-out evaluation at 256 frames (synthetic:16:999:walk, bf16):", "", *lines, "",
        f"Stage 2's last evaluation on the same clips (step {shipped['step']}, stage 2's weights): rotation error "
        f"{shipped['rotation_deg']:.2f} deg, translation {shipped['translation']:.3f}, AUC@30 {shipped['auc30']:.3f}. "
        f"Stage 3 with 2 heads ends at {two[-1]['rotation_deg']:.2f} deg, AUC@30 {two[-1]['auc30']:.3f}"
        + (", its rotation error falling at every evaluation." if falling else "."),
        ("Four heads of 32 channels beat two of 64 both at equal steps and at equal minutes."
         if wider_wins else
         f"Four heads of 32 channels do not pay here: at step {common} their rotation error is "
         f"{by_step['4 heads'][common]['rotation_deg']:.2f} deg against "
         f"{by_step['2 heads'][common]['rotation_deg']:.2f}, "
         f"and in the same minutes they ran {four[-1]['step']} steps against {two[-1]['step']}, ending at "
         f"{four[-1]['rotation_deg']:.2f} deg."), "",
        f"Stage 2 and both stage-3 runs on the held-out walks ({before['clips']}, dense, each "
        f"{before['device_name']}):", "",
        *stages_compared({"stage 2": before, **{f"stage 3, {label}": report for label, report in reports.items()}}),
        "",
        f"At {long} frames stage 3 with 2 heads against stage 2: rotation error {moved['rot err deg']}, ATE "
        f"{moved['ATE']}, AUC@30 {moved['AUC@30']}.", "",
        *(part for label, _ in STAGE3_RUNS for part in (
            f"### Stage 3, {label}: the issue's bars", "", *bars(reports[label]), "")),
        f"On 8-frame arcs ({arcs['2 heads']['clips']}, {arcs['2 heads']['device_name']}) AUC@30 is "
        + " and ".join(f"{arc_auc[label]:.3f} with {label}" for label, _ in STAGE3_RUNS)
        + f" (stage 1 {by_length(arcs_before['stage 1'])[8]['auc30']:.3f}, stage 2 "
          f"{by_length(arcs_before['stage 2'])[8]['auc30']:.3f}, both {arcs_before['stage 2']['device_name']})"
        + (": a quarter of the steps on arcs brings them back to stage 1's level."
           if min(arc_auc.values()) >= by_length(arcs_before["stage 1"])[8]["auc30"] else "."), "",
        f"Not shipped: the 2-head weights were kept as `{STAGE3_CHECKPOINT}` (commit aa3f305; removed from the tree "
        "once stage 4 started from them)."]


STAGE4_CHECKPOINT = "benchmarks/checkpoints/vggt-tiny-long-stage4.safetensors"
STAGE4_COMMAND = (f"RUN=/root/s4 MINUTES=10 INIT={STAGE3_CHECKPOINT} MAX_FRAMES=256 FRAMES_PER_STEP=1024 LR=3e-4 "
                  "WARMUP=100 SEED=4 ARC_SHARE=0.25 HEAD_DTYPE=compute COMPILE=1 bash benchmarks/train_tiny_long.sh")
STEP_RATE = re.compile(r"step (\d+)/\d+ .*?([\d.]+) steps/s\s+([\d.]+) min")


def step_rates(log: Path) -> list[tuple[int, float, float]]:
    """(step, steps/s since the last log line, minutes trained) of every log line of a training log."""
    return [(int(step), float(rate), float(minutes)) for step, rate, minutes in STEP_RATE.findall(log.read_text())]


def step_profile_rows(result: dict, length: int) -> dict[str, dict]:
    """A train_step_profile result's rows at one clip length, by DPT head dtype."""
    return {row["heads"]: row for row in result["rows"] if row["length"] == length}


def worse_than(report: dict, reference: dict) -> list[str]:
    """Every (length, metric of COMPARED or frame-only / model ATE) at which `report`'s dense model is worse than
    `reference`'s."""
    model, old = by_length(report), by_length(reference)
    ratio = {label: {f: by_length(r, "frame_only")[f]["ate"] / by_length(r)[f]["ate"] for f in by_length(r)}
             for label, r in (("new", report), ("old", reference))}
    worse = [f"{name} at {frames} ({old[frames][key]:.{digits}f} -> {model[frames][key]:.{digits}f})"
             for frames in sorted(model) for key, name, digits in COMPARED
             if (model[frames][key] < old[frames][key]) == (key == "auc30") and model[frames][key] != old[frames][key]]
    worse += [f"frame-only / model ATE at {frames} ({ratio['old'][frames]:.2f} -> {ratio['new'][frames]:.2f})"
              for frames in sorted(model) if ratio["new"][frames] < ratio["old"][frames]]
    return worse


def places(worse: list[str]) -> str:
    """`worse_than`'s list as "N place(s): ..." or "no place"."""
    return f"{len(worse)} place(s): " + "; ".join(worse) if worse else "no place"


def device_gap(report: dict, reference: dict) -> float:
    """The largest relative difference between two evaluations of the same weights on every metric of COMPARED."""
    model, old = by_length(report), by_length(reference)
    return max(abs(model[f][key] - old[f][key]) / abs(old[f][key]) for f in model for key, _, _ in COMPARED)


def drift_lines(name: str) -> list[str]:
    """benchmarks/tiny_drift.py's result `name`: where the pose error at the longest length comes from."""
    result = json.loads((RESULTS / name).read_text())
    model, truth = result["rows"]["model"], result["truth_turn"]
    first, last = next(iter(truth)), list(truth)[-1]
    noisy = model["consecutive"] > 2 * result["truth_consecutive"]
    return [
        f"Where the {result['frames']}-frame rotation error comes from (`{name[:-5]}.md`, "
        f"{result['clips']}): against frame 0 it grows from {model['by_index'][first]:.1f} deg at frames {first} to "
        f"{model['by_index'][last]:.1f} deg at frames {last}, where the true cameras have turned "
        f"{truth[last]:.0f} deg from frame 0. The rotation between consecutive frames is off by "
        f"{model['consecutive']:.1f} deg on average, against a true turn of {result['truth_consecutive']:.2f} deg per "
        "frame: " + ("besides the drift away from frame 0, neighbouring poses disagree by several times the true "
                     "motion between them, so a loss on the relative pose of nearby frames is one lever to try."
                     if noisy else "within twice the true motion, so most of the error is a smooth drift away from frame 0.")]


def stage4() -> list[str]:
    """Stage 4 from stage 3's 2-head weights on one H100, with the DPT heads in bf16 and the blocks compiled; not
    shipped."""
    log = RESULTS / "train-vggt-tiny-long-s4.log"
    evals, rates = held_out_evals(log), step_rates(log)
    eager = json.loads((RESULTS / "train-step-profile.json").read_text())
    compiled = json.loads((RESULTS / "train-step-profile-compiled.json").read_text())
    long = max(row["length"] for row in compiled["rows"])
    plain, bf16_heads = step_profile_rows(eager, long)["fp32"], step_profile_rows(eager, long)["compute"]
    both = step_profile_rows(compiled, long)["compute"]
    render_share = both["phases_ms"]["render"] / both["step_ms"]
    reports = {label: json.loads((RESULTS / f"eval-vggt-tiny-long-{tag}.json").read_text())
               for label, tag in (("stage 2", "s2-cpu"), ("stage 3", "s3-h2"), ("stage 4", "s4"))}
    on_gpu = json.loads((RESULTS / "eval-vggt-tiny-long-s4-h100.json").read_text())
    arcs = json.loads((RESULTS / "eval-vggt-tiny-long-s4-arc8.json").read_text())
    arcs3 = json.loads((RESULTS / "eval-vggt-tiny-long-s3-h2-arc8.json").read_text())
    gap = device_gap(on_gpu, reports["stage 4"])
    worse = worse_than(reports["stage 4"], reports["stage 2"])
    steady = [rate for step, rate, _ in rates if step > 100]
    first_minutes = rates[0][2]
    return [
        "Stage 3's 2-head weights trained on for 10 min alone on one NVIDIA H100 (commit 9360db2), with the DPT heads "
        "under bf16 autocast (`--head-dtype compute`) and the blocks and DPT heads compiled (`--compile`), because "
        "`benchmarks/train_step_profile.py` (`train-step-profile.md`, `train-step-profile-compiled.md`) timed a step "
        f"of {long} frames x {plain['clips']} clips at {plain['step_ms']:.0f} ms as stage 3 trained (eager, fp32 "
        "heads), "
        f"{bf16_heads['step_ms']:.0f} ms with bf16 heads and {both['step_ms']:.0f} ms with both "
        f"({plain['step_ms'] / both['step_ms']:.2f}x); of the last, the ray cast of the clips takes "
        f"{both['phases_ms']['render']:.0f} ms ({render_share:.0%}).", "",
        "```bash", STAGE4_COMMAND, "```", "",
        f"Log `train-vggt-tiny-long-s4.log` ({trained(log)}): {min(steady):.1f}-{max(steady):.1f} steps/s after step "
        f"100, but the first 100 steps took {first_minutes:.1f} min, most of it compiling (the heads hit dynamo's "
        "recompile limit for the changing clip lengths; `--compile` now compiles with dynamic shapes). Its periodic "
        "held-out evaluation at 256 frames (synthetic:16:999:walk, bf16):", "",
        *held_out_table(evals), "", ended_at("Stage 3", RESULTS / "train-vggt-tiny-long-s3-h2.log"), "",
        f"Stages 2, 3 (2 heads) and 4 on the held-out walks ({reports['stage 4']['clips']}, dense, each "
        f"{reports['stage 4']['device_name']}):", "", *stages_compared(reports), "",
        f"The same evaluation of stage 4 on the H100 in fp32 (`eval-vggt-tiny-long-s4-h100.json`) differs from the "
        f"CPU's by at most {gap:.0e} (relative) on every metric above.", "",
        "### Stage 4: the issue's bars", "", *bars(reports["stage 4"]), "",
        *drift_lines("drift-vggt-tiny-long-s4-256.json"), "",
        f"On 8-frame arcs ({arcs['clips']}, {arcs['device_name']}) AUC@30 is {by_length(arcs)[8]['auc30']:.3f} "
        f"(stage 3: {by_length(arcs3)[8]['auc30']:.3f}).", "",
        "### Stage 4: sensitivity at 32 frames", "", *sensitivity("profile-vggt-tiny-long-s4-32.json"), "",
        "### Stage 4: sensitivity at 256 frames", "", *sensitivity("profile-vggt-tiny-long-s4-256.json"), "",
        (f"Not shipped: stage 4 is worse than stage 2 in {len(worse)} place(s): " + "; ".join(worse)
         + ". " if worse else "Better than stage 2 at every length and metric above. ")
        + f"Its weights were kept as `{STAGE4_CHECKPOINT}` for stage 5 to start from (in commit 2d28945's tree; removed "
          "once stage 6 came)."]


STAGE5_CHECKPOINT = "benchmarks/checkpoints/vggt-tiny-long-stage5.safetensors"
STAGE5_COMMAND = (f"RUN=/root/s5 MINUTES=7 INIT={STAGE4_CHECKPOINT} MAX_FRAMES=256 FRAMES_PER_STEP=1024 LR=3e-4 "
                  "WARMUP=100 SEED=5 ARC_SHARE=0.25 HEAD_DTYPE=compute COMPILE=1 RELATIVE_WEIGHT=5 "
                  "bash benchmarks/train_tiny_long.sh")


def stage5() -> list[str]:
    """Stage 5 from stage 4's weights with the relative-pose loss, 7 min on one H100; not shipped."""
    log = RESULTS / "train-vggt-tiny-long-s5.log"
    reports = {label: json.loads((RESULTS / f"eval-vggt-tiny-long-{tag}.json").read_text())
               for label, tag in (("stage 2", "s2-cpu"), ("stage 4", "s4"), ("stage 5", "s5-h100"))}
    worse2, worse4 = (worse_than(reports["stage 5"], reports[label]) for label in ("stage 2", "stage 4"))
    gap = device_gap(json.loads((RESULTS / "eval-vggt-tiny-long-s4-h100.json").read_text()), reports["stage 4"])
    return [
        "Stage 4's weights trained on for 7 min on one NVIDIA H100 (commit 6c62ecf) with a new seed and the "
        "relative pose of frame pairs in the loss at weight 5 (`--relative-weight`), against the neighbouring poses "
        "that disagree on long clips (the drift above); compiled blocks and bf16 DPT heads as in stage 4.", "",
        "```bash", STAGE5_COMMAND, "```", "",
        f"Log `train-vggt-tiny-long-s5.log` ({trained(log)}). Its periodic held-out evaluation at 256 frames "
        "(synthetic:16:999:walk, bf16):", "",
        *held_out_table(held_out_evals(log)), "",
        f"Stages 2, 4 and 5 on the held-out walks ({reports['stage 5']['clips']}, dense; stages 2 and 4 "
        f"{reports['stage 4']['device_name']}, stage 5 {reports['stage 5']['device_name']} in fp32, "
        "`eval-vggt-tiny-long-s5-h100.json`; stage 4's fp32 evaluations on the two devices differ by at most "
        f"{gap:.0e}, relative):", "", *stages_compared(reports), "",
        "### Stage 5: the issue's bars", "", *bars(reports["stage 5"]), "",
        *drift_lines("drift-vggt-tiny-long-s5-256.json"), "",
        f"Against stage 2, stage 5 is worse in {places(worse2)}. Against stage 4, in {places(worse4)}. "
        f"Not shipped: its weights were kept as `{STAGE5_CHECKPOINT}` for stage 6 to start from (in commit a37238a's "
        "tree; removed once stage 7 came)."]


STAGE6_CHECKPOINT = "benchmarks/checkpoints/vggt-tiny-long-stage6.safetensors"
STAGE6_COMMAND = (f"RUN=/root/s6 MINUTES=8 INIT={STAGE5_CHECKPOINT} MAX_FRAMES=256 FRAMES_PER_STEP=1024 LR=3e-4 "
                  "WARMUP=100 SEED=6 ARC_SHARE=0.25 HEAD_DTYPE=compute COMPILE=1 RELATIVE_WEIGHT=5 "
                  "RELATIVE_OFFSETS=1,2,4,8,16,32,64,128 bash benchmarks/train_tiny_long.sh")


def later_stage(stage: int, previous_tag: str, intro: str, commands: list[str], closing: str,
                sections: list[str] = ()) -> list[str]:
    """The section of a stage trained on from the stage before it, from its result files: `intro`, the `commands`,
    its training log's held-out evaluations, the fp32 evaluation beside stage 2 and the stage before
    (`eval-vggt-tiny-long-<previous_tag>.json`), the bf16 one on the GPU, the issue's bars, the drift, any further
    `sections`, where it is worse than either, then `closing`."""
    label, previous = f"stage {stage}", f"stage {stage - 1}"
    log = RESULTS / f"train-vggt-tiny-long-s{stage}.log"
    reports = {name: json.loads((RESULTS / f"eval-vggt-tiny-long-{tag}.json").read_text())
               for name, tag in (("stage 2", "s2-cpu"), (previous, previous_tag), (label, f"s{stage}-cpu"))}
    on_gpu = by_length(json.loads((RESULTS / f"eval-vggt-tiny-long-s{stage}-h100.json").read_text()))
    worse2, worse_previous = (worse_than(reports[label], reports[name]) for name in ("stage 2", previous))
    return [
        intro, "", "```bash", *commands, "```", "",
        f"Log `{log.name}` ({trained(log)}). Its periodic held-out evaluation at 256 frames "
        "(synthetic:16:999:walk, bf16):", "",
        *held_out_table(held_out_evals(log)), "",
        ended_at(f"Stage {stage - 1}", RESULTS / f"train-vggt-tiny-long-s{stage - 1}.log"), "",
        f"Stages 2, {stage - 1} and {stage} on the held-out walks ({reports[label]['clips']}, dense, fp32; stage "
        f"{stage} {reports[label]['device_name']}, `eval-vggt-tiny-long-s{stage}-cpu.json`):", "",
        *stages_compared(reports), "",
        f"In bf16 on the H100 (`eval-vggt-tiny-long-s{stage}-h100.json`, 8 and {max(on_gpu)} frames) stage {stage} "
        "has rotation error " + " and ".join(f"{on_gpu[f]['rotation_deg']:.2f} deg, AUC@30 {on_gpu[f]['auc30']:.3f} "
                                             f"at {f}" for f in sorted(on_gpu)) + ".", "",
        f"### Stage {stage}: the issue's bars", "", *bars(reports[label]), "",
        *drift_lines(f"drift-vggt-tiny-long-s{stage}-256.json"), "", *sections,
        f"Against stage 2, stage {stage} is worse in {places(worse2)}. Against stage {stage - 1}, in "
        f"{places(worse_previous)}. " + closing]


def stage6() -> list[str]:
    """Stage 6 from stage 5's weights with the relative-pose loss reaching pairs 64 and 128 frames apart, 11.3 min on
    one H100; not shipped."""
    return later_stage(6, "s5-h100", (
        "Stage 5 had plateaued at 256 frames and its drift analysis put the error on the frames far from frame 0 "
        f"(above). Stage 6 trains stage 5's weights on with the relative-pose pairs reaching {64} and {128} frames "
        "apart as well (`--relative-offsets`; stage 5 stopped at 32), a new seed, otherwise stage 5's settings, on one "
        "NVIDIA H100 (commit 2d28945): 8 min, then resumed from its checkpoint with the limit raised to 11.3 min (the "
        "learning rate follows the minutes, so it rose again to about 4e-5 and decayed)."),
        [STAGE6_COMMAND, "# then the same with MINUTES=11.3"],
        f"Not shipped: its weights were kept as `{STAGE6_CHECKPOINT}` for stage 7 to start from (in commit 86b5d36's "
        "tree; removed once stage 8 came).")


STAGE7_CHECKPOINT = "benchmarks/checkpoints/vggt-tiny-long-stage7.safetensors"
STAGE7_COMMAND = (f"RUN=/root/s7 MINUTES=12 INIT={STAGE6_CHECKPOINT} MAX_FRAMES=256 FRAMES_PER_STEP=1024 LR=2e-4 "
                  "WARMUP=100 SEED=7 ARC_SHARE=0.25 HEAD_DTYPE=compute COMPILE=1 RELATIVE_WEIGHT=5 "
                  "RELATIVE_OFFSETS=1,2,4,8,16,32,64,128 bash benchmarks/train_tiny_long.sh")


def stage7() -> list[str]:
    """Stage 7: stage 6's weights trained on with its settings, a new seed and a lower peak learning rate, 12 min on
    one H100; not shipped."""
    first6 = held_out_evals(RESULTS / "train-vggt-tiny-long-s6.log")[0]
    first7 = held_out_evals(RESULTS / "train-vggt-tiny-long-s7.log")[0]
    return later_stage(7, "s6-cpu", (
        "Stage 7 trains stage 6's weights on with stage 6's settings, a new seed and a peak learning rate of 2e-4 "
        "instead of 3e-4, 12 min on one NVIDIA H100 (commit c6bac26): at 3e-4 stage 6 "
        f"first lost ground ({first6['rotation_deg']:.2f} deg at step {first6['step']} against stage 5's end), at 2e-4 "
        f"stage 7 stood at {first7['rotation_deg']:.2f} deg at step {first7['step']}."),
        [STAGE7_COMMAND],
        f"Not shipped: its weights are kept as `{STAGE7_CHECKPOINT}`, which stage 8 starts from.",
        ["### Stage 7: sensitivity at 32 frames", "", *sensitivity("profile-vggt-tiny-long-s7-32.json"), ""])


STAGE8_COMMAND = (f"RUN=/root/s8 MINUTES=11 INIT={STAGE7_CHECKPOINT} MAX_FRAMES=256 FRAMES_PER_STEP=1024 LR=1.5e-4 "
                  "WARMUP=100 SEED=8 ARC_SHARE=0.25 HEAD_DTYPE=compute COMPILE=1 RELATIVE_WEIGHT=5 "
                  "RELATIVE_OFFSETS=1,2,4,8,16,32,64,128 bash benchmarks/train_tiny_long.sh")


SHIPPING_RERUNS = {"eval-vggt-tiny.json": "the 8-frame arcs evaluation", "length-schedules.json":
                   "the long-clip schedule study at 256 frames",
                   "length-schedules-s8-96.json": "the long-clip schedule study at 96 frames (2 CPU cores)",
                   "profile-screening-vggt-tiny-s8-32.json": "the level screens at 32 frames",
                   "profile-screening-vggt-tiny-s8-256.json": "the level screens at 256 frames",
                   "profile-vggt-tiny-long-s8-32.json": "the 32-frame profile",
                   "profile-vggt-tiny-long-s8-256.json": "the 256-frame profile"}


def rerun_on(sha: str) -> str:
    """Which of SHIPPING_RERUNS' results measured the weights of sha256 `sha`, and which not yet."""
    done = {name: (RESULTS / name).is_file() and json.loads((RESULTS / name).read_text()).get("weights_sha256") == sha
            for name in SHIPPING_RERUNS}
    rerun = [f"{what} (`{name}`)" for name, what in SHIPPING_RERUNS.items() if done[name]]
    left = [what for name, what in SHIPPING_RERUNS.items() if not done[name]]
    return (f"Rerun on them: {'; '.join(rerun) or 'nothing yet'}."
            + (f" Not yet rerun: {'; '.join(left)}." if left else ""))


def stage8() -> list[str]:
    """Stage 8: stage 7's weights trained on with its settings, a new seed and a peak learning rate of 1.5e-4, 11 min
    on one H100; shipped."""
    last7 = held_out_evals(RESULTS / "train-vggt-tiny-long-s7.log")[-1]
    sha = json.loads((RESULTS / "eval-vggt-tiny-long-s8-cpu.json").read_text())["weights_sha256"]
    return later_stage(8, "s7-cpu", (
        "Stage 8 trains stage 7's weights on with stage 7's settings, a new seed and a peak learning rate of 1.5e-4, "
        f"11 min on one NVIDIA H100 (commit a84dfe5): stage 7's held-out AUC@30 was still rising at its end "
        f"({last7['auc30']:.3f} at step {last7['step']})."),
        [STAGE8_COMMAND],
        f"Shipped: from commit 7c096a7 `spark3r/weights/vggt-tiny.safetensors` holds stage 8's weights (sha256 "
        f"{sha[:12]}). " + rerun_on(sha),
        ["### Stage 8: ATE against the size of the trajectory (not one of the issue's bars)", "",
         *spread_table(json.loads((RESULTS / "eval-vggt-tiny-long-s8-cpu.json").read_text())), "",
         "### Stage 8: sensitivity at 32 frames", "", *sensitivity("profile-vggt-tiny-long-s8-32.json"), "",
         "### Stage 8: sensitivity at 256 frames", "",
         *sensitivity("profile-vggt-tiny-long-s8-256.json"), ""])


def sensitivity(name: str) -> list[str]:
    """The per-layer scores and asymmetry of profile result `name`, or how to measure it on the bundled weights."""
    path = RESULTS / name
    if not path.is_file():
        frames = re.search(r"-(\d+)\.json$", name).group(1)
        return [f"Not measured yet (`{name}`, on a GPU: `profile-layers --model vggt-tiny --weights auto --calib "
                f"synthetic:4:2000:walk --frames {frames} --additivity 0 --device cuda`; on 2 CPU cores one clip "
                "takes about half an hour at 256 frames)."]
    profile = json.loads(path.read_text())
    return [f"`{name}` (`{profile['command']}`, {profile['device_name']}).", "", *asymmetry(profile)]


def report() -> str:
    """train-vggt-tiny-long.md from the result files."""
    first = json.loads((RESULTS / "eval-vggt-tiny-long-48.json").read_text())
    second = json.loads((RESULTS / "eval-vggt-tiny-long.json").read_text())
    arcs_first = json.loads((RESULTS / "eval-vggt-tiny-long-48-arc8.json").read_text())
    arcs_second = json.loads((RESULTS / "eval-vggt-tiny-long-arc8.json").read_text())
    profile_first = json.loads((RESULTS / "profile-vggt-tiny-long-48-32.json").read_text())
    middle = json.loads((RESULTS / "eval-vggt-tiny-long-mid.json").read_text())
    evals = [(row["step"], row["auc30"]) for row in held_out_evals(RESULTS / "train-vggt-tiny-long-256.log")]
    long = max(by_length(second))
    one, two = by_length(first)[long], by_length(second)[long]
    text = [
        "# vggt-tiny for long clips (12 + 12 blocks): stage 1 on clips of 2-48 frames, stage 2 on 2-256, "
        "stages 3-8 on 2-256 with more arcs; stage 8 shipped", "",
        "Device: one NVIDIA H200 for stages 1-3, one NVIDIA H100 for stages 4-8 (torch 2.11), bf16 trunk. Commands "
        "(background, resumable; "
        "`benchmarks/train_tiny_long.sh`):", "",
        "```bash", "# stage 1, code of commit 2d34547 with the vggt-tiny config at depth 12 (committed next)",
        "RUN=/root/tiny-long MINUTES=13 INIT=<the 6 + 6 weights of commit 189e6d8> bash benchmarks/train_tiny_long.sh",
        "# stage 2, commit 7e0ab8b, from stage 1's weights",
        "RUN=/root/tiny-long-256 MINUTES=11 INIT=spark3r/weights/vggt-tiny.safetensors MAX_FRAMES=256 "
        "FRAMES_PER_STEP=1024 LR=2e-4 WARMUP=100 SEED=2 bash benchmarks/train_tiny_long.sh", "```", "",
        f"Stage 1 (log `train-vggt-tiny-long.log`: {trained(RESULTS / 'train-vggt-tiny-long.log')}, 384 frames per "
        "step): the 6 + 6 model grown to 12 + 12 blocks by `grow_depth` (each block preceded by a copy of itself with "
        "zero LayerScale, so training starts from the old model's exact function), trained on clips of 2-48 frames "
        "(walks; arcs for half of the steps of at most 16 frames).",
        f"Stage 2 (log `train-vggt-tiny-long-256.log`: {trained(RESULTS / 'train-vggt-tiny-long-256.log')}, 1024 "
        "frames per step): stage 1's weights trained on clips of 2-256 frames (walks; arcs only for steps of at most 16 "
        f"frames, {100 * arc_share(2, 256):.0f}% of them). Stage 2's weights were shipped from commit 7e0ab8b "
        "until stage 8's replaced them (7c096a7).", "",
        f"## Held-out walks ({second['clips']}, never trained on), dense, stage 2", "",
        *evaluation_table(second), "",
        "## The issue's bars (stage 2)", "", *bars(second), "",
        "## ATE against the size of the trajectory (stage 2; not one of the issue's bars)", "",
        f"The ATE bar compares raw ATE at {long} frames with raw ATE at {min(by_length(second))} frames, on "
        "trajectories of very different sizes. Divided by the spread of the true camera centres:", "",
        *spread_table(second), "",
        f"## Between 32 and 128 frames (stage 2, {middle['clips']}, {middle['device_name']})", "",
        *evaluation_table(middle), "", breaks(second, middle), "",
        "## Stage 1 against stage 2 (held-out walks, dense)", "",
        *stages_compared({"stage 1": first, "stage 2": second}), "",
        f"Stage 2 takes the {long}-frame ATE from {one['ate']:.3f} to {two['ate']:.3f} and AUC@30 from "
        f"{one['auc30']:.2f} to {two['auc30']:.2f} (the bars above compare it with its 8-frame quality). "
        f"Its periodic held-out AUC@30 at {long} frames (synthetic:16:999:walk) was "
        + ", ".join(f"{auc:.3f} at step {step}" for step, auc in evals)
        + (": flat after the first evaluation (within 0.03); stage 3 below trains on with a higher learning rate and "
           "more arcs." if max(a for _, a in evals[1:]) - min(a for _, a in evals[1:]) < 0.03 else
           ": still moving at the end of the run."), "",
        f"## Held-out arcs ({arcs_second['clips']}, 8 frames, the 6 + 6 model's benchmark)", "",
        "Stage 1:", "", *evaluation_table(arcs_first), "", "Stage 2:", "", *evaluation_table(arcs_second), "",
        f"Stage 2 trained on arcs in {100 * arc_share(2, 256):.0f}% of its steps: on 8-frame arcs its AUC@30 is "
        f"{by_length(arcs_second)[8]['auc30']:.3f} against stage 1's {by_length(arcs_first)[8]['auc30']:.3f}.", "",
        "## Stage 2's sensitivity at 32 and 256 frames (profile-layers)", "",
        "### 32 frames", "", *sensitivity("profile-vggt-tiny-long-32.json"), "",
        "### 256 frames", "", *sensitivity("profile-vggt-tiny-long-256.json"), "",
        "## Stage 3 (not shipped): 2 heads against 4 heads", "",
        *stage3({"stage 1": arcs_first, "stage 2": arcs_second}), "",
        "## Stage 4 (not shipped): bf16 DPT heads and compiled blocks, 10 min on one H100", "", *stage4(), "",
        "## Stage 5 (not shipped): the relative-pose loss, 7 min on one H100", "", *stage5(), "",
        "## Stage 6 (not shipped): relative pose 64 and 128 frames apart, 11.3 min on one H100", "", *stage6(), "",
        "## Stage 7 (not shipped): stage 6 trained on, 12 min on one H100", "", *stage7(), "",
        "## Stage 8 (shipped): stage 7 trained on, 11 min on one H100", "", *stage8(), "",
        "## Stage 1's sensitivity at 32 frames", "",
        f"`profile-vggt-tiny-long-48-32.json` (`{profile_first['command']}`, {profile_first['device_name']}).", "",
        *asymmetry(profile_first), ""]
    return "\n".join(text)


def main() -> None:
    (RESULTS / "train-vggt-tiny-long.md").write_text(report())


if __name__ == "__main__":
    main()
