import sys

import numpy as np
import pytest
import torch
from PIL import Image

from spark3r.commands.make_clips import main as make_clips
from spark3r.data.clip import Clip
from spark3r.data.clips import (fit_clips, frame_indices, open_clips, parse_synthetic_spec, preprocess_clip, read_clip,
                                write_clip)
from spark3r.data.preprocess import Resize, apply_plan, get_recipe
from spark3r.data.synthetic import SceneConfig, render_clip, render_views, sample_clip
from spark3r.errors import Spark3rError, Spark3rWarning


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
    folder = read_clip(write_clip(clip, tmp_path, "folder"), max_frames=1)
    archive = read_clip(write_clip(clip, tmp_path, "npz"), max_frames=1)
    assert torch.equal(folder.images, archive.images) and folder.frames == 1
    second = read_clip(tmp_path / "room", every=3)
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
    first = open_clips("synthetic:1:1", preprocess="vggt:56", frames=3, every=2)[0]
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


def one_row(values) -> torch.Tensor:
    """A 1-row, 3-channel image [1, 3, 1, W] of 8-bit values."""
    return torch.tensor(values, dtype=torch.float32).div(255).expand(1, 3, 1, len(values))


def test_da3_resamples_uint8_with_opencv_area_and_cubic_as_the_reference():
    """Hand-checked: area 3 -> 2 averages 1.5 pixels each, (0 + 0.5 * 90) / 1.5 = 30 and (0.5 * 90 + 180) / 1.5 = 150;
    cubic 4 -> 8 (Keys a = -0.75, half-pixel centres, replicated border) at output 3 samples x = 1.25, weights
    w(0.75) = 0.26171875 and w(1.75) = -0.03515625 on the two 255s: 255 * 0.2265625 = 57.8 -> 58 (PIL's a = -0.5
    gives 52); outputs 1 and 2 are negative before the uint8 clamp."""
    area, _, _ = apply_plan([Resize(1, 2, "opencv_area")], one_row([0, 90, 180]))
    assert area[0, :, 0].mul(255).round().tolist() == [[30, 150]] * 3
    cubic, _, _ = apply_plan([Resize(1, 8, "opencv_cubic")], one_row([0, 0, 255, 255]))
    assert cubic[0, 0, 0].mul(255).round().tolist() == [0, 0, 0, 58, 197, 255, 255, 255]
    assert [type(step).__name__ + ":" + step.resample for step in get_recipe("da3").plan(480, 640)] == \
        ["Resize:opencv_area"]
    # 97x150 -> 326x504 (cubic up), then 326 -> 322, the nearest multiple of 14 (area down)
    assert [(step.height, step.resample) for step in get_recipe("da3").plan(97, 150)] == \
        [(326, "opencv_cubic"), (322, "opencv_area")]


