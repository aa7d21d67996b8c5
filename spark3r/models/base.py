"""What every reconstruction model tells the rest of spark3r.

Two narrow interfaces live here:

* `Adapter`: what `spark3r.reduce` needs to patch a model's global attention. It works by module *name*, so the same
  adapter patches our model classes and upstream-built model objects alike (both use the official names).
* `ReconstructionModel`: our model classes run their alternating trunk as a list of *steps* over a `TrunkState`, so the
  profiler can cache the state entering any global layer and resume the forward from there.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from spark3r.errors import Spark3rError


@dataclass(frozen=True)
class FrameLayout:
    """How the S*P tokens entering a global attention layer are laid out, frame-major.

    Each frame holds `tokens_per_frame` = `n_special` + `grid_h` * `grid_w` tokens: first its special tokens (camera,
    registers), then its patch tokens in row-major order. Frame 0 is the reference frame.
    """

    frames: int
    n_special: int
    grid_h: int
    grid_w: int

    @property
    def patches_per_frame(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def tokens_per_frame(self) -> int:
        return self.n_special + self.patches_per_frame

    @property
    def tokens(self) -> int:
        return self.frames * self.tokens_per_frame


@dataclass(frozen=True)
class BlockGroup:
    """`count` identical transformer blocks, for the FLOP model.

    sequence: what one attention sequence spans: "frame" (one frame's tokens), "global" (all frames' tokens: the
    reducible layers), "special" (only the special tokens of all frames, VGGT-Omega's register layers) or "camera"
    (one token per frame, as in camera-head trunks).
    """

    name: str
    count: int
    width: int
    mlp_hidden: int
    sequence: str
    tokens_per_frame: int
    mlp_matrices: int = 2  # 3 for SwiGLU


@dataclass(frozen=True)
class FlopConfig:
    """The numbers the FLOP model needs for one model config at one image size.

    groups: every block list of the model (encoder, frame, global, head trunks).
    other_flops_per_frame: dense per-frame cost of everything that is not a transformer block (patch embedding, DPT
    convolutions, head MLPs), counted once by the model; never reduced.
    patch_grid: (grid_h, grid_w) of the patch tokens at the global layers; the reduced counts of the grid K/V method
    and of query merging depend on it (None: the squarest factorisation of the patch count is assumed).
    """

    layout_n_special: int
    tokens_per_frame: int
    groups: tuple[BlockGroup, ...]
    other_flops_per_frame: float
    patch_grid: tuple[int, int] | None = None


@dataclass
class Adapter:
    """Where a model's reducible global attention is and how its tokens are laid out.

    `global_attention` holds the dotted names of the attention modules (each with `qkv`, `q_norm`, `k_norm`, `proj`,
    `num_heads` and optionally `rope`, as in `spark3r.models.blocks.Attention`), in global-layer order 0..L-1.
    """

    model_name: str
    global_attention: list[str]
    n_special: int
    patch_size: int
    rope_in_global: bool = True
    image_arg: str = "images"

    @property
    def num_global_layers(self) -> int:
        return len(self.global_attention)

    def modules(self, model: nn.Module) -> list[nn.Module]:
        """The global attention modules of `model`, in order; a clear error if a name is missing."""
        named = dict(model.named_modules())
        missing = [name for name in self.global_attention if name not in named]
        if missing:
            raise Spark3rError(
                f"this model has no module {missing[0]!r}: it is not a {self.model_name} model "
                f"(build it with spark3r.load_model({self.model_name!r}) or pass the adapter of its family)"
            )
        return [named[name] for name in self.global_attention]

    def layout(self, images: torch.Tensor) -> FrameLayout:
        """Frame layout for preprocessed `images` [B, S, 3, H, W] (or [S, 3, H, W])."""
        if images.dim() == 4:
            images = images[None]
        if images.dim() != 5:
            raise Spark3rError(f"images have shape {list(images.shape)}: pass RGB frames as [S, 3, H, W] or "
                               "[B, S, 3, H, W]")
        _, frames, _, height, width = images.shape
        return FrameLayout(frames, self.n_special, height // self.patch_size, width // self.patch_size)


def pair_tap(first: torch.Tensor, second: torch.Tensor, dtype: torch.dtype, transform=None,
             order: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """A DPT tap [B, S, ..., 2C] in `dtype`: [first | transform(second)] of two halves [B, S, ..., C], frames taken in
    `order` [B, S] (None: as they are), written into the tap `chunk` frames at a time (None: all at once). No
    concatenated copy in the halves' (fp32) dtype is made, and with a chunk no transformed or reordered half is held
    whole: at 1000 frames of a giant model each of these copies is 8-16 GB."""
    batch, frames, width = first.shape[0], first.shape[1], first.shape[-1]
    tap = first.new_empty((*first.shape[:-1], width + second.shape[-1]), dtype=dtype)
    rows = torch.arange(batch, device=first.device)[:, None]
    step = chunk or frames
    for start in range(0, frames, step):
        index = slice(start, start + step)
        frames_of = (lambda half: half[:, index]) if order is None else (lambda half: half[rows, order[:, index]])
        tap[:, index, ..., :width] = frames_of(first)  # one half's chunk at a time
        tap[:, index, ..., width:] = frames_of(second) if transform is None else transform(frames_of(second))
    return tap


@functools.lru_cache(maxsize=32)
def non_block_flops(model_class: type, config, height: int, width: int, block_names: re.Pattern) -> float:
    """FLOPs of one frame's forward of `model_class(config)` outside its transformer blocks (modules whose qualified
    name `block_names` matches in full, e.g. "Pi3.decoder.3"), counted by torch.utils.flop_counter on meta."""
    with torch.device("meta"):
        model = model_class(config).requires_grad_(False)
        images = torch.empty(1, 1, 3, height, width)
    counter = FlopCounterMode(display=False)
    with counter:
        model(images)
    in_blocks = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if block_names.fullmatch(name))
    return float(counter.get_total_flops() - in_blocks)


@dataclass
class TrunkState:
    """The alternating trunk between two steps.

    tokens: [B, S, P, C] residual stream (fp32, as upstream).
    step:   index of the next step to run.
    taps:   step outputs the heads read, keyed by layer index (e.g. VGGT's 4, 11, 17, 23), [B, S, P, 2C].
    extras: model-specific tensors that do not change step to step (positions, view order, frame-block output).
    """

    tokens: torch.Tensor
    step: int = 0
    taps: dict[int, torch.Tensor] = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    def copy(self) -> "TrunkState":
        """A copy that later steps can advance without touching this one (tensors are never mutated in place)."""
        return dataclasses.replace(self, taps=dict(self.taps), extras=dict(self.extras))

    def heads_only(self) -> "TrunkState":
        """This state without its residual stream (tokens [B, S, P, 0], a new empty tensor on the same device), for
        the heads, which read only the taps and extras: 5-8 GB less alive while they run at 1000 frames."""
        return dataclasses.replace(self, tokens=self.tokens.new_empty(*self.tokens.shape[:-1], 0))


HEAD_DTYPES = ("fp32", "compute")  # the dense heads: fp32 as upstream, or the trunk's compute dtype (opt-in)


def check_head_dtype(head_dtype: str) -> str:
    """`head_dtype` if it is one of HEAD_DTYPES, else a sentence."""
    if head_dtype not in HEAD_DTYPES:
        raise Spark3rError(f"head dtype {head_dtype!r} is not one of {', '.join(HEAD_DTYPES)}")
    return head_dtype


class ReconstructionModel(nn.Module):
    """Base of our model classes: `forward(images) = decode(run_steps(prepare(images)), images, decode_dtype())`.

    Subclasses define `prepare`, `run_steps`, `decode`, `num_steps`, `global_layer_steps` (the step index at which each
    global layer's block runs), `adapter` and `flop_config`. Outputs are a dict of tensors with at least:
      depth [B, S, H, W], depth_conf [B, S, H, W], points [B, S, H, W, 3] (reference-frame or world coordinates),
      extrinsics [B, S, 3, 4] (world-to-camera, OpenCV), intrinsics [B, S, 3, 3].
    """

    config: object
    adapter: Adapter
    compute_dtype: torch.dtype = torch.float32
    head_dtype: str = "fp32"  # HEAD_DTYPES: what `forward` decodes in

    def decode_dtype(self, head_dtype: str | None = None) -> torch.dtype:
        """The dtype the dense heads decode in for `head_dtype` (default: the model's): fp32, or the compute dtype for
        "compute"."""
        head_dtype = check_head_dtype(self.head_dtype if head_dtype is None else head_dtype)
        return torch.float32 if head_dtype == "fp32" else self.compute_dtype

    def prepare(self, images: torch.Tensor) -> TrunkState:
        raise NotImplementedError

    def run_steps(self, state: TrunkState, stop: int | None = None) -> TrunkState:
        raise NotImplementedError

    def decode(self, state: TrunkState, images: torch.Tensor,
               head_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The heads over a finished trunk. head_dtype: fp32 (upstream: autocast off) or the dtype the dense
        (per-pixel) heads run under autocast to (`blocks.head_autocast`). The camera heads run fp32 either way: they
        read a few tokens per frame, so there is no time to save, and in bf16 their rounding moved a random
        vggt-tiny's profile the most (layer ranking Spearman 0.51-0.95 against 1.0 with fp32 camera heads). Outputs
        are fp32, and cameras and points are assembled from them in fp32."""
        raise NotImplementedError

    @property
    def num_steps(self) -> int:
        raise NotImplementedError

    @property
    def global_layer_steps(self) -> list[int]:
        raise NotImplementedError

    def flop_config(self, height: int, width: int) -> FlopConfig:
        raise NotImplementedError

    def check_steps(self, state: TrunkState, stop: int | None) -> int:
        """The step to stop before (default: the end); a sentence if it does not lie between the state's and the end."""
        stop = self.num_steps if stop is None else stop
        if not 0 <= state.step <= stop <= self.num_steps:
            raise Spark3rError(
                f"cannot run steps {state.step}..{stop}: stop must lie between the state's step and {self.num_steps}"
            )
        return stop

    def check_finished(self, state: TrunkState) -> None:
        """A sentence unless every trunk step of `state` has run (the heads need the finished taps)."""
        if state.step != self.num_steps:
            raise Spark3rError(
                f"the trunk state is at step {state.step} of {self.num_steps}: finish it with run_steps before decode"
            )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """prepare, the trunk one step per run_steps call, decode: each step's input state is let go once the step
        has run (one call over every step would keep the prepared tokens, 8 GB at 1000 frames of a giant model), and
        the finished residual stream before the heads (`TrunkState.heads_only`)."""
        state = self.prepare(images)
        for step in range(self.num_steps):
            state = self.run_steps(state, step + 1)
        state = state.heads_only()
        return self.decode(state, images, self.decode_dtype())
