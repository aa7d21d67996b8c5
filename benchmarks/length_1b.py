"""VGGT-1B (random weights, GPU): a length-aware schedule searched for 1000 frames on a profile of clips of at most
32 frames, timed at 1000 frames against the paper's rule at the same FLOPs (the schedule format should cost nothing).

    python benchmarks/length_1b.py        # -> benchmarks/results/length-1b.{md,json} (and speed rows in -speed.json)

1. `profile-layers --model vggt-1b --weights none` on --clips generated clips at --profile-frames (few levels, so it
   takes a few minutes on an H200);
2. `search-schedule --budget <the paper rule's global-attention FLOPs fraction at 1000 frames> --frames 1000`;
3. benchmarks/speed.py at 1000 frames with the paper's rule and the searched schedule (dense assembled per block).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402
import tiny_schedules as tiny  # noqa: E402

from spark3r.models.registry import build_model  # noqa: E402
from spark3r.commands import profile_layers as profiler_cli  # noqa: E402
from spark3r.reduce import global_attention_fraction  # noqa: E402
from spark3r.schedule import load_schedule  # noqa: E402
from spark3r.commands import search_schedule as search_cli  # noqa: E402
from spark3r.search.pipeline import find_paper_rule  # noqa: E402

_spec = importlib.util.spec_from_file_location("benchmarks_speed", HERE / "speed.py")
speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(speed)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vggt-1b")
    parser.add_argument("--clips", default="synthetic:1:100:walk", help="calibration clips")
    parser.add_argument("--profile-frames", default="8,16,32")
    parser.add_argument("--kv-frames", default="2,8")
    parser.add_argument("--kv-keep", default="0.5")
    parser.add_argument("--query-merge", default="1,2,4")
    parser.add_argument("--frames", type=int, default=1000, help="deployment length")
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", default="runs/length-1b")
    parser.add_argument("--out", default="benchmarks/results/length-1b")
    args = parser.parse_args(argv)
    work, out, started, commands, seconds = Path(args.work), Path(args.out), time.perf_counter(), [], {}

    profile_argv = ["--model", args.model, "--weights", "none", "--calib", args.clips, "--frames",
                    args.profile_frames, "--kv-frames", args.kv_frames, "--kv-keep", args.kv_keep, "--query-merge",
                    args.query_merge, "--additivity", "0", "--device", args.device, "--dtype", "bf16",
                    "--out", str(work / "profile")]
    commands.append(shlex.join(["profile-layers", *profile_argv]))
    profile = tiny.run_json("profile-layers", profiler_cli.main, profile_argv)
    seconds["profile"] = time.perf_counter() - started

    flop_config = build_model(args.model, device="meta").flop_config(args.size, args.size)
    paper_path = find_paper_rule(args.model)
    paper = load_schedule(paper_path)
    budget = global_attention_fraction(flop_config, args.frames, paper)
    searched_path = work / f"{args.model}-searched-f{args.frames}.yaml"
    search_argv = ["--profile", profile["profile"], "--budget", f"{budget:.6g}", "--frames", str(args.frames),
                   "--out", str(searched_path)]
    commands.append(shlex.join(["search-schedule", *search_argv]))
    search = tiny.run_json("search-schedule", search_cli.main, search_argv)
    seconds["search"] = time.perf_counter() - started - seconds["profile"]

    speed_json = out.parent / f"{out.name}-speed.json"
    speed_argv = ["--model", args.model, "--frames", str(args.frames), "--size", str(args.size), "--schedule",
                  str(paper_path), str(searched_path), "--repeats", str(args.repeats), "--device", args.device,
                  "--out", str(speed_json)]
    commands.append(shlex.join(["python", "benchmarks/speed.py", *speed_argv]))
    speed.main(speed_argv)
    seconds["speed"] = time.perf_counter() - started - seconds["profile"] - seconds["search"]
    rows = {row["schedule"]: row for row in json.loads(speed_json.read_text())["rows"]}
    paper_row, searched_row = rows[paper_path.stem], rows[searched_path.stem]
    searched = load_schedule(searched_path)
    result = {
        **provenance.record(__file__, argv, args.device), "model": args.model, "commands": commands, "budget": budget,
        "frames": args.frames, "dense_note": rows["dense"]["note"],
        "profile_length_model": profile.get("length_model", {}).get("score", {}).get("held_out"),
        "searched": {"schedule": searched.to_dict(), "kv_frames": search["chosen"]["kv_frames"],
                     "query_merge": search["chosen"]["query_merge"],
                     "flops_fraction": global_attention_fraction(flop_config, args.frames, searched),
                     "end_to_end_s": searched_row["end_to_end_s"], "aggregator_s": searched_row["aggregator_s"],
                     "peak_gib": searched_row["peak_gib"]},
        "paper": {"schedule": str(paper_path), "flops_fraction": budget, "end_to_end_s": paper_row["end_to_end_s"],
                  "aggregator_s": paper_row["aggregator_s"], "peak_gib": paper_row["peak_gib"]},
        "dense_end_to_end_s": rows["dense"]["end_to_end_s"],
        "time_ratio": searched_row["end_to_end_s"] / paper_row["end_to_end_s"],
        "seconds": {**seconds, "total": time.perf_counter() - started},
    }
    text = report(result)
    provenance.write_result(out.with_suffix(".json"), result, text)
    print(text)
    return result


def report(result: dict) -> str:
    s, p = result["searched"], result["paper"]
    held = result["profile_length_model"] or {}
    return "\n".join([
        f"# {result['model']} at {result['frames']} frames (random weights): searched length-aware schedule vs the "
        "paper's rule", "",
        f"Made by `{result['command']}` (git {result['commit']}, {result['device_name']}, torch {result['torch']}, "
        f"{result['created']}); it ran:", "", *[f"    {c}" for c in result["commands"]], "",
        f"Length model held out at {held.get('frames')} frames: RMSE of log "
        f"{(held.get('all') or {}).get('rmse_log', float('nan')):.3f}.", "",
        "| schedule | global-attention FLOPs fraction | end-to-end s | aggregator s | peak GiB |",
        "|---|---:|---:|---:|---:|",
        f"| paper's rule | {p['flops_fraction']:.5f} | {p['end_to_end_s']:.2f} | {p['aggregator_s']:.2f} | "
        f"{p['peak_gib'] or 0:.1f} |",
        f"| searched (K/V frames {s['kv_frames']}, merge {s['query_merge']}) | {s['flops_fraction']:.5f} | "
        f"{s['end_to_end_s']:.2f} | {s['aggregator_s']:.2f} | {s['peak_gib'] or 0:.1f} |", "",
        f"Searched / paper time: {result['time_ratio']:.3f} (goal: within 10% at the same FLOPs). Dense: "
        f"{result['dense_end_to_end_s']:.1f} s ({result['dense_note']}).", "",
        "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items()) + ".", ""])


if __name__ == "__main__":
    main()