@pytest.mark.parametrize("height, width, steps", [
    (60, 80, [((42, 56), "INTER_AREA")]),                                    # da3:56, already multiples of 14
    (200, 300, [((336, 504), "INTER_CUBIC")]),                               # da3:504 upscales
    (97, 150, [((326, 504), "INTER_CUBIC"), ((322, 504), "INTER_AREA")]),  # then 326 -> nearest multiple 322
])
def test_da3_recipe_pixels_equal_opencv_on_the_uint8_image(tmp_path, height, width, steps):
    """An 8-bit image through the da3 recipe equals the reference's calls, cv2.resize of the uint8 array with the
    hand-derived sizes and filters, value for value."""
    import cv2

    pixels = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    (tmp_path / "clip").mkdir()
    Image.fromarray(pixels).save(tmp_path / "clip" / "a.png")
    read = read_clip(tmp_path / "clip", preprocess="da3:56" if width == 80 else "da3")
    expected = pixels
    for (rows, cols), flag in steps:
        expected = cv2.resize(expected, (cols, rows), interpolation=getattr(cv2, flag))
    assert torch.equal(read.images[0].mul(255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(expected))


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
    (tmp_path / "cut").mkdir()
    save_png(tmp_path / "cut" / "a.png", 64, 64)
    (tmp_path / "cut" / "a.png").write_bytes((tmp_path / "cut" / "a.png").read_bytes()[:-40])
    cases.append((tmp_path / "cut", "is truncated, corrupt"))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 broken")
    cases.append((tmp_path / "broken.npz", "not a valid .npz"))
    np.savez(tmp_path / "noimages.npz", depth=np.ones((2, 4, 4)))
    cases.append((tmp_path / "noimages.npz", "has no 'images' array"))
    np.savez(tmp_path / "zero.npz", images=np.zeros((0, 4, 4, 3), np.uint8))
    cases.append((tmp_path / "zero.npz", "has zero frames"))
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
    with pytest.raises(Spark3rError, match="every is 0"):
        open_clips("synthetic:1", preprocess=None, every=0)
    with pytest.raises(Spark3rError, match="max_frames is 0"):
        open_clips("synthetic:1", preprocess=None, max_frames=0)
    with pytest.raises(Spark3rError, match="unknown preprocessing recipe"):
        open_clips("synthetic:1", preprocess="vggt:big")
    with pytest.raises(Spark3rError, match="vggt:100 is not a multiple of the patch size 14: use 98 or 112"):
        open_clips("synthetic:1", preprocess="vggt:100")
    with pytest.raises(Spark3rError, match="not both"):
        open_clips("synthetic:1", preprocess=None, every=2, max_frames=2)
    with pytest.raises(Spark3rError, match="unknown clip format"):
        write_clip(clip, tmp_path, "gif")
    video = write_clip(clip, tmp_path, "mp4")
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(Spark3rError, match=r"install spark3r\[video\]"):
        read_clip(video)
    with pytest.raises(Spark3rError, match="depth of shape"):
        Clip("x", torch.zeros(2, 3, 4, 4), depth=torch.zeros(2, 4, 5))


def test_frames_are_sampled_uniformly_over_the_whole_clip_or_every_nth():
    assert frame_indices(10, max_frames=4) == [0, 3, 6, 9]  # round(i * 9 / 3)
    assert frame_indices(300, max_frames=3) == [0, 150, 299]  # 149.5 rounds up
    assert frame_indices(5, max_frames=8) == [0, 1, 2, 3, 4]
    assert frame_indices(7, max_frames=1) == [0]
    assert frame_indices(7, every=3) == [0, 3, 6]
    with pytest.raises(Spark3rError, match="not both"):
        frame_indices(7, every=2, max_frames=2)


def test_sixteen_bit_png_reads_at_its_own_scale(tmp_path):
    """A 16-bit grayscale PNG scaled by 1/65535 equals its 8-bit copy within 8-bit quantisation (it was read
    saturated: values above 255 clipped to white)."""
    ramp = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000
    for depth, pixels in (("sixteen", ramp), ("eight", (ramp.astype(np.float64) / 65535 * 255).round().astype(np.uint8))):
        (tmp_path / depth).mkdir()
        Image.fromarray(pixels).save(tmp_path / depth / "a.png")
    sixteen, eight = read_clip(tmp_path / "sixteen").images, read_clip(tmp_path / "eight").images
    assert Image.open(tmp_path / "sixteen" / "a.png").mode.startswith("I")
    assert torch.allclose(sixteen[0, 0], torch.from_numpy(ramp.astype(np.float32) / 65535), atol=1e-7)
    assert (sixteen - eight).abs().max() <= 0.5 / 255 + 1e-6
    assert abs(sixteen.mean().item() - 31500 / 65535) < 1e-5  # mean of 0..63000, not ~1


def test_sixteen_bit_colour_png_keeps_all_16_bits_and_composites_alpha(tmp_path):
    """16-bit RGB(A) pngs written by OpenCV (BGR order): read as value / 65535 exactly (PIL alone keeps the high byte,
    off by up to 1/255); alpha a composites on white: rgb * a + (1 - a)."""
    import cv2

    values = np.random.default_rng(1).integers(0, 65536, (6, 5, 4)).astype(np.uint16)
    for name, pixels in (("rgb", values[..., :3]), ("rgba", values)):
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / "a.png"), pixels[..., [2, 1, 0, 3][:pixels.shape[-1]]])
    rgb = values[..., :3].astype(np.float64) / 65535
    alpha = values[..., 3:].astype(np.float64) / 65535
    for name, expected in (("rgb", rgb), ("rgba", rgb * alpha + 1 - alpha)):
        read = read_clip(tmp_path / name).images[0].permute(1, 2, 0).double().numpy()
        assert np.abs(read - expected).max() < 1e-6, name


