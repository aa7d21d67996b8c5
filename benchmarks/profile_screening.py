"""What screening levels costs a profile: profile-layers run on the same clips with every level resumed end to end
(`--resume-levels all`) and with each screen (`--resume-levels alternate`: every other level; `strongest`: one per
kind; the others estimated from their local deviation), compared level by level.

    python benchmarks/profile_screening.py --model vggt-tiny --weights auto --calib synthetic:4:2000:walk --frames 32
    python benchmarks/profile_screening.py --model vggt-tiny --weights none --calib synthetic:1 --frames 4 \\
        --out /tmp/screening.json                                          # a smoke run
    python benchmarks/profile_screening.py --frames 256 --full runs/p256 --screens alternate  # reuse a full run

Per kind (K/V, query) and non-dense level: whether it was resumed, the Spearman correlation over the layers of the
screened "score" against the full one (the search ranks layers by it; the issue's bar for a profile shortcut is
>= 0.99), and the median and largest relative difference. Beside it the resume + decode seconds of every run. Any
further profile-layers options go after `--` (e.g. `-- --device cuda --dtype bf16`). `--full DIR` takes the
`--resume-levels all` run from an earlier profile-layers run of the same options instead of running it again.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from spark3r.commands import profile_layers
from spark3r.commands.arguments import resolve_device
from spark3r.errors import Spark3rError
from spark3r.profiler.aggregate import spearman
from spark3r.profiler.format import load_profile
from spark3r.profiler.run import RESUMES, resumed_columns

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402

GOAL_SPEARMAN = 0.99


def compare(full, screened, metric: str = "score") -> list[dict]:
    """One row per kind and non-dense level: resumed or estimated, Spearman over layers, relative differences."""
    rows = []
    for kind, levels in (("kv", full.kv_keep), ("query", full.query_merge)):
        resumed = resumed_columns(len(levels), screened.options.get("resume", "all"))
        whole = np.asarray(getattr(full, kind)[metric].mean)
        estimate = np.asarray(getattr(screened, kind)[metric].mean)
        for column in range(1, len(levels)):
            relative = np.abs(estimate[:, column] - whole[:, column]) / np.maximum(np.abs(whole[:, column]), 1e-12)
            rows.append({"kind": kind, "level": levels[column], "resumed": column in resumed,
                         "spearman": spearman(estimate[:, column], whole[:, column]),
                         "median_rel_diff": float(np.median(relative)), "max_rel_diff": float(relative.max())})
    return rows


def differing(full, screened) -> str | None:
    """The first of model, frames, levels, clips and options (but --resume-levels) in which two profiles differ;
    None when they profiled the same thing."""
    for name in ("model", "frames", "kv_keep", "query_merge", "clips"):
        if getattr(full, name) != getattr(screened, name):
            return name
    options = [{key: value for key, value in p.options.items() if key != "resume"} for p in (full, screened)]
    return next((f"options[{key!r}]" for key in sorted(options[0].keys() | options[1].keys())
                 if options[0].get(key) != options[1].get(key)), None)


def seconds(profile, phases=("resume", "decode")) -> float:
    return float(sum(profile.timings.get(phase, 0.0) for phase in phases))


def markdown(result: dict) -> str:
    lines = [f"# Screening levels in profile-layers: {result['model']}, {result['frames']} frames", "",
             f"`{result['command']}` (git {result['commit']}, {result['device_name']}, torch {result['torch']}, "
             f"{result['created']}). Every run: `{result['profile_command']}`, once with `--resume-levels all` and "
             "once with each screen: " + ", ".join(f"`--resume-levels {screen['resume']}`"
                                                   for screen in result["screens"]) + "."
             + (f" The all-levels run is an earlier one, `{result['full_from']['path']}` "
                f"({result['full_from']['created']})." if result.get("full_from") else ""), ""]
    for screen in result["screens"]:
        lines += [f"## --resume-levels {screen['resume']}", "",
                  "| kind | level | resumed | Spearman over layers | median rel diff | max rel diff |",
                  "|---|---:|---|---:|---:|---:|"]
        for row in screen["rows"]:
            lines.append(f"| {'K/V keep' if row['kind'] == 'kv' else 'query merge'} | {row['level']:g} | "
                         f"{'yes' if row['resumed'] else 'estimated'} | {row['spearman']:.3f} | "
                         f"{row['median_rel_diff']:.3f} | {row['max_rel_diff']:.3f} |")
        worst = min(row["spearman"] for row in screen["rows"])
        resumed = sum(row["resumed"] for row in screen["rows"])
        lines += ["", f"Resumed {resumed} of {len(screen['rows'])} levels per layer. Lowest Spearman {worst:.3f} (a "
                      f"profile shortcut's bar: >= {GOAL_SPEARMAN}, {'met' if worst >= GOAL_SPEARMAN else 'not met'})."
                      f" Resume + decode: {result['all_s']:.1f} s resuming all, {screen['seconds']:.1f} s screened "
                      f"({screen['seconds'] / result['all_s']:.2f} of it); whole runs {result['all_wall_s']:.1f} s "
                      f"and {screen['wall_s']:.1f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vggt-tiny")
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--calib", default="synthetic:4:2000:walk")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--screens", nargs="+", default=[r for r in RESUMES if r != "all"],
                        choices=[r for r in RESUMES if r != "all"], help="screened --resume-levels to compare with all")
    parser.add_argument("--full", default=None, metavar="DIR",
                        help="an earlier profile-layers --resume-levels all run (its --out folder) of these options, "
                             "compared with instead of running it")
    parser.add_argument("--out", default=None, help="JSON path, markdown beside it "
                                                    "(default: benchmarks/results/profile-screening-<model>-<frames>"
                                                    ".json)")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="more profile-layers options, after --")
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    common = ["--model", args.model, "--weights", args.weights, "--calib", args.calib, "--frames", str(args.frames),
              "--additivity", "0", *rest]
    profiles = {}
    if args.full is not None:
        try:
            profiles["all"] = load_profile(args.full)
        except Spark3rError as error:
            parser.error(f"--full: {error}")
        if profiles["all"].options.get("resume", "all") != "all":
            parser.error(f"--full {args.full} is a --resume-levels {profiles['all'].options['resume']} run; it must "
                         "resume every level (--resume-levels all)")
    with tempfile.TemporaryDirectory() as folder:
        for resume in [resume for resume in ("all", *args.screens) if resume not in profiles]:
            out = Path(folder) / resume
            if profile_layers.main([*common, "--resume-levels", resume, "--out", str(out)]) != 0:
                parser.error(f"profile-layers --resume-levels {resume} failed (its message is above)")
            profiles[resume] = load_profile(out)
            if args.full is not None and (mismatch := differing(profiles["all"], profiles[resume])):
                parser.error(f"--full {args.full} profiled another {mismatch} than these options do; pass the "
                             "folder of a run of the same profile-layers options")
    device = resolve_device(profile_layers.build_parser().parse_args(common).device)
    full = profiles["all"]
    result = {**provenance.record(__file__, argv, device), **provenance.weights_identity(args.model, args.weights),
              "model": args.model,
              "frames": args.frames, "profile_command": "profile-layers " + " ".join(common),
              "full_from": args.full and {"path": args.full, "created": full.created},
              "all_s": seconds(full), "all_wall_s": full.timings.get("wall"),
              "screens": [{"resume": resume, "rows": compare(full, profiles[resume]),
                           "seconds": seconds(profiles[resume]), "wall_s": profiles[resume].timings.get("wall")}
                          for resume in args.screens]}
    provenance.publish(args.out, HERE / "results" / f"profile-screening-{args.model}-{args.frames}.json", result,
                       markdown(result))
    return result


if __name__ == "__main__":
    main()
