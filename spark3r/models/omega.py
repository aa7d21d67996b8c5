"""VGGT-Omega (facebookresearch/vggt-omega), re-implemented with the release key names (tests/manifests/omega.tsv).

Trunk: a DINOv3-style ViT-L/16 patch encoder (cls + 4 storage tokens, axial RoPE with a persistent `periods` buffer,
no pos_embed, LayerScale, `qkv` with a persistent K-bias mask) -> per frame [camera(1), register(16), patches] ->
24 x (frame block i, inter-frame block i). Frame blocks use the same axial RoPE (coordinates normalised by max(Hp, Wp))
on the patch tokens only. Inter-frame block i is global attention over all S * P tokens of a scene, except the
register-attention blocks (2, 6, 9, 14, 20), where only the 17 * S camera and register tokens attend across frames
and the patch tokens pass through unchanged; those five are not reducible global attention, so the adapter lists
only the 19 full global layers (no RoPE in them). The trunk runs as 48 steps (2i: frame block i, 2i + 1: inter-frame
block i), as VGGT's.

Heads (fp32, autocast off, as upstream): `camera_head` normalises the camera and register tokens of the last layer
[frame | inter-frame] (2C wide), runs a 4-block trunk over all S * 17 of them, and maps token 0 of each frame through
`camera_branch` to pose_enc [t, quaternion xyzw, fov_h, fov_w] (fov = relu + 0.01); the pose is world-to-camera as in
VGGT. `dense_head` is a DPT over layers (4, 11, 17, 23) fused at 4 x the patch grid, then 1x1 convs to 16 channels
and a 4x pixel shuffle: depth = exp, depth_conf = 1 + exp. points = depth unprojected with the predicted cameras.

Input: images [B, S, 3, H, W] (or [S, 3, H, W]) in [0, 1], H and W multiples of 16; ImageNet normalisation inside.

Uncertain (no access to the released 39a0cb8 code for these; implemented as the keys and the 2026-05 code imply):
the UV embedding of the dense head computes its frequencies in float64 as VGGT's does; the camera head's output
layer is named `camera_branch` (an earlier code version called it `pose_branch`, same shapes and maths); released
checkpoints may carry pre-release key names, which `convert_checkpoint` renames (upstream's documented rules).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spark3r.errors import Spark3rError
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
    active_compute_dtype,
    compiled_for,
    compute_autocast,
    expand_special,
    frame_map,
    head_autocast,
    no_autocast,
    rotate_half,
)
from spark3r.models.dinov2 import PatchEmbed
from spark3r.models.dpt import FeatureFusionBlock, add_uv_pos_embed, make_resize_layers, make_scratch
from spark3r.models.geometry import pose_encoding_to_extrinsics_intrinsics, se3_inverse, unproject_pixel_indices
from spark3r.models.inputs import IMAGENET_MEAN, IMAGENET_STD, check_images
from spark3r.models.registry import ModelEntry, register

HEAD_CHUNK_FRAMES = 8


@dataclass(frozen=True)
class OmegaConfig:
    """One VGGT-Omega size (only the 1B at 512 px is released); `vggt-omega-tiny` is a random-weights toy for tests."""

    name: str
    embed_dim: int = 1024
    num_heads: int = 16
    encoder_depth: int = 24
    n_storage_tokens: int = 4
    depth: int = 24
    num_register_tokens: int = 16
    register_blocks: tuple[int, ...] = (2, 6, 9, 14, 20)
    taps: tuple[int, ...] = (4, 11, 17, 23)
    camera_heads: int = 16
    camera_depth: int = 4
    head_features: int = 256
    head_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    patch_size: int = 16
    rope_base: float = 100.0
    default_size: tuple[int, int] = (512, 512)

    @property
    def n_special(self) -> int:
        """Camera + register tokens in front of each frame's patches (upstream's patch_token_start)."""
        return 1 + self.num_register_tokens

    @property
    def global_blocks(self) -> list[int]:
        """Inter-frame blocks with full global attention (the reducible ones)."""
        return [i for i in range(self.depth) if i not in self.register_blocks]


CONFIGS = {
    "vggt-omega": OmegaConfig("vggt-omega"),
    "vggt-omega-tiny": OmegaConfig(
        "vggt-omega-tiny", embed_dim=64, num_heads=4, encoder_depth=2, depth=6, num_register_tokens=4,
        register_blocks=(2,), taps=(1, 3, 4, 5), camera_heads=4, camera_depth=1, head_features=16,
        head_channels=(8, 16, 32, 32), default_size=(48, 64),
    ),
}


class AxialRopeAngles(nn.Module):
    """DINOv3 RoPE angles with a persistent `periods` buffer [D / 4] = base^(2j / (D / 2)).

    forward(grid_h, grid_w, n_prefix) -> angles [n_prefix + Hp * Wp, D / 2] fp32: patch (y, x) at normalised
    coordinates 2 * (i + 0.5) / max(Hp, Wp) - 1 gets [2 pi y / periods | 2 pi x / periods]; prefix tokens get 0 (no
    rotation, as upstream leaves them out).
    """

    def __init__(self, head_dim: int, base: float = 100.0):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.register_buffer("periods", torch.empty(head_dim // 4))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        exponents = 2 * torch.arange(self.head_dim // 4, dtype=torch.float32, device=self.periods.device)
        self.periods.copy_(self.base ** (exponents / (self.head_dim // 2)))

    def forward(self, grid_h: int, grid_w: int, n_prefix: int) -> Tensor:
        side = max(grid_h, grid_w)
        dd = {"device": self.periods.device, "dtype": torch.float32}
        coords_h = torch.arange(0.5, grid_h, **dd) / side
        coords_w = torch.arange(0.5, grid_w, **dd) / side
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        angles = (2 * math.pi * coords[:, :, None] / self.periods.float()).flatten(1)
        return torch.cat([angles.new_zeros(n_prefix, angles.shape[1]), angles], dim=0)


class AxialRope(nn.Module):
    """Applies DINOv3 RoPE: x [B, h, N, D], angles [N, D / 2] -> x * cos + rotate_half(x) * sin with [angles | angles],
    computed in fp32 and cast back to x's dtype. No parameters (the angles come from `AxialRopeAngles`)."""

    def forward(self, x: Tensor, angles: Tensor) -> Tensor:
        angles = angles.tile(2)
        rotated = x.float() * angles.cos() + rotate_half(x.float()) * angles.sin()
        return rotated.to(x.dtype)


