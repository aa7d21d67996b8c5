import math

import pytest
import torch

from spark3r.data.clip import unproject_depth
from spark3r.data.synthetic import Scene, SceneConfig, clip_seeds, render_batch, render_clip, render_views, sample_clip
from spark3r.errors import Spark3rError


def hand_scene(boxes=(), spheres=(), color=(0.2, 0.4, 0.6)) -> Scene:
    """Room of half extents (2, 1.5, 3), flat-coloured surfaces (no waves), light straight up (-y)."""
    count = 6 + len(boxes) + len(spheres)
    box_center = torch.tensor([[c for c, _, _ in boxes]]).reshape(1, len(boxes), 3)
    box_half = torch.tensor([[h for _, h, _ in boxes]]).reshape(1, len(boxes), 3)
    box_yaw = torch.tensor([[y for _, _, y in boxes]]).reshape(1, len(boxes))
    return Scene(
        room_half=torch.tensor([[2.0, 1.5, 3.0]]), box_center=box_center, box_half=box_half, box_yaw=box_yaw,
        sphere_center=torch.tensor([[c for c, _ in spheres]]).reshape(1, len(spheres), 3),
        sphere_radius=torch.tensor([[r for _, r in spheres]]).reshape(1, len(spheres)),
        light=torch.tensor([[0.0, -1.0, 0.0]]), wave_vector=torch.zeros(1, count, 1, 3),
        wave_phase=torch.zeros(1, count, 1), wave_amplitude=torch.zeros(1, count, 1), sharpness=torch.ones(1, count),
        colors=torch.tensor(color).expand(1, count, 2, 3).clone())


def identity_camera(size=9):
    """Camera at the origin looking down +z with a 90-degree field of view; pixel (4, 4) looks straight ahead."""
    intrinsics = torch.tensor([[[[size / 2, 0, size / 2], [0, size / 2, size / 2], [0, 0, 1]]]])
    extrinsics = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)[None, None]
    return intrinsics, extrinsics


def test_room_depth_and_shading_match_hand_computed_values():
    intrinsics, extrinsics = identity_camera()
    images, depth = render_views(hand_scene(), intrinsics, extrinsics, 9, 9)
    assert depth[0, 0, 4, 4] == pytest.approx(3.0)  # far wall z = 3
    assert depth[0, 0, 4, 8] == pytest.approx(2.0 / (4 / 4.5))  # side wall x = 2 along ray (0.889, 0, 1)
    assert depth[0, 0, 8, 4] == pytest.approx(1.5 / (4 / 4.5))  # floor y = 1.5
    # the far wall faces the camera, perpendicular to the light: ambient 0.45 only; the floor is fully lit
    assert images[0, 0, :, 4, 4].tolist() == pytest.approx([0.45 * c for c in (0.2, 0.4, 0.6)])
    assert images[0, 0, :, 8, 4].tolist() == pytest.approx([0.2, 0.4, 0.6])
    points = unproject_depth(depth[0], intrinsics[0], extrinsics[0])  # same pixel convention as the renderer
    assert points[0, 4, 8, 0] == pytest.approx(2.0) and points[0, 8, 4, 1] == pytest.approx(1.5)


def test_objects_depth_match_hand_computed_values():
    intrinsics, extrinsics = identity_camera()
    sphere = hand_scene(spheres=[((0.0, 0.0, 2.0), 0.5)])
    assert render_views(sphere, intrinsics, extrinsics, 9, 9)[1][0, 0, 4, 4] == pytest.approx(1.5)
    box = hand_scene(boxes=[((0.0, 0.0, 2.0), (0.5, 0.5, 0.5), 0.0)])
    assert render_views(box, intrinsics, extrinsics, 9, 9)[1][0, 0, 4, 4] == pytest.approx(1.5)
    turned = hand_scene(boxes=[((0.0, 0.0, 2.0), (0.5, 0.5, 0.5), math.pi / 4)])
    assert render_views(turned, intrinsics, extrinsics, 9, 9)[1][0, 0, 4, 4] == pytest.approx(2 - 0.5 * math.sqrt(2))


def project(points, intrinsics, extrinsics):
    """Pixel coordinates [N, 2] and z-depth [N] of world points [N, 3] in one camera."""
    camera = points @ extrinsics[:, :3].T + extrinsics[:, 3]
    pixels = camera @ intrinsics.T
    return pixels[:, :2] / pixels[:, 2:], camera[:, 2]


