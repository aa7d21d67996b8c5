"""search-schedule: the per-layer schedule with the least predicted deviation under a FLOP budget.

    search-schedule --budget 0.1                      # newest profiles/*/profile.json -> schedules/<model>-b0.1.yaml
    search-schedule --profile P --budget 0.1 --trials 4000 --verify 5 --calib synthetic:4:100
    search-schedule --budget 0.01 --frames 100,300,1000   # a profile of several lengths: a length-aware schedule

First the exact optimum of the predicted objective (multiple-choice knapsack), then an Optuna study warm-started with it
(resumable: the same command continues it; several workers can share it), optionally the best candidates measured on
held-out clips; the chosen schedule is written as YAML with a plot beside it. On a profile of several clip lengths the
search is length-aware and exact per deployment length (spark3r.search.deploy), with no study.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import torch

from spark3r.commands.arguments import (ArgumentParser, add_compile_arg, add_runtime_args, command, resolve_device,
                                        resolve_dtype)
from spark3r.schedule import BUDGET_OF
from spark3r.search.lengths import parse_lengths
from spark3r.search.pipeline import LONG_FRAMES, SearchRequest, search_schedule
from spark3r.search.study import SAMPLERS

FLAGS = {"path": "--profile"}  # library parameters whose flag is not --parameter-name


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
                        help="measure the K best candidates and the best uniform schedule on the --calib clips (cut "
                             "to the longest --frames for a profile of several lengths) and export the best measured "
                             "one")
    parser.add_argument("--calib", default=None,
                        help="held-out clips for --verify (folder, clip or synthetic:N[:SEED])")
    parser.add_argument("--size", type=int, default=None,
                        help="preprocessing size of the --verify clips, the side of a square image (default: the "
                             "profile's)")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--every", type=int, default=None, metavar="N", help="--verify on every N-th frame")
    sampling.add_argument("--max-frames", type=int, default=None, metavar="N",
                          help="--verify on N frames spread over each clip (default: the profile's frame count)")
    parser.add_argument("--weights", default=None, help="weights for --verify (default: those the profile used)")
    parser.add_argument("--model", default=None, help="refuse a profile made for another model")
    parser.add_argument("--storage", default=None,
                        help="study storage: a journal file path or a database URL (default: <out>.journal)")
    parser.add_argument("--study", default=None, help="study name (default: <model>-b<budget>-<problem digest>)")
    parser.add_argument("--out", default=None, help="schedule YAML (default: schedules/<model>-b<budget>.yaml)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    add_runtime_args(parser)
    add_compile_arg(parser)
    return parser


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
        name += " (over budget)" if row["flops_fraction"] > result["budget"] else ""
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


def length_table(result: dict) -> str:
    """The human summary of a length-aware search: FLOPs fraction and predicted deviation at the profiled, report and deployment lengths."""
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


@command(flags=FLAGS)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fields = {field.name for field in dataclasses.fields(SearchRequest)} - {"device", "dtype", "compiled"}
    device = resolve_device(args.device) if args.verify else torch.device("cpu")  # only --verify runs the model
    frames = None if args.frames is None else parse_lengths(args.frames)
    request = SearchRequest(**{name: getattr(args, name) for name in fields - {"frames"}}, frames=frames,
                            device=device, dtype=resolve_dtype(args.dtype, device), compiled=args.compile)
    result = search_schedule(request)
    summary = length_table if result.get("length_aware") else table
    print(json.dumps(result, indent=1) if args.json else summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
