"""evaluate-schedule: timing, dense vs reduced on vggt-tiny clips, the summary, the CLI and its one-sentence errors."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from spark3r.commands import evaluate_schedule as command
from spark3r.data.clip import Clip
from spark3r.data.synthetic import render_clip
from spark3r.evaluate import schedule_eval as se
from spark3r.evaluate.metrics import camera_metrics, depth_metrics
from spark3r.reduce import model_flops
from spark3r.schedule import load_schedule

IDENTITY = {"spark3r_schedule": 1, "model": "vggt-tiny", "global_layers": 12, "default": {"kv": {"keep": 1.0}}}
AGGRESSIVE = {"spark3r_schedule": 1, "model": "vggt-tiny", "global_layers": 12,
              "default": {"kv": {"keep": 0.25, "method": "grid"}, "query": {"merge": 2}}}


@pytest.fixture(scope="module")
def tiny(tiny):
    """vggt-tiny with random weights and the camera head's FoV bias at 1 rad, so its intrinsics are finite."""
    with torch.no_grad():
        tiny.camera_head.pose_branch.fc2.bias[7:] = 1.0
    return tiny


@pytest.fixture(scope="module")
def weights(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({key: value.contiguous() for key, value in tiny.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def clip():
    return render_clip(5, frames=3, height=56, width=56)


def write_schedule(path, doc):
    path.write_text(yaml.safe_dump(doc))
    return path


def test_timed_forward_runs_warmup_then_repeats_and_returns_the_last_outputs():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, images):
            self.calls += 1
            return {"depth": images * self.calls}

    model = Counter()
    outputs, seconds, peak = se.timed_forward(model, torch.ones(1, 2, 3, 4, 4), repeats=3, warmup=2)
    assert model.calls == 5 and torch.equal(outputs["depth"], torch.full((1, 2, 3, 4, 4), 5.0))
    assert seconds >= 0 and peak is None


def test_identity_schedule_deviates_by_nothing(tiny, clip):
    result = se.evaluate_clip(tiny, load_schedule(IDENTITY), clip, torch.device("cpu"), repeats=1, warmup=0)
    assert all(value == 0 for value in result.deviation.values())
    assert result.flops["dense"] == result.flops["reduced"] == model_flops(tiny.flop_config(56, 56), 3).total
    assert result.global_attention_fraction == 1.0
    assert result.quality["dense"] == result.quality["reduced"]
    assert set(result.quality["dense"]) == set(se.QUALITY_KEYS)


def test_aggressive_schedule_is_cheaper_and_deviates(tiny, clip):
    result = se.evaluate_clip(tiny, load_schedule(AGGRESSIVE), clip, torch.device("cpu"), repeats=1, warmup=0)
    assert result.flops["reduced"] < result.flops["dense"] and result.global_attention_fraction < 0.5
    assert result.deviation["score"] > 0 and result.deviation["camera_rotation_deg"] > 0


def test_quality_matches_the_metrics_and_needs_ground_truth(tiny, clip):
    with torch.no_grad():
        outputs = tiny(clip.images[None])
    scores = se.quality(outputs, clip)
    assert scores["abs_rel"] == depth_metrics(outputs["depth"][0], clip.depth, align="sequence")["abs_rel"]
    assert scores["auc30"] == camera_metrics(outputs["extrinsics"][0], clip.extrinsics)["auc30"]
    assert se.quality(outputs, Clip(name="plain", images=clip.images)) == {}


def test_summary_sums_times_and_flops_and_averages_the_rest():
    def result(seconds, flops, peak, deviation, abs_rel):
        return se.ClipComparison(name="c", frames=4, seconds={"dense": seconds, "reduced": seconds / 2},
                             peak_bytes={"dense": peak, "reduced": peak // 2},
                             flops={"dense": flops, "reduced": flops / 4}, global_attention_fraction=0.2,
                             deviation={"depth": deviation, "score": 2 * deviation},
                             quality={"dense": {"abs_rel": abs_rel}, "reduced": {}})

    summary = se.summarize([result(1.0, 8.0, 100, 0.1, 0.2), result(3.0, 4.0, 300, 0.3, 0.4)])
    assert summary["dense"]["seconds"] == 4.0 and summary["reduced"]["seconds"] == 2.0
    assert summary["measured_speedup"] == 2.0 and summary["predicted_speedup"] == 4.0
    assert summary["dense"]["peak_bytes"] == 300 and summary["reduced"]["peak_bytes"] == 150
    assert summary["deviation"] == pytest.approx({"depth": 0.2, "score": 0.4})
    assert summary["dense"]["quality"] == pytest.approx({"abs_rel": 0.3}) and summary["reduced"]["quality"] == {}


def test_command_prints_json_and_the_table(weights, tmp_path, capsys, monkeypatch):
    schedule = write_schedule(tmp_path / "s.yaml", AGGRESSIVE)
    args = ["--model", "vggt-tiny", "--schedule", str(schedule), "--clips", "synthetic:1", "--frames", "2",
            "--weights", str(weights), "--device", "cpu", "--repeats", "1", "--warmup", "0"]
    assert command.main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = report["summary"]
    assert summary["clips"] == 1 and len(report["per_clip"]) == 1 and report["model"] == "vggt-tiny"
    assert report["head_dtype"] == "fp32"
    assert summary["predicted_speedup"] > 1 and summary["dense"]["peak_bytes"] is None
    assert set(summary["reduced"]["quality"]) == set(se.QUALITY_KEYS)
    table = command.format_report(summary, "header")
    for text in ("measured speed-up", "predicted speed-up", "peak CUDA memory", "deviation of reduced from dense",
                 "abs_rel", "auc30", "normal_consistency"):
        assert text in table
    loaded, load_model = [], se.load_model
    monkeypatch.setattr(se, "load_model", lambda *a, **k: loaded.append(load_model(*a, **k)) or loaded[-1])
    assert command.main(args + ["--json", "--head-dtype", "compute"]) == 0
    assert json.loads(capsys.readouterr().out)["head_dtype"] == "compute" and loaded[0].head_dtype == "compute"


def test_clips_without_ground_truth_get_no_quality_rows(tiny, clip):
    plain = Clip(name="plain", images=clip.images[:2])
    result = se.evaluate_clip(tiny, load_schedule(AGGRESSIVE), plain, torch.device("cpu"), repeats=1, warmup=0)
    assert result.quality == {"dense": {}, "reduced": {}}
    assert "ground truth: none in these clips" in command.format_report(se.summarize([result]), "header")


@pytest.mark.parametrize("change, message", [
    ({"--schedule": "schedules/vggt-1b-paper.yaml"}, "was made for vggt-1b, not vggt-tiny"),
    ({"--schedule": "missing.yaml"}, "does not exist"),
    ({"--clips": "no/such/clips"}, "does not exist"),
    ({"--weights": "missing.safetensors"}, "does not exist"),
    ({"--repeats": "0"}, "--repeats is 0"),
    ({"--clips": "synthetic:x"}, "bad clip spec"),
])
def test_bad_inputs_exit_2_with_one_sentence(tmp_path, capsys, change, message):
    schedule = write_schedule(tmp_path / "s.yaml", AGGRESSIVE)
    options = {"--model": "vggt-tiny", "--schedule": str(schedule), "--clips": "synthetic:1", "--weights": "none",
               "--device": "cpu", "--repeats": "1", **change}
    assert command.main([item for pair in options.items() for item in pair]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_schedule_with_another_layer_count_is_refused(tmp_path, capsys):
    schedule = write_schedule(tmp_path / "s.yaml", {**AGGRESSIVE, "global_layers": 5})
    assert command.main(["--model", "vggt-tiny", "--schedule", str(schedule), "--clips", "synthetic:1", "--frames", "2",
                    "--weights", "none", "--device", "cpu"]) == 2
    assert "has 5 global layers but the vggt-tiny model has 12" in capsys.readouterr().err


def test_command_samples_every_nth_frame_at_another_size(weights, tmp_path, capsys):
    schedule = write_schedule(tmp_path / "s.yaml", AGGRESSIVE)
    args = ["--model", "vggt-tiny", "--schedule", str(schedule), "--clips", "synthetic:1", "--every", "3",
            "--size", "56", "--weights", str(weights), "--device", "cpu", "--repeats", "1", "--warmup", "0", "--json"]
    assert command.main(args) == 0
    assert json.loads(capsys.readouterr().out)["per_clip"][0]["frames"] == 3  # frames 0, 3, 6 of the default 8
    with pytest.raises(SystemExit) as exit:
        command.main(args[:-1] + ["--frames", "2"])
    assert exit.value.code == 2 and "not allowed with argument --every" in capsys.readouterr().err
