"""Depth-Anything-3 any-view models (ByteDance-Seed/Depth-Anything-3): da3-small, -base, -large, -giant (alias da3).

The module tree mirrors `DepthAnything3` so state_dict keys equal the checkpoints' (tests/manifests/da3-*.tsv):
`model.backbone.pretrained` (DINOv2 without registers, DA3 pos-embed interpolation, camera_token), `model.head`
(DualDPT), `model.cam_dec`, `model.cam_enc` and, for giant, `model.gs_head`.

Input: images [B, S, 3, H, W] (or [S, 3, H, W]) in [0, 1], H and W multiples of 14. Upstream normalises with ImageNet
mean/std in its input processor; here `prepare` does it, so every spark3r model takes [0, 1] images and the "da3"
preprocess recipe only resizes.

Backbone: ViT blocks i < alt_start run per frame without RoPE or qk-norm. Before block
alt_start - 1, when S >= 3, a reference view is chosen from the cls tokens ("saddle_balanced" by default, or "first")
and moved to frame 0; the taps are restored to the input order. Before block alt_start, token 0 of every frame becomes
the camera token (frame 0: camera_token[:, 0], others: camera_token[:, 1]). From alt_start on, odd blocks are global
(all S * P tokens of a scene, RoPE with the constant position (1, 1) for every patch and (0, 0) for the camera token)
and even blocks are local (RoPE with the patch grid positions). The trunk runs one block per step from the local
block just before the first global block; the blocks before it run in `prepare`. A tap at an out_layer is
[local | global] (2C wide); the heads see the local half raw and the global half through the backbone's final `norm`.

Outputs: depth [B, S, H, W] (exp), depth_conf (1 + exp), extrinsics [B, S, 3, 4] world-to-camera (the inverse of the
decoded camera-to-world pose), intrinsics [B, S, 3, 3] from the predicted field of view (principal point (W/2, H/2)),
pose_enc [B, S, 9], points [B, S, H, W, 3] = depth unprojected with those cameras (pixel (u, v) at integer indices,
as upstream's `unproject_depth`: spark3r.models.geometry.unproject_pixel_indices), points_conf = depth_conf.

Not wired: camera conditioning (cam_enc turns a 9-d pose encoding into camera tokens, but `forward` takes images
only), the ray-based pose path (the DualDPT ray branch is available through `DualDPT.forward(..., rays=True)`) and the
3D-Gaussian branch (gs_head computes its raw maps; the Gaussian adapter and renderer are not ported).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
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
    Mlp,
    RotaryPositionEmbedding2D,
    active_compute_dtype,
    compiled_for,
    compute_autocast,
    frame_chunk,
    frame_map,
    head_autocast,
    no_autocast,
    patch_positions,
    swiglu_hidden,
)
from spark3r.models.dinov2 import DinoVisionTransformer
from spark3r.models.dpt import (
    FeatureFusionBlock,
    add_uv_pos_embed,
    fuse,
    interpolate,
    make_resize_layers,
    make_scratch,
)
from spark3r.models.geometry import quaternion_to_matrix, se3_inverse, unproject_pixel_indices
from spark3r.models.inputs import IMAGENET_MEAN, IMAGENET_STD, check_images
from spark3r.models.registry import ModelEntry, register

REF_VIEW_STRATEGIES = ("saddle_balanced", "first")
MIN_VIEWS_FOR_REFERENCE = 3  # upstream THRESH_FOR_REF_SELECTION
HEAD_CHUNK_FRAMES = 8


@dataclass(frozen=True)
class DA3Config:
    """One any-view DA3 size (configs/*.yaml upstream); `da3-tiny` is a random-weights toy for tests."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    alt_start: int
    out_layers: tuple[int, ...]
    features: int
    out_channels: tuple[int, int, int, int]
    ffn_layer: str = "mlp"
    gs_head: bool = False
    cam_enc_heads: int = 16
    cam_enc_depth: int = 4
    patch_size: int = 14
    img_size: int = 518
    rope_base: float = 100.0
    default_size: tuple[int, int] = (504, 504)
    hf_repo: str | None = None

    @property
    def global_blocks(self) -> list[int]:
        """Indices of the cross-view blocks: odd i >= alt_start."""
        return [i for i in range(self.alt_start, self.depth) if i % 2 == 1]


CONFIGS = {
    config.name: config
    for config in (
        DA3Config("da3-small", 384, 12, 6, 4, (5, 7, 9, 11), 64, (48, 96, 192, 384),
                  hf_repo="depth-anything/DA3-SMALL"),
        DA3Config("da3-base", 768, 12, 12, 4, (5, 7, 9, 11), 128, (96, 192, 384, 768),
                  hf_repo="depth-anything/DA3-BASE"),
        DA3Config("da3-large", 1024, 24, 16, 8, (11, 15, 19, 23), 256, (256, 512, 1024, 1024),
                  hf_repo="depth-anything/DA3-LARGE-1.1"),
        DA3Config("da3-giant", 1536, 40, 24, 13, (19, 27, 33, 39), 256, (256, 512, 1024, 1024),
                  ffn_layer="swiglu", gs_head=True, hf_repo="depth-anything/DA3-GIANT-1.1"),
        DA3Config("da3-tiny", 64, 10, 2, 3, (3, 5, 7, 9), 16, (8, 16, 32, 32), cam_enc_heads=4, cam_enc_depth=1,
                  img_size=56, default_size=(42, 56)),
    )
}


def select_reference_view(cls_tokens: Tensor, strategy: str) -> Tensor:
    """The reference view of each scene from its cls tokens [B, S, C] -> [B] long.

    saddle_balanced: min-max normalise (over views) the mean cosine similarity to the other views, the token norm and
    the variance of the unit token, and take the view whose three values are closest to 0.5 in summed L1.
    """
    batch, views = cls_tokens.shape[:2]
    if strategy == "first":
        return torch.zeros(batch, dtype=torch.long, device=cls_tokens.device)
    unit = cls_tokens / cls_tokens.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.transpose(1, 2) - torch.eye(views, device=unit.device)
    metrics = (similarity.sum(dim=-1) / (views - 1), cls_tokens.norm(dim=-1), unit.var(dim=-1))

    def normalise(metric: Tensor) -> Tensor:
        low, high = metric.min(dim=1, keepdim=True).values, metric.max(dim=1, keepdim=True).values
        return (metric - low) / (high - low + 1e-8)

    return sum((normalise(metric) - 0.5).abs() for metric in metrics).argmin(dim=1)


def reference_order(reference: Tensor, views: int) -> Tensor:
    """Frame order [B, S] that puts view `reference` [B] first and keeps the others in input order."""
    positions = torch.arange(views, device=reference.device).expand(reference.shape[0], -1)
    order = torch.where((positions > 0) & (positions <= reference[:, None]), positions - 1, positions)
    order[:, 0] = reference
    return order


def gather_frames(x: Tensor, order: Tensor) -> Tensor:
    """x [B, S, ...] with frames taken in `order` [B, S]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], order]


def pose_encoding_to_camera(pose_enc: Tensor, image_size: tuple[int, int], min_tan: float | None = None):
    """pose_enc [B, S, 9] = [t, quaternion xyzw, fov_h, fov_w] -> ([R | t] [B, S, 3, 4], intrinsics [B, S, 3, 3]).

    fy = (H / 2) / tan(fov_h / 2), fx = (W / 2) / tan(fov_w / 2) (tan clamped at `min_tan` if given, as DA3 does),
    principal point (W / 2, H / 2). DA3 reads [R | t] as camera-to-world.
    """
    height, width = image_size
    rotation = quaternion_to_matrix(pose_enc[..., 3:7])
    pose = torch.cat([rotation, pose_enc[..., :3, None]], dim=-1)
    tan_h, tan_w = torch.tan(pose_enc[..., 7] / 2.0), torch.tan(pose_enc[..., 8] / 2.0)
    if min_tan is not None:
        tan_h, tan_w = tan_h.clamp(min=min_tan), tan_w.clamp(min=min_tan)
    intrinsics = torch.zeros(pose_enc.shape[:-1] + (3, 3), device=pose_enc.device, dtype=pose_enc.dtype)
    intrinsics[..., 0, 0] = (width / 2.0) / tan_w
    intrinsics[..., 1, 1] = (height / 2.0) / tan_h
    intrinsics[..., 0, 2] = width / 2.0
    intrinsics[..., 1, 2] = height / 2.0
    intrinsics[..., 2, 2] = 1.0
    return pose, intrinsics


class Permute(nn.Module):
    """x.permute(*dims) (no parameters; keeps Sequential slot numbering as upstream)."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class DualDPT(nn.Module):
    """DA3's head: one DPT trunk, two fusion chains. Main: depth + confidence at H x W; aux: rays at 8Hp x 8Wp.

    Keys: norm, projects, resize_layers, scratch.{layer*_rn, refinenet*, output_conv1, output_conv2,
    refinenet*_aux, output_conv1_aux.{0..3}, output_conv2_aux.{0..3}}. Only the last aux level is ever decoded.
    `compile_backend` (see blocks.compile_model) runs `forward_frames` compiled.
    """

    compile_backend: str | None = None

    def __init__(self, dim_in: int, patch_size: int, features: int, out_channels: tuple[int, int, int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, channels, kernel_size=1) for channels in out_channels)
        self.resize_layers = make_resize_layers(out_channels)
        self.scratch = make_scratch(out_channels, features)
        for suffix in ("", "_aux"):
            for level in (1, 2, 3, 4):
                block = FeatureFusionBlock(features, has_residual=level != 4, relu_skip=False)
                setattr(self.scratch, f"refinenet{level}{suffix}", block)
        self.scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, kernel_size=3, padding=1), nn.ReLU(), nn.Conv2d(32, 2, kernel_size=1)
        )
        half = features // 2
        self.scratch.output_conv1_aux = nn.ModuleList(
            nn.Sequential(*(nn.Conv2d(a, b, kernel_size=3, padding=1)
                            for a, b in ((features, half), (half, features)) * 2 + ((features, half),)))
            for _ in range(4)
        )
        self.scratch.output_conv2_aux = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(half, 32, kernel_size=3, padding=1),
                Permute((0, 2, 3, 1)),
                nn.LayerNorm(32),
                Permute((0, 3, 1, 2)),
                nn.ReLU(),
                nn.Conv2d(32, 7, kernel_size=1),
            )
            for _ in range(4)
        )

    def add_pos(self, x: Tensor, image_size: tuple[int, int]) -> Tensor:
        """x [N, C, h, w] + 0.1 * UV embedding (DA3 computes its frequencies in fp32)."""
        return add_uv_pos_embed(x, image_size[1], image_size[0], freq_dtype=torch.float32)

    def fusion_levels(self, feats: list[Tensor], image_size: tuple[int, int]) -> list[Tensor]:
        """feats: 4 patch-token maps [N, Hp * Wp, dim_in] -> the four pyramid levels after layer*_rn."""
        grid_h, grid_w = image_size[0] // self.patch_size, image_size[1] // self.patch_size
        levels = []
        for index, (project, resize, tokens) in enumerate(zip(self.projects, self.resize_layers, feats), start=1):
            x = self.norm(tokens).permute(0, 2, 1).reshape(tokens.shape[0], -1, grid_h, grid_w)
            x = resize(self.add_pos(project(x), image_size))
            levels.append(getattr(self.scratch, f"layer{index}_rn")(x))
        return levels

    def forward_frames(self, feats: list[Tensor], image_size: tuple[int, int], rays: bool) -> dict[str, Tensor]:
        """feats: 4 tensors [N, Hp * Wp, dim_in] -> depth, depth_conf [N, H, W] (+ ray [N, 8Hp, 8Wp, 6], ray_conf)."""
        levels = self.fusion_levels(feats, image_size)
        grid_h, grid_w = image_size[0] // self.patch_size, image_size[1] // self.patch_size
        main = self.scratch.output_conv1(fuse(self.scratch, levels))
        main = self.add_pos(interpolate(main, size=(grid_h * self.patch_size, grid_w * self.patch_size)), image_size)
        logits = self.scratch.output_conv2(main)
        out = {"depth": torch.exp(logits[:, 0]), "depth_conf": 1.0 + torch.exp(logits[:, 1])}
        if rays:
            aux = self.scratch.output_conv1_aux[-1](fuse(self.scratch, levels, "_aux"))
            aux = self.scratch.output_conv2_aux[-1](self.add_pos(aux, image_size)).permute(0, 2, 3, 1)
            out.update(ray=aux[..., :6], ray_conf=1.0 + torch.exp(aux[..., 6]))
        return out

    def forward(self, taps: list[Tensor], image_size: tuple[int, int], patch_start_idx: int = 1,
                rays: bool = False) -> dict[str, Tensor]:
        """taps: 4 tensors [B, S, P, dim_in], patch tokens from `patch_start_idx`, any dtype -> dict of [B, S, ...];
        frames run in chunks of 8 (`frame_map`), each cast to fp32 on its own (1000 frames of taps stay in their
        dtype)."""
        forward_frames = compiled_for(self, type(self).forward_frames)
        return frame_map(lambda chunk: forward_frames(self, [tap[:, patch_start_idx:].float() for tap in chunk],
                                                      image_size, rays), taps, HEAD_CHUNK_FRAMES)


class CameraDec(nn.Module):
    """Camera token [B, S, dim] -> pose encoding [B, S, 9] = [t (3), quaternion xyzw (4), fov_h, fov_w]."""

    def __init__(self, dim: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.fc_t = nn.Linear(dim, 3)
        self.fc_qvec = nn.Linear(dim, 4)
        self.fc_fov = nn.Sequential(nn.Linear(dim, 2), nn.ReLU())

    def forward(self, tokens: Tensor) -> Tensor:
        feat = self.backbone(tokens).float()
        return torch.cat([self.fc_t(feat), self.fc_qvec(feat), self.fc_fov(feat)], dim=-1)


class CameraEnc(nn.Module):
    """Pose encoding [B, S, 9] -> camera tokens [B, S, dim] (pose_branch MLP, token_norm, 4-block trunk, trunk_norm).

    Upstream feeds it the encoding of user-given cameras (camera-to-world) to replace the learned camera token.
    """

    def __init__(self, dim: int, num_heads: int, depth: int):
        super().__init__()
        self.trunk = nn.Sequential(*(Block(dim, num_heads, init_values=0.01, norm_eps=1e-5) for _ in range(depth)))
        self.token_norm = nn.LayerNorm(dim)
        self.trunk_norm = nn.LayerNorm(dim)
        self.pose_branch = Mlp(9, dim // 2, dim)

    def forward(self, pose_enc: Tensor) -> Tensor:
        return self.trunk_norm(self.trunk(self.token_norm(self.pose_branch(pose_enc))))


class GSDPT(nn.Module):
    """The giant's 3D-Gaussian head (kept for strict loading): a DPT trunk without token norm plus `images_merger`.

    forward_frames(feats, images) gives the raw 38-channel Gaussian maps [N, 38, H, W]; turning them into Gaussians
    (upstream's GaussianAdapter) is not ported.
    """

    def __init__(self, dim_in: int, patch_size: int, features: int, out_channels: tuple[int, int, int, int],
                 output_dim: int = 38):
        super().__init__()
        self.patch_size = patch_size
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, channels, kernel_size=1) for channels in out_channels)
        self.resize_layers = make_resize_layers(out_channels)
        self.scratch = make_scratch(out_channels, features)
        for level in (1, 2, 3, 4):
            block = FeatureFusionBlock(features, has_residual=level != 4, relu_skip=False)
            setattr(self.scratch, f"refinenet{level}", block)
        half = features // 2
        self.scratch.output_conv1 = nn.Conv2d(features, half, kernel_size=3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(half, 32, kernel_size=3, padding=1), nn.ReLU(), nn.Conv2d(32, output_dim, kernel_size=1)
        )
        self.images_merger = nn.Sequential(
            nn.Conv2d(3, half // 4, 3, padding=1), nn.GELU(),
            nn.Conv2d(half // 4, half // 2, 3, padding=1), nn.GELU(),
            nn.Conv2d(half // 2, half, 3, padding=1), nn.GELU(),
        )

    def forward_frames(self, feats: list[Tensor], images: Tensor) -> Tensor:
        """feats: 4 tensors [N, Hp * Wp, dim_in], images [N, 3, H, W] (normalised) -> raw maps [N, 38, H, W]."""
        height, width = images.shape[-2:]
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        levels = []
        for index, (project, resize, tokens) in enumerate(zip(self.projects, self.resize_layers, feats), start=1):
            x = project(tokens.permute(0, 2, 1).reshape(tokens.shape[0], -1, grid_h, grid_w))
            x = resize(add_uv_pos_embed(x, width, height, freq_dtype=torch.float32))
            levels.append(getattr(self.scratch, f"layer{index}_rn")(x))
        fused = self.scratch.output_conv1(fuse(self.scratch, levels))
        fused = interpolate(fused, size=(height, width)) + self.images_merger(images)
        return self.scratch.output_conv2(add_uv_pos_embed(fused, width, height, freq_dtype=torch.float32))


class Backbone(nn.Module):
    """Holds the ViT as `pretrained` (upstream's DinoV2 wrapper), so its keys read `backbone.pretrained.*`."""

    def __init__(self, pretrained: DinoVisionTransformer):
        super().__init__()
        self.pretrained = pretrained


class DepthAnything3Net(nn.Module):
    """backbone, head, cam_dec, cam_enc [, gs_head]: the modules of upstream's DepthAnything3Net, in its order."""

    def __init__(self, config: DA3Config):
        super().__init__()
        rope = RotaryPositionEmbedding2D(config.rope_base)
        cross_view = {"qk_norm": True, "rope": rope}
        vit = DinoVisionTransformer(
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mask_token=False,
            camera_token=True,
            init_values=1.0,
            norm_eps=1e-6,
            final_norm_eps=1e-5,
            ffn_layer=config.ffn_layer,
            interpolate_offset=0.1,
            interpolate_antialias=False,
            block_overrides=lambda index: cross_view if index >= config.alt_start else {},
        )
        dim_in = 2 * config.embed_dim
        self.backbone = Backbone(vit)
        self.head = DualDPT(dim_in, config.patch_size, config.features, config.out_channels)
        self.cam_dec = CameraDec(dim_in)
        self.cam_enc = CameraEnc(config.embed_dim, config.cam_enc_heads, config.cam_enc_depth)
        self.gs_head = (
            GSDPT(dim_in, config.patch_size, config.features, config.out_channels) if config.gs_head else None
        )


class DA3(ReconstructionModel):
    """DA3 any-view model; `model` holds the upstream module tree (keys `model.*`).

    The trunk runs one ViT block per step from the first local block paired with a global block (g_0 - 1) on; the
    earlier blocks run in `prepare`. Each tap is stored as [local | norm(global)] (the heads' input), in the compute
    dtype if lean (default True; 1000 frames of giant taps are 32 GB in bf16) or fp32 if not (then bit-exact with
    upstream's fp32 taps); the last tap's raw camera token stays fp32 in extras["camera_token"].
    ref_view_strategy: "saddle_balanced" (upstream's default) or "first" (keep frame 0 as the reference).
    compute_dtype: the backbone runs under autocast to this dtype (fp32: none of its own); heads run fp32, autocast off
    (the DualDPT in `decode`'s head dtype if given another).
    """

    def __init__(self, config: DA3Config, ref_view_strategy: str = "saddle_balanced", lean: bool = True,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if ref_view_strategy not in REF_VIEW_STRATEGIES:
            raise Spark3rError(
                f"ref_view_strategy {ref_view_strategy!r} is unknown: use one of {', '.join(REF_VIEW_STRATEGIES)}"
            )
        self.config = config
        self.ref_view_strategy = ref_view_strategy
        self.lean = lean
        self.compute_dtype = compute_dtype
        self.first_step_block = config.global_blocks[0] - 1
        self.model = DepthAnything3Net(config)
        self.adapter = Adapter(
            model_name=config.name,
            global_attention=[f"model.backbone.pretrained.blocks.{g}.attn" for g in config.global_blocks],
            n_special=1,
            patch_size=config.patch_size,
            rope_in_global=True,
        )

    @property
    def vit(self) -> DinoVisionTransformer:
        return self.model.backbone.pretrained

    @property
    def num_steps(self) -> int:
        return self.config.depth - self.first_step_block

    @property
    def global_layer_steps(self) -> list[int]:
        return [block - self.first_step_block for block in self.config.global_blocks]

    def prepare(self, images: Tensor) -> TrunkState:
        """Normalise, embed, run the blocks before the first pair and reorder views: tokens [B, S, 1 + Hp * Wp, C]
        fp32 in reference-first order; extras: pos / pos_global [P, 2] (local and global RoPE positions), order
        [B, S] (the frame order, or None), grid (Hp, Wp)."""
        config = self.config
        images = check_images(images, config.patch_size)
        batch, frames, _, height, width = images.shape
        grid = (height // config.patch_size, width // config.patch_size)
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
        order = None
        with compute_autocast(images.device.type, self.compute_dtype):
            x = self.vit.prepare_tokens(((images - mean) / std).flatten(0, 1)).unflatten(0, (batch, frames))
            for index in range(self.first_step_block + 1):
                if index == config.alt_start - 1 and frames >= MIN_VIEWS_FOR_REFERENCE \
                        and self.ref_view_strategy != "first":
                    order = reference_order(select_reference_view(x[:, :, 0], self.ref_view_strategy), frames)
                    x = gather_frames(x, order)
                if index < self.first_step_block:
                    x = self.vit.blocks[index](x.flatten(0, 1)).unflatten(0, (batch, frames))
        pos = patch_positions(*grid, 1, images.device)
        pos_global = torch.ones_like(pos)
        pos_global[0] = 0
        extras = {"pos": pos, "pos_global": pos_global, "order": order, "grid": grid}
        return TrunkState(tokens=x.float(), extras=extras)

    def insert_camera_token(self, x: Tensor) -> Tensor:
        """x [B, S, P, C] with token 0 replaced: frame 0 by camera_token[:, 0], the others by camera_token[:, 1]."""
        batch, frames = x.shape[:2]
        camera = self.vit.camera_token
        tokens = torch.cat([camera[:, :1].expand(batch, 1, -1), camera[:, 1:].expand(batch, frames - 1, -1)], dim=1)
        return torch.cat([tokens[:, :, None].to(x.dtype), x[:, :, 1:]], dim=2)

    def run_steps(self, state: TrunkState, stop: int | None = None) -> TrunkState:
        """Run steps state.step .. stop - 1 (default: to the end) and return a new state; `state` is left as it is."""
        config = self.config
        stop = self.check_steps(state, stop)
        state = state.copy()
        x = state.tokens
        batch, frames, per_frame, width = x.shape
        local_pos = state.extras["pos"][None]
        global_pos = state.extras["pos_global"][None]  # one frame's positions: RoPE repeats them over the frames
        restore = None if state.extras["order"] is None else torch.argsort(state.extras["order"], dim=1)
        tap_chunk = frame_chunk(batch, frames, per_frame)
        with compute_autocast(x.device.type, self.compute_dtype):
            tap_dtype = active_compute_dtype(x.device.type, x.dtype) if self.lean else x.dtype
            for step in range(state.step, stop):
                index = self.first_step_block + step
                block = self.vit.blocks[index]
                if index == config.alt_start:
                    x = self.insert_camera_token(x)
                if index in config.global_blocks:
                    out = block(x.reshape(batch, frames * per_frame, width), pos=global_pos)
                else:
                    rope_pos = local_pos if index >= config.alt_start else None
                    out = block(x.reshape(batch * frames, per_frame, width), pos=rope_pos)
                out = out.view(batch, frames, per_frame, width)
                if index in config.out_layers:
                    state.taps[index] = pair_tap(x, out, tap_dtype, self.vit.norm, restore, tap_chunk)
                    if index == config.out_layers[-1]:
                        camera = torch.cat([x[:, :, 0], out[:, :, 0]], dim=-1).float()
                        state.extras["camera_token"] = camera if restore is None else gather_frames(camera, restore)
                x = out
        state.tokens, state.step = x, stop
        return state

    def decode(self, state: TrunkState, images: Tensor, head_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Taps -> DualDPT depth and cam_dec cameras, fp32 with autocast off as upstream (see the module docstring);
        the DualDPT under autocast to `head_dtype` if it is not fp32 (outputs cast to fp32)."""
        self.check_finished(state)
        grid_h, grid_w = state.extras["grid"]
        image_size = (grid_h * self.config.patch_size, grid_w * self.config.patch_size)
        taps = [state.taps[layer] for layer in self.config.out_layers]
        with head_autocast(taps[0].device.type, head_dtype):
            out = {key: value.float() for key, value in self.model.head(taps, image_size).items()}
        with no_autocast(taps[0].device.type):
            pose_enc = self.model.cam_dec(state.extras["camera_token"])
            cam_to_world, intrinsics = pose_encoding_to_camera(pose_enc, image_size, min_tan=1e-6)
            out.update(
                extrinsics=se3_inverse(cam_to_world)[..., :3, :],
                intrinsics=intrinsics,
                pose_enc=pose_enc,
                points=unproject_pixel_indices(out["depth"], intrinsics, cam_to_world),
                points_conf=out["depth_conf"],
            )
        return out

    def flop_config(self, height: int, width: int) -> FlopConfig:
        """FLOP-model numbers at an H x W input: the ViT blocks as BlockGroups (local and global); everything else
        (patch conv, DualDPT main branch, cam_dec) counted per frame on the meta device (`non_block_flops`)."""
        config = self.config
        check_images(torch.empty(1, 3, height, width, device="meta"), config.patch_size)
        grid = (height // config.patch_size, width // config.patch_size)
        tokens = 1 + grid[0] * grid[1]
        swiglu = config.ffn_layer == "swiglu"
        hidden = swiglu_hidden(4 * config.embed_dim) if swiglu else 4 * config.embed_dim
        matrices = 3 if swiglu else 2
        count = len(config.global_blocks)
        groups = (
            BlockGroup("blocks (local)", config.depth - count, config.embed_dim, hidden, "frame", tokens, matrices),
            BlockGroup("blocks (global)", count, config.embed_dim, hidden, "global", tokens, matrices),
        )
        other = non_block_flops(DA3, config, height, width, DA3_BLOCKS)
        return FlopConfig(1, tokens, groups, other, patch_grid=grid)


DA3_BLOCKS = re.compile(r"DA3\.model\.backbone\.pretrained\.blocks\.\d+")

for _config in CONFIGS.values():
    register(ModelEntry(
        name=_config.name, family="da3", builder=lambda config=_config: DA3(config), image_width=_config.default_size[1],
        preprocess="da3", hf_repo=_config.hf_repo, hf_files=("model.safetensors",) if _config.hf_repo else (),
        aliases=("da3",) if _config.name == "da3-giant" else (),
        description=f"Depth-Anything-3 any-view {_config.name.removeprefix('da3-')} "
                    f"(ViT {_config.embed_dim} x {_config.depth}, {len(_config.global_blocks)} global layers)",
    ))
