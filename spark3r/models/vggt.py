"""VGGT (facebookresearch/vggt), re-implemented with the official key names so `facebook/VGGT-1B` loads strictly.

Trunk: DINOv2 patch encoder -> per frame [camera(1), register(4), patches] -> 24 x (frame block i, global block i).
The trunk runs as 2 * depth steps (step 2i = frame block i, step 2i + 1 = global block i) over a `TrunkState`, so the
profiler can cache the state entering any global layer. Heads (camera, depth, points) run in fp32 with autocast off,
as upstream. The checkpoint's track head is not built: its keys are dropped on load and reported.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from spark3r.models.base import (
    Adapter,
    BlockGroup,
    FlopConfig,
    ReconstructionModel,
    TrunkState,
    non_block_flops,
    pair_tap,
)
from spark3r.models.blocks import (
    Block,
    Mlp,
    RotaryPositionEmbedding2D,
    active_compute_dtype,
    compute_autocast,
    expand_special,
    head_autocast,
    no_autocast,
    patch_positions,
)
from spark3r.models.dinov2 import conv_patch_embed, vit_large_reg
from spark3r.models.dpt import DPTHead
from spark3r.models.geometry import pose_encoding_to_extrinsics_intrinsics
from spark3r.models.inputs import IMAGENET_MEAN, IMAGENET_STD, check_images
from spark3r.models.registry import ModelEntry, register

@dataclass(frozen=True)
class VGGTConfig:
    """One VGGT size. encoder: "dinov2" (ViT-L/14 reg4, as released) or "conv" (patchify only, for toy models).

    head_chunk_frames / encoder_chunk_frames: frames per chunk of the DPT heads / of the patch encoder (all its blocks
    run on one chunk of frames before the next), which bound their peak memory on long clips; chunking leaves the math
    unchanged. The frame blocks bound theirs themselves (`Block.forward_rows`).
    """

    name: str = "vggt-1b"
    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    init_values: float = 0.01
    rope_base: float = 100.0
    encoder: str = "dinov2"
    taps: tuple[int, ...] = (4, 11, 17, 23)
    head_features: int = 256
    head_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    camera_depth: int = 4
    camera_heads: int = 16
    camera_iterations: int = 4
    head_chunk_frames: int = 8
    encoder_chunk_frames: int = 128

    @property
    def n_special(self) -> int:
        """Camera + register tokens in front of each frame's patches (VGGT's patch_start_idx)."""
        return 1 + self.num_register_tokens


VGGT_1B = VGGTConfig()
VGGT_TINY = VGGTConfig(
    name="vggt-tiny", img_size=112, embed_dim=128, depth=12, num_heads=2, encoder="conv", taps=(3, 7, 9, 11),
    head_features=32, head_channels=(32, 64, 128, 128), camera_depth=2, camera_heads=4,
)


def enumerate_chunks(x: Tensor, chunk: int):
    """(first index, x[first: first + chunk]) over dim 0 of x, in order."""
    for first in range(0, x.shape[0], chunk):
        yield first, x[first: first + chunk]


class Aggregator(nn.Module):
    """Patch encoder, special tokens and the alternating frame/global blocks (keys `aggregator.*`)."""

    def __init__(self, config: VGGTConfig):
        super().__init__()
        width = config.embed_dim
        self.patch_size = config.patch_size
        self.camera_token = nn.Parameter(torch.empty(1, 2, 1, width))
        self.register_token = nn.Parameter(torch.empty(1, 2, config.num_register_tokens, width))
        if config.encoder == "dinov2":
            self.patch_embed = vit_large_reg(img_size=config.img_size, patch_size=config.patch_size)
        else:
            self.patch_embed = conv_patch_embed(width, config.img_size, config.patch_size)
        self.rope = RotaryPositionEmbedding2D(config.rope_base)

        def block() -> Block:
            return Block(width, config.num_heads, config.mlp_ratio, init_values=config.init_values, norm_eps=1e-5,
                         qk_norm=True, rope=self.rope)

        self.frame_blocks = nn.ModuleList(block() for _ in range(config.depth))
        self.global_blocks = nn.ModuleList(block() for _ in range(config.depth))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)

    def embed(self, images: Tensor, chunk_frames: int) -> Tensor:
        """images [B, S, 3, H, W] in [0, 1] -> tokens [B, S, P, C]: [camera, registers, normed DINO patch tokens].

        The patch encoder runs over `chunk_frames` frames at a time, writing into the preallocated tokens.
        """
        batch, frames = images.shape[:2]
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        special = torch.cat([expand_special(self.camera_token, batch, frames),
                             expand_special(self.register_token, batch, frames)], dim=1)
        tokens = None
        for first, chunk in enumerate_chunks(images.flatten(0, 1), chunk_frames):
            patches = self.patch_embed.forward_features((chunk - mean) / std)
            if tokens is None:
                dtype = torch.promote_types(special.dtype, patches.dtype)
                tokens = special.new_empty(batch * frames, special.shape[1] + patches.shape[1], special.shape[2],
                                           dtype=dtype)
                tokens[:, : special.shape[1]] = special
            tokens[first: first + len(chunk), special.shape[1]:] = patches
        return tokens.unflatten(0, (batch, frames))


class CameraHead(nn.Module):
    """Iterative AdaLN camera head: camera tokens [B, S, 2C] -> pose_enc [B, S, 9].

    Each iteration embeds the previous (raw, detached) encoding, or `empty_pose_tokens` at first, modulates the normed
    tokens with shift/scale/gate, runs `trunk` over the S camera tokens and adds a delta. Activation: translation and
    quaternion linear, field of view ReLU.
    """

    def __init__(self, dim_in: int = 2048, trunk_depth: int = 4, num_heads: int = 16, iterations: int = 4,
                 init_values: float = 0.01, target_dim: int = 9):
        super().__init__()
        self.iterations = iterations
        self.empty_pose_tokens = nn.Parameter(torch.empty(1, 1, target_dim))
        self.trunk = nn.Sequential(*(Block(dim_in, num_heads, init_values=init_values, norm_eps=1e-5)
                                     for _ in range(trunk_depth)))
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.embed_pose = nn.Linear(target_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, target_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.empty_pose_tokens)

    def forward(self, camera_tokens: Tensor) -> Tensor:
        tokens = self.token_norm(camera_tokens)
        pose_enc = None
        for _ in range(self.iterations):
            previous = self.empty_pose_tokens.expand(*tokens.shape[:2], -1) if pose_enc is None else pose_enc.detach()
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(previous)).chunk(3, dim=-1)
            modulated = gate * (self.adaln_norm(tokens) * (1 + scale) + shift) + tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(modulated)))
            pose_enc = delta if pose_enc is None else pose_enc + delta
        return torch.cat([pose_enc[..., :7], torch.relu(pose_enc[..., 7:])], dim=-1)


class VGGT(ReconstructionModel):
    """VGGT with camera, depth and point heads. images [B, S, 3, H, W] (or [S, 3, H, W]) in [0, 1] -> dict:

    depth [B, S, H, W], depth_conf [B, S, H, W], points [B, S, H, W, 3] (frame 0's camera coordinates), points_conf,
    pose_enc [B, S, 9], extrinsics [B, S, 3, 4] (world-to-camera, OpenCV), intrinsics [B, S, 3, 3].

    lean (default True): keep only the tapped layers, stored in the compute dtype (the camera token of the last layer
    stays fp32), so 1000 frames at 518 px fit on one 80 GB GPU; lean False keeps all `depth` taps in fp32 as upstream.
    compute_dtype: the trunk runs under autocast to this dtype (fp32: no autocast of its own); heads run fp32 (the DPT
    heads in `decode`'s head dtype if given another).
    """

    def __init__(self, config: VGGTConfig = VGGT_1B, lean: bool = True, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.lean = lean
        self.compute_dtype = compute_dtype
        dim_in = 2 * config.embed_dim
        self.aggregator = Aggregator(config)
        self.camera_head = CameraHead(dim_in, config.camera_depth, config.camera_heads, config.camera_iterations)
        head = dict(dim_in=dim_in, patch_size=config.patch_size, conf_activation="expp1",
                    features=config.head_features, out_channels=config.head_channels)
        self.point_head = DPTHead(output_dim=4, activation="inv_log", **head)
        self.depth_head = DPTHead(output_dim=2, activation="exp", **head)
        self.adapter = Adapter(
            model_name=config.name,
            global_attention=[f"aggregator.global_blocks.{i}.attn" for i in range(config.depth)],
            n_special=config.n_special,
            patch_size=config.patch_size,
        )

    @property
    def num_steps(self) -> int:
        return 2 * self.config.depth

    @property
    def global_layer_steps(self) -> list[int]:
        return [2 * layer + 1 for layer in range(self.config.depth)]

    def kept_layers(self) -> set[int]:
        """Layers whose [frame | global] output the trunk keeps: the DPT taps and the camera head's last layer."""
        if not self.lean:
            return set(range(self.config.depth))
        return {*self.config.taps, self.config.depth - 1}

    def prepare(self, images: Tensor) -> TrunkState:
        """Normalise, encode and add special tokens: tokens [B, S, P, C] fp32, positions in extras["pos"] [P, 2]."""
        images = check_images(images, self.config.patch_size)
        height, width = images.shape[-2:]
        with compute_autocast(images.device.type, self.compute_dtype):
            tokens = self.aggregator.embed(images, self.config.encoder_chunk_frames)
        pos = patch_positions(height // self.config.patch_size, width // self.config.patch_size,
                              self.config.n_special, images.device)
        return TrunkState(tokens=tokens, extras={"pos": pos})

    def run_steps(self, state: TrunkState, stop: int | None = None) -> TrunkState:
        """Run steps state.step .. stop - 1 (default: to the end) and return a new state; `state` is left as it is."""
        stop = self.check_steps(state, stop)
        state = state.copy()
        tokens = state.tokens
        batch, frames, per_frame, width = tokens.shape
        pos = state.extras["pos"]  # one frame's positions: RoPE repeats them over the frames of a global layer
        kept = self.kept_layers()
        with compute_autocast(tokens.device.type, self.compute_dtype):
            tap_dtype = active_compute_dtype(tokens.device.type, tokens.dtype) if self.lean else tokens.dtype
            for step in range(state.step, stop):
                layer, is_global = divmod(step, 2)
                if not is_global:
                    block = self.aggregator.frame_blocks[layer]
                    out = block(tokens.reshape(batch * frames, per_frame, width), pos=pos)
                else:
                    block = self.aggregator.global_blocks[layer]
                    out = block(tokens.reshape(batch, frames * per_frame, width), pos=pos)
                out = out.view(batch, frames, per_frame, width)
                if is_global and layer in kept:
                    state.taps[layer] = pair_tap(tokens, out, tap_dtype)
                    if layer == self.config.depth - 1:
                        state.extras["camera_token"] = torch.cat([tokens[:, :, 0], out[:, :, 0]], dim=-1).float()
                tokens = out
        state.tokens, state.step = tokens, stop
        return state

    def decode(self, state: TrunkState, images: Tensor, head_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Heads over a finished trunk, in fp32 with autocast off; the DPT heads run over chunks of frames, under
        autocast to `head_dtype` if it is not fp32 (outputs cast to fp32)."""
        self.check_finished(state)
        images = check_images(images, self.config.patch_size)
        image_size = tuple(images.shape[-2:])
        taps = [state.taps[layer] for layer in self.config.taps]
        chunk = self.config.head_chunk_frames
        with no_autocast(images.device.type):
            pose_enc = self.camera_head(state.extras["camera_token"])
        with head_autocast(images.device.type, head_dtype):
            depth, depth_conf = self.depth_head(taps, image_size, self.config.n_special, chunk)
            points, points_conf = self.point_head(taps, image_size, self.config.n_special, chunk)
        depth, depth_conf, points, points_conf = (tensor.float() for tensor in (depth, depth_conf, points, points_conf))
        extrinsics, intrinsics = pose_encoding_to_extrinsics_intrinsics(pose_enc, image_size)
        return {
            "depth": depth[..., 0], "depth_conf": depth_conf, "points": points, "points_conf": points_conf,
            "pose_enc": pose_enc, "extrinsics": extrinsics, "intrinsics": intrinsics,
        }

    def flop_config(self, height: int, width: int) -> FlopConfig:
        """FLOP-model numbers at an H x W input.

        Block lists are given as BlockGroups (the camera trunk counted once per refinement iteration, sequence length
        S). Everything else (patch conv, DPT heads, camera-head linears) is counted once, per frame, by
        torch.utils.flop_counter over a forward of one frame on the meta device, minus the blocks it ran.
        """
        config = self.config
        check_images(torch.empty(1, 3, height, width, device="meta"), config.patch_size)
        grid_h, grid_w = height // config.patch_size, width // config.patch_size
        grid = grid_h * grid_w
        tokens = config.n_special + grid
        width_c, hidden = config.embed_dim, int(config.embed_dim * config.mlp_ratio)
        encoder = self.aggregator.patch_embed
        groups = [
            BlockGroup("aggregator.patch_embed.blocks", len(encoder.blocks), width_c, hidden, "frame",
                       encoder.num_prefix_tokens + grid),
            BlockGroup("aggregator.frame_blocks", config.depth, width_c, hidden, "frame", tokens),
            BlockGroup("aggregator.global_blocks", config.depth, width_c, hidden, "global", tokens),
            BlockGroup("camera_head.trunk", config.camera_depth * config.camera_iterations, 2 * width_c,
                       8 * width_c, "camera", 1),
        ]
        return FlopConfig(
            layout_n_special=config.n_special,
            tokens_per_frame=tokens,
            groups=tuple(group for group in groups if group.count),
            other_flops_per_frame=non_block_flops(VGGT, config, height, width, BLOCK_NAME),
            patch_grid=(grid_h, grid_w),
        )


BLOCK_LISTS = ("aggregator.patch_embed.blocks", "aggregator.frame_blocks", "aggregator.global_blocks",
               "camera_head.trunk")
BLOCK_NAME = re.compile(r"VGGT\.(" + "|".join(re.escape(name) for name in BLOCK_LISTS) + r")\.\d+")


register(ModelEntry(
    name="vggt-1b", family="vggt", builder=lambda: VGGT(VGGT_1B), image_width=518, preprocess="vggt",
    hf_repo="facebook/VGGT-1B", hf_files=("model.safetensors", "model.pt"), drop_prefixes=("track_head.",),
    aliases=("vggt",), description="VGGT-1B (facebookresearch/vggt), camera + depth + point heads",
))
register(ModelEntry(
    name="vggt-tiny", family="vggt", builder=lambda: VGGT(VGGT_TINY), image_width=112, preprocess="vggt",
    description="toy VGGT (width 128, 12 + 12 blocks, conv patch embed, 7.7 M parameters) for tests, the "
                "walkthrough and long-clip schedules",
))