def test_truncated_mp4_is_one_sentence(tmp_path, clip):
    """An mp4 whose index (moov, written first) lists more frames than the file still holds is refused."""
    import av

    path = tmp_path / "cut.mp4"
    pixels = (clip.images.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=10, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv444p"
        for frame in np.concatenate([pixels] * 5):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    assert read_clip(path).frames == 20
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) * 2 // 3])
    with pytest.raises(Spark3rError, match=r"is truncated or damaged: its header lists 20 frames but only \d+ decode"):
        read_clip(path, max_frames=4)


def test_upstream_scene_images_layout_is_one_clip_named_after_the_scene(tmp_path, clip):
    write_clip(clip, tmp_path / "scene", "folder")
    (tmp_path / "scene" / "room").rename(tmp_path / "scene" / "images")
    (tmp_path / "scene" / "sparse").mkdir()  # what COLMAP leaves beside it
    read = read_clip(tmp_path / "scene")
    assert read.name == "scene" and read.frames == 4 and torch.equal(read.depth, clip.depth)
    assert [c.name for c in open_clips(tmp_path / "scene", preprocess=None)] == ["scene"]


def test_mixed_sizes_are_fitted_to_the_first_frame_and_the_crop_is_said_once(tmp_path):
    """vggt:28 keeps a 28-wide, 14-high frame as it is and would make a 28x28 frame 28x28; the square ones are brought
    to the first frame's 14 rows by a centre crop of rows 7..20 (half of each image), said in one warning."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    wide = np.zeros((14, 28, 3), np.uint8)
    wide[:, 14:] = 255
    Image.fromarray(wide).save(folder / "a.png")
    square = np.zeros((28, 28, 3), np.uint8)
    square[:, 14:] = 200
    Image.fromarray(square).save(folder / "b.png")
    Image.fromarray(square).save(folder / "c.png")
    with pytest.warns(Spark3rWarning) as caught:
        read = read_clip(folder, preprocess="vggt:28")
    assert len(caught) == 1 and "28x28 keeps 50%" in str(caught[0].message)
    assert read.images.shape == (3, 3, 14, 28)
    assert torch.equal(read.images[0], torch.from_numpy(wide).permute(2, 0, 1) / 255)
    assert torch.allclose(read.images[1:, :, :, :14], torch.zeros(2, 3, 14, 14))
    assert torch.allclose(read.images[1:, :, :, 14:], torch.full((2, 3, 14, 14), 200 / 255), atol=1e-6)


def test_portrait_crop_of_the_vggt_recipe_is_said_once(tmp_path):
    folder = tmp_path / "portrait"
    folder.mkdir()
    for index in range(3):
        save_png(folder / f"{index}.png", 40, 20)
    with pytest.warns(Spark3rWarning, match=r"the vggt preprocessing centre-crops frames to 28x28.*20x40 keeps 50%"):
        read = read_clip(folder, preprocess="vggt:28")
    assert read.images.shape == (3, 3, 28, 28)


def test_calibration_clips_of_other_aspect_ratios_are_fitted_to_the_first(clip):
    other = render_clip(5, frames=2, height=48, width=48, name="square")
    with pytest.warns(Spark3rWarning, match=r"1 of 2 clips are resized and centre-cropped to the first clip's 48x32: "
                                            r"square \(48x48\) keeps 67%"):
        fitted = fit_clips([clip, other])
    assert fitted[0] is clip and fitted[1].images.shape == (2, 3, 32, 48)
    assert fitted[1].intrinsics[0, 1, 2].item() == pytest.approx(other.intrinsics[0, 1, 2].item() - 8)


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


def test_a_rotated_phone_video_is_read_upright(tmp_path):
    """Stored 32 wide x 16 high with a 90-degree counter-clockwise display rotation: read 16 wide x 32 high, the
    stored top-left white square now at the bottom left."""
    import av

    path = tmp_path / "portrait.mp4"
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(2):
            stored = np.zeros((16, 32, 3), np.uint8)
            stored[:8, :8] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode(None))
    images = read_clip(path).images
    assert images.shape == (2, 3, 32, 16)
    assert images[:, :, 26:, :6].mean() > 0.9 and images[:, :, :6, :6].mean() < 0.1