@pytest.mark.parametrize("path, frames, other", [("arc", 4, 1), ("arc", 4, 3), ("walk", 12, 1), ("walk", 12, 6)])
def test_reprojected_pixels_land_on_the_same_surface_point(path, frames, other):
    clip = render_clip(3, frames=frames, height=48, width=64, config=SceneConfig(path=path))
    points = unproject_depth(clip.depth, clip.intrinsics, clip.extrinsics)[0].reshape(-1, 3)
    pixels, z = project(points, clip.intrinsics[other], clip.extrinsics[other])
    col, row = pixels[:, 0].floor().long(), pixels[:, 1].floor().long()
    inside = (z > 0) & (col >= 0) & (col < 64) & (row >= 0) & (row < 48)
    assert inside.float().mean() > 0.5  # consecutive views overlap
    seen = clip.depth[other][row[inside], col[inside]]
    agree = (seen - z[inside]).abs() / z[inside] < 0.02
    assert agree.float().mean() > 0.95  # the rest: occlusion boundaries and pixel-edge effects
    source_colors = clip.images[0].permute(1, 2, 0).reshape(-1, 3)[inside][agree]
    target_colors = clip.images[other].permute(1, 2, 0)[row[inside][agree], col[inside][agree]]
    assert (source_colors - target_colors).abs().median() < 0.03  # view-independent texture and shading


def test_same_seed_gives_the_same_clip_and_batching_changes_nothing():
    first, again = render_clip(5, frames=3, height=24, width=32), render_clip(5, frames=3, height=24, width=32)
    for key in ("images", "depth", "intrinsics", "extrinsics"):
        assert torch.equal(getattr(first, key), getattr(again, key))
    assert not torch.equal(first.images, render_clip(6, frames=3, height=24, width=32).images)
    batch = render_batch([6, 5], frames=3, height=24, width=32)
    assert torch.allclose(batch.images[1], first.images, atol=1e-6)
    assert torch.allclose(batch.depth[1], first.depth, rtol=1e-6)
    drawn = [render_batch(torch.Generator().manual_seed(1), frames=2, height=8, width=8, batch_size=2).seeds
             for _ in range(2)]
    assert drawn[0] == drawn[1] and len(set(drawn[0])) == 2
    assert clip_seeds(0, 3)[:2] == clip_seeds(0, 2) and clip_seeds(0, 2) != clip_seeds(1, 2)


def test_camera_path_is_smooth_level_and_clear_of_objects():
    config = SceneConfig()
    for seed in range(6):
        scene, intrinsics, extrinsics = sample_clip(seed, 10, 32, 32, config)
        rotation = extrinsics[:, :, :3]
        centers = -(rotation.transpose(1, 2) @ extrinsics[:, :, 3:])[..., 0]
        assert rotation[:, 0, 1].abs().max() < 1e-12  # camera x axis horizontal: no roll
        forward = rotation[:, 2]
        yaw = torch.atan2(forward[:, 0], forward[:, 2])
        step = torch.rad2deg(torch.remainder(yaw[1:] - yaw[:-1] + math.pi, 2 * math.pi) - math.pi).abs()
        assert step.min() >= 3 - 1e-9 and step.max() <= 9 + 1e-9
        assert torch.rad2deg(torch.asin(forward[:, 1].abs())).max() <= config.max_pitch + 1e-9
        assert (centers.abs() < scene.room_half[0] - 0.3).all()
        distance = (centers[:, None] - scene.sphere_center[0][None]).norm(dim=-1)
        assert (distance > scene.sphere_radius[0] + config.clearance - 1e-9).all()
        footprint = scene.box_half[0, :, [0, 2]].norm(dim=-1)
        ground = (centers[:, None, [0, 2]] - scene.box_center[0][None, :, [0, 2]]).norm(dim=-1)
        assert (ground > footprint + config.clearance - 1e-9).all()


def camera_centers(extrinsics):
    return -(extrinsics[:, :, :3].transpose(1, 2) @ extrinsics[:, :, 3:])[..., 0]


def test_walk_is_continuous_level_clear_of_objects_and_moves_through_the_room():
    config = SceneConfig(path="walk")
    for seed in range(6):
        scene, intrinsics, extrinsics = sample_clip(seed, 256, 32, 32, config)
        rotation, centers = extrinsics[:, :, :3], camera_centers(extrinsics)
        assert torch.allclose(rotation @ rotation.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(256, 3, 3))
        assert rotation[:, 0, 1].abs().max() < 1e-12  # no roll
        step = (centers[1:] - centers[:-1]).norm(dim=-1)
        assert step.min() > 0.02 - 0.002 and step.max() < 0.06 + 0.002  # a few centimetres per frame, no jumps
        forward = rotation[:, 2]
        turn = torch.rad2deg(torch.acos((forward[1:] * forward[:-1]).sum(-1).clamp(max=1)))
        assert turn.max() < 10 and turn.median() < 3  # a few degrees per frame
        assert torch.rad2deg(torch.asin(forward[:, 1].abs())).max() <= config.max_pitch + 1e-9
        assert (centers[:, [0, 2]].abs() < scene.room_half[0, [0, 2]] - 0.5).all()  # away from the walls
        extent = centers.max(0).values - centers.min(0).values
        assert extent[[0, 2]].min() > 1.0  # it walks through the room instead of turning on the spot
        distance = (centers[:, None] - scene.sphere_center[0][None]).norm(dim=-1)
        assert (distance > scene.sphere_radius[0] + config.clearance - 1e-9).all()
        footprint = scene.box_half[0, :, [0, 2]].norm(dim=-1)
        ground = (centers[:, None, [0, 2]] - scene.box_center[0][None, :, [0, 2]]).norm(dim=-1)
        assert (ground > footprint + config.clearance - 1e-9).all()


