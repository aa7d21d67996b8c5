"""Train the bundled vggt-tiny on synthetic clips rendered on the fly, and evaluate it on held-out clips.

    python -m spark3r.commands.train_tiny --steps 100000 --minutes 21 --seed 0 --out vggt-tiny.safetensors
    python -m spark3r.commands.train_tiny --frames 2 --max-frames 48 --frames-per-step 384 --path mixed \
        --init old.safetensors --out vggt-tiny.safetensors
    python -m spark3r.commands.train_tiny --evaluate vggt-tiny.safetensors --clips synthetic:16:1000:walk \
        --frames 8,32,128,256

Training renders new clips on the device every step (spark3r.data.synthetic: scene parameters are sampled by
DataLoader workers on the CPU, the ray cast runs on the device): `--batch` clips of `--frames` frames, or, with
`--max-frames`, clips of a length drawn per step from `--frames`..`--max-frames`, as many as fit `--frames-per-step`
frames (VGGT trains on a varying number of frames so that it generalises in length). `--path` picks the camera path:
arc (short arcs), walk (hand-held walks through the scene) or mixed (walks, and arcs for half of the steps of at most
16 frames; with `--arc-share P`, instead a share P of the steps are arcs of at most 16 frames). It trains the vggt-tiny architecture, the same code as vggt-1b, from random weights or from `--init`
weights (a shallower trunk is grown by `grow_depth`) with VGGT's losses:
- targets as VGGT normalises them: cameras relative to frame 0, points in frame 0's camera coordinates, and depth,
  points and translations divided by the mean distance of the clip's points from camera 0;
- camera: L1 on pose_enc (translation, quaternion xyzw, field of view; FoV weighted 0.5) of every refinement iteration
  of the camera head, iteration i of n weighted 0.6^(n-1-i), times `--camera-weight`;
- relative pose (off by default): with `--relative-weight W` > 0, plus W times the loss of the relative poses of frame
  pairs (i, i + d), d in `--relative-offsets` (1, 2, 4, ..., 32 by default; chordal distance of the rotations + L1 of
  the translations), weighted over the iterations alike; a resumed run must keep the same weight and offsets;
- depth and points: VGGT's aleatoric loss conf * |err| - alpha * log(conf) (alpha 0.2) plus the plain |err| and a
  3-scale gradient-matching term (VGGT uses a normal loss for points; the gradient term is used for both here).
AdamW with linear warm-up and cosine decay to 5 % of `--lr`; the trunk runs in bf16 on CUDA (heads in fp32 as
upstream), gradients are clipped. Schedule progress is max(step / --steps, time / --minutes), so a time-limited run
still decays its learning rate to the end. A checkpoint beside `--out` (`<out stem>.ckpt.pt`) is written every
`--checkpoint-every` steps and at the end; rerunning the same command resumes from it (--minutes counts the total
training time over all resumes). The weights are written as fp16 safetensors in the state_dict layout that
`load_model("vggt-tiny", weights=path)` loads strictly (10.6 MB).

Seeds: run seed S renders, at step i, the clips of `synthetic:<clips>:<10^9 (S + 1) + i>` (the step's length and path
are drawn from the same seed); every spec seed below 10^9 is held out. The periodic eval log uses synthetic:16:999 (at
the longest training length) and `--evaluate` defaults to synthetic:16:1000:walk at 8, 32, 128 and 256 frames.

`--evaluate` renders synthetic clips on `--device` and prints, at each of `--frames` (a list), depth AbsRel and
delta < 1.25 (median-aligned per clip), rotation and translation error of the cameras relative to frame 0 (translation
in the normalised scene scale), ATE (Sim(3)-aligned, normalised scale) and AUC@30 for the model, the model with every
global attention layer reduced to frame-only attention, and the trivial baselines (a constant depth per clip, identity
cameras).
"""
from __future__ import annotations

import json
import sys

