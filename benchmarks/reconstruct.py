"""reconstruct end to end on a long video: seconds per stage, peak host and GPU memory.

    python benchmarks/reconstruct.py --model vggt-1b --weights none --frames 1000 --size 518 --schedule paper

Without --video, a video of --frames generated frames (a hand-held walk through a synthetic room, rendered at
--size x --size and written as H.264 mp4) is made first, in --work; with --video, that
file is used. Then `reconstruct` runs on it (all frames unless --max-frames / --every) into --work/reconstruction and
its summary, the command line, the commit and the device are written to benchmarks/results/reconstruct-<model>-
<frames>.{json,md} (or --results PREFIX).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from spark3r.commands.arguments import DTYPES, resolve_device, resolve_dtype
from spark3r.data.clip import Clip
from spark3r.data.clips import write_clip
from spark3r.data.synthetic import SceneConfig, render_clip
from spark3r.files import write_atomic, write_json
from spark3r.reconstruct import reconstruct

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("benchmarks_provenance", HERE / "provenance.py")
provenance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(provenance)


def make_video(folder: Path, frames: int, size: int, device: torch.device, seed: int) -> Path:
    """A generated walk of `frames` frames at size x size, written as folder/walk-<frames>.mp4 (no ground truth)."""
    clip = render_clip(seed, frames=frames, height=size, width=size, config=SceneConfig(path="walk"), device=device,
                       name=f"walk-{frames}")
    return write_clip(Clip(clip.name, clip.images.cpu()), folder, "mp4")


def markdown(record: dict) -> str:
    summary = record["summary"]
    peaks = summary["peak_memory_bytes"]
    lines = [f"# reconstruct: {summary['model']}, {summary['frames']} frames at {summary['image_size'][1]}x"
             f"{summary['image_size'][0]}, schedule {summary['schedule']}", "",
             f"Command: `{record['command']}`  ", f"Commit: `{record['commit']}`  ",
             f"Device: {record['device_name']}, {summary['dtype']}, torch {record['torch']}  ",
             f"Input: {summary['input']}" + (f" (generated in {record['video_seconds']:.1f} s)"
                                             if record["video_seconds"] is not None else ""), "",
             *([record["note"], ""] if record.get("note") else []),
             "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.2f} |" for stage, seconds in summary["seconds"].items()]
    lines += [f"| **total** | **{summary['seconds_total']:.2f}** |", "",
              f"Peak memory: host {peaks['host_max_rss'] / 2**30:.2f} GiB (max RSS of the process, including "
              "generating the video)" + ("" if peaks["device_allocated"] is None else
                                        f", GPU {peaks['device_allocated'] / 2**30:.2f} GiB allocated"), "",
              f"Points: {summary['points']} (confidence >= {summary['point_filter']['confidence_threshold']:.4g}); "
              f"global-attention FLOPs of the schedule: {summary['global_attention_flops_fraction']} of dense.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vggt-1b")
    parser.add_argument("--weights", default="none", help="none: random weights (timing), auto, or a file")
    parser.add_argument("--schedule", default="paper")
    parser.add_argument("--video", type=Path, help="a video to reconstruct (default: generate one)")
    parser.add_argument("--frames", type=int, default=1000, help="frames of the generated video")
    parser.add_argument("--size", type=int, default=518, help="generated frame size and preprocessing size")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--every", type=int)
    sampling.add_argument("--max-frames", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spark3r-reconstruct"),
                        help="folder for the generated video and the reconstruction")
    parser.add_argument("--commit", help="the commit to record (default: this checkout's; give it for a copy "
                                         "without .git)")
    parser.add_argument("--note", help="what else ran on the machine during the measurement, recorded with it")
    parser.add_argument("--results", type=Path, help="output prefix (default: benchmarks/results/"
                                                     "reconstruct-<model>-<frames>)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    video_seconds = None
    video = args.video
    if video is None:
        start = time.perf_counter()
        video = make_video(args.work, args.frames, args.size, device, args.seed)
        video_seconds = time.perf_counter() - start
    result = reconstruct(video, args.model, weights=args.weights, schedule=args.schedule, size=args.size,
                         every=args.every, max_frames=args.max_frames, out=args.work / "reconstruction",
                         device=device, dtype=resolve_dtype(args.dtype, device), seed=args.seed)
    summary = {key: value for key, value in result.summary.items() if key != "frame_names"}
    record = provenance.record(__file__, argv, device)
    record.update(commit=args.commit or record["commit"], note=args.note, video_seconds=video_seconds, summary=summary)
    prefix = args.results or HERE / "results" / f"reconstruct-{result.model}-{summary['frames']}"
    write_json(prefix.with_suffix(".json"), record)
    text = markdown(record)
    write_atomic(prefix.with_suffix(".md"), text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
