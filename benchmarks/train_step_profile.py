"""Where a training step of vggt-tiny spends its time, phase by phase, at fixed clip lengths: the scene sampling (CPU,
done by DataLoader workers in training), the ray cast, the trunk's and the heads' forward, the loss, the backward and
the optimizer step, each timed with the device synchronised at both ends. Beside it the heads alone (forward + backward
from detached trunk outputs), so that the trunk's share of forward + backward is the difference, and the same step
with the DPT heads in the compute dtype (`train_tiny --head-dtype compute`: bf16 autocast) instead of fp32.

    python benchmarks/train_step_profile.py --device cuda --lengths 32,128,256 --frames-per-step 1024

The shipped weights, the training settings of benchmarks/train_tiny_long.sh (AdamW, bf16 trunk on CUDA, TF32 allowed),
walks. Times: mean milliseconds over --steps steps after --warmup steps.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from spark3r.commands.arguments import resolve_device, resolve_dtype
from spark3r.data.synthetic import SceneConfig
from spark3r.models.loading import load_model
from spark3r.profiler.run import PhaseTimer
from spark3r.training.losses import camera_iterations, training_loss
from spark3r.training.steps import StepScenes, StepShape, render_step
from spark3r.training.tiny import TrainConfig, compile_model, parameter_groups

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402

PHASES = ("sample (CPU)", "render", "trunk forward", "heads forward", "loss", "backward", "optimizer")
HEADS_PHASE = "heads forward + backward"


def step(model, optimizer, scenes: StepScenes, index: int, size: tuple[int, int], device: torch.device,
         head_dtype: torch.dtype, clock: PhaseTimer) -> None:
    """One training step as spark3r.training.tiny.train runs it, phase by phase."""
    with clock("sample (CPU)"):
        arrays = scenes[index]
    with clock("render"):
        images, targets = render_step(arrays, size, device)
    with camera_iterations(model) as poses:
        with clock("trunk forward"):
            state = model.run_steps(model.prepare(images))
        with clock("heads forward"):
            outputs = model.decode(state, images, head_dtype)
    with clock("loss"):
        loss, _ = training_loss(outputs, poses, targets, TrainConfig.camera_weight)
    with clock("backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with clock("optimizer"):
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), TrainConfig.clip_grad)
        optimizer.step()


def heads_only(model, scenes: StepScenes, index: int, size: tuple[int, int], device: torch.device,
               head_dtype: torch.dtype, clock: PhaseTimer) -> None:
    """The heads' forward + backward from the trunk's outputs, detached (so no trunk backward runs)."""
    images, targets = render_step(scenes[index], size, device)
    with torch.no_grad():
        state = model.run_steps(model.prepare(images))
    state.taps = {layer: tap.detach().requires_grad_() for layer, tap in state.taps.items()}
    state.extras["camera_token"] = state.extras["camera_token"].detach().requires_grad_()
    with clock(HEADS_PHASE), camera_iterations(model) as poses:
        outputs = model.decode(state, images, head_dtype)
        loss, _ = training_loss(outputs, poses, targets, TrainConfig.camera_weight)
        model.zero_grad(set_to_none=True)
        loss.backward()


def measure(model, optimizer, length: int, frames_per_step: int, size: tuple[int, int], device: torch.device,
            head_dtype: torch.dtype, steps: int, warmup: int) -> dict:
    """Mean ms per phase of `steps` steps of clips of `length` frames (after `warmup` untimed ones)."""
    clips = max(1, frames_per_step // length)
    scenes = StepScenes(0, StepShape((length, length), clips, path="walk"), size, SceneConfig())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    def timed(run) -> dict[str, float]:
        """Mean ms per phase of run(index, timer) over `steps` steps, after `warmup` untimed ones."""
        for index in range(warmup + steps):
            if index == warmup or index == 0:
                timer = PhaseTimer(device, (*PHASES, HEADS_PHASE))
            run(index, timer)
        return {phase: 1e3 * seconds / steps for phase, seconds in timer.seconds.items()}

    phases = timed(lambda index, timer: step(model, optimizer, scenes, index, size, device, head_dtype, timer))
    phases = {phase: phases[phase] for phase in PHASES}
    heads = timed(lambda index, timer: heads_only(model, scenes, index, size, device, head_dtype, timer))[HEADS_PHASE]
    device_ms = sum(ms for phase, ms in phases.items() if phase != "sample (CPU)")
    return {"length": length, "clips": clips, "frames": clips * length, "phases_ms": phases,
            "heads_forward_backward_ms": heads,
            "trunk_forward_backward_ms": phases["trunk forward"] + phases["heads forward"] + phases["backward"] - heads,
            "step_ms": device_ms, "steps_per_s": 1e3 / device_ms,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def markdown(result: dict) -> str:
    compiled = ", blocks and DPT heads compiled" if result.get("compiled") else ""
    lines = [f"# A vggt-tiny training step, phase by phase ({result['device_name']}{compiled})", "",
             f"`{result['command']}` (git {result['commit']}, torch {result['torch']}, {result['created']}). "
             f"Mean ms per step over {result['steps']} steps after {result['warmup']} untimed, the device synchronised "
             "around each phase; sampling runs in DataLoader workers during training, so it costs the step nothing "
             "while the workers keep up. Heads alone: their forward + backward from detached trunk outputs; the "
             "trunk's forward + backward is the step's forward + backward minus that.", "",
             "| length x clips | DPT heads | " + " | ".join(PHASES) + " | heads fwd + bwd | trunk fwd + bwd | "
             "step on the device | steps/s | peak GiB |",
             "|---|---|" + "---:|" * (len(PHASES) + 5)]
    for row in result["rows"]:
        peak = "" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        lines.append(f"| {row['length']} x {row['clips']} | {row['heads']} | "
                     + " | ".join(f"{row['phases_ms'][phase]:.1f}" for phase in PHASES)
                     + f" | {row['heads_forward_backward_ms']:.1f} | {row['trunk_forward_backward_ms']:.1f} | "
                       f"{row['step_ms']:.1f} | {row['steps_per_s']:.2f} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="auto", help="vggt-tiny weights to start from (default: the shipped)")
    parser.add_argument("--lengths", default="32,128,256", help="clip lengths, one row each (default %(default)s)")
    parser.add_argument("--frames-per-step", type=int, default=1024)
    parser.add_argument("--size", type=int, default=TrainConfig.size)
    parser.add_argument("--heads", default="fp32,compute", help="DPT head dtypes to time (default %(default)s)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks and DPT heads, as "
                                                              "train_tiny --compile does")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/train-step-profile.json)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = load_model("vggt-tiny", weights=args.weights, device=device, dtype=resolve_dtype("auto", device)).train()
    model.config = replace(model.config, encoder_chunk_frames=sys.maxsize, head_chunk_frames=sys.maxsize)
    if args.compile:
        compile_model(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, TrainConfig.weight_decay), lr=1e-5, betas=(0.9, 0.95),
                                  **({"fused": True} if device.type == "cuda" else {}))
    rows = []
    for length in (int(text) for text in args.lengths.split(",")):
        for heads in args.heads.split(","):
            row = measure(model, optimizer, length, args.frames_per_step, (args.size, args.size), device,
                          model.decode_dtype(heads), args.steps, args.warmup)
            rows.append({**row, "heads": heads})
            print(f"{length} frames x {row['clips']}, {heads} heads: {row['step_ms']:.0f} ms per step", flush=True)
    result = {**provenance.record(__file__, argv, device), "steps": args.steps, "warmup": args.warmup,
              "size": args.size, "compiled": args.compile, "rows": rows}
    provenance.publish(args.out, HERE / "results" / "train-step-profile.json", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