from spark3r.commands.arguments import ArgumentParser, add_runtime_args, command, resolve_device, resolve_dtype
from spark3r.errors import Spark3rError
from spark3r.models.base import HEAD_DTYPES
from spark3r.training.evaluation import DEFAULT_EVAL_FRAMES, DEFAULT_EVAL_SPEC, MODEL, evaluate_weights
from spark3r.training.steps import SCENE_PATHS
from spark3r.training.tiny import HELD_OUT_SPEC, TrainConfig, train

EVAL_LABELS = {"model": "model", "frame_only": "model, frame-only global attention",
               "trivial": "constant depth / identity cameras"}

EVAL_COLUMNS = (("abs_rel", "depth AbsRel", 3), ("delta_1.25", "delta<1.25", 3), ("rotation_deg", "rot err deg", 2),
                ("translation", "trans err", 3), ("ate", "ATE", 3), ("auc30", "AUC@30", 3))


def format_table(results: dict, title: str) -> str:
    """The evaluation table, plus the frame-only / model pose error ratios when both rows are present."""
    width = max(len(EVAL_LABELS[row]) for row in results)
    lines = [title, " " * width + "".join(f"  {label:>12}" for _, label, _ in EVAL_COLUMNS)]
    for row, values in results.items():
        lines.append(f"{EVAL_LABELS[row]:<{width}}" + "".join(f"  {values[key]:>12.{digits}f}"
                                                            for key, _, digits in EVAL_COLUMNS))
    if "model" in results and "frame_only" in results:
        ratios = [f"{name} {results['frame_only'][key] / max(results['model'][key], 1e-12):.2f}x"
                  for key, name in (("rotation_deg", "rotation"), ("translation", "translation"), ("ate", "ATE"))]
        lines.append("frame-only / model pose error: " + ", ".join(ratios))
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m spark3r.commands.train_tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="vggt-tiny.safetensors", help="weights file to write (fp16 safetensors)")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="training steps (default %(default)s)")
    parser.add_argument("--minutes", type=float, help="stop cleanly after this much training time (all resumes)")
    parser.add_argument("--batch", type=int, default=TrainConfig.batch,
                        help="clips per step at a fixed length (default %(default)s)")
    parser.add_argument("--frames", help=f"frames per clip (training: one number, default {TrainConfig.frames}, the "
                        f"shortest when --max-frames is given; --evaluate: a list, default {DEFAULT_EVAL_FRAMES})")
    parser.add_argument("--max-frames", type=int, help="train on clip lengths drawn per step from --frames to this")
    parser.add_argument("--frames-per-step", type=int,
                        help="with --max-frames: frames per step (clips = this // length; default batch x frames)")
    parser.add_argument("--path", choices=SCENE_PATHS, default=TrainConfig.path,
                        help="camera path of the training clips (default %(default)s)")
    parser.add_argument("--arc-share", type=float,
                        help="with --path mixed: this share of the steps are short arcs (<= 16 frames), the rest walks")
    parser.add_argument("--init", help="start from these vggt-tiny weights (safetensors; a shallower trunk is grown)")
    parser.add_argument("--size", type=int, default=TrainConfig.size, help="square image size (default %(default)s)")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=TrainConfig.warmup, help="warm-up steps (default %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    parser.add_argument("--clip-grad", type=float, default=TrainConfig.clip_grad, help="gradient norm clip")
    parser.add_argument("--camera-weight", type=float, default=TrainConfig.camera_weight,
                        help="weight of the camera loss (default %(default)s)")
    parser.add_argument("--relative-weight", type=float, default=TrainConfig.relative_weight,
                        help="weight of the relative-pose loss of frame pairs (default %(default)s: off)")
    parser.add_argument("--relative-offsets", default=",".join(map(str, TrainConfig.relative_offsets)),
                        help="frame offsets of the relative-pose loss's pairs (default %(default)s)")
    parser.add_argument("--init-logit-scale", type=float, default=TrainConfig.init_logit_scale,
                        help="multiply the --init weights' global attention logits by this factor before training "
                             "(default %(default)s: as they are; above 1 sharpens attention over long clips)")
    parser.add_argument("--log-every", type=int, default=TrainConfig.log_every)
    parser.add_argument("--eval-every", type=int, default=TrainConfig.eval_every,
                        help="steps between evaluations on the --held-out clips")
    parser.add_argument("--held-out", default=HELD_OUT_SPEC,
                        help="synthetic:N:SEED clips (SEED < 10^9) for the periodic evaluation (default %(default)s)")
    parser.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    parser.add_argument("--workers", type=int, help="scene-sampling workers (default: 0 on CPU, up to 8 on CUDA)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer blocks (the DPT heads stay eager)")
    parser.add_argument("--head-dtype", choices=HEAD_DTYPES, default=TrainConfig.head_dtype,
                        help="dtype of the DPT heads in training: fp32 (as upstream) or compute (the trunk's --dtype, "
                             "bf16 on CUDA) (default %(default)s; the camera head stays fp32)")
    parser.add_argument("--evaluate", metavar="WEIGHTS",
                        help="evaluate these weights (a file, 'auto' for the shipped ones, 'none' for random) instead")
    parser.add_argument("--clips", default=DEFAULT_EVAL_SPEC, help="clips for --evaluate (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="with --evaluate: print JSON instead of the table")
    add_runtime_args(parser)
    return parser


def frame_counts(text: str | None, default: str) -> list[int]:
    """`--frames` as a list of whole numbers >= 2 ("8" or "8,32,128")."""
    try:
        counts = [int(part) for part in (text or default).split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 2:
        raise Spark3rError(f"--frames {text}: give whole numbers of at least 2 frames per clip (relative pose needs "
                           "two), e.g. 8 or 8,32,128,256")
    return counts


def frame_offsets(text: str) -> tuple[int, ...]:
    """`--relative-offsets` as a tuple of whole numbers ("1,2,4,8,16,32,64,128"); the config checks that each is
    >= 1."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise Spark3rError(f"--relative-offsets {text}: give whole frame offsets separated by commas, e.g. "
                           "1,2,4,8,16,32,64,128") from None


def run_evaluation(args) -> int:
    device = resolve_device(args.device)
    lengths = frame_counts(args.frames, DEFAULT_EVAL_FRAMES)
    by_length = evaluate_weights(args.evaluate, args.clips, lengths, device=device,
                                 dtype=resolve_dtype(args.dtype, device), seed=args.seed)
    if args.json:
        print(json.dumps({"weights": args.evaluate, "clips": args.clips, "frames": list(by_length),
                          "lengths": {str(frames): row for frames, row in by_length.items()}}, indent=2))
        return 0
    for frames, row in by_length.items():
        height, width = row["size"]
        print(format_table(row["results"], f"{MODEL} ({args.evaluate}) on {args.clips}: {row['count']} clips x "
                                           f"{frames} frames, {height}x{width}; depth median-aligned per clip"))
    return 0


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.evaluate is not None:
        return run_evaluation(args)
    counts = frame_counts(args.frames, str(TrainConfig.frames))
    if len(counts) > 1:
        raise Spark3rError(f"--frames {args.frames} is a list: training takes one length (add --max-frames for a "
                           "range)")
    device = resolve_device(args.device)
    train(TrainConfig(
        out=args.out, steps=args.steps, batch=args.batch, frames=counts[0], max_frames=args.max_frames,
        frames_per_step=args.frames_per_step, path=args.path, arc_share=args.arc_share, init=args.init,
        size=args.size, seed=args.seed,
        lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        camera_weight=args.camera_weight, relative_weight=args.relative_weight,
        relative_offsets=frame_offsets(args.relative_offsets), init_logit_scale=args.init_logit_scale,
        minutes=args.minutes,
        log_every=args.log_every, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, workers=args.workers, compile=args.compile, head_dtype=args.head_dtype,
        held_out=args.held_out),
        device, resolve_dtype(args.dtype, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
