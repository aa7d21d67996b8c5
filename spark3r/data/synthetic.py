"""Procedural indoor scenes with exact ground truth, rendered by ray casting in torch (CPU or GPU, batched).

A scene is an axis-aligned room (6 planes) holding boxes (turned about the vertical axis), spheres and optional thin
panels. Every surface carries its own texture defined in world coordinates (a sharpened sum of 3-D sinusoids mixing two
colours) and Lambertian shading from one fixed light, so every view sees the same surface pattern. Every object keeps a
clearance from the whole camera path. Two camera paths (`SceneConfig.path`):
- "arc" (default): a smooth arc around a point near the room centre, looking across the room, 3-9 degrees of yaw per
  frame; made for short clips (at 256 frames it spins in place several times);
- "walk": a hand-held walk for long clips: the camera walks a smooth closed loop through the room at a few centimetres
  per frame, looking ahead and somewhat inwards with a slow head swing (a few degrees per frame), so 256 frames move
  through the scene and longer clips revisit it.
Both have slight pitch and no roll. `SceneConfig(shuffle=True)` gives unordered views.

Conventions (shared with `spark3r.data.clip`):
- world: y points down (gravity), the room is centred on the origin, the floor is the plane y = +room_half[1];
- camera: OpenCV (x right, y down, z forward); extrinsics [S, 3, 4] world-to-camera [R | t] (x_cam = R x_world + t),
  as VGGT; intrinsics [S, 3, 3] without skew;
- image coordinates: the centre of pixel (row i, column j) is at (x, y) = (j + 0.5, i + 0.5);
- depth is z-depth (distance along the camera's z axis).

Everything a clip needs is drawn from one CPU `torch.Generator` seeded with the clip's seed, so the same seed gives the
same clip on CPU (and the same scene on any device).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

from spark3r.data.clip import Clip
from spark3r.errors import Spark3rError

WALLS = 6
MAX_RAYS_PER_CALL = 1 << 23
PANEL_HALF_THICKNESS = 0.02
_EPS = 1e-4
CAMERA_PATHS = ("arc", "walk")
WALL_MARGIN = 0.6


@dataclass(frozen=True)
class SceneConfig:
    """What the scene and camera-path sampler draws from (lengths in metres, angles in degrees)."""

    boxes: int = 6
    spheres: int = 4
    panels: int = 0
    room_half_width: tuple[float, float] = (3.0, 5.0)
    room_height: tuple[float, float] = (2.8, 4.0)
    path_radius: tuple[float, float] = (0.5, 1.2)
    clearance: float = 0.4
    yaw_per_frame: tuple[float, float] = (3.0, 9.0)
    max_pitch: float = 6.0
    fov: tuple[float, float] = (50.0, 70.0)
    texture_waves: int = 3
    shuffle: bool = False
    path: str = "arc"
    walk_step: tuple[float, float] = (0.02, 0.06)
    walk_swing: tuple[float, float] = (5.0, 25.0)

    def __post_init__(self):
        for name in ("boxes", "spheres", "panels"):
            if getattr(self, name) < 0:
                raise Spark3rError(f"SceneConfig.{name} is {getattr(self, name)}: give a count >= 0")
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, tuple) and not (len(value) == 2 and 0 <= value[0] <= value[1]):
                raise Spark3rError(f"SceneConfig.{item.name} is {value}: "
                                   "give a range (low, high) with 0 <= low <= high")
        if self.path not in CAMERA_PATHS:
            raise Spark3rError(f"SceneConfig.path is {self.path!r}: give one of {', '.join(CAMERA_PATHS)}")
        if self.clearance < 0:
            raise Spark3rError(f"SceneConfig.clearance is {self.clearance}: give a distance >= 0 in metres")
        if not 0 <= self.max_pitch < 45:
            raise Spark3rError(f"SceneConfig.max_pitch is {self.max_pitch}: give an angle in [0, 45) degrees")
        if self.texture_waves < 1:
            raise Spark3rError(f"SceneConfig.texture_waves is {self.texture_waves}: give at least 1")
        if not (0 < self.fov[0] and self.fov[1] < 170):
            raise Spark3rError(f"SceneConfig.fov is {self.fov}: "
                               "give a horizontal field of view within (0, 170) degrees")
        if self.room_half_width[0] < self.path_radius[1] * 1.15 + self.clearance + 1.0:
            raise Spark3rError("SceneConfig.room_half_width is too small for path_radius and clearance: "
                               "keep room_half_width[0] >= 1.15 * path_radius[1] + clearance + 1")

    @property
    def surfaces(self) -> int:
        return WALLS + self.boxes + self.panels + self.spheres


@dataclass
class Scene:
    """A batch of B scenes as tensors; surfaces are numbered walls (0-5), boxes then panels, then spheres.

    room_half [B, 3]; box_center / box_half [B, NB, 3], box_yaw [B, NB] (panels are thin boxes, NB = boxes + panels);
    sphere_center [B, NS, 3], sphere_radius [B, NS]; light [B, 3] (unit, towards the light);
    wave_vector [B, NSURF, K, 3], wave_phase / wave_amplitude [B, NSURF, K], sharpness [B, NSURF],
    colors [B, NSURF, 2, 3] (the two colours each texture mixes).
    """

    room_half: torch.Tensor
    box_center: torch.Tensor
    box_half: torch.Tensor
    box_yaw: torch.Tensor
    sphere_center: torch.Tensor
    sphere_radius: torch.Tensor
    light: torch.Tensor
    wave_vector: torch.Tensor
    wave_phase: torch.Tensor
    wave_amplitude: torch.Tensor
    sharpness: torch.Tensor
    colors: torch.Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> "Scene":
        return Scene(**{item.name: getattr(self, item.name).to(device=device, dtype=dtype) for item in fields(self)})

    @staticmethod
    def stack(scenes: Sequence["Scene"]) -> "Scene":
        """Concatenate scenes along the batch axis (all must have the same object counts)."""
        return Scene(**{item.name: torch.cat([getattr(s, item.name) for s in scenes]) for item in fields(Scene)})


@dataclass
class SyntheticBatch:
    """B rendered clips: images [B, S, 3, H, W] in [0, 1], depth [B, S, H, W], intrinsics [B, S, 3, 3],
    extrinsics [B, S, 3, 4]; `seeds` [B] are the clip seeds."""

    images: torch.Tensor
    depth: torch.Tensor
    intrinsics: torch.Tensor
    extrinsics: torch.Tensor
    seeds: list[int]

    def clips(self, names: Sequence[str] | None = None) -> list[Clip]:
        """The batch as a list of `Clip` (named `synthetic-<seed>` unless `names` are given)."""
        names = names or [f"synthetic-{seed}" for seed in self.seeds]
        return [Clip(name=name, images=self.images[b], depth=self.depth[b], intrinsics=self.intrinsics[b],
                     extrinsics=self.extrinsics[b], source=f"synthetic seed {self.seeds[b]}")
                for b, name in enumerate(names)]


def clip_seeds(seed: int, count: int) -> list[int]:
    """`count` clip seeds derived from one seed; the first k of `clip_seeds(s, n)` equal `clip_seeds(s, k)`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**62, (count,), generator=generator).tolist()


