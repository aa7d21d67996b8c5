"""benchmarks/length_1b.py end to end on CPU, on vggt-tiny with random weights: profile, length-aware search, timing."""
import json

from spark3r.schedule import load_schedule
from support import load_benchmark

bench = load_benchmark("length_1b")


def test_whole_run_writes_the_searched_schedule_its_timing_and_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARK3R_COMMIT", "0123abc")
    out = tmp_path / "out" / "length-1b"
    result = bench.main(["--model", "vggt-tiny", "--frames", "16", "--profile-frames", "4,8", "--kv-frames", "2",
                         "--size", "112", "--repeats", "1", "--device", "cpu", "--work", str(tmp_path / "work"),
                         "--out", str(out)])
    assert result["commit"] == "0123abc" and result["command"].startswith("python benchmarks/length_1b.py")
    saved = json.loads(out.with_suffix(".json").read_text())
    schedule = load_schedule(saved["searched"]["schedule"])
    assert schedule.global_layers == 12
    assert saved["searched"]["flops_fraction"] <= saved["budget"] * (1 + 1e-9)
    speed = json.loads((tmp_path / "out" / "length-1b-speed.json").read_text())
    rows = {row["schedule"]: row for row in speed["rows"]}
    assert saved["time_ratio"] == rows["vggt-tiny-searched-f16"]["end_to_end_s"] / rows["vggt-tiny-paper"]["end_to_end_s"]
    assert "git 0123abc" in out.with_suffix(".md").read_text()
