"""benchmarks/reconstruct.py on CPU with vggt-tiny: it generates the video, reconstructs it and writes the results."""
import json
from support import load_benchmark

benchmark = load_benchmark("reconstruct")


def test_generates_a_walk_video_and_records_every_stage(tmp_path, capsys):
    argv = ["--model", "vggt-tiny", "--weights", "auto", "--frames", "6", "--size", "56", "--device", "cpu",
            "--work", str(tmp_path / "work"), "--results", str(tmp_path / "result")]
    assert benchmark.main(argv) == 0
    record = json.loads((tmp_path / "result.json").read_text())
    summary = record["summary"]
    assert summary["frames"] == 6 and summary["image_size"] == [56, 56] and summary["input"].endswith("walk-6.mp4")
    assert set(summary["seconds"]) == {"read", "load_model", "model", "points", "frames", "preview"}
    assert record["command"].startswith("python benchmarks/reconstruct.py --model vggt-tiny")
    assert len(record["commit"].removesuffix(" + uncommitted changes")) == 40 and record["video_seconds"] > 0
    assert record["device_name"].endswith("torch threads)") and record["note"] is None
    text = (tmp_path / "result.md").read_text()
    assert "| model |" in text and "schedule paper (vggt-tiny-paper.yaml)" in text and text in capsys.readouterr().out
