"""benchmarks/select_merge.py on CPU: each step of the reduced attention timed, the rows and the share it reports."""
import json
from support import load_benchmark

bench = load_benchmark("select_merge")

SCHEDULE = """spark3r_schedule: 1
model: vggt-tiny
global_layers: 12
default:
  query: {merge: 2, group_frames: 4}
  kv: {keep: 0.25, method: frame_stride, keep_reference_frame: true}
layers:
  3: {kv: {keep: 0.5}}
  4: {query: {merge: 1}, kv: {keep: 1}}
"""


def test_every_step_is_timed_per_distinct_reduction_and_the_share_is_their_sum(tmp_path):
    (tmp_path / "s.yaml").write_text(SCHEDULE)
    out = tmp_path / "sm.json"
    result = bench.main(["--model", "vggt-tiny", "--frames", "8", "--device", "cpu", "--repeats", "1", "--schedule",
                         str(tmp_path / "s.yaml"), "--out", str(out)])
    rows = {row["label"]: row for row in result["rows"]}
    assert set(rows) == {"K/V keep 0.25, query merge 2", "K/V keep 0.5, query merge 2"}  # layer 4 is dense
    assert rows["K/V keep 0.25, query merge 2"]["layers"] == [0, 1, 2, 5, 6, 7, 8, 9, 10, 11]
    for row in rows.values():
        assert set(row["steps_s"]) == set(bench.STEPS)  # key similarity: the metric is the keys' mean over heads
        assert row["select_merge_s"] == sum(s for step, s in row["steps_s"].items() if step != "attention")
        assert row["attention_s"] == row["steps_s"]["attention"]
        assert row["queries"] < 8 * 69 and row["keys"] < 8 * 69
    saved = json.loads(out.read_text())
    assert {"command", "commit", "device_name"} <= set(saved)
    assert "the issue's goal: at most 0.05" in out.with_suffix(".md").read_text()