class LinearKMaskedBias(nn.Linear):
    """Fused qkv Linear whose bias is multiplied by the persistent `bias_mask` [3C] (1 for Q and V, 0 for K)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=True)
        self.register_buffer("bias_mask", torch.empty(out_features, device=self.bias.device))
        self.reset_bias_mask()

    def reset_bias_mask(self) -> None:
        third = self.out_features // 3
        self.bias_mask.fill_(1.0)
        self.bias_mask[third : 2 * third] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


def masked_bias_block(dim: int, num_heads: int, qk_norm: bool = False, rope: nn.Module | None = None) -> Block:
    """A DINOv3 SelfAttentionBlock: LN eps 1e-5, LayerScale 1e-5, MLP 4x, qkv with the K-bias mask."""
    block = Block(dim, num_heads, init_values=1e-5, norm_eps=1e-5, qk_norm=qk_norm, rope=rope)
    block.attn.qkv = LinearKMaskedBias(dim, 3 * dim)
    return block


class DinoV3Encoder(nn.Module):
    """Per-image DINOv3 ViT: images [N, 3, H, W] (normalised) -> normed patch tokens [N, Hp * Wp, C].

    Tokens [cls, storage x 4, patches]; every block rotates the patch tokens with the axial RoPE. `mask_token` is kept
    for strict loading (masking is a training feature; upstream adds 0 * mask_token to cls, a no-op).
    """

    def __init__(self, config: OmegaConfig):
        super().__init__()
        dim = config.embed_dim
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.storage_tokens = nn.Parameter(torch.empty(1, config.n_storage_tokens, dim))
        self.mask_token = nn.Parameter(torch.empty(1, dim))
        self.patch_embed = PatchEmbed(config.patch_size, 3, dim)
        self.rope_embed = AxialRopeAngles(dim // config.num_heads, config.rope_base)
        rope = AxialRope()
        self.blocks = nn.ModuleList(masked_bias_block(dim, config.num_heads, rope=rope)
                                    for _ in range(config.encoder_depth))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)

    def forward(self, images: Tensor) -> Tensor:
        patch_size = self.patch_embed.patch_size
        grid_h, grid_w = images.shape[-2] // patch_size, images.shape[-1] // patch_size
        x = self.patch_embed(images)
        prefix = torch.cat([self.cls_token, self.storage_tokens], dim=1).expand(x.shape[0], -1, -1)
        x = torch.cat([prefix.to(x.dtype), x], dim=1)
        n_prefix = prefix.shape[1]
        angles = self.rope_embed(grid_h, grid_w, n_prefix)
        for block in self.blocks:
            x = block(x, pos=angles)
        return self.norm(x)[:, n_prefix:]


class Aggregator(nn.Module):
    """Patch encoder, special tokens, RoPE and the frame / inter-frame blocks (keys `aggregator.*`)."""

    def __init__(self, config: OmegaConfig):
        super().__init__()
        dim = config.embed_dim
        self.camera_token = nn.Parameter(torch.empty(1, 2, 1, dim))
        self.register_token = nn.Parameter(torch.empty(1, 2, config.num_register_tokens, dim))
        self.patch_embed = DinoV3Encoder(config)
        self.rope_embed = AxialRopeAngles(dim // config.num_heads, config.rope_base)
        rope = AxialRope()
        self.frame_blocks = nn.ModuleList(masked_bias_block(dim, config.num_heads, qk_norm=True, rope=rope)
                                          for _ in range(config.depth))
        self.inter_frame_blocks = nn.ModuleList(masked_bias_block(dim, config.num_heads, qk_norm=True)
                                                for _ in range(config.depth))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.camera_token, std=1e-3)
        nn.init.normal_(self.register_token, std=1e-3)

    def embed(self, images: Tensor) -> Tensor:
        """images [B, S, 3, H, W] in [0, 1] -> tokens [B, S, P, C]: [camera, registers, normed patch tokens]."""
        batch, frames = images.shape[:2]
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 1, 3, 1, 1)
        patches = self.patch_embed(((images - mean) / std).flatten(0, 1))
        special = torch.cat([expand_special(self.camera_token, batch, frames),
                             expand_special(self.register_token, batch, frames)], dim=1)
        return torch.cat([special.to(patches.dtype), patches], dim=1).unflatten(0, (batch, frames))


class CameraHead(nn.Module):
    """Last layer's camera + register tokens [B, S, 17, 2C] -> pose_enc [B, S, 9].

    token_norm -> trunk over the S * 17 tokens of a scene -> trunk_norm of each frame's token 0 -> camera_branch;
    activation: translation and quaternion linear, fov relu + 0.01.
    """

    def __init__(self, dim_in: int, num_heads: int, depth: int):
        super().__init__()
        self.token_norm = nn.LayerNorm(dim_in, eps=1e-5)
        self.trunk = nn.ModuleList(masked_bias_block(dim_in, num_heads) for _ in range(depth))
        self.trunk_norm = nn.LayerNorm(dim_in, eps=1e-5)
        self.camera_branch = nn.Sequential(nn.Linear(dim_in, dim_in // 2), nn.GELU(), nn.Linear(dim_in // 2, 9))

    def forward(self, special_tokens: Tensor) -> Tensor:
        batch, frames, n_special, width = special_tokens.shape
        x = self.token_norm(special_tokens).reshape(batch, frames * n_special, width)
        for block in self.trunk:
            x = block(x)
        raw = self.camera_branch(self.trunk_norm(x.reshape(batch, frames, n_special, width)[:, :, 0]))
        return torch.cat([raw[..., :7], F.relu(raw[..., 7:]) + 0.01], dim=-1)


class DenseHead(nn.Module):
    """DPT over four taps fused at 4x the patch grid, then `proj` / `proj_conf` (1x1 to (p/4)^2) and a p/4 pixel
    shuffle: taps [N, Hp * Wp, 2C] (patch tokens) -> depth [N, H, W] (exp), depth_conf [N, H, W] (1 + exp).
    `compile_backend` (see blocks.compile_model) runs `forward_frames` compiled."""

    compile_backend: str | None = None

    def __init__(self, dim_in: int, patch_size: int, features: int, out_channels: tuple[int, int, int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.shuffle = patch_size // 4
        self.norm = nn.LayerNorm(dim_in, eps=1e-5)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, channels, kernel_size=1) for channels in out_channels)
        self.resize_layers = make_resize_layers(out_channels)
        self.scratch = make_scratch(out_channels, features)
        for level in (1, 2, 3, 4):
            block = FeatureFusionBlock(features, has_residual=level != 4, relu_skip=False)
            setattr(self.scratch, f"refinenet{level}", block)
        self.proj = nn.Conv2d(features, self.shuffle**2, kernel_size=1)
        self.proj_conf = nn.Conv2d(features, self.shuffle**2, kernel_size=1)

    def forward(self, taps: list[Tensor], image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        return compiled_for(self, type(self).forward_frames)(self, taps, image_size)

    def forward_frames(self, taps: list[Tensor], image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The head on one chunk of frames (`forward`, compiled or not)."""
        height, width = image_size
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        levels = []
        for index, (project, resize, tokens) in enumerate(zip(self.projects, self.resize_layers, taps), start=1):
            x = self.norm(tokens).permute(0, 2, 1).reshape(tokens.shape[0], -1, grid_h, grid_w)
            x = resize(add_uv_pos_embed(project(x), width, height))
            levels.append(getattr(self.scratch, f"layer{index}_rn")(x))
        l1, l2, l3, l4 = levels
        out = self.scratch.refinenet4(l4, size=l3.shape[2:])
        out = self.scratch.refinenet3(out, l3, size=l2.shape[2:])
        out = self.scratch.refinenet2(out, l2, size=l1.shape[2:])
        out = add_uv_pos_embed(self.scratch.refinenet1(out, l1, size=l1.shape[2:]), width, height)
        depth = F.pixel_shuffle(self.proj(out), self.shuffle)[:, 0]
        conf = F.pixel_shuffle(self.proj_conf(out), self.shuffle)[:, 0]
        return torch.exp(depth), 1.0 + torch.exp(conf)