def test_a_long_walk_revisits_the_scene():
    """Over 1000 frames (20-60 m) on a loop of a few metres' radius, the camera comes back near where it started."""
    extrinsics = sample_clip(4, 1000, 8, 8, SceneConfig(path="walk"))[2]
    centers = camera_centers(extrinsics)
    later = (centers[300:] - centers[0]).norm(dim=-1)
    assert later.min() < 0.3


def test_texture_of_each_point_is_its_own_surfaces_waves_in_float64():
    """Albedo of every pixel of two rendered scenes against the formula evaluated point by point in float64 with the
    parameters of the surface the point lies on: colour_1 + (colour_2 - colour_1) * mix, mix = 1/2 + tanh(sharpness *
    sum_k amplitude_k sin(k_k . p + phase_k)) / 2."""
    from spark3r.data.synthetic import _texture
    sampled = [sample_clip(seed, 2, 6, 6, SceneConfig()) for seed in clip_seeds(3, 2)]
    scene = Scene.stack([item[0] for item in sampled])
    points = torch.randn(2, 2, 36, 3, dtype=torch.float64)
    surface = torch.randint(0, scene.wave_vector.shape[1], (2, 2, 36))
    albedo = _texture(scene.to(dtype=torch.float64), points, surface)
    for b, s, n in torch.cartesian_prod(torch.arange(2), torch.arange(2), torch.arange(36)).tolist():
        index, point = surface[b, s, n], points[b, s, n].tolist()
        phases = [sum(float(scene.wave_vector[b, index, k, c]) * point[c] for c in range(3))
                  + float(scene.wave_phase[b, index, k]) for k in range(scene.wave_vector.shape[2])]
        wave = sum(float(scene.wave_amplitude[b, index, k]) * math.sin(phase) for k, phase in enumerate(phases))
        mix = 0.5 + 0.5 * math.tanh(float(scene.sharpness[b, index]) * wave)
        first, second = scene.colors[b, index, 0].double(), scene.colors[b, index, 1].double()
        assert torch.allclose(albedo[b, s, n], first + (second - first) * mix, atol=1e-12), (b, s, n)


def test_existing_specs_keep_their_clips():
    """The third camera of synthetic:1:0's clip as the arc drew it before the walk mode existed (printed by the
    renderer of commit 189e6d8): existing clip specs keep their meaning."""
    arc = sample_clip(clip_seeds(0, 1)[0], 3, 16, 16, SceneConfig())[2]
    expected = torch.tensor([[-0.8951940853, 0.0, 0.4456765078, -0.4009196365],
                             [0.0201207947, 0.9989803708, 0.0404150008, -0.4857542923],
                             [-0.4452220831, 0.0451466352, -0.8942813193, 1.0256900429]], dtype=torch.float64)
    assert torch.allclose(arc[2], expected, atol=1e-9)
    walk = sample_clip(clip_seeds(0, 1)[0], 3, 16, 16, SceneConfig(path="walk"))[2]
    assert not torch.allclose(arc, walk)


def test_unordered_views_shuffle_the_same_cameras():
    ordered = sample_clip(2, 6, 16, 16, SceneConfig())[2]
    shuffled = sample_clip(2, 6, 16, 16, SceneConfig(shuffle=True))[2]
    assert not torch.equal(ordered, shuffled)
    assert sorted(map(tuple, ordered.flatten(1).tolist())) == sorted(map(tuple, shuffled.flatten(1).tolist()))


@pytest.mark.parametrize("kwargs, message", [
    ({"boxes": -1}, "SceneConfig.boxes"),
    ({"fov": (70.0, 50.0)}, "SceneConfig.fov"),
    ({"room_half_width": (1.5, 2.0)}, "too small"),
    ({"max_pitch": -1.0}, "SceneConfig.max_pitch"),
    ({"path": "spiral"}, "SceneConfig.path"),
])
def test_bad_scene_config_is_one_sentence(kwargs, message):
    with pytest.raises(Spark3rError, match=message) as error:
        SceneConfig(**kwargs)
    assert "\n" not in str(error.value)


def test_render_batch_rejects_bad_sizes():
    with pytest.raises(Spark3rError, match="positive sizes"):
        render_batch([0], frames=0)
    with pytest.raises(Spark3rError, match="batch_size"):
        render_batch(torch.Generator())


def test_long_clips_render_in_frame_chunks_with_the_same_result(monkeypatch):
    whole = render_batch([3, 4], frames=5, height=16, width=16)
    monkeypatch.setattr("spark3r.data.synthetic.MAX_RAYS_PER_CALL", 2 * 2 * 16 * 16)  # 2 frames per call
    chunked = render_batch([3, 4], frames=5, height=16, width=16)
    assert torch.equal(whole.images, chunked.images) and torch.equal(whole.depth, chunked.depth)
