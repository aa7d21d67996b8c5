"""Where one block's time goes: the kernels of one encoder block (DINOv2's; vggt-tiny has none), one frame block, one
reduced global block and the heads of VGGT-1B (or of a DA3 model, --model da3-giant) at --frames frames
(torch.profiler, CUDA time per kernel name), beside variants timed whole on the same inputs: each SDPA backend forced,
the heads with cuDNN's autotuned convolution algorithms (and their outputs' distance from the shipped ones), and the
model compiled (`blocks.compile_model`: the first, compiling call and the compiled time, and each part's kernels
compiled). And the bf16 path's own noise, which decides what may become a default: bf16 against fp32 outputs of
random VGGT-1B and of the shipped vggt-tiny, and compiled against eager in bf16.

    python benchmarks/block_profile.py --frames 1000 --out $OUT/block-profile-vggt-1b-1000.json
    python benchmarks/block_profile.py --model da3-giant --frames 1000 --skip-noise \\
        --out $OUT/block-profile-da3-giant-1000.json

Random weights (vggt-tiny: the shipped ones); random tokens of the block's input shape (random images for the heads
and the noise runs). Times: medians of --repeats calls after a warm-up (CUDA events). The profiler tables go to the
markdown beside --out.
"""
from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from spark3r.commands.arguments import resolve_device
from spark3r.models.blocks import compile_model, compute_autocast
from spark3r.models.da3 import DA3
from spark3r.models.loading import load_model
from spark3r.models.registry import build_model
from spark3r.models.vggt import VGGT
from spark3r.schedule import apply_schedule

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import models  # noqa: E402
import provenance  # noqa: E402
import speed  # noqa: E402

