"""benchmarks/tiny_pose.py: gap errors against hand-built rotations, the windowed attention against a brute-force
per-query softmax, the query scale restoring the model, and one small run with its result files."""
import json

import torch
from scipy.spatial.transform import Rotation
from support import BENCHMARKS, load_benchmark

from spark3r.models.base import FrameLayout
from spark3r.models.loading import load_model

pose = load_benchmark("tiny_pose")


def yaw_cameras(degrees: list[float]) -> torch.Tensor:
    """World-to-camera extrinsics [S, 3, 4] turning about the y axis by the given angles, at the origin."""
    rotations = torch.tensor(Rotation.from_euler("y", [[d] for d in degrees], degrees=True).as_matrix())
    return torch.cat([rotations, torch.zeros(len(degrees), 3, 1, dtype=torch.float64)], dim=-1)


def test_gap_errors_are_zero_for_the_truth_and_the_true_motion_for_identity_cameras():
    truth = yaw_cameras([0.0, 2.0, 4.0, 6.0, 8.0, 10.0])[None]  # 2 degrees a frame
    exact = pose.gap_errors(truth, truth)
    assert [row["gaps"] for row in exact] == [[1, 3], [4, 5]]
    assert [row["pairs"] for row in exact] == [5 + 4 + 3, 2 + 1]
    assert all(row["error_median"] < 1e-6 for row in exact)
    identity = pose.gap_errors(yaw_cameras([0.0] * 6)[None], truth)
    # gaps 1, 2, 3 are 2, 4, 6 degrees (5, 4, 3 pairs: median 4); gaps 4, 5 are 8, 10 degrees (2 and 1 pairs)
    assert abs(identity[0]["error_median"] - 4.0) < 1e-6 and abs(identity[0]["motion_median"] - 4.0) < 1e-6
    assert abs(identity[1]["error_mean"] - (8.0 * 2 + 10.0) / 3) < 1e-6


def test_window_attention_equals_a_softmax_over_the_allowed_frames_by_hand():
    layout = FrameLayout(frames=5, n_special=1, grid_h=1, grid_w=2)  # 3 tokens a frame
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, layout.tokens, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    out = pose.window_attention(q, k, v, layout, window=1)
    for token in range(layout.tokens):
        frame = token // 3
        allowed = [key for key in range(layout.tokens) if abs(key // 3 - frame) <= 1 or key // 3 == 0]
        weights = torch.softmax(torch.einsum("hd,hkd->hk", q[0, :, token], k[0, :, allowed]) / 2.0, dim=-1)  # sqrt(4)
        assert torch.allclose(out[0, :, token], torch.einsum("hk,hkd->hd", weights, v[0, :, allowed]))
    wide = pose.window_attention(q, k, v, layout, window=layout.frames)
    assert torch.allclose(wide, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_query_scale_changes_outputs_inside_and_restores_them_after():
    model = load_model("vggt-tiny", weights="auto")  # trained: its global attention moves the output
    images = torch.rand(1, 3, 3, 112, 112)
    with torch.no_grad():
        before = model(images)["depth"]
        with pose.global_query_scale(model, 2.0):
            scaled = model(images)["depth"]
        after = model(images)["depth"]
    assert (before - scaled).abs().max() > 1e-3
    assert torch.equal(before, after)


def test_a_small_run_writes_its_tables(tmp_path, one_thread):
    out = tmp_path / "tiny-pose.json"
    pose.main(["--clips", "synthetic:1:1000:walk", "--frames", "4", "--temperatures", "1,2", "--windows", "1",
               "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [row["t"] for row in result["temperatures"]] == [1.0, 2.0]
    assert [row["window"] for row in result["windows"]] == [1]
    assert result["gaps"][0]["gaps"] == [1, 3] and result["gaps"][0]["pairs"] == 6
    text = out.with_suffix(".md").read_text()
    assert "| 2 |" in text and "windowed" in text


def test_committed_tables_are_their_result_files_regenerated():
    files = sorted((BENCHMARKS / "results").glob("tiny-pose-*.json"))
    assert files
    for path in files:
        assert path.with_suffix(".md").read_text() == pose.markdown(json.loads(path.read_text())), path
