"""reconstruct on generated clips with vggt-tiny: the COLMAP model (read back with pycolmap), the PLY (read back with
plyfile), the per-frame depth files and summary.json against an independent forward and unprojection; the command's
schedules and sentences; host memory of a 300-frame video."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pycolmap
import pytest
import torch
from plyfile import PlyData

from spark3r.commands.reconstruct import main
from spark3r.data.clips import write_clip
from spark3r.data.synthetic import render_clip
from spark3r.models.loading import load_model
from spark3r.reconstruct import reconstruct

FRAMES, SIDE = 6, 112
STAGES = ("read", "load_model", "model", "points", "frames", "preview")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A generated clip with ground truth, written as an image folder, and its reconstruction (dense)."""
    root = tmp_path_factory.mktemp("scene")
    folder = write_clip(render_clip(11, frames=FRAMES, height=SIDE, width=SIDE, name="room"), root, "folder")
    result = reconstruct(folder, "vggt-tiny", schedule="none", out=root / "out", progress=False)
    return folder, result


@pytest.fixture(scope="module")
def direct(scene):
    """An independent forward of the same frames (read as 8-bit pngs, in [0, 1]) through the bundled model."""
    folder, _ = scene
    files = sorted(folder.glob("*.png"))
    images = torch.from_numpy(np.stack([cv2.imread(str(f))[..., ::-1] for f in files]).copy())
    model = load_model("vggt-tiny")
    with torch.inference_mode():
        outputs = model(images.permute(0, 3, 1, 2).float().div(255)[None])
    return {key: value[0].double().numpy() for key, value in outputs.items()}, images.numpy()


def test_colmap_model_reads_back_with_the_models_cameras(scene, direct):
    _, result = scene
    outputs, _ = direct
    model = pycolmap.Reconstruction(str(result.out / "sparse" / "0"))
    assert model.num_cameras() == FRAMES and model.num_images() == FRAMES
    for image_id, image in sorted(model.images.items()):
        index = image_id - 1
        assert image.name == f"{index:06d}.png"
        camera = model.cameras[image.camera_id]
        assert camera.model.name == "PINHOLE" and (camera.height, camera.width) == (SIDE, SIDE)
        K = outputs["intrinsics"][index]
        assert np.allclose(camera.params, [K[0, 0], K[1, 1], K[0, 2], K[1, 2]], atol=1e-5)
        assert np.allclose(image.cam_from_world().matrix(), outputs["extrinsics"][index], atol=1e-5)
    assert model.num_points3D() == result.points


def test_ply_holds_the_stated_points_with_the_pixel_colours(scene, direct):
    """Default filter: finite positive depth with confidence at or above the median of all frames' confidences.
    Points: x_world = R^T (z K^-1 [j + 0.5, i + 0.5, 1] - t) in float64 numpy; colours: the frames' pixels."""
    _, result = scene
    outputs, images = direct
    confidence, depth = outputs["depth_conf"], outputs["depth"]
    keep = confidence >= np.median(confidence)
    assert result.points == keep.sum() == FRAMES * SIDE * SIDE // 2
    vertices = PlyData.read(str(result.out / "points.ply"))["vertex"]
    assert len(vertices) == result.points == result.summary["points"]
    colors = np.stack([vertices[name] for name in ("red", "green", "blue")], axis=-1)
    assert np.array_equal(colors, images[keep])
    rows, cols = np.nonzero(keep[0])
    K, E = outputs["intrinsics"][0], outputs["extrinsics"][0]
    pixels = np.stack([cols + 0.5, rows + 0.5, np.ones_like(rows, dtype=float)], axis=-1)
    expected = (depth[0][rows, cols, None] * pixels @ np.linalg.inv(K).T - E[:, 3]) @ E[:, :3]
    xyz = np.stack([vertices[name] for name in "xyz"], axis=-1)[:len(rows)]
    assert np.allclose(xyz, expected, atol=1e-4)


