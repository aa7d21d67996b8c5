"""DPT dense-prediction head (VGGT's `DPTHead`) and its reusable parts, with the official key names.

Keys: norm, projects.{0..3}, resize_layers.{0,1,3} (slot 2 is Identity), scratch.layer{1..4}_rn,
scratch.refinenet{1..4} (refinenet4 has no resConfUnit1), scratch.output_conv1, scratch.output_conv2.{0,2}.
The pieces (fusion blocks, UV positional embedding, activations) are public so DA3's DualDPT can be built from them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spark3r.errors import Spark3rError
from spark3r.models.blocks import compiled_for, frame_map

INT_MAX_ELEMENTS = 1610612736  # F.interpolate overflows above this many output elements; split the batch


def interpolate(x: Tensor, size: tuple[int, int] | None = None, scale_factor: float | None = None) -> Tensor:
    """Bilinear resize with align_corners=True, split over the batch when the output is too large for one call.

    x [B, C, h, w] -> [B, C, *size]; with scale_factor, size = (int(h * s), int(w * s)).
    """
    if size is None:
        size = (int(x.shape[-2] * scale_factor), int(x.shape[-1] * scale_factor))
    elements = size[0] * size[1] * x.shape[0] * x.shape[1]
    if elements <= INT_MAX_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    chunks = x.chunk(elements // INT_MAX_ELEMENTS + 1, dim=0)
    return torch.cat([F.interpolate(c, size=size, mode="bilinear", align_corners=True) for c in chunks]).contiguous()


def uv_grid(width: int, height: int, aspect_ratio: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised view-plane UV grid [height, width, 2] (u = x, v = y); the half-diagonal has length 1.

    u spans +-span_x * (width - 1) / width with span_x = a / sqrt(a^2 + 1), v likewise with span_y = 1 / sqrt(a^2 + 1).
    """
    diagonal = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diagonal, 1.0 / diagonal
    u_end = span_x * (width - 1) / width
    v_end = span_y * (height - 1) / height
    u = torch.linspace(-u_end, u_end, steps=width, dtype=dtype, device=device)
    v = torch.linspace(-v_end, v_end, steps=height, dtype=dtype, device=device)
    uu, vv = torch.meshgrid(u, v, indexing="xy")
    return torch.stack([uu, vv], dim=-1)