BACKENDS = {"cuDNN": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
OUTPUTS = ("depth", "points", "pose_enc")


def kernel_table(device, fn, rows: int = 25) -> list[dict]:
    """One profiled fn() call after an unprofiled one (which autotunes the Triton kernels and loads the modules): the
    `rows` kernels / ops with the most self time on the device (CUDA time; CPU time off CUDA), each {"name", "calls",
    "ms"}. On CUDA an aten:: op's row repeats the time of the kernels it launched."""
    cuda = device.type == "cuda"
    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        synchronize(device)
    self_us = (lambda event: event.self_device_time_total) if cuda else (lambda event: event.self_cpu_time_total)
    averages = sorted(prof.key_averages(), key=lambda event: -self_us(event))
    return [{"name": event.key[:90], "calls": event.count, "ms": self_us(event) / 1e3} for event in averages[:rows]]


# kernel classes by name, first match wins (cuDNN's fused attention kernels also say "fprop"); the first three are
# compute-bound (COMPUTE_KERNELS)
KERNEL_CLASSES = (("attention", ("sdpa", "flash", "fmha", "attention")),
                  ("convolution", ("fprop", "dgrad", "conv")),
                  ("matrix product", ("gemm", "nvjet", "addmm", "aten::mm", "bmm", "matmul")),
                  ("normalisation (+ fused RoPE)", ("layer_norm",)),
                  ("upsampling", ("upsample", "_unsafe_index")))
COMPUTE_KERNELS = tuple(label for label, _ in KERNEL_CLASSES[:3])
OTHER_KERNELS = "other (elementwise, copies)"
FUSED_POINTWISE = ("triton_poi", "triton_red", "triton_per")
"""Inductor's generated pointwise and reduction kernels: memory-bound whatever ops their names list (a conv's bias
and ReLU fused into an upsampling kernel is named after the convolution)."""


def kernel_class(name: str) -> str:
    """The class of a profiled kernel's name (KERNEL_CLASSES, else OTHER_KERNELS); an inductor pointwise or reduction
    kernel (FUSED_POINTWISE) is never a compute-bound class."""
    lowered = name.lower()
    classes = KERNEL_CLASSES[len(COMPUTE_KERNELS):] if lowered.startswith(FUSED_POINTWISE) else KERNEL_CLASSES
    return next((label for label, keys in classes if any(key in lowered for key in keys)), OTHER_KERNELS)


NOT_KERNELS = ("Command Buffer Full", "Lazy Function Loading")
"""Rows the CUDA profiler adds for time the host waited (a full launch queue, a module loaded), not run on the GPU."""


def table_kernels(rows: list[dict]) -> set[tuple[str, int, float]]:
    """(name, calls, ms) of a table's kernel rows: an aten:: op row repeats the time of its kernels, a compiled
    kernel's launch and the kernel itself show as two equal rows, and NOT_KERNELS are waits. A CPU profile has op rows
    only: those."""
    kernels = {(row["name"], row["calls"], row["ms"]) for row in rows
               if not row["name"].startswith("aten::") and row["name"] not in NOT_KERNELS}
    return kernels or {(row["name"], row["calls"], row["ms"]) for row in rows}


def kernel_shares(rows: list[dict]) -> dict[str, float]:
    """Share of the time of a table's kernels (`table_kernels`) per kernel class."""
    kernels = table_kernels(rows)
    total = sum(ms for _, _, ms in kernels)
    shares = dict.fromkeys([label for label, _ in KERNEL_CLASSES] + [OTHER_KERNELS], 0.0)
    for name, _, ms in kernels:
        shares[kernel_class(name)] += ms / total
    return shares


def kernel_lines(rows: list[dict]) -> list[str]:
    total = sum(ms for _, _, ms in table_kernels(rows))
    lines = ["| kernel / op (self device time) | calls | ms | of the table's kernel time |", "|---|---:|---:|---:|"]
    return lines + [f"| `{row['name']}` | {row['calls']} | {row['ms']:.1f} | {row['ms'] / total:.3f} |"
                    for row in rows]


def markdown(result: dict) -> str:
    """The result's tables: times, device time per kernel class, then each kernel table and the noise rows."""
    args = parser().parse_args(shlex.split(result["command"])[2:])  # the run's own arguments, defaults included
    titles = {"global block": "global block (paper rule)", "heads": f"heads ({args.head_frames} frames, fp32)"}
    text = [f"# Block profile: {args.model}, {result['frames']} frames", "",
            f"`{result['command']}` (git {result['commit']}, {result['device_name']}, torch {result['torch']})", "",
            "| variant | seconds |", "|---|---:|"]
    text += [f"| {key} | {value if isinstance(value, str) else f'{value:.4f}'} |"
             for key, value in result["times_s"].items()]
    classes = [label for label, _ in KERNEL_CLASSES] + [OTHER_KERNELS]
    text += ["", "## Device time by kernel class", "",
             "Matrix products, convolutions and attention are compute-bound; normalisation, upsampling and the other "
             "kernels move memory, and their share is what memory bandwidth costs the part. Shares of the time of the "
             "kernels in each part's table below (its 25 rows with the most device time, one profiled call; op rows, "
             "which repeat their kernels' time, left out).", "",
             "| part | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
    for key, rows in result["kernels"].items():
        shares = kernel_shares(rows)
        text.append(f"| {titles.get(key, key)} | " + " | ".join(f"{shares[label]:.0%}" for label in classes) + " |")
    for key, rows in result["kernels"].items():
        text += ["", f"## {titles.get(key, key)}", "", *kernel_lines(rows)]
    if "autotuned heads vs shipped" in result:
        text += ["", "Heads with cuDNN's autotuned convolution algorithms against the shipped ones (eager, fp32, "
                 "relative L2): " + ", ".join(f"{key} {value:.1e}"
                                              for key, value in result["autotuned heads vs shipped"].items()) + "."]
    for row in result.get("noise", []):
        text += ["", f"noise {row}"]
    return "\n".join(text + [""])


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call(device, fn) -> float:
    """Seconds of fn()'s first call (compiling), by the host clock."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def timed(device, fn, repeats):
    """Median seconds, or the error's first line when fn cannot run."""
    try:
        return speed.median_seconds(device, fn, repeats)
    except RuntimeError as error:
        return str(error).splitlines()[0][:160]


def with_backend(backend, fn):
    def run():
        with sdpa_kernel([backend]):
            return fn()
    return run


@contextlib.contextmanager
def autotuned_convolutions():
    """cuDNN times its convolution algorithms for each new shape and keeps the fastest (torch.backends.cudnn.benchmark)
    in this block; the heads run fixed-size chunks of frames, so they tune once."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def noise(name: str, frames: int, device, compiled: bool) -> dict:
    """Relative L2 differences of the outputs: bf16 vs fp32, bf16 with the DPT heads in bf16 too vs fp32 (and
    compiled bf16 vs eager bf16)."""
    model = load_model(name, "auto" if name == "vggt-tiny" else None, device).requires_grad_(False)
    size = model.config.img_size
    images = torch.rand(1, frames, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(1))
    outputs = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model.compute_dtype = dtype
        with torch.inference_mode():
            outputs[label] = model(images)
    with torch.inference_mode():  # the DPT heads too under bf16 autocast (they run fp32 as upstream by default)
        outputs["bf16 heads"] = model.decode(model.run_steps(model.prepare(images)), images, torch.bfloat16)
    row = {f"bf16 vs fp32 {key}": relative(outputs["bf16"][key], outputs["fp32"][key]) for key in OUTPUTS}
    row.update({f"bf16 with bf16 heads vs fp32 {key}": relative(outputs["bf16 heads"][key], outputs["fp32"][key])
                for key in OUTPUTS})
    if compiled:
        compile_model(model)
        start = time.perf_counter()
        with torch.inference_mode():
            outputs["compiled"] = model(images)
        row["compile + first call s"] = time.perf_counter() - start
        row.update({f"compiled vs eager bf16 {key}": relative(outputs["compiled"][key], outputs["bf16"][key])
                    for key in OUTPUTS})
    return {"model": name, "frames": frames, **row}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--head-frames", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="vggt-1b",
                        help="a VGGT- or DA3-family model (vggt-tiny or da3-tiny for a CPU smoke run)")
    parser.add_argument("--noise-frames", type=int, default=16)
    parser.add_argument("--skip-noise", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="JSON path, markdown beside it "
                                                    "(default: benchmarks/results/block-profile-<model>-<frames>.json)")
    return parser


class Parts(NamedTuple):
    """One model's blocks as block_profile runs them: random tokens [frames, per_frame, C] of the trunk's shape, one
    frame block and the global blocks (by global layer) with the RoPE positions each takes, the encoder blocks run
    per frame without positions (empty where the encoder is not a stack of blocks), and the heads' image size."""

    tokens: torch.Tensor
    frame_block: torch.nn.Module
    frame_pos: torch.Tensor | None
    global_blocks: list[torch.nn.Module]
    global_pos: torch.Tensor | None
    encoder_blocks: list[torch.nn.Module]
    image_size: tuple[int, int]


def model_parts(model, frames: int, device) -> Parts:
    """VGGT's aggregator (frame_blocks / global_blocks, DINOv2 patch_embed.blocks as the encoder) or DA3's DINOv2
    (the blocks before the first pair are the encoder, a frame block is an even block from alt_start on)."""
    if isinstance(model, VGGT):
        size = (model.config.img_size,) * 2
    elif isinstance(model, DA3):
        size = model.config.default_size
    else:
        raise SystemExit(f"block_profile runs VGGT- and DA3-family models, not {type(model).__name__}")
    probe = model.prepare(torch.rand(1, 2, 3, *size, device=device))
    _, _, per_frame, width = probe.tokens.shape
    generator = torch.Generator(device).manual_seed(0)
    tokens = torch.randn(frames, per_frame, width, device=device, generator=generator)
    if isinstance(model, VGGT):
        aggregator, pos = model.aggregator, probe.extras["pos"]
        return Parts(tokens, aggregator.frame_blocks[0], pos, list(aggregator.global_blocks), pos,
                     list(aggregator.patch_embed.blocks), size)
    config, blocks = model.config, model.vit.blocks
    frame_index = next(i for i in range(config.alt_start, config.depth) if i not in config.global_blocks)
    return Parts(tokens, blocks[frame_index], probe.extras["pos"][None], [blocks[i] for i in config.global_blocks],
                 probe.extras["pos_global"][None], list(blocks[:model.first_step_block]), size)


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, device).eval().requires_grad_(False)
    model.compute_dtype = torch.bfloat16
    parts = model_parts(model, args.frames, device)
    tokens, pos = parts.tokens, parts.frame_pos
    frame_block, encoder_blocks = parts.frame_block, parts.encoder_blocks
    result = {**provenance.record(__file__, argv, device), "frames": args.frames, "repeats": args.repeats,
              "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
              "times_s": {}, "kernels": {}}
    times = result["times_s"]

    def frame_run(block=frame_block):
        with compute_autocast(device.type, torch.bfloat16):
            return block(tokens, pos=pos)

    def encoder_run():
        with compute_autocast(device.type, torch.bfloat16):
            return encoder_blocks[0](tokens)

    encoder = [("encoder block", encoder_run)] if len(encoder_blocks) else []
    with torch.inference_mode():
        for label, fn in encoder:
            result["kernels"][label] = kernel_table(device, fn)
            times[f"{label}, shipped"] = timed(device, fn, args.repeats)
        result["kernels"]["frame block"] = kernel_table(device, frame_run)
        times["frame block, shipped"] = timed(device, frame_run, args.repeats)
        for label, backend in BACKENDS.items():
            times[f"frame block, SDPA {label}"] = timed(device, with_backend(backend, frame_run), args.repeats)

        schedule = models.paper_rule(model)
        layout = model.adapter.layout(torch.empty(1, args.frames, 3, *parts.image_size, device="meta"))
        reductions = schedule.reductions(args.frames)
        layer = max(range(len(reductions)), key=lambda index: reductions[index].kv_factor)
        global_block = parts.global_blocks[layer]
        result["global layer"], result["global reduction"] = layer, repr(reductions[layer])
        sequence = tokens.reshape(1, -1, tokens.shape[-1])
        handle = apply_schedule(model, schedule)
        handle.set_layout(layout)

        def global_run():
            with compute_autocast(device.type, torch.bfloat16):
                return global_block(sequence, pos=parts.global_pos)

        result["kernels"]["global block"] = kernel_table(device, global_run)
        times["global block, shipped"] = timed(device, global_run, args.repeats)
        for label, backend in BACKENDS.items():
            times[f"global block, SDPA {label}"] = timed(device, with_backend(backend, global_run), args.repeats)

        images = torch.rand(1, args.head_frames, 3, *parts.image_size, device=device)
        handle.remove()
        state = model.run_steps(model.prepare(images))
        decode = lambda: model.decode(state, images)  # noqa: E731
        result["kernels"]["heads"] = kernel_table(device, decode)
        times["heads, shipped"] = timed(device, decode, args.repeats)
        times["heads, compute dtype"] = timed(device, lambda: model.decode(state, images, model.compute_dtype),
                                              args.repeats)
        shipped = decode()
        with autotuned_convolutions():
            times["heads, cuDNN autotuned"] = timed(device, decode, args.repeats)
            result["autotuned heads vs shipped"] = {key: relative(decode()[key], shipped[key]) for key in OUTPUTS}

        if not args.skip_compile:
            compile_model(model)
            handle = apply_schedule(model, schedule)
            handle.set_layout(layout)
            compiled = [*encoder, ("frame block", frame_run), ("global block", global_run), ("heads", decode)]
            for label, fn in compiled:
                times[f"{label}, compiled: first call"] = first_call(device, fn)
                times[f"{label}, compiled"] = timed(device, fn, args.repeats)
            compute_heads = lambda: model.decode(state, images, model.compute_dtype)  # noqa: E731
            times["heads, compute dtype, compiled: first call"] = first_call(device, compute_heads)
            times["heads, compute dtype, compiled"] = timed(device, compute_heads, args.repeats)
            with autotuned_convolutions():
                times["heads, compiled, cuDNN autotuned"] = timed(device, decode, args.repeats)
            for label, fn in compiled:
                result["kernels"][f"{label}, compiled"] = kernel_table(device, fn)
            result["kernels"]["heads, compute dtype, compiled"] = kernel_table(device, compute_heads)
            handle.remove()
    print("\n".join(f"{key}: {value}" for key, value in times.items()), flush=True)
    if not args.skip_noise:
        result["noise"] = [noise("vggt-tiny", 32, device, compiled=False),
                           noise(args.model, args.noise_frames, device, compiled=not args.skip_compile)]
        result.update(provenance.weights_identity("vggt-tiny", "auto"))  # the noise rows' trained weights
    provenance.publish(args.out, HERE / "results" / f"block-profile-{args.model}-{args.frames}.json", result,
                       markdown(result))
    return result


if __name__ == "__main__":
    main()
