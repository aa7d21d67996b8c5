"""benchmarks/tiny_attention.py: attention mass per key frame against a float64 loop, the distance shares by hand, and
a CPU run that leaves the model's outputs as the dense model's."""
from __future__ import annotations

import json
import math

import pytest
import torch

import spark3r
from spark3r.models.base import FrameLayout
from spark3r.training.evaluation import predict
from support import load_benchmark

bench = load_benchmark("tiny_attention")


def test_query_tokens_are_the_camera_token_and_evenly_spaced_patches():
    layout = FrameLayout(frames=3, n_special=5, grid_h=4, grid_w=4)
    assert bench.query_tokens(layout, 2).tolist() == [0, 5, 20]  # camera, first patch, last patch
    assert bench.query_tokens(layout, 0).tolist() == [0]


def test_frame_mass_against_a_float64_loop():
    layout = FrameLayout(frames=4, n_special=1, grid_h=1, grid_w=2)  # 3 tokens per frame
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 2, layout.tokens, 4, generator=generator) for _ in range(2))
    queries = torch.tensor([0, 2])
    probabilities = bench.attention_rows(q, k, layout, queries, frames=3)  # query frames 1 and 2
    mass = bench.frame_mass(probabilities, layout)
    assert probabilities.shape == (2, 2, 2, 2, 12) and mass.shape == (2, 2, 2, 2, 4)
    for b in range(2):
        for h in range(2):
            for f, frame in enumerate((1, 2)):
                for j, offset in enumerate(queries.tolist()):
                    row = q[b, h, frame * 3 + offset].double()
                    weights = [math.exp(float(row @ k[b, h, t].double()) / 2.0) for t in range(layout.tokens)]
                    total = sum(weights)
                    expected = [sum(weights[3 * s: 3 * s + 3]) / total for s in range(4)]
                    assert mass[b, h, f, j].tolist() == pytest.approx(expected, rel=1e-5)
                    assert probabilities[b, h, f, j].tolist() == pytest.approx([w / total for w in weights], rel=1e-5)


def test_effective_count_is_one_for_one_hot_rows_and_the_length_for_uniform_ones():
    rows = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    assert bench.effective_count(rows).tolist() == pytest.approx([1.0, 4.0, 2.0])


def test_mass_by_distance_by_hand():
    """Two query frames (1 and 2) over 5 key frames, one head, one query each."""
    mass = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.2],    # frame 1: frame 0, own, 1 away, 2 away, 3 away
                         [0.25, 0.25, 0.25, 0.25, 0.0]])  # frame 2: frame 0, 1 away, own, 1 away, 2 away
    shares = bench.mass_by_distance(mass[None, None, :, None, :])
    assert shares["frame 0"] == pytest.approx((0.1 + 0.25) / 2)
    assert shares["own frame"] == pytest.approx((0.5 + 0.25) / 2)
    assert shares["1-2 frames away"] == pytest.approx((0.2 + 0.0 + 0.25 + 0.25) / 2)
    assert shares["3-8 frames away"] == pytest.approx((0.2 + 0.0) / 2)
    assert shares["further"] == 0.0
    uniform4 = 4.0  # frame 2 spreads evenly over 4 frames
    frame1 = math.exp(-sum(p * math.log(p) for p in (0.1, 0.5, 0.2, 0.2)))
    assert shares["effective frames"] == pytest.approx((frame1 + uniform4) / 2)


def test_a_cpu_run_keeps_the_dense_outputs_and_writes_its_table(tmp_path, one_thread):
    out = tmp_path / "attention.json"
    result = bench.main(["--weights", "none", "--clips", "synthetic:1:1000:walk", "--lengths", "3", "6", "--patches",
                         "2", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["pose"] == result["pose"]
    layers = result["global_layers"]
    for length in ("3", "6"):
        assert len(result["attention"][length]) == layers
        for shares in result["attention"][length]:  # the bins partition each query's attention
            parts = shares["frame 0"] + sum(shares[label] for label, _, _ in bench.DISTANCES)
            assert parts == pytest.approx(1.0, abs=1e-5)
            assert 1.0 <= shares["effective frames"] <= int(length)
            assert 1.0 <= shares["effective tokens"] <= int(length) * result["tokens_per_frame"]
            assert 0.0 < shares["top key"] <= 1.0
    model = spark3r.load_model("vggt-tiny", weights="none")
    clips = bench.open_clips("synthetic:1:1000:walk", preprocess=bench.get_entry("vggt-tiny").recipe(), frames=6)
    images, targets = bench.clips_batch(clips, torch.device("cpu"))
    dense = predict(model, images[:, :3], chunk=1)[1]
    truth = bench.relative_to_first(targets.extrinsics.double())
    assert result["pose"]["3"] == pytest.approx(bench.pose_errors(dense, truth, 3), rel=1e-6)
    assert "| rotation error of frames 1-2 (deg) |" in out.with_suffix(".md").read_text()


def test_logit_scale_runs_the_model_with_sharper_global_attention(tmp_path, one_thread):
    out = tmp_path / "sharper.json"
    result = bench.main(["--weights", "none", "--clips", "synthetic:1:1000:walk", "--lengths", "3", "--patches", "2",
                         "--logit-scale", "3", "--device", "cpu", "--out", str(out)])
    model = spark3r.load_model("vggt-tiny", weights="none")
    with torch.no_grad():  # logits x 3 by hand: the q-norm's affine map of every global layer
        for block in model.aggregator.global_blocks:
            block.attn.q_norm.weight.mul_(3.0)
            block.attn.q_norm.bias.mul_(3.0)
    clips = bench.open_clips("synthetic:1:1000:walk", preprocess=bench.get_entry("vggt-tiny").recipe(), frames=3)
    images, targets = bench.clips_batch(clips, torch.device("cpu"))
    sharper = bench.pose_errors(predict(model, images, chunk=1)[1], bench.relative_to_first(
        targets.extrinsics.double()), 3)
    assert result["logit_scale"] == 3.0 and result["pose"]["3"] == pytest.approx(sharper, rel=1e-6)
    assert "global attention logits x 3" in out.with_suffix(".md").read_text()
