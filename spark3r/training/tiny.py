"""Train the bundled vggt-tiny (the vggt-tiny architecture, the same code as vggt-1b) on synthetic clips rendered on
the fly, from random weights or from `init` weights (a shallower trunk is grown by `grow_depth`), with VGGT's losses
(spark3r.training.losses).

AdamW with linear warm-up and cosine decay to 5 % of the peak learning rate; the trunk runs in bf16 on CUDA (the DPT
heads in fp32 as upstream, or with `head_dtype` "compute" under autocast to the trunk's dtype; the camera head in
fp32), gradients are clipped. Schedule progress is max(step / steps, time / minutes), so a time-limited run
still decays its learning rate to the end. A checkpoint beside `out` (`<out stem>.ckpt.pt`) is written every
`checkpoint_every` steps and at the end; running the same config again resumes from it (`minutes` counts the total
training time over all resumes). The weights are written as fp16 safetensors in the state_dict layout that
`load_model("vggt-tiny", weights=path)` loads strictly.
"""
from __future__ import annotations

import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from spark3r.data.clips import parse_synthetic_spec
from spark3r.data.synthetic import SceneConfig, clip_seeds, render_batch
from spark3r.errors import ParameterError, Spark3rError
from spark3r.files import atomic_save
from spark3r.models.base import HEAD_DTYPES
from spark3r.models.loading import load_model
from spark3r.training.evaluation import MODEL, evaluate
from spark3r.training.losses import RELATIVE_OFFSETS, camera_iterations, scene_targets, training_loss
from spark3r.training.steps import SCENE_PATHS, TRAIN_SEED_BASE, StepScenes, StepShape, render_step

HELD_OUT_SPEC = "synthetic:16:999"
FINAL_LR_FRACTION = 0.05
MAX_WEIGHTS_BYTES = 25 * 10**6


def learning_rate(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from `peak` to FINAL_LR_FRACTION * peak as `progress`
    goes from 0 to 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * cosine)


TRUNK_BLOCK = re.compile(r"aggregator\.(frame_blocks|global_blocks)\.(\d+)\.(.+)")


def trunk_depth(state: dict[str, Tensor]) -> int:
    """The number of frame (= global) blocks of a VGGT state_dict."""
    return 1 + max(int(match.group(2)) for match in map(TRUNK_BLOCK.fullmatch, state) if match)