def sincos_embed(positions: Tensor, channels: int, omega_0: float = 100.0, freq_dtype=torch.float64) -> Tensor:
    """1D sin/cos embedding: positions [M] -> [M, channels] fp32 = [sin | cos] over channels / 2 frequencies.

    Frequencies omega_0^(-j / (channels / 2)) and the products are computed in `freq_dtype` (VGGT: float64, DA3: fp32).
    """
    omega = torch.arange(channels // 2, dtype=freq_dtype, device=positions.device) / (channels / 2.0)
    omega = 1.0 / omega_0**omega
    angles = positions.reshape(-1, 1).to(freq_dtype) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


@torch.compiler.assume_constant_result
def uv_pos_embed(height: int, width: int, channels: int, aspect_ratio: float, dtype: torch.dtype,
                 device: torch.device, freq_dtype=torch.float64) -> Tensor:
    """UV positional embedding [channels, height, width]: first half from u (x), second half from v (y).

    A compiled head takes it as a constant of its graph, computed once when traced: otherwise inductor fuses its
    float64 sin and cos into the add, per element of every frame (19% of VGGT-1B's compiled bf16 heads on an H100,
    benchmarks/results/block-profile-vggt-1b-1000-h100-write.md)."""
    grid = uv_grid(width, height, aspect_ratio, dtype, device).reshape(-1, 2)
    embed = torch.cat([sincos_embed(grid[:, 0], channels // 2, freq_dtype=freq_dtype),
                       sincos_embed(grid[:, 1], channels // 2, freq_dtype=freq_dtype)], dim=-1)
    return embed.reshape(height, width, channels).permute(2, 0, 1)


def add_uv_pos_embed(x: Tensor, image_width: int, image_height: int, ratio: float = 0.1,
                     freq_dtype=torch.float64) -> Tensor:
    """x [B, C, h, w] + ratio * UV embedding of an h x w grid spanning an image of aspect image_width / image_height."""
    embed = uv_pos_embed(x.shape[-2], x.shape[-1], x.shape[1], image_width / image_height, x.dtype, x.device,
                         freq_dtype)
    return x + ratio * embed[None]


def inverse_log_transform(y: Tensor) -> Tensor:
    """sign(y) * (exp(|y|) - 1)."""
    return torch.sign(y) * torch.expm1(torch.abs(y))


ACTIVATIONS = {
    "exp": torch.exp,
    "inv_log": inverse_log_transform,
    "expp1": lambda x: 1 + torch.exp(x),
    "linear": lambda x: x,
    "relu": F.relu,
}


def activate_head(out: Tensor, activation: str, conf_activation: str) -> tuple[Tensor, Tensor]:
    """out [B, C, H, W] -> (values [B, H, W, C - 1], confidence [B, H, W]); the last channel is the confidence."""
    channels_last = out.permute(0, 2, 3, 1)
    return ACTIVATIONS[activation](channels_last[..., :-1]), ACTIVATIONS[conf_activation](channels_last[..., -1])


class ResidualConvUnit(nn.Module):
    """skip + conv2(relu(conv1(relu(x)))), 3x3 convs, x [B, F, h, w] -> [B, F, h, w].

    relu_skip=True: skip = relu(x). VGGT builds this unit with ReLU(inplace=True), whose first call rectifies x itself,
    so the residual it adds back is relu(x); relu_skip=False gives the textbook skip = x
    (Depth-Anything-V2 builds it with ReLU(False)).
    """

    def __init__(self, features: int, relu_skip: bool = True):
        super().__init__()
        self.relu_skip = relu_skip
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        rectified = F.relu(x)
        return (rectified if self.relu_skip else x) + self.conv2(F.relu(self.conv1(rectified)))


class FeatureFusionBlock(nn.Module):
    """out_conv(resize(resConfUnit2(x + resConfUnit1(skip)))): fuse a coarse map with a skip, then upsample.

    x [B, F, h, w], skip [B, F, h, w] or None (refinenet4 has no resConfUnit1) -> [B, F, *size] (2x if size is None).
    """

    def __init__(self, features: int, has_residual: bool = True, relu_skip: bool = True):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        self.resConfUnit1 = ResidualConvUnit(features, relu_skip) if has_residual else None
        self.resConfUnit2 = ResidualConvUnit(features, relu_skip)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = interpolate(x, size=size) if size is not None else interpolate(x, scale_factor=2)
        return self.out_conv(x)


def make_scratch(in_channels: Sequence[int], features: int) -> nn.Module:
    """`scratch` with layer{1..4}_rn: 3x3 convs (no bias) from each pyramid level's channels to `features`."""
    scratch = nn.Module()
    for level, channels in enumerate(in_channels, start=1):
        scratch.add_module(f"layer{level}_rn", nn.Conv2d(channels, features, kernel_size=3, padding=1, bias=False))
    return scratch


def make_resize_layers(out_channels: Sequence[int]) -> nn.ModuleList:
    """Per-level resampling to 4x, 2x, 1x and 1/2x of the patch grid (slot 2 is Identity, so it has no keys)."""
    return nn.ModuleList([
        nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4),
        nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2),
        nn.Identity(),
        nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
    ])


def fuse(scratch: nn.Module, levels: Sequence[Tensor], suffix: str = "") -> Tensor:
    """The DPT fusion chain over four pyramid levels (already through layer{i}_rn): [B, F, 8 Hp, 8 Wp].

    refinenet4(l4) -> refinenet3(., l3) -> refinenet2(., l2) -> refinenet1(., l1), each resized to the next level.
    `suffix` selects another chain of the same scratch (DA3's "_aux").
    """
    l1, l2, l3, l4 = levels
    out = getattr(scratch, f"refinenet4{suffix}")(l4, size=l3.shape[2:])
    out = getattr(scratch, f"refinenet3{suffix}")(out, l3, size=l2.shape[2:])
    out = getattr(scratch, f"refinenet2{suffix}")(out, l2, size=l1.shape[2:])
    return getattr(scratch, f"refinenet1{suffix}")(out, l1)


class DPTHead(nn.Module):
    """VGGT's DPT head: four token taps -> dense prediction at image resolution.

    forward(taps, image_size, patch_start_idx): taps are 4 tensors [B, S, P, dim_in] (patch tokens from
    `patch_start_idx`), any dtype (cast to the head's dtype per chunk of `frames_chunk_size` frames, `frame_map`) ->
    (values [B, S, H, W, output_dim - 1], confidence [B, S, H, W]), or features [B, S, F, H', W'] if feature_only.
    `compile_backend` (see blocks.compile_model) runs `forward_frames` compiled.
    """

    compile_backend: str | None = None

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
        norm: bool = True,
    ):
        super().__init__()
        for name in (activation, conf_activation):
            if name not in ACTIVATIONS:
                raise Spark3rError(f"DPT activation {name!r} is unknown: use one of {sorted(ACTIVATIONS)}")
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self.norm = nn.LayerNorm(dim_in) if norm else nn.Identity()
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, channels, kernel_size=1) for channels in out_channels)
        self.resize_layers = make_resize_layers(out_channels)
        self.scratch = make_scratch(out_channels, features)
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        if feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(32, output_dim, kernel_size=1),
            )

    def pyramid(self, taps: Sequence[Tensor], image_size: tuple[int, int]) -> list[Tensor]:
        """taps: 4 tensors [N, Np, dim_in] of N frames -> 4 maps [N, oc_i, r_i * Hp, r_i * Wp], r = 4, 2, 1, 1/2."""
        height, width = image_size
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        dtype = self.projects[0].weight.dtype
        levels = []
        for project, resize, tokens in zip(self.projects, self.resize_layers, taps):
            x = self.norm(tokens.to(dtype))
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], grid_h, grid_w)
            x = project(x)
            if self.pos_embed:
                x = add_uv_pos_embed(x, width, height)
            levels.append(resize(x))
        return levels

    def forward_frames(self, taps: Sequence[Tensor], image_size: tuple[int, int]) -> Tensor:
        """taps: 4 tensors [N, Np, dim_in] -> raw output [N, output_dim, H, W] (or features if feature_only)."""
        height, width = image_size
        levels = self.pyramid(taps, image_size)
        levels = [getattr(self.scratch, f"layer{i}_rn")(x) for i, x in enumerate(levels, start=1)]
        out = self.scratch.output_conv1(fuse(self.scratch, levels))
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        out = interpolate(out, size=(int(grid_h * self.patch_size / self.down_ratio),
                                     int(grid_w * self.patch_size / self.down_ratio)))
        if self.pos_embed:
            out = add_uv_pos_embed(out, width, height)
        if self.feature_only:
            return out
        return self.scratch.output_conv2(out)

    def forward(self, taps: Sequence[Tensor], image_size: tuple[int, int], patch_start_idx: int,
                frames_chunk_size: int | None = 8) -> Tensor | tuple[Tensor, Tensor]:
        forward_frames = compiled_for(self, type(self).forward_frames)

        def chunk_out(chunk: list[Tensor]) -> Tensor | tuple[Tensor, Tensor]:
            out = forward_frames(self, [tap[:, patch_start_idx:] for tap in chunk], image_size)
            return out if self.feature_only else activate_head(out, self.activation, self.conf_activation)

        return frame_map(chunk_out, list(taps), frames_chunk_size)
