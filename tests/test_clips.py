import sys

import numpy as np
import pytest
import torch
from PIL import Image

from spark3r.commands.make_clips import main as make_clips
from spark3r.data.clip import Clip
from spark3r.data.clips import open_clips, parse_synthetic_spec, preprocess_clip, read_clip, write_clip
from spark3r.data.preprocess import get_recipe
from spark3r.data.synthetic import SceneConfig, render_clip, render_views, sample_clip
from spark3r.errors import Spark3rError


@pytest.fixture(scope="module")
def clip() -> Clip:
    return render_clip(4, frames=4, height=32, width=48, name="room")


def save_png(path, height=8, width=8, value=128):
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)


@pytest.mark.parametrize("fmt", ["folder", "npz", "mp4"])
def test_written_clips_read_back_identical(tmp_path, clip, fmt):
    path = write_clip(clip, tmp_path, fmt)
    back = read_clip(path)
    assert back.name == "room" and back.images.shape == clip.images.shape
    if fmt == "mp4":
        assert (back.images - clip.images).abs().mean() < 0.015  # H.264 codec error only
    else:
        assert (back.images - clip.images).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit quantisation only
        assert back.fingerprint() == clip.fingerprint()
    for key in ("depth", "intrinsics", "extrinsics"):
        assert torch.equal(getattr(back, key), getattr(clip, key))


def test_folder_and_npz_copies_are_identical_and_subsample_ground_truth_alike(tmp_path, clip):
    folder = read_clip(write_clip(clip, tmp_path, "folder"), stride=2, max_frames=1)
    archive = read_clip(write_clip(clip, tmp_path, "npz"), stride=2, max_frames=1)
    assert torch.equal(folder.images, archive.images) and folder.frames == 1
    second = read_clip(tmp_path / "room", stride=3)
    assert second.frames == 2 and torch.equal(second.depth, clip.depth[[0, 3]])
    assert torch.equal(second.images, read_clip(tmp_path / "room").images[[0, 3]])
    sources = [c.source for c in open_clips(tmp_path, preprocess=None)]
    assert sources == [str(tmp_path / "room"), str(tmp_path / "room.npz")]


def test_image_folder_natural_order_exif_and_transparency(tmp_path):
    for index in (10, 2, 1):
        save_png(tmp_path / f"frame{index}.png", value=index)
    assert read_clip(tmp_path).images[:, 0, 0, 0].mul(255).round().tolist() == [1, 2, 10]

    rotated = tmp_path / "rotated"
    rotated.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(rotated / "a.png", exif=exif)
    assert read_clip(rotated).images.shape[-2:] == (6, 4)

    transparent = tmp_path / "transparent"
    transparent.mkdir()
    Image.fromarray(np.zeros((2, 2, 4), np.uint8), mode="RGBA").save(transparent / "a.png")
    assert read_clip(transparent).images.min() == 1.0  # composited on white, as upstream


def test_synthetic_specs_are_deterministic_prefix_stable_and_preprocessed():
    clips = open_clips("synthetic:2:1", preprocess="vggt:56", frames=3)
    assert [c.name for c in clips] == ["synthetic1-000", "synthetic1-001"]
    assert clips[0].images.shape == (3, 3, 56, 56) and clips[0].depth.shape == (3, 56, 56)
    assert not torch.equal(clips[0].images, clips[1].images)
    first = open_clips("synthetic:1:1", preprocess="vggt:56", frames=3, stride=2)[0]
    assert torch.equal(first.images, clips[0].images[[0, 2]])
    other_seed = open_clips("synthetic:1:2", preprocess=None, frames=1, size=(8, 8))[0]
    assert other_seed.images.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("recipe, width, height, expected", [
    ("vggt", 640, 480, (392, 518)), ("vggt", 1000, 1000, (518, 518)), ("vggt", 480, 640, (518, 518)),
    ("pi3", 640, 480, (434, 574)), ("pi3", 1920, 1080, (378, 672)), ("pi3", 1000, 1000, (504, 504)),
    ("da3", 640, 480, (378, 504)), ("da3", 1920, 1080, (280, 504)), ("da3", 300, 300, (504, 504)),
    ("omega", 1500, 1000, (416, 624)), ("omega", 700, 700, (512, 512)), ("omega", 3000, 1000, (368, 720)),
])
def test_recipe_sizes_match_upstream_tables(recipe, width, height, expected):
    assert get_recipe(recipe).output_size(height, width) == expected


@pytest.mark.parametrize("name", ["vggt", "pi3", "da3", "omega"])
def test_recipe_side_is_the_size_of_a_square_image(name):
    side = 64 if name == "omega" else 56
    assert get_recipe(f"{name}:{side}").output_size(300, 300) == (side, side)
    assert get_recipe("pi3:504").pixel_limit == 255000


@pytest.mark.parametrize("recipe, height, width", [
    ("vggt:56", 64, 96),   # resize only
    ("vggt:28", 96, 64),   # portrait: resize then centre crop
    ("pi3:50", 64, 96),    # pixel-limit rule (limit 2510), LANCZOS
    ("da3:56", 64, 96),    # two resizes (area)
    ("omega:32", 32, 96),  # aspect-ratio crop then balanced resize
])
def test_preprocessed_ground_truth_matches_a_direct_render(recipe, height, width):
    """Resized depth + transformed intrinsics must equal rendering the scene directly with those intrinsics."""
    clip = render_clip(7, frames=2, height=height, width=width)
    small = preprocess_clip(clip, recipe)
    scene, _, extrinsics = sample_clip(7, 2, height, width, SceneConfig())
    direct_images, direct_depth = render_views(scene.to(), small.intrinsics[None], extrinsics[None].float(),
                                               small.height, small.width)
    relative = (small.depth - direct_depth[0]).abs() / direct_depth[0]
    assert relative.median() < 0.01 and (relative < 0.05).float().mean() > 0.85
    assert (small.images - direct_images[0]).abs().median() < 0.06
    assert small.images.min() >= 0 and small.images.max() <= 1


