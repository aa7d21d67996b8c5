"""pi3 (yyfz/Pi3): a DINOv2 encoder, a 36-block alternating decoder (odd blocks global) and three per-frame heads.

Keys and shapes equal `Pi3()`'s state_dict (spec/state_dict/pi3.tsv), so the official `model.safetensors` loads strictly.
Input: images [B, S, 3, H, W] (or [S, 3, H, W]) in [0, 1], H and W multiples of 14; ImageNet normalisation happens
inside, with the checkpoint's persistent `image_mean` / `image_std` buffers.

The trunk runs as 18 steps; step k runs frame block `decoder.{2k}` then global block `decoder.{2k+1}`. The heads read
[frame block 34 | global block 35] of every token (the tap of the last step).

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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spark3r.errors import Spark3rError
from spark3r.models.base import Adapter, BlockGroup, FlopConfig, ReconstructionModel, TrunkState
from spark3r.models.blocks import Block, RotaryPositionEmbedding2D, patch_positions
from spark3r.models.dinov2 import DinoVisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def images_5d(images: Tensor, patch_size: int) -> Tensor:
    """Check `images` and return them as [B, S, 3, H, W]; a Spark3rError names what is wrong."""
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise Spark3rError("images must be a floating-point tensor in [0, 1]: convert them with .float() / 255")
    if images.dim() == 4:
        images = images[None]
    if images.dim() != 5 or images.shape[2] != 3:
        raise Spark3rError(
            f"images must have shape [S, 3, H, W] or [B, S, 3, H, W], got {tuple(images.shape)}: stack RGB frames"
        )
    height, width = images.shape[-2:]
    if height < patch_size or width < patch_size or height % patch_size or width % patch_size:
        raise Spark3rError(
            f"image size {height}x{width} is not a multiple of the patch size {patch_size}: "
            f"resize or crop to multiples of {patch_size} (the model's preprocess recipe does this)"
        )
    return images


def se3_inverse(pose: Tensor) -> Tensor:
    """Inverse of rigid transforms [..., 4, 4] (or [..., 3, 4]) -> [..., 4, 4]."""
    rotation_t = pose[..., :3, :3].transpose(-1, -2)
    translation = -(rotation_t @ pose[..., :3, 3:])
    bottom = torch.zeros_like(pose[..., :1, :4])
    bottom[..., 0, 3] = 1.0
    return torch.cat([torch.cat([rotation_t, translation], dim=-1), bottom], dim=-2)


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
    """pi3 with the official module names (`encoder`, `decoder.{i}`, `register_token`, heads)."""

    def __init__(self, config: Pi3Config):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.register_token = nn.Parameter(torch.empty(1, 1, config.num_register_tokens, dim))
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
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
            Block(
                dim,
                config.decoder_heads,
                init_values=0.01,
                norm_eps=1e-6,
                qk_norm=True,
                rope=rope,
                qk_to_v_dtype=True,
            )
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
            global_attention=[f"decoder.{index}.attn" for index in range(1, config.decoder_depth, 2)],
            n_special=config.num_register_tokens,
            patch_size=config.patch_size,
            rope_in_global=True,
        )

    def reset_parameters(self) -> None:
        """Upstream init of the model's own tensors (the ImageNet buffers are also in the checkpoint)."""
        nn.init.normal_(self.register_token, std=1e-6)
        self.image_mean.copy_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.image_std.copy_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    @property
    def num_steps(self) -> int:
        return self.config.decoder_depth // 2

    @property
    def global_layer_steps(self) -> list[int]:
        return list(range(self.num_steps))

    def prepare(self, images: Tensor) -> TrunkState:
        """images [B, S, 3, H, W] in [0, 1] -> the state entering step 0: tokens [B, S, 5 + Hp * Wp, C] fp32."""
        images = images_5d(images, self.config.patch_size)
        batch, frames, _, height, width = images.shape
        grid_h, grid_w = height // self.config.patch_size, width // self.config.patch_size
        normed = (images - self.image_mean) / self.image_std
        patches = self.encoder(normed.reshape(batch * frames, 3, height, width))
        registers = self.register_token.expand(batch, frames, -1, -1)
        tokens = torch.cat([registers, patches.reshape(batch, frames, grid_h * grid_w, -1)], dim=2).float()
        pos = patch_positions(grid_h, grid_w, self.config.num_register_tokens, device=images.device)
        return TrunkState(tokens=tokens, extras={"pos": pos, "grid": (grid_h, grid_w)})

    def run_steps(self, state: TrunkState, stop: int | None = None) -> TrunkState:
        """Run steps state.step .. stop - 1 (default: to the end); each is a frame block then a global block."""
        stop = self.num_steps if stop is None else stop
        state = state.copy()
        batch, frames, tokens_per_frame, dim = state.tokens.shape
        pos = state.extras["pos"]
        frame_pos, global_pos = pos[None], pos.repeat(frames, 1)[None]
        tokens = state.tokens
        for step in range(state.step, stop):
            frame_out = self.decoder[2 * step](tokens.reshape(batch * frames, tokens_per_frame, dim), pos=frame_pos)
            global_out = self.decoder[2 * step + 1](frame_out.reshape(batch, -1, dim), pos=global_pos)
            tokens = global_out.reshape(batch, frames, tokens_per_frame, dim)
            if step == self.num_steps - 1:
                state.taps[step] = torch.cat([frame_out.reshape_as(tokens), tokens], dim=-1)
        state.tokens, state.step = tokens, max(state.step, stop)
        return state

    def decode(self, state: TrunkState, images: Tensor) -> dict[str, Tensor]:
        """The heads on the last tap [B, S, P, 2C] -> the output dict (see the module docstring)."""
        if state.step != self.num_steps:
            raise Spark3rError(f"decode needs the trunk run to the end (step {self.num_steps}), got step {state.step}")
        hidden = state.taps[self.num_steps - 1]
        batch, frames, tokens_per_frame, width = hidden.shape
        grid_h, grid_w = state.extras["grid"]
        height, width_px = grid_h * self.config.patch_size, grid_w * self.config.patch_size
        hidden = hidden.reshape(batch * frames, tokens_per_frame, width)
        pos = state.extras["pos"][None]
        start = self.config.num_register_tokens
        point_hidden = self.point_decoder(hidden, pos)
        conf_hidden = self.conf_decoder(hidden, pos)
        camera_hidden = self.camera_decoder(hidden, pos)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            raw = self.point_head(point_hidden[:, start:].float(), grid_h, grid_w)
            raw = raw.reshape(batch, frames, height, width_px, 3)
            xy, z = raw.split([2, 1], dim=-1)
            z = torch.exp(z)
            local_points = torch.cat([xy * z, z], dim=-1)
            conf = self.conf_head(conf_hidden[:, start:].float(), grid_h, grid_w)
            conf = conf.reshape(batch, frames, height, width_px)
            camera_poses = self.camera_head(camera_hidden[:, start:].float()).reshape(batch, frames, 4, 4)
            points = torch.einsum("bsij,bshwj->bshwi", camera_poses[..., :3, :3], local_points)
            points = points + camera_poses[:, :, None, None, :3, 3]
            confidence = torch.sigmoid(conf)
            return {
                "depth": local_points[..., 2],
                "depth_conf": confidence,
                "points": points,
                "points_conf": confidence,
                "extrinsics": se3_inverse(camera_poses)[..., :3, :],
                "intrinsics": centred_focal_lengths(local_points),
                "local_points": local_points,
                "conf": conf,
                "camera_poses": camera_poses,
            }

    def flop_config(self, height: int, width: int) -> FlopConfig:
        """Block lists and the dense non-block cost per frame for H x W input (multiply-adds count 2)."""
        c, p = self.config, self.config.patch_size
        patches = (height // p) * (width // p)
        tokens = c.num_register_tokens + patches
        dim, head = c.embed_dim, c.head_dim
        groups = (
            BlockGroup("encoder", c.encoder_depth, dim, 4 * dim, "frame", 1 + 4 + patches),
            BlockGroup("frame", c.decoder_depth // 2, dim, 4 * dim, "frame", tokens),
            BlockGroup("global", c.decoder_depth // 2, dim, 4 * dim, "global", tokens),
            BlockGroup("heads", 3 * c.head_depth, head, 4 * head, "frame", tokens),
        )
        other = 2 * patches * 3 * p * p * dim  # patch embedding
        other += 2 * tokens * (3 * 2 * dim * head + head * (2 * head + c.camera_dim))  # head projections in / out
        other += 2 * patches * head * 4 * p * p  # point and conf pixel heads
        other += 2 * patches * 6 * c.camera_dim**2  # camera head residual convs
        return FlopConfig(c.num_register_tokens, tokens, groups, float(other))


def build_pi3(name: str = "pi3") -> Pi3:
    """A pi3 model of config `name` with random weights."""
    if name not in CONFIGS:
        raise Spark3rError(f"unknown pi3 config {name!r}: use one of {', '.join(CONFIGS)}")
    return Pi3(CONFIGS[name])
