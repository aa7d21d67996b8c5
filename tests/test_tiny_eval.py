"""benchmarks/tiny_eval.py: the evaluation's JSON with its provenance and the identity of the weights file."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from safetensors.torch import save_file

import spark3r
from support import load_benchmark

bench = load_benchmark("tiny_eval")


def test_writes_the_evaluation_with_command_commit_device_and_weights_hash(tmp_path):
    weights = tmp_path / "w.safetensors"
    model = spark3r.load_model("vggt-tiny", weights="none", seed=3)
    save_file({key: value.half().contiguous() for key, value in model.state_dict().items()}, weights)
    out = tmp_path / "eval.json"
    assert bench.main(["--weights", str(weights), "--clips", "synthetic:1:1000", "--frames", "2", "--out",
                       str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert {"command", "commit", "device_name"} <= set(result) and list(result["lengths"]) == ["2"]
    assert set(result["lengths"]["2"]["results"]) == {"model", "frame_only", "trivial"}
    assert bench.main(["--weights", "none", "--clips", "synthetic:1:1000", "--frames", "2", "--out", str(out)]) == 0
    assert "weights_sha256" not in json.loads(out.read_text())


def test_names_the_bundled_weights_by_their_hash_when_run_with_auto(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.train_tiny, "main", lambda argv: print("{}") or 0)  # the evaluation itself: above
    out = tmp_path / "eval.json"
    assert bench.main(["--weights", "auto", "--out", str(out)]) == 0
    bundled = Path(spark3r.__file__).parent / "weights" / "vggt-tiny.safetensors"
    assert json.loads(out.read_text())["weights_sha256"] == hashlib.sha256(bundled.read_bytes()).hexdigest()


def test_passes_the_dtype_to_the_evaluation(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(bench.train_tiny, "main", lambda argv: seen.append(argv) or 1)
    out = tmp_path / "e.json"
    assert bench.main(["--weights", "none", "--dtype", "fp32", "--device", "cuda", "--out", str(out)]) == 1
    assert seen[0][seen[0].index("--dtype") + 1] == "fp32" and seen[0][seen[0].index("--device") + 1] == "cuda"


def test_logit_scale_evaluates_weights_whose_global_q_norms_are_scaled(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    weights = tmp_path / "w.safetensors"
    state = spark3r.load_model("vggt-tiny", weights="none", seed=3).state_dict()
    save_file({key: value.contiguous() for key, value in state.items()}, weights)
    evaluated = {}

    def evaluate(argv):
        evaluated.update(load_file(argv[argv.index("--evaluate") + 1]))
        print(json.dumps({"lengths": {}}))
        return 0

    monkeypatch.setattr(bench.train_tiny, "main", evaluate)
    out = tmp_path / "e.json"
    assert bench.main(["--weights", str(weights), "--logit-scale", "2.5", "--out", str(out)]) == 0
    scaled = {key for key in state if key.startswith("aggregator.global_blocks.") and ".attn.q_norm." in key}
    assert len(scaled) == 2 * 12  # weight and bias of each of the 12 global layers' q-norm
    for key, value in state.items():
        torch.testing.assert_close(evaluated[key], value * 2.5 if key in scaled else value, rtol=0, atol=0)
    assert json.loads(out.read_text())["logit_scale"] == 2.5
