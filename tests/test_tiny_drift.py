"""benchmarks/tiny_drift.py: pose error by frame index and between consecutive frames, by hand and end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch

from support import load_benchmark

bench = load_benchmark("tiny_drift")


def yaw(degrees: float) -> torch.Tensor:
    """World-to-camera [3, 4] of a camera at the origin turned by `degrees` about y."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return torch.tensor([[c, 0, s, 0], [0, 1, 0, 0], [-s, 0, c, 0]], dtype=torch.float64)


def test_bins_cover_the_frames_after_the_first():
    assert bench.index_bins(256) == [(1, 8), (8, 32), (32, 128), (128, 256)]
    assert bench.index_bins(20) == [(1, 8), (8, 20)]


def test_drift_by_hand():
    """Truth: frame i turned by i degrees. Prediction: frame i turned by 2i degrees, so its error against frame 0 is
    i degrees and every consecutive step is off by 1 degree."""
    truth = torch.stack([yaw(i) for i in range(10)])[None]
    predicted = torch.stack([yaw(2 * i) for i in range(10)])[None]
    result = bench.drift(predicted, truth, bench.index_bins(10))
    assert result["by_index"] == pytest.approx({"1-7": 4.0, "8-9": 8.5})  # mean of 1..7, of 8 and 9
    assert result["consecutive"] == pytest.approx(1.0)


def test_a_cpu_run_writes_its_table(tmp_path, one_thread):
    out = tmp_path / "drift.json"
    result = bench.main(["--weights", "none", "--clips", "synthetic:1:1000:walk", "--frames", "9", "--device", "cpu",
                         "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert set(result["rows"]) == {"model", "frame-only global attention"}
    assert list(result["truth_turn"]) == ["1-7", "8-8"]
    assert "| true rotation from frame 0 (deg) |" in out.with_suffix(".md").read_text()
