"""benchmarks/merge_kernels.py on CPU: every merging candidate is the per-slot mean (float64 brute force), every
similarity kernel gives the torch path's max, and the script writes its rows, the fused kernels' rows too (run in
Triton's interpreter)."""
import json
import os

import pytest
import torch
from support import load_benchmark

bench = load_benchmark("merge_kernels")

SCHEDULE = """spark3r_schedule: 1
model: vggt-tiny
global_layers: 12
default:
  query: {merge: 3, group_frames: 4}
  kv: {keep: 0.25, method: frame_stride, keep_reference_frame: true}
"""


@pytest.mark.parametrize("name", list(bench.MERGES))
def test_every_merge_candidate_is_the_mean_of_each_slot(name):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 11, 4, dtype=torch.float64, generator=generator)
    slot = torch.tensor([[0, 1, 0, 2, 3, 3, 3, 1, 4, 0, 2], [4, 3, 2, 1, 0, 0, 1, 2, 3, 4, 4]])
    expected = torch.zeros(2, 3, 5, 4, dtype=torch.float64)
    for b in range(2):
        for s in range(5):
            expected[b, :, s] = sum(q[b, :, t] for t in range(11) if slot[b, t] == s) / (slot[b] == s).sum()
    torch.testing.assert_close(bench.MERGES[name](q, slot, 5), expected, rtol=1e-12, atol=1e-12)


def test_the_script_times_each_candidate_and_records_it(tmp_path):
    (tmp_path / "s.yaml").write_text(SCHEDULE)
    out = tmp_path / "mk.json"
    result = bench.main(["--model", "vggt-tiny", "--frames", "8", "--device", "cpu", "--repeats", "1", "--dtype",
                         "fp32", "--schedule", str(tmp_path / "s.yaml"), "--out", str(out)])
    assert [row["kernel"] for row in result["similarity"]] == ["torch, chunk 2^26", "torch, chunk 2^28",
                                                               "torch, chunk 2^30"]
    assert all(row["max_abs_diff"] == 0 and row["same_index"] == 1 for row in result["similarity"])
    assert [(row["kernel"], row["same"]) for row in result["metric"]] == [("torch path (mean, then normalise)", 1)]
    assert [row["merge"] for row in result["merge"]] == list(bench.MERGES)
    assert all(row["seconds"] > 0 and row["max_abs_diff"] < 1e-5 for row in result["merge"])
    assert [row["equal"] for row in result["unmerge"]] == [True, True]
    assert result["layer_deviation"] is None  # no fused kernels on CPU
    assert result["queries"] < result["tokens"] == 8 * 69
    assert {"command", "commit", "device_name"} <= set(json.loads(out.read_text()))
    assert "| index_add over all heads |" in out.with_suffix(".md").read_text()


def test_the_fused_kernels_get_their_rows_and_the_layer_deviation(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from spark3r.reduce import fused, merge  # kernels interpreted on CPU (conftest)

    monkeypatch.setattr(merge, "fused_kernels", lambda tensor: None if os.environ.get("SPARK3R_FUSED") == "0"
                        else fused)
    (tmp_path / "s.yaml").write_text(SCHEDULE)
    result = bench.main(["--model", "vggt-tiny", "--frames", "8", "--device", "cpu", "--repeats", "1", "--dtype",
                         "fp32", "--schedule", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "mk.json")])
    similarity = {row["kernel"]: row for row in result["similarity"]}
    fused_rows = [row for name, row in similarity.items() if name.startswith("fused Triton kernel")]
    assert len(fused_rows) == 1 + len(fused.BEST_DESTINATIONS_BLOCKS)  # autotuned, then each tiling
    assert all(row["same_index"] == 1 and row["max_abs_diff"] < 1e-6 for row in fused_rows)
    assert next(row for row in result["merge"] if row["merge"] == "fused Triton kernel")["max_abs_diff"] < 1e-6
    assert result["metric"][1]["kernel"] == "fused Triton kernel" and result["metric"][1]["max_abs_diff"] < 1e-6
    deviation = result["layer_deviation"]
    assert deviation["fused_vs_torch_rel_l2"] < 1e-6 and deviation["torch_vs_fp32_rel_l2"] < 1e-6  # fp32 run
    assert "fused path against the torch path" in (tmp_path / "mk.md").read_text()


def test_a_candidate_that_fails_is_recorded_not_raised(tmp_path, monkeypatch):
    def unavailable(q, slot, n_q):
        raise RuntimeError("segment_reduce: not implemented for this backend\nsecond line")

    monkeypatch.setitem(bench.MERGES, "segment mean over sorted tokens", unavailable)
    (tmp_path / "s.yaml").write_text(SCHEDULE)
    result = bench.main(["--model", "vggt-tiny", "--frames", "8", "--device", "cpu", "--repeats", "1", "--schedule",
                         str(tmp_path / "s.yaml"), "--out", str(tmp_path / "mk.json")])
    assert result["merge"][-1] == {"merge": "segment mean over sorted tokens",
                                   "error": "segment_reduce: not implemented for this backend"}
    assert "| segment mean over sorted tokens | failed: segment_reduce: not implemented" in \
        (tmp_path / "mk.md").read_text()


def test_a_schedule_that_merges_nothing_is_refused_with_exit_2(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", "vggt-tiny", "--frames", "8", "--device", "cpu", "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
