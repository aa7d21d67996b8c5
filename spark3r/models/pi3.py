"""pi3 (yyfz/Pi3): a DINOv2 encoder, a 36-block alternating decoder (odd blocks global) and three per-frame heads.

Keys and shapes equal `Pi3()`'s state_dict (tests/manifests/pi3.tsv), so the official
`model.safetensors` loads strictly.
Input: images [B, S, 3, H, W] (or [S, 3, H, W]) in [0, 1], H and W multiples of 14; ImageNet normalisation happens
inside, with the checkpoint's persistent `image_mean` / `image_std` buffers.

The trunk runs as 36 steps, one decoder block each: even blocks attend within a frame, odd blocks over all S * P tokens
of a scene (the 18 global layers). The heads read [frame block 34 | global block 35] of every token (the one tap).

Outputs (the common dict of `ReconstructionModel`, plus pi3's own):
  local_points [B, S, H, W, 3] camera-frame points; depth = their z;
  conf [B, S, H, W] logits; depth_conf = points_conf = sigmoid(conf) (as upstream's examples threshold it);
  camera_poses [B, S, 4, 4] camera-to-world (OpenCV); extrinsics = its inverse, [B, S, 3, 4] world-to-camera;
  points [B, S, H, W, 3] = camera_poses applied to local_points (pi3's world frame, no reference frame);
  intrinsics [B, S, 3, 3]: pi3 predicts none, so each frame's focal lengths are fitted to its local points by least
    squares with the principal point fixed at the image centre ((W - 1) / 2, (H - 1) / 2) in pixel-index coordinates,
    as upstream's `recover_intrinsic_from_rays_d(..., force_center_principal_point=True)` does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
    RotaryPositionEmbedding2D,
    active_compute_dtype,
    compute_autocast,
    frame_map,
    head_autocast,
    no_autocast,
    patch_positions,
)
from spark3r.models.dinov2 import DinoVisionTransformer
from spark3r.models.geometry import se3_inverse
from spark3r.models.inputs import IMAGENET_MEAN, IMAGENET_STD, check_images
from spark3r.models.registry import ModelEntry, register

HEAD_CHUNK_FRAMES = 32


@dataclass(frozen=True)
class Pi3Config:
    """One pi3 size. The released model is `pi3`; `pi3-tiny` is a random-weights toy for tests."""

    name: str
    embed_dim: int = 1024
    encoder_depth: int = 24
    encoder_heads: int = 16
    decoder_depth: int = 36
    decoder_heads: int = 16
    num_register_tokens: int = 5
    head_dim: int = 1024
    head_heads: int = 16
    head_depth: int = 5
    camera_dim: int = 512
    patch_size: int = 14
    img_size: int = 518
    rope_base: float = 100.0
    default_size: tuple[int, int] = (504, 504)


CONFIGS = {
    "pi3": Pi3Config("pi3"),
    "pi3-tiny": Pi3Config(
        "pi3-tiny",
        embed_dim=64,
        encoder_depth=2,
        encoder_heads=2,
        decoder_depth=4,
        decoder_heads=2,
        head_dim=64,
        head_heads=2,
        head_depth=1,
        camera_dim=32,
        img_size=56,
        default_size=(42, 56),
    ),
}


def centred_focal_lengths(local_points: Tensor) -> Tensor:
    """Least-squares focal lengths of camera-frame points [..., H, W, 3] -> intrinsics [..., 3, 3].

    With the principal point fixed at ((W - 1) / 2, (H - 1) / 2), fx minimises sum (u - cx - fx * x / z)^2 over the
    pixel grid u = 0..W-1 (fy likewise), i.e. fx = sum(x/z * (u - cx)) / sum((x/z)^2).
    """
    height, width = local_points.shape[-3:-1]
    z = local_points[..., 2].abs() + 1e-10
    x_over_z = local_points[..., 0] / z
    y_over_z = local_points[..., 1] / z
    centre_x, centre_y = (width - 1) / 2.0, (height - 1) / 2.0
    u = torch.arange(width, device=local_points.device, dtype=local_points.dtype) - centre_x
    v = torch.arange(height, device=local_points.device, dtype=local_points.dtype)[:, None] - centre_y
    fx = (x_over_z * u).sum(dim=(-2, -1)) / (x_over_z * x_over_z).sum(dim=(-2, -1))
    fy = (y_over_z * v).sum(dim=(-2, -1)) / (y_over_z * y_over_z).sum(dim=(-2, -1))
    intrinsics = torch.zeros(*fx.shape, 3, 3, device=local_points.device, dtype=local_points.dtype)
    intrinsics[..., 0, 0] = fx
    intrinsics[..., 1, 1] = fy
    intrinsics[..., 0, 2] = centre_x
    intrinsics[..., 1, 2] = centre_y
    intrinsics[..., 2, 2] = 1.0
    return intrinsics


class TransformerDecoder(nn.Module):
    """projects (Linear in -> C) -> blocks (RoPE, no LayerScale, no qk-norm) -> linear_out. [N, P, in] -> [N, P, out]."""

    def __init__(self, in_dim: int, dim: int, out_dim: int, depth: int, num_heads: int, rope: nn.Module):
        super().__init__()
        self.projects = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads, norm_eps=1e-6, rope=rope) for _ in range(depth))
        self.linear_out = nn.Linear(dim, out_dim)

    def forward(self, hidden: Tensor, pos: Tensor) -> Tensor:
        hidden = self.projects(hidden)
        for block in self.blocks:
            hidden = block(hidden, pos=pos)
        return self.linear_out(hidden)


class LinearPts3d(nn.Module):
    """One linear map per patch token to its patch's pixels: [N, Hp * Wp, C] -> [N, H, W, out] (pixel shuffle)."""

    def __init__(self, patch_size: int, dim: int, output_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(dim, output_dim * patch_size**2)

    def forward(self, tokens: Tensor, grid_h: int, grid_w: int) -> Tensor:
        feat = self.proj(tokens).transpose(-1, -2).reshape(tokens.shape[0], -1, grid_h, grid_w)
        return F.pixel_shuffle(feat, self.patch_size).permute(0, 2, 3, 1)


class ResConvBlock(nn.Module):
    """x + relu(res_conv3(relu(res_conv2(relu(res_conv1(x)))))) with Linear layers (upstream's 1x1 "convs")."""

    def __init__(self, dim: int):
        super().__init__()
        self.res_conv1 = nn.Linear(dim, dim)
        self.res_conv2 = nn.Linear(dim, dim)
        self.res_conv3 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.relu(self.res_conv3(F.relu(self.res_conv2(F.relu(self.res_conv1(x))))))


def svd_orthogonalize(matrix: Tensor) -> Tensor:
    """Nearest rotation to each 3x3 in [N, 9] (rows L2-normalised first, reflection fixed) -> [N, 3, 3]."""
    m_t = F.normalize(matrix.reshape(-1, 3, 3), p=2, dim=-1).transpose(-1, -2)
    u, _, v_h = torch.linalg.svd(m_t)
    v = v_h.transpose(-1, -2)
    det = torch.det(v @ u.transpose(-1, -2))
    return torch.cat([v[:, :, :-1], v[:, :, -1:] * det.view(-1, 1, 1)], dim=2) @ u.transpose(-1, -2)


class CameraHead(nn.Module):
    """Patch tokens [N, Hp * Wp, C] -> camera-to-world poses [N, 4, 4]: res convs, average pool, MLP, t and SVD rotation."""

    def __init__(self, dim: int):
        super().__init__()
        self.res_conv = nn.ModuleList(ResConvBlock(dim) for _ in range(2))
        self.more_mlps = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.fc_t = nn.Linear(dim, 3)
        self.fc_rot = nn.Linear(dim, 9)

    def forward(self, tokens: Tensor) -> Tensor:
        for block in self.res_conv:
            tokens = block(tokens)
        feat = self.more_mlps(tokens.mean(dim=1))
        pose = torch.zeros(feat.shape[0], 4, 4, device=feat.device, dtype=feat.dtype)
        pose[:, :3, :3] = svd_orthogonalize(self.fc_rot(feat))
        pose[:, :3, 3] = self.fc_t(feat)
        pose[:, 3, 3] = 1.0
        return pose


class Pi3(ReconstructionModel):
    """pi3 with the official module names (`encoder`, `decoder.{i}`, `register_token`, heads).

    The trunk runs as 36 steps, step i = decoder block i (even: per frame, odd: global over all S * P tokens of a
    scene). lean (default True): the one tap [frame 34 | global 35] is stored in the compute dtype, which loses
    nothing, since its only readers are the head decoders' input projections running under the same autocast; lean
    False keeps it fp32. compute_dtype: the encoder, trunk and head transformers run under autocast to this dtype
    (fp32: no autocast of their own); the pixel heads run fp32 with autocast off unless `decode` is given another
    head dtype; the camera head always runs fp32 with autocast off.
    """

    def __init__(self, config: Pi3Config, lean: bool = True, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.lean = lean
        self.compute_dtype = compute_dtype
        dim = config.embed_dim
        self.register_token = nn.Parameter(torch.empty(1, 1, config.num_register_tokens, dim))
        self.register_buffer("image_mean", torch.empty(1, 3, 1, 1))
        self.register_buffer("image_std", torch.empty(1, 3, 1, 1))
        self.encoder = DinoVisionTransformer(
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_heads,
            num_register_tokens=4,
            mask_token=False,
            init_values=1.0,
        )
        rope = RotaryPositionEmbedding2D(config.rope_base)
        self.decoder = nn.ModuleList(
            Block(dim, config.decoder_heads, init_values=0.01, norm_eps=1e-6, qk_norm=True, rope=rope,
                  qk_to_v_dtype=True)
            for _ in range(config.decoder_depth)
        )
        head = dict(dim=config.head_dim, depth=config.head_depth, num_heads=config.head_heads, rope=rope)
        self.point_decoder = TransformerDecoder(2 * dim, out_dim=config.head_dim, **head)
        self.point_head = LinearPts3d(config.patch_size, config.head_dim, 3)
        self.conf_decoder = TransformerDecoder(2 * dim, out_dim=config.head_dim, **head)
        self.conf_head = LinearPts3d(config.patch_size, config.head_dim, 1)
        self.camera_decoder = TransformerDecoder(2 * dim, out_dim=config.camera_dim, **head)
        self.camera_head = CameraHead(config.camera_dim)
        self.reset_parameters()
        self.adapter = Adapter(
            model_name=config.name,
            global_attention=[f"decoder.{i}.attn" for i in self.global_layer_steps],
            n_special=config.num_register_tokens,
            patch_size=config.patch_size,
        )

    def reset_parameters(self) -> None:
        """Upstream init of the model's own tensors (the ImageNet buffers are also in the checkpoint)."""
        nn.init.normal_(self.register_token, std=1e-6)
        self.image_mean.copy_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.image_std.copy_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    @property
    def num_steps(self) -> int:
        return self.config.decoder_depth

    @property
    def global_layer_steps(self) -> list[int]:
        return list(range(1, self.config.decoder_depth, 2))

    def prepare(self, images: Tensor) -> TrunkState:
        """Normalise, encode, add the registers: tokens [B, S, 5 + Hp * Wp, C] fp32; extras pos [P, 2], grid."""
        config = self.config
        images = check_images(images, config.patch_size)
        batch, frames, _, height, width = images.shape
        grid = (height // config.patch_size, width // config.patch_size)
        with compute_autocast(images.device.type, self.compute_dtype):
            normed = (images - self.image_mean) / self.image_std
            patches = self.encoder(normed.flatten(0, 1)).unflatten(0, (batch, frames))
        registers = self.register_token.expand(batch, frames, -1, -1)
        tokens = torch.cat([registers.to(patches.dtype), patches], dim=2).float()
        pos = patch_positions(*grid, config.num_register_tokens, images.device)
        return TrunkState(tokens=tokens, extras={"pos": pos, "grid": grid})

    def run_steps(self, state: TrunkState, stop: int | None = None) -> TrunkState:
        """Run steps state.step .. stop - 1 (default: to the end) and return a new state; `state` is left as it is."""
        stop = self.check_steps(state, stop)
        state = state.copy()
        tokens = state.tokens
        batch, frames, per_frame, width = tokens.shape
        pos = state.extras["pos"]
        pos = pos[None]  # one frame's positions: in a global layer RoPE repeats them over the frames
        with compute_autocast(tokens.device.type, self.compute_dtype):
            tap_dtype = active_compute_dtype(tokens.device.type, tokens.dtype) if self.lean else tokens.dtype
            for step in range(state.step, stop):
                if step % 2 == 0:
                    out = self.decoder[step](tokens.reshape(batch * frames, per_frame, width), pos=pos)
                else:
                    out = self.decoder[step](tokens.reshape(batch, frames * per_frame, width), pos=pos)
                out = out.view(batch, frames, per_frame, width)
                if step == self.num_steps - 1:
                    state.taps[step] = pair_tap(tokens, out, tap_dtype)
                tokens = out
        state.tokens, state.step = tokens, stop
        return state

    def decode_frames(self, hidden: Tensor, pos: Tensor, grid: tuple[int, int],
                      head_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Heads on the tap of N frames [N, P, 2C] -> local points [N, H, W, 3], conf logits [N, H, W], c2w [N, 4, 4],
        fp32; the pixel heads run under `head_autocast(head_dtype)`, the camera head in fp32."""
        start = self.config.num_register_tokens
        with compute_autocast(hidden.device.type, self.compute_dtype):
            point_hidden = self.point_decoder(hidden, pos)
            conf_hidden = self.conf_decoder(hidden, pos)
            camera_hidden = self.camera_decoder(hidden, pos)
        with head_autocast(hidden.device.type, head_dtype):
            xy, z = self.point_head(point_hidden[:, start:].float(), *grid).split([2, 1], dim=-1)
            z = torch.exp(z)
            local_points = torch.cat([xy * z, z], dim=-1).float()
            conf = self.conf_head(conf_hidden[:, start:].float(), *grid)[..., 0].float()
        with no_autocast(hidden.device.type):
            return {"local_points": local_points, "conf": conf,
                    "camera_poses": self.camera_head(camera_hidden[:, start:].float())}

    def decode(self, state: TrunkState, images: Tensor, head_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The heads over chunks of frames of the last tap [B, S, P, 2C] -> the output dict (module docstring); the
        pixel heads in `head_dtype` (`decode_frames`), the points and cameras assembled in fp32."""
        self.check_finished(state)
        hidden = state.taps[self.num_steps - 1]
        pos = state.extras["pos"][None]
        out = frame_map(lambda chunk: self.decode_frames(chunk[0], pos, state.extras["grid"], head_dtype), [hidden],
                        HEAD_CHUNK_FRAMES)
        local_points, camera_poses = out["local_points"], out["camera_poses"]
        with no_autocast(hidden.device.type):
            points = torch.einsum("bsij,bshwj->bshwi", camera_poses[..., :3, :3], local_points)
            points = points + camera_poses[:, :, None, None, :3, 3]
            confidence = torch.sigmoid(out["conf"])
            out.update(
                depth=local_points[..., 2],
                depth_conf=confidence,
                points=points,
                points_conf=confidence,
                extrinsics=se3_inverse(camera_poses)[..., :3, :],
                intrinsics=centred_focal_lengths(local_points),
            )
        return out

    def flop_config(self, height: int, width: int) -> FlopConfig:
        """FLOP-model numbers at an H x W input: block lists as BlockGroups; everything else (patch conv, head
        projections, pixel heads, camera head) counted per frame on the meta device (`non_block_flops`)."""
        config = self.config
        check_images(torch.empty(1, 3, height, width, device="meta"), config.patch_size)
        grid = (height // config.patch_size, width // config.patch_size)
        patches = grid[0] * grid[1]
        tokens = config.num_register_tokens + patches
        dim, head = config.embed_dim, config.head_dim
        groups = (
            BlockGroup("encoder.blocks", config.encoder_depth, dim, 4 * dim, "frame", 1 + 4 + patches),
            BlockGroup("decoder (frame)", config.decoder_depth // 2, dim, 4 * dim, "frame", tokens),
            BlockGroup("decoder (global)", config.decoder_depth // 2, dim, 4 * dim, "global", tokens),
            BlockGroup("point/conf/camera_decoder.blocks", 3 * config.head_depth, head, 4 * head, "frame", tokens),
        )
        other = non_block_flops(Pi3, config, height, width, PI3_BLOCKS)
        return FlopConfig(config.num_register_tokens, tokens, groups, other, patch_grid=grid)


PI3_BLOCKS = re.compile(r"Pi3\.(encoder\.blocks|decoder|(point|conf|camera)_decoder\.blocks)\.\d+")


register(ModelEntry(
    name="pi3", family="pi3", builder=lambda: Pi3(CONFIGS["pi3"]), image_width=504, preprocess="pi3",
    hf_repo="yyfz233/Pi3", hf_files=("model.safetensors",),
    description="pi3 (yyfz/Pi3): DINOv2-L encoder, 36-block alternating decoder, point/conf/camera heads",
))
register(ModelEntry(
    name="pi3-tiny", family="pi3", builder=lambda: Pi3(CONFIGS["pi3-tiny"]), image_width=56, preprocess="pi3",
    description="toy pi3 (width 64, 2 encoder + 4 decoder blocks) for CPU tests",
))
