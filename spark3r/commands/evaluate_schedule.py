"""`evaluate-schedule`: the dense model against the model with a schedule, on the same clips.

    evaluate-schedule --model vggt-tiny --schedule schedules/vggt-tiny-paper.yaml --clips synthetic:4
    evaluate-schedule --model vggt-1b --schedule schedules/vggt-1b-b0.1.yaml --clips clips/ --weights model.pt --json

What is measured: spark3r.evaluate.schedule_eval. A table goes to stdout, or JSON with `--json`.
"""
from __future__ import annotations

import json
import sys

from spark3r.commands.arguments import (ArgumentParser, add_compile_arg, add_head_dtype_arg, add_runtime_args,
                                        command, resolve_device, resolve_dtype)
from spark3r.evaluate.schedule_eval import QUALITY_KEYS, ScheduleEvaluation, evaluate_schedule


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def format_report(summary: dict, header: str) -> str:
    """The stdout table of a summary."""
    dense, reduced_run = summary["dense"], summary["reduced"]
    lines = [header, f"{'':<26}{'dense':>12}{'reduced':>12}",
             f"{'time s (all clips)':<26}{dense['seconds']:>12.4f}{reduced_run['seconds']:>12.4f}"
             f"   measured speed-up {summary['measured_speedup']:.2f}x",
             f"{'peak CUDA memory GiB':<26}{_gib(dense['peak_bytes']):>12}{_gib(reduced_run['peak_bytes']):>12}",
             f"{'FLOPs (FLOP model) G':<26}{dense['flops'] / 1e9:>12.3f}{reduced_run['flops'] / 1e9:>12.3f}"
             f"   predicted speed-up {summary['predicted_speedup']:.2f}x, global attention at "
             f"{summary['global_attention_fraction']:.3f} of dense",
             "deviation of reduced from dense: " + "  ".join(f"{key} {value:.4g}"
                                                              for key, value in summary["deviation"].items())]
    keys = [key for key in QUALITY_KEYS if key in dense["quality"]]
    if keys:
        lines.append(f"{'ground truth':<26}{'dense':>12}{'reduced':>12}")
        lines += [f"{key:<26}{dense['quality'][key]:>12.4f}{reduced_run['quality'][key]:>12.4f}" for key in keys]
    else:
        lines.append("ground truth: none in these clips")
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="evaluate-schedule", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="registry name or alias, e.g. vggt-1b, vggt-tiny, da3")
    parser.add_argument("--schedule", required=True, help="schedule YAML file made for this model")
    parser.add_argument("--clips", required=True, help="a folder of clips, one clip, or synthetic:N[:SEED]")
    parser.add_argument("--weights", default="auto",
                        help="checkpoint file or folder, 'auto' (shipped or Hugging Face cache) or 'none' (random)")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--frames", type=int, help="frames per clip, spread over the whole clip (synthetic clips: "
                                                     "rendered with N, 8 by default)")
    sampling.add_argument("--every", type=int, metavar="N", help="every N-th frame of each clip")
    parser.add_argument("--size", type=int, help="preprocessing size in pixels, the side of a square image (default: "
                                                 "the model's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per run; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards before timing each run")
    parser.add_argument("--json", action="store_true", help="print JSON (summary and per clip) instead of the table")
    add_runtime_args(parser)
    add_compile_arg(parser)
    add_head_dtype_arg(parser)
    return parser


def report_header(evaluation: ScheduleEvaluation) -> str:
    context, results = evaluation.context, evaluation.clips
    frames = "/".join(str(count) for count in sorted({r.frames for r in results}))
    clips = f"{len(results)} clip" + ("s" if len(results) > 1 else "")
    return (f"evaluate-schedule: {context['model']} with {context['schedule']} on {context['clips']} ({clips}, "
            f"{frames} frames; {context['device']}, {context['dtype']}; depth median-aligned per clip)")


@command(flags={"max_frames": "--frames"})
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    evaluation = evaluate_schedule(args.model, args.schedule, args.clips, device=device,
                                   dtype=resolve_dtype(args.dtype, device), weights=args.weights, frames=args.frames,
                                   every=args.every, size=args.size,
                                   repeats=args.repeats, warmup=args.warmup, seed=args.seed, compiled=args.compile,
                                   head_dtype=args.head_dtype)
    if args.json:
        print(json.dumps(evaluation.to_dict(), indent=2))
    else:
        print(format_report(evaluation.summary, report_header(evaluation)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