def render_clip(seed: int, frames: int = 8, height: int = 112, width: int = 112, config: SceneConfig | None = None,
                device: torch.device | str | None = None, name: str | None = None) -> Clip:
    """One synthetic clip with ground truth (images [S, 3, H, W], depth, intrinsics, extrinsics), rendered on `device`
    (default the CPU) and returned on the CPU."""
    batch = render_batch([seed], frames=frames, height=height, width=width, config=config, device=device)
    clip = batch.clips([name] if name else None)[0]
    return replace(clip, **{key: getattr(clip, key).cpu() for key in ("images", "depth", "intrinsics", "extrinsics")})


def render_batch(seeds: Sequence[int] | torch.Generator, frames: int = 8, height: int = 112, width: int = 112,
                 config: SceneConfig | None = None, device: torch.device | str | None = None,
                 batch_size: int | None = None) -> SyntheticBatch:
    """Render one clip per seed, batched, on `device` (for training loops).

    seeds: clip seeds, or a generator from which `batch_size` clip seeds are drawn. Frames are cast in chunks of at
    most MAX_RAYS_PER_CALL rays, so long clips fit in memory.
    """
    config = config or SceneConfig()
    if isinstance(seeds, torch.Generator):
        if not batch_size or batch_size < 1:
            raise Spark3rError("render_batch with a generator needs batch_size >= 1")
        seeds = torch.randint(0, 2**62, (batch_size,), generator=seeds).tolist()
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise Spark3rError("render_batch got no seeds: pass at least one clip seed")
    if frames < 1 or height < 1 or width < 1:
        raise Spark3rError(f"cannot render {frames} frames of {height}x{width} pixels: give positive sizes")
    sampled = [sample_clip(seed, frames, height, width, config) for seed in seeds]
    scene = Scene.stack([item[0] for item in sampled]).to(device)
    intrinsics = torch.stack([item[1] for item in sampled]).to(device, torch.float32)
    extrinsics = torch.stack([item[2] for item in sampled]).to(device, torch.float32)
    chunk = max(1, MAX_RAYS_PER_CALL // (len(seeds) * height * width))
    rendered = [render_views(scene, intrinsics[:, start:start + chunk], extrinsics[:, start:start + chunk], height,
                             width) for start in range(0, frames, chunk)]
    images, depth = (torch.cat(parts, dim=1) for parts in zip(*rendered))
    return SyntheticBatch(images, depth, intrinsics, extrinsics, seeds)


def sample_clip(seed: int, frames: int, height: int, width: int,
                config: SceneConfig) -> tuple[Scene, torch.Tensor, torch.Tensor]:
    """Draw one clip's scene (B = 1), intrinsics [S, 3, 3] and extrinsics [S, 3, 4] from its seed (CPU, float64)."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)

    half_x, half_z = uniform(*config.room_half_width, 2)
    half_y = uniform(*config.room_height, 1)[0] / 2
    room_half = torch.stack([half_x, half_y, half_z])
    if config.path == "walk":
        walk = _sample_walk(uniform, config, room_half, frames)
        ground = walk["centers"][:, [0, 2]]

        def clear(x: float, z: float, footprint: float) -> bool:
            gap = (ground - torch.tensor([x, z], dtype=torch.float64)).norm(dim=-1).min().item()
            return gap >= config.clearance + footprint
    else:
        path = _sample_path(uniform, config, room_half, frames)
        keep_out = (path["radius"] * 1.15 + config.clearance).item()
        center_x, center_z = path["center"][0].item(), path["center"][2].item()

        def clear(x: float, z: float, footprint: float) -> bool:
            return math.hypot(x - center_x, z - center_z) >= keep_out + footprint
    box_center, box_half, box_yaw = _sample_boxes(uniform, config, room_half, clear)
    sphere_center, sphere_radius = _sample_spheres(uniform, config, room_half, clear)
    light = torch.stack([uniform(-0.5, 0.5, 1)[0], torch.tensor(-1.0, dtype=torch.float64), uniform(-0.5, 0.5, 1)[0]])
    scene = Scene(room_half=room_half[None], box_center=box_center[None], box_half=box_half[None],
                  box_yaw=box_yaw[None], sphere_center=sphere_center[None], sphere_radius=sphere_radius[None],
                  light=(light / light.norm())[None], **_sample_textures(uniform, generator, config))
    if config.path == "walk":
        intrinsics, extrinsics = _walk_cameras(uniform, config, walk, frames, height, width)
    else:
        intrinsics, extrinsics = _path_cameras(uniform, config, path, frames, height, width)
    if config.shuffle:
        order = torch.randperm(frames, generator=generator)
        intrinsics, extrinsics = intrinsics[order], extrinsics[order]
    return scene, intrinsics, extrinsics


def _sample_path(uniform, config: SceneConfig, room_half: torch.Tensor, frames: int) -> dict:
    """An arc around a point near the room centre: position angle advances by the per-frame yaw."""
    center = torch.stack([uniform(-0.15, 0.15, 1)[0] * room_half[0], torch.tensor(0.0, dtype=torch.float64),
                          uniform(-0.15, 0.15, 1)[0] * room_half[2]])
    floor = room_half[1]
    eye_height = uniform(1.0, 1.7, 1)[0].clamp(max=2 * room_half[1] - 0.5)
    center[1] = floor - eye_height
    step = math.radians(uniform(*config.yaw_per_frame, 1)[0].item()) * (1 if uniform(0, 1, 1)[0] < 0.5 else -1)
    return {
        "center": center,
        "radius": uniform(*config.path_radius, 1)[0],
        "start": uniform(0, 2 * math.pi, 1)[0],
        "step": step,
        "heading": uniform(-25, 25, 1)[0] * math.pi / 180,
        "wobble": uniform(0, 2 * math.pi, 4),
    }


def _sample_walk(uniform, config: SceneConfig, room_half: torch.Tensor, frames: int) -> dict:
    """A closed loop (an ellipse with a slow radial wobble) around a point near the room centre, walked at a constant
    speed of `walk_step` metres per frame: camera centres [S, 3] and the unit walking direction [S, 3]."""
    reach = room_half[[0, 2]] - WALL_MARGIN - config.clearance
    center = uniform(-0.1, 0.1, 2) * reach
    semi_axes = uniform(0.45, 0.7, 2) * reach / 1.1
    wobble, phase = uniform(0.0, 0.1, 2), uniform(0, 2 * math.pi, 2)
    eye_height = uniform(1.0, 1.7, 1)[0].clamp(max=2 * room_half[1] - 0.5)
    step = uniform(*config.walk_step, 1)[0] * (1 if uniform(0, 1, 1)[0] < 0.5 else -1)
    start = uniform(0, 1, 1)[0]

    def loop(u: torch.Tensor) -> torch.Tensor:  # [M] -> [M, 2] (x, z)
        radial = 1 + wobble[0] * torch.sin(2 * u + phase[0]) + wobble[1] * torch.sin(3 * u + phase[1])
        return center + radial[:, None] * semi_axes * torch.stack([torch.cos(u), torch.sin(u)], dim=-1)

    fine = torch.linspace(0, 2 * math.pi, 8193, dtype=torch.float64)
    length = torch.cat([torch.zeros(1, dtype=torch.float64), loop(fine).diff(dim=0).norm(dim=-1).cumsum(0)])
    walked = torch.remainder(start * length[-1] + step * torch.arange(frames + 1, dtype=torch.float64), length[-1])
    index = torch.searchsorted(length, walked).clamp(1, len(fine) - 1)
    share = (walked - length[index - 1]) / (length[index] - length[index - 1])
    ground = loop(fine[index - 1] + share * (fine[index] - fine[index - 1]))  # frames + 1 points: one step ahead
    t = torch.arange(frames, dtype=torch.float64)
    height = room_half[1] - eye_height + 0.02 * torch.sin(0.3 * t + phase[0])
    centers = torch.stack([ground[:-1, 0], height, ground[:-1, 1]], dim=-1)
    heading = torch.nn.functional.normalize(ground[1:] - ground[:-1], dim=-1)
    return {"centers": centers, "heading": heading, "center": center}


def _place(uniform, room_half: torch.Tensor, clear, footprint: float) -> tuple[float, float]:
    """A floor position (x, z) whose footprint disc lies inside the room and `clear(x, z, footprint)` of the camera
    path."""
    limit_x, limit_z = room_half[0].item() - footprint - 0.05, room_half[2].item() - footprint - 0.05
    for _ in range(1000):
        x, z = uniform(-limit_x, limit_x, 1).item(), uniform(-limit_z, limit_z, 1).item()
        if clear(x, z, footprint):
            return x, z
    raise Spark3rError("the room is too small to place the objects away from the camera path: "
                       "raise SceneConfig.room_half_width or lower path_radius / clearance")


def _sample_boxes(uniform, config: SceneConfig, room_half, clear):
    centers, halves, yaws = [], [], []
    for index in range(config.boxes + config.panels):
        if index < config.boxes:
            half = torch.stack([uniform(0.25, 0.7, 1)[0], uniform(0.25, 0.9, 1)[0], uniform(0.25, 0.7, 1)[0]])
        else:
            thickness = torch.tensor(PANEL_HALF_THICKNESS, dtype=torch.float64)
            half = torch.stack([uniform(0.4, 1.0, 1)[0], uniform(0.5, 1.0, 1)[0], thickness])
        x, z = _place(uniform, room_half, clear, math.hypot(half[0].item(), half[2].item()))
        centers.append(torch.tensor([x, room_half[1].item() - half[1].item(), z], dtype=torch.float64))
        halves.append(half)
        yaws.append(uniform(0, math.pi, 1)[0])
    if not centers:
        empty = torch.zeros(0, 3, dtype=torch.float64)
        return empty, empty, empty[:, 0]
    return torch.stack(centers), torch.stack(halves), torch.stack(yaws)


def _sample_spheres(uniform, config: SceneConfig, room_half, clear):
    centers, radii = [], []
    for _ in range(config.spheres):
        radius = uniform(0.25, 0.6, 1).item()
        x, z = _place(uniform, room_half, clear, radius)
        lift = uniform(0.0, min(1.2, 2 * room_half[1].item() - 2 * radius - 0.1), 1).item()
        centers.append(torch.tensor([x, room_half[1].item() - radius - lift, z], dtype=torch.float64))
        radii.append(radius)
    if not centers:
        return torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    return torch.stack(centers), torch.tensor(radii, dtype=torch.float64)


def _sample_textures(uniform, generator: torch.Generator, config: SceneConfig) -> dict:
    """Per surface: K plane waves of wavelength 0.25-1.5 m in random directions, and two well-separated colours."""
    count, waves = config.surfaces, config.texture_waves
    direction = torch.randn(count, waves, 3, generator=generator, dtype=torch.float64)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-9)
    wavelength = uniform(0.25, 1.5, count, waves, 1)
    first = uniform(0.05, 0.95, count, 3)
    second = (first + uniform(0.35, 0.65, count, 3)) % 1.0
    return {
        "wave_vector": (2 * math.pi / wavelength * direction)[None],
        "wave_phase": uniform(0, 2 * math.pi, count, waves)[None],
        "wave_amplitude": uniform(0.5, 1.0, count, waves)[None],
        "sharpness": uniform(1.0, 4.0, count)[None],
        "colors": torch.stack([first, second], dim=1)[None],
    }


def _path_cameras(uniform, config: SceneConfig, path: dict, frames: int, height: int,
                  width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cameras along the arc, looking inwards across the room: yaw follows the position angle, slight pitch, no roll."""
    t = torch.arange(frames, dtype=torch.float64)
    wobble = path["wobble"]
    angle = path["start"] + path["step"] * t
    radius = path["radius"] * (1 + 0.15 * torch.sin(0.21 * t + wobble[0]))
    centers = torch.stack([path["center"][0] + radius * torch.sin(angle),
                           path["center"][1] + 0.05 * torch.sin(0.17 * t + wobble[1]),
                           path["center"][2] + radius * torch.cos(angle)], dim=-1)
    yaw = angle + math.pi + path["heading"]
    max_pitch = math.radians(config.max_pitch)
    pitch = uniform(-0.6 * max_pitch, 0.3 * max_pitch, 1)[0] + 0.4 * max_pitch * torch.sin(0.13 * t + wobble[2])
    return _cameras(uniform, config, centers, yaw, pitch, height, width)


def _walk_cameras(uniform, config: SceneConfig, walk: dict, frames: int, height: int,
                  width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cameras along the walk: looking ahead, turned part of the way towards the loop's centre, with a slow head
    swing of `walk_swing` degrees and slight pitch, no roll."""
    t = torch.arange(frames, dtype=torch.float64)
    centers, heading = walk["centers"], walk["heading"]
    ahead = torch.atan2(heading[:, 0], heading[:, 1])
    inward = walk["center"] - centers[:, [0, 2]]
    towards_center = torch.atan2(inward[:, 0], inward[:, 1])
    turn = torch.remainder(towards_center - ahead + math.pi, 2 * math.pi) - math.pi
    swing = math.radians(uniform(*config.walk_swing, 1).item())
    rate, phase = uniform(0.01, 0.03, 1)[0], uniform(0, 2 * math.pi, 2)
    yaw = ahead + uniform(0.2, 0.5, 1)[0] * turn + swing * torch.sin(rate * t + phase[0])
    max_pitch = math.radians(config.max_pitch)
    pitch = uniform(-0.6 * max_pitch, 0.3 * max_pitch, 1)[0] + 0.4 * max_pitch * torch.sin(0.05 * t + phase[1])
    return _cameras(uniform, config, centers, yaw, pitch, height, width)


def _cameras(uniform, config: SceneConfig, centers: torch.Tensor, yaw: torch.Tensor, pitch: torch.Tensor, height: int,
             width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Intrinsics [S, 3, 3] (one drawn field of view) and world-to-camera extrinsics [S, 3, 4] of cameras at `centers`
    [S, 3] looking along yaw / pitch [S] (radians; yaw 0 looks along +z, positive pitch looks up), no roll."""
    forward = torch.stack([torch.cos(pitch) * torch.sin(yaw), -torch.sin(pitch), torch.cos(pitch) * torch.cos(yaw)], -1)
    right = torch.stack([torch.cos(yaw), torch.zeros_like(yaw), -torch.sin(yaw)], -1)
    down = torch.linalg.cross(forward, right)
    rotation = torch.stack([right, down, forward], dim=-2)  # rows: camera axes in world coordinates
    translation = -(rotation @ centers[..., None])[..., 0]
    extrinsics = torch.cat([rotation, translation[..., None]], dim=-1)
    focal = (width / 2) / math.tan(math.radians(uniform(*config.fov, 1).item()) / 2)
    intrinsics = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=torch.float64)
    return intrinsics.expand(len(centers), 3, 3).clone(), extrinsics


def render_views(scene: Scene, intrinsics: torch.Tensor, extrinsics: torch.Tensor, height: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray-cast B scenes from S cameras each: images [B, S, 3, H, W] in [0, 1] and z-depth [B, S, H, W].

    intrinsics [B, S, 3, 3] (no skew), extrinsics [B, S, 3, 4] world-to-camera; computed on `scene`'s device and dtype.
    """
    device, dtype = scene.room_half.device, scene.room_half.dtype
    intrinsics, extrinsics = intrinsics.to(device, dtype), extrinsics.to(device, dtype)
    batch, frames = extrinsics.shape[:2]
    rows = torch.arange(height, device=device, dtype=dtype) + 0.5
    cols = torch.arange(width, device=device, dtype=dtype) + 0.5
    fx, fy = intrinsics[..., 0, 0, None, None], intrinsics[..., 1, 1, None, None]
    cx, cy = intrinsics[..., 0, 2, None, None], intrinsics[..., 1, 2, None, None]
    x = ((cols - cx) / fx).expand(batch, frames, height, width)
    y = ((rows[:, None] - cy) / fy).expand(batch, frames, height, width)
    rays_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1).reshape(batch, frames, height * width, 3)
    rotation, translation = extrinsics[..., :3], extrinsics[..., 3]
    directions = rays_cam @ rotation  # R^T d: [B, S, N, 3], z-depth = ray parameter
    origins = -(rotation.transpose(-1, -2) @ translation[..., None])[..., 0][:, :, None]  # [B, S, 1, 3]

    depth, surface, normal = _hit_room(scene.room_half[:, None, None], origins, directions)
    for index in range(scene.box_center.shape[1]):
        _hit_box(scene, index, origins, directions, depth, surface, normal)
    for index in range(scene.sphere_center.shape[1]):
        _hit_sphere(scene, index, origins, directions, depth, surface, normal)

    points = origins + depth[..., None] * directions
    albedo = _texture(scene, points, surface)
    normal = torch.where(((normal * directions).sum(-1, keepdim=True) > 0), -normal, normal)
    shade = 0.45 + 0.55 * (normal * scene.light[:, None, None]).sum(-1, keepdim=True).clamp(min=0)
    images = (albedo * shade).clamp(0, 1)
    images = images.reshape(batch, frames, height, width, 3).permute(0, 1, 4, 2, 3).contiguous()
    return images, depth.reshape(batch, frames, height, width)


def _hit_room(half: torch.Tensor, origins: torch.Tensor, directions: torch.Tensor):
    """Exit point of rays from inside the room box: z-depth [B, S, N], wall index, inward normal."""
    safe = torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
    exit_t = torch.where(safe > 0, half - origins, -half - origins) / safe
    depth, axis = exit_t.min(dim=-1)
    positive = torch.gather(safe, -1, axis[..., None])[..., 0] > 0
    surface = 2 * axis + positive.long()
    normal = torch.nn.functional.one_hot(axis, 3).to(directions.dtype) * torch.where(positive, -1.0, 1.0)[..., None]
    return depth, surface, normal


def _rotate_y(vectors: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [..., 3] vectors about the world y axis by the angle whose cos/sin are given (broadcastable)."""
    x, y, z = vectors.unbind(-1)
    return torch.stack([cos * x + sin * z, y, -sin * x + cos * z], dim=-1)


def _hit_box(scene: Scene, index: int, origins, directions, depth, surface, normal) -> None:
    """Slab test in the box's own frame; updates depth / surface / normal in place where the box is nearer."""
    center = scene.box_center[:, index, None, None]
    half = scene.box_half[:, index, None, None]
    cos = torch.cos(scene.box_yaw[:, index])[:, None, None]
    sin = torch.sin(scene.box_yaw[:, index])[:, None, None]
    local_origin = _rotate_y(origins - center, cos, -sin)
    local_direction = _rotate_y(directions, cos, -sin)
    safe = torch.where(local_direction.abs() < 1e-9, torch.full_like(local_direction, 1e-9), local_direction)
    first, second = (-half - local_origin) / safe, (half - local_origin) / safe
    near, axis = torch.minimum(first, second).max(dim=-1)
    far = torch.maximum(first, second).min(dim=-1).values
    hit = (near <= far) & (near > _EPS) & (near < depth)
    sign = -torch.sign(torch.gather(safe, -1, axis[..., None]))
    box_normal = _rotate_y(torch.nn.functional.one_hot(axis, 3).to(directions.dtype) * sign, cos, sin)
    depth.copy_(torch.where(hit, near, depth))
    surface.copy_(torch.where(hit, WALLS + index, surface))
    normal.copy_(torch.where(hit[..., None], box_normal, normal))


def _hit_sphere(scene: Scene, index: int, origins, directions, depth, surface, normal) -> None:
    """Nearest root of |o + t d - c|^2 = r^2; updates depth / surface / normal in place where the sphere is nearer."""
    center = scene.sphere_center[:, index, None, None]
    radius = scene.sphere_radius[:, index, None, None]
    offset = origins - center
    a = (directions * directions).sum(-1)
    b = (directions * offset).sum(-1)
    c = (offset * offset).sum(-1) - radius**2
    discriminant = b * b - a * c
    t = (-b - discriminant.clamp(min=0).sqrt()) / a
    hit = (discriminant > 0) & (t > _EPS) & (t < depth)
    sphere_normal = (offset + t[..., None] * directions) / radius[..., None]
    depth.copy_(torch.where(hit, t, depth))
    surface.copy_(torch.where(hit, WALLS + scene.box_center.shape[1] + index, surface))
    normal.copy_(torch.where(hit[..., None], sphere_normal, normal))


def _texture(scene: Scene, points: torch.Tensor, surface: torch.Tensor) -> torch.Tensor:
    """Albedo [B, S, N, 3] of each hit point: its surface's two colours mixed by tanh(sharpness * sum of waves),
    computed for the points of one surface at a time (each point's waves once, not every surface's)."""
    albedo = torch.zeros_like(points)
    batch = torch.arange(points.shape[0], device=points.device).view(-1, 1, 1).expand_as(surface)
    for index in range(scene.wave_vector.shape[1]):
        hit = surface == index
        owner, at = batch[hit], points[hit]  # [M], [M, 3]
        phase = (at[:, None] * scene.wave_vector[owner, index]).sum(-1) + scene.wave_phase[owner, index]  # [M, K]
        wave = (torch.sin(phase) * scene.wave_amplitude[owner, index]).sum(-1)
        mix = 0.5 + 0.5 * torch.tanh(scene.sharpness[owner, index] * wave)
        first, second = scene.colors[owner, index, 0], scene.colors[owner, index, 1]
        albedo[hit] = first + (second - first) * mix[:, None]
    return albedo
