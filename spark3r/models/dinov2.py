"""DINOv2 ViT patch encoder (`DinoVisionTransformer`) with the official key names.

Keys, in state_dict order: cls_token, [camera_token], pos_embed, [register_tokens], [mask_token], patch_embed.proj,
blocks.{i}, norm. Token order: [cls, registers, patches]; registers are inserted after pos_embed is added.

Two pos_embed interpolation variants, both computed in fp32:
  VGGT / pi3: interpolate_offset 0, antialias True, resize to size (Hp, Wp);
  DA3:        interpolate_offset 0.1, antialias False, resize by scale_factor ((Hp + 0.1) / M, (Wp + 0.1) / M).
A square input whose grid equals the pretraining grid (37 x 37 at 518 px) uses pos_embed as is.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spark3r.errors import Spark3rError
from spark3r.models.blocks import Block


class PatchEmbed(nn.Module):
    """Conv patchify: images [B, 3, H, W] -> tokens [B, (H / p) * (W / p), C], row-major."""

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 1024):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):
    """Per-image ViT encoder.

    `prepare_tokens` and `blocks` are exposed separately so a backbone that interleaves its own cross-frame attention
    (DA3) can run the blocks one by one; `forward_features` runs everything and returns normed patch tokens (VGGT, pi3).

    block_overrides: optional function of the block index returning extra `Block` keyword arguments (e.g. DA3's
    qk-norm and RoPE from a given depth on). camera_token adds DA3's `camera_token` [1, 2, C] (unused here).
    mask_token keeps the checkpoint's `mask_token` [1, C] (present in VGGT; masking is a training feature, unused here).
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 0,
        mask_token: bool = True,
        camera_token: bool = False,
        init_values: float | None = 1.0,
        norm_eps: float = 1e-6,
        final_norm_eps: float | None = None,
        ffn_layer: str = "mlp",
        interpolate_offset: float = 0.0,
        interpolate_antialias: bool = True,
        block_overrides: Callable[[int], dict] | None = None,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.pos_grid = img_size // patch_size

        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        self.camera_token = nn.Parameter(torch.empty(1, 2, embed_dim)) if camera_token else None
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + self.pos_grid**2, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.empty(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim)) if mask_token else None
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                init_values=init_values,
                norm_eps=norm_eps,
                ffn_layer=ffn_layer,
                **(block_overrides(index) if block_overrides else {}),
            )
            for index in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps if final_norm_eps is None else final_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DINOv2 init of the encoder's own tensors (blocks and convs initialise themselves)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for token in (self.camera_token, self.register_tokens):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        if self.mask_token is not None:
            nn.init.zeros_(self.mask_token)

    @property
    def num_prefix_tokens(self) -> int:
        """cls + registers, in front of the patch tokens."""
        return 1 + self.num_register_tokens

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (Hp, Wp) of an image; a Spark3rError if a side is not a positive multiple of the patch."""
        p = self.patch_size
        if height < p or width < p or height % p or width % p:
            raise Spark3rError(
                f"image size {height}x{width} is not a multiple of the patch size {p}: "
                f"resize or crop to multiples of {p}"
            )
        return height // p, width // p

    def interpolate_pos_encoding(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        """pos_embed resized to the patch grid of an H x W image: [1, 1 + Hp * Wp, C] in `dtype` (computed in fp32)."""
        grid_h, grid_w = self.grid_size(height, width)
        if grid_h == grid_w == self.pos_grid:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        side = self.pos_grid
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((grid_h + self.interpolate_offset) / side, (grid_w + self.interpolate_offset) / side)
            resize = {"scale_factor": scale}
        else:
            resize = {"size": (grid_h, grid_w)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.interpolate_antialias, **resize)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1).to(dtype)

    def prepare_tokens(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] (already normalised) -> tokens [B, 1 + R + Hp * Wp, C]: [cls, registers, patches]."""
        height, width = images.shape[-2:]
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(height, width, x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_features(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> normed patch tokens [B, Hp * Wp, C] (DINOv2's x_norm_patchtokens)."""
        x = self.prepare_tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, self.num_prefix_tokens :]

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images)


def vit_large_reg(**overrides) -> DinoVisionTransformer:
    """DINOv2 ViT-L/14 with 4 registers as VGGT and pi3 build it (518 px, offset 0, antialias, LayerScale 1.0)."""
    config = dict(
        img_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16, num_register_tokens=4, init_values=1.0
    )
    return DinoVisionTransformer(**{**config, **overrides})


def conv_patch_embed(embed_dim: int, img_size: int = 112, patch_size: int = 14, **overrides) -> DinoVisionTransformer:
    """A tiny encoder for toy models: the same keys as DINOv2 but no blocks (conv patchify + pos_embed + norm)."""
    config = dict(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=0, num_heads=1, num_register_tokens=4
    )
    return DinoVisionTransformer(**{**config, **overrides})
