"""Speed of the synthetic scene renderer (spark3r.data.synthetic) on the tiny model's training batch.

    python benchmarks/render.py --device cuda --batch 48 --frames 8 --size 112 \
        --out benchmarks/results/render.json

Times, each the best of --repeats after one warm-up: sampling the batch's scenes and cameras on the CPU
(`sample_clip` per clip), and ray casting them on --device (`render_views`, one batched call). Also checks that the
device render matches the CPU render of the same scenes (largest image difference, median relative depth difference)
on the first --check clips. Markdown table on stdout, JSON in --out.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import measure  # noqa: E402
from provenance import record  # noqa: E402

from spark3r.commands.arguments import resolve_device  # noqa: E402
from spark3r.files import write_json  # noqa: E402
from spark3r.data.synthetic import (  # noqa: E402
    Scene,
    SceneConfig,
    clip_seeds,
    render_views,
    sample_clip,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, nargs="+", default=[112], help="H W, or one value for square frames")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check", type=int, default=2, help="clips whose device render is compared with the CPU's")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/render.json"))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    height, width = (args.size * 2)[:2]
    seeds = clip_seeds(0, args.batch)

    def sample():
        return [sample_clip(seed, args.frames, height, width, SceneConfig()) for seed in seeds]

    sampled, _, _ = measure(torch.device("cpu"), sample)
    sample_seconds = min(measure(torch.device("cpu"), sample)[1] for _ in range(args.repeats))
    scene = Scene.stack([item[0] for item in sampled]).to(device)
    intrinsics = torch.stack([item[1] for item in sampled]).to(device, torch.float32)
    extrinsics = torch.stack([item[2] for item in sampled]).to(device, torch.float32)

    def render():
        return render_views(scene, intrinsics, extrinsics, height, width)

    measure(device, render)
    runs = [measure(device, render) for _ in range(args.repeats)]
    (images, depth), render_seconds, peak = min(runs, key=lambda run: run[1])
    rays = args.batch * args.frames * height * width

    check = slice(0, args.check)
    cpu_scene = Scene(**{item.name: getattr(scene, item.name)[check].cpu() for item in fields(Scene)})
    cpu_images, cpu_depth = render_views(cpu_scene, intrinsics[check].cpu(), extrinsics[check].cpu(), height, width)
    image_difference = float((images[check].cpu() - cpu_images).abs().max())
    depth_difference = float(((depth[check].cpu() - cpu_depth).abs() / cpu_depth).median())

    result = {
        **record(__file__, argv, device), "batch": args.batch, "frames": args.frames, "height": height, "width": width,
        "sample_seconds": sample_seconds, "render_seconds": render_seconds, "render_peak_gib": peak,
        "mrays_per_second": rays / render_seconds / 1e6,
        "device_vs_cpu": {"image_max_abs": image_difference, "depth_median_rel": depth_difference},
    }
    print("| device | clips x frames x H x W | sample (CPU) ms | render ms | Mrays/s | peak GiB | max image diff vs CPU |")
    print("|---|---|---|---|---|---|---|")
    peak_text = f"{peak:.2f}" if peak is not None else "-"
    print(f"| {result['device_name']} | {args.batch} x {args.frames} x {height} x {width} | {sample_seconds * 1e3:.1f} | "
          f"{render_seconds * 1e3:.1f} | {result['mrays_per_second']:.1f} | {peak_text} | {image_difference:.2e} |")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
