"""benchmarks/train_step_profile.py: every phase of a vggt-tiny training step timed, on CPU at a toy size."""
from __future__ import annotations

import json

from support import load_benchmark

bench = load_benchmark("train_step_profile")


def test_profile_times_every_phase_and_writes_its_table(tmp_path):
    out = tmp_path / "profile.json"
    result = bench.main(["--weights", "none", "--lengths", "2,3", "--frames-per-step", "4", "--size", "28",
                         "--steps", "1", "--warmup", "1", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert [(row["length"], row["clips"], row["heads"]) for row in result["rows"]] == [
        (2, 2, "fp32"), (2, 2, "compute"), (3, 1, "fp32"), (3, 1, "compute")]
    for row in result["rows"]:
        assert set(row["phases_ms"]) == set(bench.PHASES) and min(row["phases_ms"].values()) > 0
        assert 0 < row["heads_forward_backward_ms"] and row["step_ms"] == sum(
            ms for phase, ms in row["phases_ms"].items() if phase != "sample (CPU)")
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| 2 x 2 |") == 2 and "trunk fwd + bwd" in table
