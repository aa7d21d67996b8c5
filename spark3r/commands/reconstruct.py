"""reconstruct: a video, a folder of photos or a `scene/images/` folder -> point cloud, COLMAP cameras, depth maps.

    reconstruct walk.mp4 --model vggt-1b --weights model.safetensors --schedule paper --max-frames 300 --out walk/
    reconstruct photos/ --model vggt-tiny --schedule none

Writes DIR/points.ply, DIR/sparse/0/{cameras,images,points3D}.txt, DIR/images/, DIR/depth/, DIR/preview.png and
DIR/summary.json (see spark3r.reconstruct).
"""
from __future__ import annotations

import sys

from spark3r.commands.arguments import (ArgumentParser, add_compile_arg, add_head_dtype_arg, add_runtime_args,
                                        command, resolve_device, resolve_dtype)
from spark3r.reconstruct import (DEFAULT_CONFIDENCE_PERCENTILE, DEFAULT_MAX_POINTS, SCHEDULE_CHOICES,
                                 reconstruct)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="reconstruct", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="a video (.mp4 .mov .avi .mkv .webm), a folder of png/jpg images, or a folder "
                                      "holding images/")
    parser.add_argument("--model", required=True, help="registry name or alias, e.g. vggt-1b, vggt-tiny, pi3, da3")
    parser.add_argument("--weights", default="auto",
                        help="a .safetensors/.pt file or folder, auto (bundled or Hugging Face cache) or none (random)")
    parser.add_argument("--schedule", default="paper", help=SCHEDULE_CHOICES + " (default: paper)")
    parser.add_argument("--size", type=int, help="preprocessing size in pixels, the side of a square image "
                                                  "(default: the model's, e.g. 518 for vggt-1b)")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--every", type=int, metavar="N", help="keep every N-th frame")
    sampling.add_argument("--max-frames", type=int, metavar="N",
                          help="keep N frames spread uniformly over the whole input (default: all frames)")
    parser.add_argument("--confidence-percentile", type=float, default=DEFAULT_CONFIDENCE_PERCENTILE,
                        help="keep points whose depth confidence is at or above this percentile of all frames' "
                             f"(default {DEFAULT_CONFIDENCE_PERCENTILE:g}: the median)")
    parser.add_argument("--max-points", type=int, default=DEFAULT_MAX_POINTS,
                        help=f"at most this many points, a seeded random subset (default {DEFAULT_MAX_POINTS})")
    parser.add_argument("--out", default="reconstruction", help="output folder (default: reconstruction/)")
    add_runtime_args(parser)
    add_compile_arg(parser)
    add_head_dtype_arg(parser)
    return parser


@command(flags={"input": "INPUT"})
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    result = reconstruct(args.input, args.model, weights=args.weights, schedule=args.schedule, size=args.size,
                         every=args.every, max_frames=args.max_frames, out=args.out, device=device,
                         dtype=resolve_dtype(args.dtype, device), compiled=args.compile, head_dtype=args.head_dtype,
                         confidence_percentile=args.confidence_percentile,
                         max_points=args.max_points, seed=args.seed)
    summary = result.summary
    height, width = result.image_size
    print(f"{summary['frames']} frames at {width}x{height}, {result.model}, schedule {result.schedule}: "
          f"{result.points} points (confidence >= {result.confidence_threshold:.4g})")
    print("seconds: " + ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in result.seconds.items())
          + f" (total {summary['seconds_total']:.2f})")
    peaks = summary["peak_memory_bytes"]
    device_peak = "" if peaks["device_allocated"] is None else f", GPU {peaks['device_allocated'] / 2**30:.2f} GiB"
    print(f"peak memory: host {peaks['host_max_rss'] / 2**30:.2f} GiB{device_peak}")
    print(f"wrote {result.out}/: points.ply, sparse/0/ (COLMAP text), images/, depth/, preview.png, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