def test_depth_files_and_summary(scene, direct):
    _, result = scene
    outputs, _ = direct
    summary = json.loads((result.out / "summary.json").read_text())
    assert summary["model"] == "vggt-tiny" and summary["schedule"] == "none" and summary["frames"] == FRAMES
    assert all(summary["seconds"][stage] > 0 for stage in STAGES)
    assert summary["peak_memory_bytes"]["host_max_rss"] > 0
    saved = np.load(result.out / "depth" / "000002.npz")
    assert np.allclose(saved["depth"], outputs["depth"][2], atol=1e-5)
    assert np.allclose(saved["confidence"], outputs["depth_conf"][2], rtol=1e-5)
    steps = cv2.imread(str(result.out / "depth" / "000002.png"), cv2.IMREAD_UNCHANGED)
    scale = summary["depth_png_scale"]
    assert steps.dtype == np.uint16 and scale == pytest.approx(outputs["depth"].max() / 65535, rel=1e-5)
    assert np.abs(steps * scale - outputs["depth"][2]).max() <= scale / 2 + 1e-6
    assert cv2.imread(str(result.out / "images" / "000002.png")).shape == (SIDE, SIDE, 3)
    assert (result.out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("schedule, named", [("paper", "paper (vggt-tiny-paper.yaml)"), ("none", "none")])
def test_command_runs_with_the_paper_schedule_and_dense(scene, tmp_path, capsys, schedule, named):
    folder, _ = scene
    assert main([str(folder), "--model", "vggt-tiny", "--schedule", schedule, "--max-frames", "4",
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert f"4 frames at 112x112, vggt-tiny, schedule {named}" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["schedule"] == named and summary["frame_names"] == ["000000", "000002", "000003", "000005"]


def test_head_dtype_compute_is_recorded_and_moves_only_the_dense_outputs(scene, tmp_path, capsys):
    folder, _ = scene
    runs = {}
    for head_dtype in ("fp32", "compute"):
        out = tmp_path / head_dtype
        assert main([str(folder), "--model", "vggt-tiny", "--schedule", "none", "--max-frames", "2", "--dtype", "bf16",
                     "--head-dtype", head_dtype, "--out", str(out), "--device", "cpu"]) == 0
        depth = np.load(out / "depth" / "000000.npz")["depth"]
        runs[head_dtype] = (json.loads((out / "summary.json").read_text()), depth)
    assert [summary["head_dtype"] for summary, _ in runs.values()] == ["fp32", "compute"]
    assert not np.array_equal(runs["fp32"][1], runs["compute"][1])


def test_every_nth_frame_and_another_size(scene, tmp_path, capsys):
    folder, _ = scene
    assert main([str(folder), "--model", "vggt-tiny", "--every", "2", "--size", "56", "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["frame_names"] == ["000000", "000002", "000004"] and summary["image_size"] == [56, 56]
    assert summary["preprocess"] == "vggt:56" and "3 frames at 56x56" in capsys.readouterr().out


def test_bad_input_is_one_sentence_and_exit_code_2(scene, tmp_path, capsys):
    folder, _ = scene
    cases = [([str(tmp_path / "missing.mp4"), "--model", "vggt-tiny"], "INPUT " + str(tmp_path / "missing.mp4")),
             ([str(folder), "--model", "da3-small"], "no paper-rule --schedule is shipped for da3-small"),
             ([str(folder), "--model", "vggt-tiny", "--schedule", "schedules/vggt-1b-paper.yaml"],
              "was made for vggt-1b"),
             ([str(folder), "--model", "vggt-tiny", "--size", "0"], "--size is 0"),
             ([str(folder), "--model", "vggt-tiny", "--max-points", "0"], "--max-points is 0")]
    for argv, sentence in cases:
        assert main(argv + ["--out", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert sentence in error and error.startswith("error: ")


def write_test_video(path, frames: int, height: int, width: int) -> None:
    """An H.264 mp4 of moving colour gradients, written frame by frame with PyAV."""
    import av

    rows, cols = np.mgrid[0:height, 0:width]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            frame = np.stack([(cols + 2 * index) % 256, (rows + index) % 256, (cols + rows) % 256], -1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")))
        container.mux(stream.encode(None))


def test_a_300_frame_video_through_max_frames_64_stays_under_2_gb(tmp_path):
    video = tmp_path / "walk.mp4"
    write_test_video(video, 300, 240, 320)
    command = [sys.executable, "-m", "spark3r.commands.reconstruct", str(video), "--model", "vggt-tiny",
               "--max-frames", "64", "--out", str(tmp_path / "out"), "--device", "cpu"]
    measure = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    peak_kib = int(subprocess.run([sys.executable, "-c", measure, *command], check=True, capture_output=True,
                                  text=True).stdout)
    assert peak_kib * 1024 < 2 * 2**30
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["frames"] == 64 and summary["frame_names"][:2] == ["frame000000", "frame000005"]  # 299 / 63
    assert summary["frame_names"][-1] == "frame000299" and summary["image_size"] == [84, 112]


def test_frame_files_do_not_depend_on_the_writer_threads(tmp_path):
    from spark3r.export.frames import write_frames

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 14, 21, 3), dtype=np.uint8)
    depth = rng.uniform(0.5, 4.0, (5, 14, 21)).astype(np.float32)
    depth[0, 0, 0], depth[1, 2, 3] = np.nan, -1.0
    confidence = rng.uniform(1.0, 3.0, (5, 14, 21)).astype(np.float32)
    names = [f"frame{i:03d}" for i in range(5)]
    calls = []
    scales = [write_frames(tmp_path / str(workers), names, images, depth, confidence, on_frame=lambda: calls.append(1),
                           workers=workers) for workers in (1, 4)]
    assert scales[0] == scales[1] == pytest.approx(float(np.nanmax(depth)) / 65535) and len(calls) == 10
    one = sorted(p.relative_to(tmp_path / "1") for p in (tmp_path / "1").rglob("*") if p.is_file())
    assert len(one) == 15 and one == sorted(p.relative_to(tmp_path / "4") for p in (tmp_path / "4").rglob("*")
                                           if p.is_file())
    assert all((tmp_path / "1" / p).read_bytes() == (tmp_path / "4" / p).read_bytes() for p in one)
    back = cv2.imread(str(tmp_path / "4" / "images" / "frame002.png"), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert np.array_equal(back, images[2])


def test_point_cloud_filters_samples_and_unprojects_like_a_pixel_loop():
    from spark3r.reconstruct import point_cloud

    rng = np.random.default_rng(3)
    S, H, W = 3, 7, 9
    depth = rng.uniform(0.5, 3.0, (S, H, W)).astype(np.float32)
    depth[0, 1, 2], depth[2, 6, 8] = np.nan, -1.0
    confidence = rng.uniform(1.0, 2.0, (S, H, W)).astype(np.float32)
    images = rng.integers(0, 256, (S, H, W, 3), dtype=np.uint8)
    K = np.array([[[8.0 + s, 0, 4.5], [0, 7.0, 3.5], [0, 0, 1]] for s in range(S)])
    angles = rng.uniform(-0.5, 0.5, (S, 3))
    E = []
    for a, b, c in angles:
        Rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        Rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
        E.append(np.hstack([Rz @ Rx, rng.normal(size=(3, 1))]))
    E = np.array(E)
    valid = np.isfinite(depth) & (depth > 0)
    threshold = np.percentile(confidence[valid], 30)
    expected_points, expected_colors = [], []
    for s in range(S):  # brute force, pixel by pixel
        for i in range(H):
            for j in range(W):
                if valid[s, i, j] and confidence[s, i, j] >= threshold:
                    ray = np.linalg.solve(K[s], [j + 0.5, i + 0.5, 1.0])
                    expected_points.append(E[s, :, :3].T @ (depth[s, i, j] * ray - E[s, :, 3]))
                    expected_colors.append(images[s, i, j])
    points, colors, found = point_cloud(depth, confidence, K, E, images, confidence_percentile=30)
    assert found == pytest.approx(threshold) and points.dtype == np.float32 and colors.dtype == np.uint8
    assert np.allclose(points, expected_points, atol=1e-5) and np.array_equal(colors, expected_colors)

    few, few_colors, _ = point_cloud(depth, confidence, K, E, images, confidence_percentile=30, max_points=40, seed=1)
    again, _, _ = point_cloud(depth, confidence, K, E, images, confidence_percentile=30, max_points=40, seed=1)
    assert np.array_equal(few, again) and 15 <= len(few) <= 70  # each kept with probability 40 / ~120, seeded
    distance = np.linalg.norm(few[:, None].astype(np.float64) - np.asarray(expected_points)[None], axis=-1)
    nearest = distance.argmin(axis=1)  # every sampled point is one of the kept pixels, with its colour
    assert distance.min(axis=1).max() < 1e-5 and np.array_equal(few_colors, np.asarray(expected_colors)[nearest])