def grow_depth(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """A VGGT state_dict with d frame + d global blocks -> one with `depth` = k d of each that computes the same
    function: block i becomes block k (i + 1) - 1, after k - 1 copies of it whose LayerScale gammas are zero (identity
    blocks that training then opens). Frame and global block k (i + 1) - 1 then output what old frame and global block
    i did, so old tap t (the pair of both outputs) is new tap k (t + 1) - 1 (vggt-tiny's 1, 3, 4, 5 of 6 are 3, 7, 9,
    11 of 12)."""
    old = trunk_depth(state)
    if depth % old:
        raise Spark3rError(f"cannot grow a trunk of {old} blocks to {depth}: give a whole multiple of {old}")
    factor = depth // old
    grown = {}
    for key, value in state.items():
        match = TRUNK_BLOCK.fullmatch(key)
        if not match:
            grown[key] = value
            continue
        kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
        for copy in range(factor):
            silent = copy < factor - 1 and rest in ("ls1.gamma", "ls2.gamma")
            grown[f"aggregator.{kind}.{factor * index + copy}.{rest}"] = torch.zeros_like(value) if silent else value
    return grown


TRUNK_ATTENTION = re.compile(r"(aggregator\.(?:frame_blocks|global_blocks)\.\d+\.attn)\.q_norm\.weight")


def split_head_channels(width: int, old_dim: int, head_dim: int) -> Tensor:
    """The channel order that splits heads of `old_dim` channels into heads of `head_dim` (k = old_dim / head_dim of
    each): [width] long, new channel -> old channel.

    A head's channels are (axis y|x, RoPE half first|second, frequency j) with frequency j = base^(-4j / dim) of its
    axis (spark3r.models.blocks.RotaryPositionEmbedding2D). Old channel (axis, half, j) goes to new head k h + j mod k
    as channel (axis, half, j // k): axes and RoPE pairs stay together, and sub-head 0 keeps its frequencies exactly
    (old j = k j' rotates as new j'); the other sub-heads rotate up to base^(4 (k - 1) / old_dim) times faster.
    """
    factor = old_dim // head_dim
    quarter = head_dim // 4
    order = torch.empty(width, dtype=torch.long)
    for new_head in range(width // head_dim):
        old_head, sub = divmod(new_head, factor)
        for axis in range(2):
            for half in range(2):
                for j in range(quarter):
                    new = new_head * head_dim + axis * head_dim // 2 + half * quarter + j
                    order[new] = old_head * old_dim + axis * old_dim // 2 + half * old_dim // 4 + factor * j + sub
    return order


def split_heads(state: dict[str, Tensor], head_dim: int) -> dict[str, Tensor]:
    """A VGGT state_dict whose trunk attention has heads of D channels -> one with heads of `head_dim` = D / k: the
    same weights with q, k, v and the projection's inputs reordered by `split_head_channels`, and qk-norm's per-channel
    weight and bias (shared by all heads) the mean over the k old channels that share a new one.

    Not the same function (k softmaxes per old head instead of one), but a warm start: with v, the projection and
    every other weight kept, an attention that is uniform stays exactly the same, and qk-norm is scaled by
    k^(1/4) so that a dot product split evenly over the sub-heads keeps its logit (1/sqrt(D) -> 1/sqrt(D/k))."""
    split = dict(state)
    for key, weight in state.items():
        match = TRUNK_ATTENTION.fullmatch(key)
        if not match or len(weight) == head_dim:
            continue
        old_dim, prefix = len(weight), match.group(1)
        if old_dim % head_dim or head_dim % 4:
            raise Spark3rError(f"cannot split heads of {old_dim} channels into heads of {head_dim}: give a head dim "
                               f"that divides {old_dim} and is a multiple of 4")
        factor = old_dim // head_dim
        width = state[f"{prefix}.proj.weight"].shape[1]
        order = split_head_channels(width, old_dim, head_dim)
        qkv_rows = torch.cat([order + part * width for part in range(3)])
        split[f"{prefix}.qkv.weight"] = state[f"{prefix}.qkv.weight"][qkv_rows]
        split[f"{prefix}.qkv.bias"] = state[f"{prefix}.qkv.bias"][qkv_rows]
        split[f"{prefix}.proj.weight"] = state[f"{prefix}.proj.weight"][:, order]
        for norm in ("q_norm", "k_norm"):
            for name in ("weight", "bias"):
                old = state[f"{prefix}.{norm}.{name}"]
                shared = old.float()[order[:old_dim]].view(factor, head_dim).mean(0)  # old head 0's sub-heads
                split[f"{prefix}.{norm}.{name}"] = (shared * factor ** 0.25).to(old.dtype)
    return split


def initial_weights(path: str, model: nn.Module) -> None:
    """Load `path` (a safetensors file of vggt-tiny weights, any trunk depth that divides the model's, heads of any
    width that the model's divides) into `model`, strictly, growing its trunk with `grow_depth` and splitting its
    heads with `split_heads` first."""
    try:
        state = load_file(path)
    except (OSError, ValueError) as error:
        raise ParameterError(f"`init` {path} is not a readable safetensors file ({error}): give a vggt-tiny weights "
                             "file", "init") from None
    depth = len(model.aggregator.frame_blocks)
    state = grow_depth(state, depth) if trunk_depth(state) != depth else state
    state = split_heads(state, model.aggregator.frame_blocks[0].attn.head_dim)
    missing, unexpected = model.load_state_dict({key: value.float() for key, value in state.items()}, strict=False)
    if missing or unexpected:
        raise ParameterError(f"`init` {path} does not fit {MODEL}: missing {missing[:3]}, unexpected {unexpected[:3]}",
                             "init")


@dataclass
class TrainConfig:
    """Settings of one training run (spark3r.commands.train_tiny's flags say what each means)."""

    out: str
    steps: int = 10000
    batch: int = 48
    frames: int = 8
    max_frames: int | None = None
    frames_per_step: int | None = None
    path: str = "arc"
    arc_share: float | None = None
    init: str | None = None
    size: int = 112
    seed: int = 0
    lr: float = 6e-4
    warmup: int = 300
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    camera_weight: float = 5.0
    relative_weight: float = 0.0
    relative_offsets: tuple[int, ...] = RELATIVE_OFFSETS
    init_logit_scale: float = 1.0
    minutes: float | None = None
    log_every: int = 100
    eval_every: int = 1000
    checkpoint_every: int = 1000
    workers: int | None = None
    compile: bool = False
    head_dtype: str = "fp32"
    held_out: str = HELD_OUT_SPEC

    RESUME_KEYS = ("batch", "frames", "max_frames", "frames_per_step", "path", "arc_share", "size", "seed",
                   "relative_weight", "relative_offsets")

    def check(self) -> None:
        for name in ("steps", "batch", "frames", "size", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ParameterError(f"`{name}` is {getattr(self, name)}: give a whole number >= 1", name)
        if self.frames < 2:
            raise ParameterError(f"`frames` is {self.frames}: relative pose needs at least 2 frames per clip", "frames")
        if self.max_frames is not None and self.max_frames < self.frames:
            raise ParameterError(f"`max_frames` {self.max_frames} is below `frames` {self.frames}: give the longest "
                                 "clip length of the range", "max_frames", "frames")
        if self.frames_per_step is not None and self.frames_per_step < self.longest:
            raise ParameterError(f"`frames_per_step` {self.frames_per_step} holds no clip of {self.longest} frames: "
                                 f"give at least {self.longest}", "frames_per_step")
        if self.path not in SCENE_PATHS:
            raise ParameterError(f"`path` {self.path} is not one of {', '.join(SCENE_PATHS)}", "path")
        if self.arc_share is not None and (self.path != "mixed" or not 0 < self.arc_share < 1):
            raise ParameterError(f"`arc_share` {self.arc_share} needs `path` mixed and a share between 0 and 1 "
                                 "(e.g. 0.25)", "arc_share", "path")
        if not self.relative_weight >= 0:
            raise ParameterError(f"`relative_weight` is {self.relative_weight}: give a weight >= 0 (0 leaves the "
                                 "relative-pose loss out)", "relative_weight")
        if not self.relative_offsets or min(self.relative_offsets) < 1:
            raise ParameterError(f"`relative_offsets` is {self.relative_offsets}: give frame offsets >= 1 (e.g. 1, 2, "
                                 "4, ..., 128)", "relative_offsets")
        if not (math.isfinite(self.init_logit_scale) and self.init_logit_scale > 0):
            raise ParameterError(f"`init_logit_scale` is {self.init_logit_scale}: give a factor > 0 (1 starts from "
                                 "the `init` weights as they are)", "init_logit_scale")
        if self.head_dtype not in HEAD_DTYPES:
            raise ParameterError(f"`head_dtype` {self.head_dtype} is not one of {', '.join(HEAD_DTYPES)}",
                                 "head_dtype")
        if self.size % 14:
            raise ParameterError(f"`size` {self.size} is not a multiple of the patch size 14: use e.g. 112", "size")
        if self.minutes is not None and not self.minutes > 0:
            raise ParameterError(f"`minutes` is {self.minutes}: give a positive time limit", "minutes")
        if not (self.lr > 0 and self.warmup >= 0 and self.weight_decay >= 0 and self.clip_grad > 0):
            raise ParameterError("`lr` and `clip_grad` must be > 0, `warmup` and `weight_decay` >= 0", "lr",
                                 "clip_grad", "warmup", "weight_decay")
        if not self.out.endswith(".safetensors"):
            raise ParameterError(f"`out` {self.out} must name a .safetensors file, e.g. vggt-tiny.safetensors", "out")

    @property
    def longest(self) -> int:
        return self.max_frames or self.frames

    @property
    def step_shape(self) -> StepShape:
        frames_per_step = self.frames_per_step or self.batch * self.frames
        return StepShape((self.frames, self.longest), self.batch, frames_per_step, self.path, self.arc_share)

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.out).with_suffix(".ckpt.pt")


def save_weights(model: nn.Module, path: str | os.PathLike) -> int:
    """Write the model's state_dict as fp16 safetensors (atomically); returns the file size in bytes."""
    state = {key: (value.half() if value.is_floating_point() else value).detach().cpu().contiguous()
             for key, value in model.state_dict().items()}
    path = Path(path)
    atomic_save(path, lambda temporary: save_file(state, temporary, metadata={"model": MODEL, "dtype": "float16"}))
    return path.stat().st_size


def scale_global_logits(model: nn.Module, factor: float) -> None:
    """Multiply every global attention's logits q.k / sqrt(d) by `factor`, in place: its q-norm's weight and bias (q =
    weight * normalised + bias). Above 1 the attention over a clip sharpens; 1 leaves the model as it is."""
    if factor == 1.0:
        return
    with torch.no_grad():
        for block in model.aggregator.global_blocks:
            block.attn.q_norm.weight.mul_(factor)
            block.attn.q_norm.bias.mul_(factor)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and conv kernels, none on biases, norms, LayerScale and tokens."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        skip = parameter.ndim < 2 or "token" in name or "pos_embed" in name
        (no_decay if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_checkpoint(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """Resume from the run's checkpoint if there is one: (next step, training seconds so far), else (0, 0)."""
    path = config.checkpoint_path
    if not path.exists():
        return 0, 0.0
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in TrainConfig.RESUME_KEYS:
        # .get with the default: checkpoints older than arc_share, relative_weight and relative_offsets
        made_with = checkpoint["settings"].get(key, getattr(TrainConfig, key))
        if made_with != getattr(config, key):
            raise ParameterError(f"checkpoint {path} was made with `{key}` {made_with}, not "
                                 f"{getattr(config, key)}: pass the same settings to resume, or delete it to start "
                                 "over", key)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    print(f"resuming from {path} at step {checkpoint['step']} ({checkpoint['seconds'] / 60:.1f} min trained)",
          file=sys.stderr)
    return checkpoint["step"], checkpoint["seconds"]


def save_checkpoint(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    seconds: float) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "seconds": seconds,
             "settings": asdict(config)}
    atomic_save(config.checkpoint_path, lambda temporary: torch.save(state, temporary))


def compile_model(model: nn.Module) -> None:
    """torch.compile every transformer block in place with dynamic shapes (clip length and clips per step change from
    step to step); the DPT heads stay eager. With static shapes the heads hit dynamo's recompile limit (8) and fell
    back to eager after the first 100 steps took 3.9 min (train-vggt-tiny-long-s4.log); with dynamic shapes
    inductor's tiling analysis failed an assertion on the depth head at the first step (torch 2.11, H100,
    train-vggt-tiny-long-s5-crash.log)."""
    for module in [*model.aggregator.frame_blocks, *model.aggregator.global_blocks, *model.camera_head.trunk]:
        module.compile(dynamic=True)


def train(config: TrainConfig, device: torch.device = torch.device("cpu"),
          dtype: torch.dtype = torch.float32) -> dict:
    """Run (or resume) training on `device` with the trunk in `dtype`; write the weights to `config.out`. Returns the
    last held-out evaluation."""
    config.check()
    size = (config.size, config.size)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = load_model(MODEL, weights=None, device=device, dtype=dtype, seed=config.seed,
                       head_dtype=config.head_dtype).train()
    # whole batches through the per-frame stages and heads: chunks bound inference memory on long clips, but a
    # training batch of 384 frames in chunks of 8 launches the heads' small kernels 48 times over
    model.config = replace(model.config, encoder_chunk_frames=sys.maxsize, head_chunk_frames=sys.maxsize)
    eval_model = load_model(MODEL, weights=None, device=device, dtype=dtype, seed=config.seed)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95),
                                  **({"fused": True} if device.type == "cuda" else {}))
    start, seconds_before = load_checkpoint(config, model, optimizer)
    if start == 0 and config.init is not None:
        initial_weights(config.init, model)
        scale_global_logits(model, config.init_logit_scale)
    if config.compile:
        compile_model(model)
    count, held_out_seed, held_out_path = parse_synthetic_spec(config.held_out)
    if held_out_seed >= TRAIN_SEED_BASE:
        raise Spark3rError(f"held-out spec {config.held_out} uses a training seed: give a seed below {TRAIN_SEED_BASE}")
    held_out = render_batch(clip_seeds(held_out_seed, count), frames=config.longest, height=size[0], width=size[1],
                            config=SceneConfig(path=held_out_path), device=device)
    held_images, held_targets = held_out.images, scene_targets(held_out.depth, held_out.intrinsics, held_out.extrinsics)
    workers = config.workers if config.workers is not None else (min(8, (os.cpu_count() or 2) - 1)
                                                                 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(
        StepScenes(config.seed, config.step_shape, size, SceneConfig()), batch_size=None,
        sampler=range(start, config.steps), num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=False, **({"prefetch_factor": 4} if workers else {}))
    parameters = list(model.parameters())
    limit = None if config.minutes is None else config.minutes * 60
    print(f"training {MODEL} ({sum(p.numel() for p in parameters) / 1e6:.2f} M parameters) on {device} "
          f"({str(dtype).removeprefix('torch.')} trunk): "
          + (f"batch {config.batch} x {config.frames} frames" if config.max_frames is None else
             f"{config.step_shape.frames_per_step} frames per step in clips of {config.frames}-{config.max_frames}")
          + f" of {size[0]}x{size[1]} ({config.path} paths), steps {start}..{config.steps}"
          + (f", at most {config.minutes:g} min" if limit else ""), flush=True)

    def held_out_eval(step: int) -> dict:
        eval_model.load_state_dict(model.state_dict())
        results = evaluate(eval_model, held_images, held_targets, rows=("model", "frame_only"))
        model_row, frame_row = results["model"], results["frame_only"]
        print(f"eval step {step}: depth abs_rel {model_row['abs_rel']:.3f} delta {model_row['delta_1.25']:.3f} | "
              f"rot {model_row['rotation_deg']:.2f} deg (frame-only {frame_row['rotation_deg']:.2f}) | trans "
              f"{model_row['translation']:.3f} (frame-only {frame_row['translation']:.3f}) | auc30 "
              f"{model_row['auc30']:.3f} [{config.held_out}, {config.longest} frames]", flush=True)
        return results

    step, began = start, time.monotonic()
    seconds = seconds_before
    running = torch.zeros(5, device=device)  # loss, then training_loss's parts
    last_log, last_log_step = began, start
    results: dict = {}
    for arrays in loader:
        seconds = seconds_before + time.monotonic() - began
        if limit is not None and seconds >= limit:
            print(f"time limit of {config.minutes:g} min reached at step {step}", flush=True)
            break
        progress = max(step / config.steps, seconds / limit if limit else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, progress, config.lr, config.warmup)
        images, targets = render_step(arrays, size, device)
        with camera_iterations(model) as pose_iterations:
            outputs = model(images)
        loss, parts = training_loss(outputs, pose_iterations, targets, config.camera_weight, config.relative_weight,
                                      config.relative_offsets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.clip_grad)
        optimizer.step()
        running += torch.cat([loss.detach()[None], parts])
        step += 1
        if step % config.log_every == 0 or step == config.steps:
            values = (running / (step - last_log_step)).tolist()
            if not math.isfinite(values[0]):
                raise ParameterError(f"the loss became {values[0]} at step {step}: lower `lr` (now {config.lr:g}) and "
                                     "rerun (the run resumes from the last checkpoint)", "lr")
            now = time.monotonic()
            print(f"step {step}/{config.steps}  lr {optimizer.param_groups[0]['lr']:.2e}  loss {values[0]:.4f} "
                  f"(camera {values[1]:.4f} depth {values[2]:.4f} points {values[3]:.4f}"
                  + (f" relative {values[4]:.4f}" if config.relative_weight else "") + ")  "
                  f"{(step - last_log_step) / (now - last_log):.1f} steps/s  "
                  f"{(seconds_before + now - began) / 60:.1f} min", flush=True)
            running.zero_()
            last_log, last_log_step = now, step
        if step % config.eval_every == 0:
            results = held_out_eval(step)
        if step % config.checkpoint_every == 0:
            save_checkpoint(config, model, optimizer, step, seconds_before + time.monotonic() - began)
    seconds = seconds_before + time.monotonic() - began
    save_checkpoint(config, model, optimizer, step, seconds)
    if step % config.eval_every or not results:
        results = held_out_eval(step)
    size_bytes = save_weights(model, config.out)
    print(f"wrote {config.out} ({size_bytes / 2**20:.1f} MiB, fp16) after {step} steps, {seconds / 60:.1f} min",
          flush=True)
    if size_bytes > MAX_WEIGHTS_BYTES:
        raise Spark3rError(f"{config.out} is {size_bytes / 2**20:.1f} MiB, over the 15 MiB limit: shrink vggt-tiny")
    return results
