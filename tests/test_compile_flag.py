"""`compiled` / `--compile`: load_model compiles only when asked, and each inference command's --compile reaches
load_model as compiled=True (the commands run eagerly here: the recording wrapper loads with compiled=False, so
nothing is compiled on CPU)."""
import json

import numpy as np
import pytest
import yaml

import spark3r.evaluate.schedule_eval
import spark3r.models.loading
import spark3r.profiler.pipeline
import spark3r.reconstruct
import spark3r.search.verify
from spark3r.commands import evaluate_schedule, profile_layers, reconstruct, search_schedule
from spark3r.data.clips import write_clip
from spark3r.data.synthetic import render_clip
from spark3r.profiler.format import MetricTable, Profile, save_profile

REAL_LOAD_MODEL = spark3r.models.loading.load_model
SCHEDULE = {"spark3r_schedule": 1, "model": "vggt-tiny", "global_layers": 12,
            "default": {"kv": {"keep": 0.25, "method": "grid"}, "query": {"merge": 2}}}


@pytest.fixture
def compile_calls(monkeypatch):
    """The models compile_model was called with (it is not run)."""
    calls = []
    monkeypatch.setattr(spark3r.models.loading, "compile_model", lambda model, *args, **kwargs: calls.append(model))
    return calls


@pytest.mark.parametrize("compiled, times", [(True, 1), (False, 0)])
def test_load_model_compiles_only_when_asked(compile_calls, compiled, times):
    model = REAL_LOAD_MODEL("vggt-tiny", weights=None, compiled=compiled)
    assert compile_calls == [model] * times


def test_compiled_is_off_by_default(compile_calls):
    REAL_LOAD_MODEL("vggt-tiny", weights=None)
    assert compile_calls == []


def test_compiled_sets_the_inductor_backend_on_the_compilable_modules():
    backends = {name: [module.compile_backend for module in model.modules()
                       if hasattr(type(module), "compile_backend")]
                for name, model in (("eager", REAL_LOAD_MODEL("vggt-tiny", weights=None)),
                                    ("compiled", REAL_LOAD_MODEL("vggt-tiny", weights=None, compiled=True)))}
    assert backends["compiled"] and set(backends["compiled"]) == {"inductor"}
    assert len(backends["eager"]) == len(backends["compiled"]) and "inductor" not in backends["eager"]


def record_load_model(monkeypatch, module) -> list[bool]:
    """Replace `module.load_model` by a wrapper recording each call's `compiled` and loading eagerly."""
    seen = []

    def wrapper(*args, compiled=False, **kwargs):
        seen.append(compiled)
        return REAL_LOAD_MODEL(*args, compiled=False, **kwargs)

    monkeypatch.setattr(module, "load_model", wrapper)
    return seen


@pytest.mark.parametrize("flag", [[], ["--compile"]])
def test_reconstruct_passes_compile(tmp_path, monkeypatch, capsys, flag):
    seen = record_load_model(monkeypatch, spark3r.reconstruct)
    folder = write_clip(render_clip(11, frames=2, height=56, width=56, name="room"), tmp_path, "folder")
    assert reconstruct.main([str(folder), "--model", "vggt-tiny", "--schedule", "none", "--out", str(tmp_path / "out"),
                             "--device", "cpu", *flag]) == 0
    assert seen == [bool(flag)]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["compiled"] is bool(flag)


@pytest.mark.parametrize("flag", [[], ["--compile"]])
def test_evaluate_schedule_passes_compile(tmp_path, monkeypatch, capsys, flag):
    seen = record_load_model(monkeypatch, spark3r.evaluate.schedule_eval)
    schedule = tmp_path / "s.yaml"
    schedule.write_text(yaml.safe_dump(SCHEDULE))
    assert evaluate_schedule.main(["--model", "vggt-tiny", "--schedule", str(schedule), "--clips", "synthetic:1",
                                   "--frames", "2", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--json",
                                   *flag]) == 0
    assert seen == [bool(flag)]
    assert json.loads(capsys.readouterr().out)["compiled"] is bool(flag)


def test_profile_layers_passes_compile(tmp_path, monkeypatch, capsys):
    seen = record_load_model(monkeypatch, spark3r.profiler.pipeline)
    assert profile_layers.main(["--model", "vggt-tiny", "--weights", "none", "--calib", "synthetic:1", "--frames", "2",
                                "--kv-keep", "0.5", "--query-merge", "2", "--additivity", "0", "--device", "cpu",
                                "--dtype", "fp32", "--out", str(tmp_path / "profile"), "--json", "--compile"]) == 0
    assert seen == [True]


def tiny_profile(frames: int = 3) -> Profile:
    """A made-up profile of vggt-tiny's 12 global layers (random weights, seed 0): deviation grows with reduction."""
    layers, kv_keep, query_merge = 12, [1.0, 0.5, 0.25], [1, 2]
    sensitivity = np.linspace(0.001, 0.03, layers)[:, None]

    def tables(reduction):
        mean = sensitivity * reduction[None, :]
        return {"score": MetricTable(mean, mean / 4, mean / 8)}

    return Profile(model="vggt-tiny", global_layers=layers, frames=frames, image_hw=(112, 112),
                   layout={"n_special": 5, "grid_h": 8, "grid_w": 8},
                   clips=[{"name": "synthetic-0", "sha256": "0" * 64, "frames": frames}],
                   options={"kv_method": "frame_stride", "keep_reference_frame": True, "group_frames": 20,
                            "weights": "none"},
                   kv_keep=kv_keep, query_merge=query_merge, metrics=["score"],
                   kv=tables(np.log2(1 / np.asarray(kv_keep))), query=tables(3 * np.log2(np.asarray(query_merge))))


def test_search_schedule_passes_compile_to_verify(tmp_path, monkeypatch, capsys):
    seen = record_load_model(monkeypatch, spark3r.search.verify)
    monkeypatch.chdir(tmp_path)
    save_profile(tiny_profile(), tmp_path / "profiles" / "vggt-tiny")
    assert search_schedule.main(["--budget", "0.5", "--trials", "5", "--verify", "1", "--calib", "synthetic:1:77",
                                 "--json", "--device", "cpu", "--compile"]) == 0
    assert seen == [True]
    assert np.isfinite(json.loads(capsys.readouterr().out)["chosen"]["measured_deviation"])