def test_make_clips_writes_every_format_and_maps_bad_input_to_exit_code_2(tmp_path, capsys):
    for fmt in ("folder", "npz"):
        assert make_clips(["synthetic:2", "--out", str(tmp_path), "--frames", "2", "--size", "8", "12",
                           "--format", fmt]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic0-000", "synthetic0-000.npz", "synthetic0-001",
                                                         "synthetic0-001.npz"]
    assert "synthetic0-001" in capsys.readouterr().out
    assert make_clips(["synthetic:0", "--out", str(tmp_path)]) == 2
    assert "bad clip spec" in capsys.readouterr().err


def bad_inputs(tmp_path):
    """(spec, expected message) for every bad input the readers name."""
    cases = [(tmp_path / "missing", "does not exist")]
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "is empty"))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hello")
    cases.append((tmp_path / "text", "holds no png/jpg images"))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "a.png").write_bytes(b"not a png at all")
    cases.append((tmp_path / "corrupt", "cannot read the image"))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 broken")
    cases.append((tmp_path / "broken.npz", "not a valid .npz"))
    np.savez(tmp_path / "noimages.npz", depth=np.ones((2, 4, 4)))
    cases.append((tmp_path / "noimages.npz", "has no 'images' array"))
    np.savez(tmp_path / "zero.npz", images=np.zeros((0, 4, 4, 3), np.uint8))
    cases.append((tmp_path / "zero.npz", "zero frames after subsampling"))
    (tmp_path / "mixed").mkdir()
    save_png(tmp_path / "mixed" / "a.png", 8, 8)
    save_png(tmp_path / "mixed" / "b.png", 8, 10)
    cases.append((tmp_path / "mixed", "different sizes"))
    for name, truth, message in [("frames", {"depth": np.ones((3, 8, 8))}, "for 3 frames but the clip has 2"),
                                 ("size", {"depth": np.ones((2, 4, 8))}, "depth of size 4x8"),
                                 ("cameras", {"intrinsics": np.ones((2, 3, 4))}, "intrinsics of shape 3x4")]:
        (tmp_path / name).mkdir()
        save_png(tmp_path / name / "a.png")
        save_png(tmp_path / name / "b.png")
        np.savez(tmp_path / name / "gt.npz", **truth)
        cases.append((tmp_path / name, message))
    (tmp_path / "garbage.mp4").write_bytes(b"\x00" * 64)
    cases.append((tmp_path / "garbage.mp4", "cannot read the video"))
    (tmp_path / "clip.txt").write_text("x")
    cases.append((tmp_path / "clip.txt", "is not a clip"))
    for spec in ("synthetic:", "synthetic:0", "synthetic:x", "synthetic:2:-1", "synthetic:1:2:3"):
        cases.append((spec, "bad clip spec"))
    return cases


def test_every_bad_input_is_one_clear_sentence(tmp_path):
    for spec, message in bad_inputs(tmp_path):
        with pytest.raises(Spark3rError, match=message) as error:
            open_clips(str(spec), preprocess=None)
        assert "\n" not in str(error.value), spec


def test_bad_options_and_missing_pyav(tmp_path, clip, monkeypatch):
    with pytest.raises(Spark3rError, match="stride is 0"):
        open_clips("synthetic:1", preprocess=None, stride=0)
    with pytest.raises(Spark3rError, match="max_frames is 0"):
        open_clips("synthetic:1", preprocess=None, max_frames=0)
    with pytest.raises(Spark3rError, match="unknown preprocessing recipe"):
        open_clips("synthetic:1", preprocess="vggt:big")
    with pytest.raises(Spark3rError, match="unknown clip format"):
        write_clip(clip, tmp_path, "gif")
    video = write_clip(clip, tmp_path, "mp4")
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(Spark3rError, match=r"install spark3r\[video\]"):
        read_clip(video)
    with pytest.raises(Spark3rError, match="depth of shape"):
        Clip("x", torch.zeros(2, 3, 4, 4), depth=torch.zeros(2, 4, 5))


def test_walk_specs_render_walks_and_keep_the_arc_default():
    assert parse_synthetic_spec("synthetic:3") == (3, 0, "arc")
    assert parse_synthetic_spec("synthetic:3:7:walk") == (3, 7, "walk")
    walk = open_clips("synthetic:1:7:walk", preprocess=None, frames=5, size=(14, 14))[0]
    arc = open_clips("synthetic:1:7", preprocess=None, frames=5, size=(14, 14))[0]
    assert walk.name == "synthetic-walk7-000" and arc.name == "synthetic7-000"
    centers = -(walk.extrinsics[:, :, :3].transpose(1, 2) @ walk.extrinsics[:, :, 3:])[..., 0]
    assert ((centers[1:] - centers[:-1]).norm(dim=-1) < 0.07).all()  # centimetres per frame, not the arc's decimetres
    with pytest.raises(Spark3rError, match="synthetic:N:SEED:walk"):
        parse_synthetic_spec("synthetic:3:7:spiral")