class VGGTOmega(ReconstructionModel):
    """VGGT-Omega with camera and dense heads. images [B, S, 3, H, W] (or [S, 3, H, W]) in [0, 1] -> dict:

    depth, depth_conf [B, S, H, W], pose_enc [B, S, 9], extrinsics [B, S, 3, 4] (world-to-camera, OpenCV),
    intrinsics [B, S, 3, 3], points [B, S, H, W, 3] (depth unprojected with the predicted cameras), points_conf.

    lean (default True): the four DPT taps are stored in the compute dtype (the camera head's 17 special tokens of the
    last layer stay fp32); lean False keeps them fp32 as upstream. compute_dtype: the aggregator runs under autocast to
    this dtype (fp32: no autocast of its own); heads run fp32 with autocast off (the dense head in `decode`'s
    head dtype if given another).
    """

    def __init__(self, config: OmegaConfig, lean: bool = True, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.lean = lean
        self.compute_dtype = compute_dtype
        dim_in = 2 * config.embed_dim
        self.aggregator = Aggregator(config)
        self.camera_head = CameraHead(dim_in, config.camera_heads, config.camera_depth)
        self.dense_head = DenseHead(dim_in, config.patch_size, config.head_features, config.head_channels)
        self.reset_parameters()
        self.adapter = Adapter(
            model_name=config.name,
            global_attention=[f"aggregator.inter_frame_blocks.{i}.attn" for i in config.global_blocks],
            n_special=config.n_special,
            patch_size=config.patch_size,
            rope_in_global=False,
        )

    def reset_parameters(self) -> None:
        """The K-bias masks (buffers no Linear init touches)."""
        for module in self.modules():
            if isinstance(module, LinearKMaskedBias):
                module.reset_bias_mask()

    @property
    def num_steps(self) -> int:
        return 2 * self.config.depth

    @property
    def global_layer_steps(self) -> list[int]:
        return [2 * layer + 1 for layer in self.config.global_blocks]

    def prepare(self, images: Tensor) -> TrunkState:
        """Normalise, encode and add special tokens: tokens [B, S, P, C] fp32; extras: angles [P, D / 2] (frame
        RoPE), grid (Hp, Wp)."""
        config = self.config
        images = check_images(images, config.patch_size)
        grid = (images.shape[-2] // config.patch_size, images.shape[-1] // config.patch_size)
        with compute_autocast(images.device.type, self.compute_dtype):
            tokens = self.aggregator.embed(images)
        angles = self.aggregator.rope_embed(*grid, config.n_special)
        return TrunkState(tokens=tokens.float(), extras={"angles": angles, "grid": grid})

    def inter_frame(self, layer: int, tokens: Tensor) -> Tensor:
        """Inter-frame block `layer` on tokens [B, S, P, C]: global, or over the special tokens only (register)."""
        batch, frames, per_frame, width = tokens.shape
        block = self.aggregator.inter_frame_blocks[layer]
        if layer not in self.config.register_blocks:
            return block(tokens.reshape(batch, frames * per_frame, width)).view_as(tokens)
        n_special = self.config.n_special
        special = block(tokens[:, :, :n_special].reshape(batch, frames * n_special, width))
        return torch.cat([special.view(batch, frames, n_special, width), tokens[:, :, n_special:]], dim=2)

    def run_steps(self, state: TrunkState, stop: int | None = None) -> TrunkState:
        """Run steps state.step .. stop - 1 (default: to the end) and return a new state; `state` is left as it is."""
        config = self.config
        stop = self.check_steps(state, stop)
        state = state.copy()
        tokens = state.tokens
        batch, frames, per_frame, width = tokens.shape
        angles = state.extras["angles"]
        with compute_autocast(tokens.device.type, self.compute_dtype):
            tap_dtype = active_compute_dtype(tokens.device.type, tokens.dtype) if self.lean else tokens.dtype
            for step in range(state.step, stop):
                layer, is_inter_frame = divmod(step, 2)
                if not is_inter_frame:
                    block = self.aggregator.frame_blocks[layer]
                    out = block(tokens.reshape(batch * frames, per_frame, width), pos=angles).view_as(tokens)
                else:
                    out = self.inter_frame(layer, tokens)
                    if layer in config.taps:
                        state.taps[layer] = pair_tap(tokens, out, tap_dtype)
                    if layer == config.depth - 1:
                        special = torch.cat([tokens[:, :, : config.n_special], out[:, :, : config.n_special]], -1)
                        state.extras["camera_tokens"] = special.float()
                tokens = out
        state.tokens, state.step = tokens, stop
        return state

    def decode(self, state: TrunkState, images: Tensor, head_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Heads over a finished trunk, fp32 with autocast off; the dense head runs over chunks of 8 frames, each cast
        to fp32 on its own, under autocast to `head_dtype` if it is not fp32 (outputs cast to fp32)."""
        config = self.config
        self.check_finished(state)
        grid_h, grid_w = state.extras["grid"]
        image_size = (grid_h * config.patch_size, grid_w * config.patch_size)
        taps = [state.taps[layer] for layer in config.taps]
        with no_autocast(state.tokens.device.type):
            pose_enc = self.camera_head(state.extras["camera_tokens"])
        with head_autocast(state.tokens.device.type, head_dtype):
            depth, depth_conf = frame_map(
                lambda chunk: self.dense_head([tap[:, config.n_special:].float() for tap in chunk], image_size),
                taps, HEAD_CHUNK_FRAMES)
        depth, depth_conf = depth.float(), depth_conf.float()
        with no_autocast(state.tokens.device.type):
            extrinsics, intrinsics = pose_encoding_to_extrinsics_intrinsics(pose_enc, image_size)
            points = unproject_pixel_indices(depth, intrinsics, se3_inverse(extrinsics))
        return {
            "depth": depth, "depth_conf": depth_conf, "points": points, "points_conf": depth_conf,
            "pose_enc": pose_enc, "extrinsics": extrinsics, "intrinsics": intrinsics,
        }

    def flop_config(self, height: int, width: int) -> FlopConfig:
        """FLOP-model numbers at an H x W input: block lists as BlockGroups (the register-attention inter-frame
        blocks and the camera trunk as "special" sequences of 17 tokens per frame); everything else (patch conv, DPT,
        head linears) counted per frame on the meta device (`non_block_flops`)."""
        config = self.config
        check_images(torch.empty(1, 3, height, width, device="meta"), config.patch_size)
        grid = (height // config.patch_size, width // config.patch_size)
        patches = grid[0] * grid[1]
        tokens = config.n_special + patches
        dim = config.embed_dim
        groups = (
            BlockGroup("aggregator.patch_embed.blocks", config.encoder_depth, dim, 4 * dim, "frame",
                       1 + config.n_storage_tokens + patches),
            BlockGroup("aggregator.frame_blocks", config.depth, dim, 4 * dim, "frame", tokens),
            BlockGroup("aggregator.inter_frame_blocks (global)", len(config.global_blocks), dim, 4 * dim, "global",
                       tokens),
            BlockGroup("aggregator.inter_frame_blocks (register)", len(config.register_blocks), dim, 4 * dim,
                       "special", config.n_special),
            BlockGroup("camera_head.trunk", config.camera_depth, 2 * dim, 8 * dim, "special", config.n_special),
        )
        other = non_block_flops(VGGTOmega, config, height, width, OMEGA_BLOCKS)
        return FlopConfig(config.n_special, tokens, groups, other, patch_grid=grid)


OMEGA_BLOCKS = re.compile(
    r"VGGTOmega\.(aggregator\.patch_embed\.blocks|aggregator\.frame_blocks|aggregator\.inter_frame_blocks"
    r"|camera_head\.trunk)\.\d+"
)

PRE_RELEASE_KEY_RENAMES = (
    ("patch_embed.", "aggregator.patch_embed."),
    ("aggregator.global_blocks.", "aggregator.inter_frame_blocks."),
    ("depth_head.", "dense_head."),
    ("camera_head.extra_attention_pre_norm.", "camera_head.token_norm."),
    ("camera_head.extra_attention_blocks.", "camera_head.trunk."),
    ("camera_head.token_norm.", "camera_head.trunk_norm."),
    ("camera_head.pose_branch.", "camera_head.camera_branch."),
)


def convert_checkpoint(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Release key names for a VGGT-Omega state_dict saved under pre-release names (upstream's rename record).

    Each key is renamed by the first matching rule, so renames do not cascade. `camera_head.token_norm` is ambiguous:
    it is the old name of `trunk_norm` only in checkpoints that still have `extra_attention_pre_norm` (the old name
    of `token_norm`). Release-named checkpoints pass through unchanged.
    """
    old_head = any(key.startswith("camera_head.extra_attention_pre_norm.") for key in state_dict)
    rules = [rule for rule in PRE_RELEASE_KEY_RENAMES if old_head or rule[0] != "camera_head.token_norm."]
    renamed = {}
    for key, value in state_dict.items():
        new_key = next((new + key.removeprefix(old) for old, new in rules if key.startswith(old)), key)
        if new_key in renamed:
            raise Spark3rError(
                f"checkpoint keys {key!r} and another both map to {new_key!r}: pass an unmodified VGGT-Omega checkpoint"
            )
        renamed[new_key] = value
    return renamed


for _config in CONFIGS.values():
    _released = _config.name == "vggt-omega"
    register(ModelEntry(
        name=_config.name, family="vggt-omega", builder=lambda config=_config: VGGTOmega(config),
        image_width=_config.default_size[1], preprocess="omega",
        hf_repo="facebook/VGGT-Omega" if _released else None,
        hf_files=("vggt_omega_1b_512.pt",) if _released else (),
        drop_prefixes=("alignment_head.",), convert_state_dict=convert_checkpoint,
        description="VGGT-Omega 1B (512 px): DINOv3 L/16 encoder, 24 frame + 24 inter-frame blocks, camera and dense"
                    " heads" if _released else "toy VGGT-Omega (width 64, 6 + 6 blocks) for CPU tests",
    ))
