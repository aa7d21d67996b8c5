"""Profiles at several lengths: the length model's fit, the profile format, the length-aware search and its export."""
import itertools
import json
import math

import numpy as np
import pytest

from spark3r.errors import Spark3rError
from spark3r.models.registry import build_model
from spark3r.profiler.format import MetricTable, Profile, load_profile, save_profile
from spark3r.profiler.length_model import Cells, fit_length_model
from spark3r.profiler.lengths import combine, kept_frames, length_models, levels_at
from spark3r.reduce import Reduction
from spark3r.reduce.flops import global_attention_fraction, model_flops
from spark3r.schedule import load_schedule
from spark3r.commands.search_schedule import main as search_main
from spark3r.search.lengths import (
    LengthCandidate, build_length_problem, merge_steps, parse_lengths, schedule_deviation, search,
)

TINY = build_model("vggt-tiny", device="meta").flop_config(112, 112)  # 5 special + 8 x 8 patches per frame
LAYERS = 3
# per layer (a, b, c, e) of kv deviation exp(a) S^b n^c (1 - n/S)^e and (a, b, e) of query exp(a) S^b (1 - 1/m)^e
KV_LAW = np.array([[-3.0, 0.5, -0.7, 1.5], [-2.0, 0.2, -0.3, 2.0], [-4.0, 0.9, -1.1, 1.0]])
QUERY_LAW = np.array([[-5.0, 0.1, 1.2], [-4.5, 0.3, 0.8], [-6.0, 0.0, 2.0]])


def kv_law(frames, kept, law=KV_LAW):
    return np.exp(law[:, :1] + law[:, 1:2] * np.log(frames) + law[:, 2:3] * np.log(kept)
                  + law[:, 3:] * np.log(1 - kept / frames))


def query_law(frames, merge, law=QUERY_LAW):
    return np.exp(law[:, :1] + law[:, 1:2] * np.log(frames) + law[:, 2:] * np.log(1 - 1 / merge))


def test_fit_recovers_the_exponents_of_a_power_law():
    frames = np.array([s for s in (16, 32, 64) for n in (1, 2, 4, 8, 16, 32) if n < s], dtype=float)
    kept = np.array([n for s in (16, 32, 64) for n in (1, 2, 4, 8, 16, 32) if n < s], dtype=float)
    query_frames = np.repeat([16.0, 32.0, 64.0], 3)
    merge = np.tile([2.0, 3.0, 4.0], 3)
    dense = np.array([16.0, 32.0, 64.0])  # dense cells (n = S, m = 1) are measured 0 and left out of the fit
    kv = Cells(np.r_[frames, dense], np.r_[kept, dense], np.c_[kv_law(frames, kept), np.zeros((LAYERS, 3))])
    query = Cells(np.r_[query_frames, dense], np.r_[merge, np.ones(3)],
                  np.c_[query_law(query_frames, merge), np.zeros((LAYERS, 3))])
    model = fit_length_model("score", kv, query)
    np.testing.assert_allclose(model.kv, KV_LAW, atol=1e-9)
    np.testing.assert_allclose(model.query, QUERY_LAW, atol=1e-9)
    np.testing.assert_allclose(model.kv_deviation(1000, 40), kv_law(1000.0, 40.0)[:, 0], rtol=1e-9)
    np.testing.assert_array_equal(model.kv_deviation(100, 100), np.zeros(LAYERS))  # all K/V kept: dense
    np.testing.assert_array_equal(model.query_deviation(100, 1), np.zeros(LAYERS))
    held = model.held_out  # fitted on 16 and 32 frames: the law is exact, so the 64-frame error is 0
    assert held["frames"] == 64 and held["fitted_on"] == [16, 32]
    assert held["kv"]["rmse_log"] < 1e-9 and held["query"]["median_relative_error"] < 1e-9
    assert held["all"]["spearman"] == pytest.approx(1.0)


def test_a_feature_constant_over_the_fit_gets_exponent_zero():
    kept = np.array([1.0, 2.0, 4.0])
    kv = Cells(np.full(3, 8.0), kept, kv_law(8.0, kept))
    query = Cells(np.full(3, 8.0), np.array([2.0, 3.0, 4.0]), query_law(8.0, np.array([2.0, 3.0, 4.0])))
    with pytest.raises(Spark3rError, match="two clip lengths"):
        fit_length_model("score", kv, query)
    twice = Cells(np.r_[kv.frames, 16.0], np.r_[kept, 1.0], np.c_[kv.value, kv_law(16.0, 1.0)])
    model = fit_length_model("score", twice, query)
    assert model.query[:, 1].tolist() == [0.0] * LAYERS  # queries profiled at one length: no length exponent
    assert model.held_out["fitted_on"] == [8]


def length_profile(frames: int, kv_frames=(1, 2, 4), merges=(1, 2, 4), layers=LAYERS) -> Profile:
    """A one-length profile whose tables follow KV_LAW / QUERY_LAW exactly (frame stride, reference frame kept);
    with more layers than LAYERS the laws repeat."""
    layout_doc = {"n_special": 5, "grid_h": 8, "grid_w": 8}
    keeps = [keep for keep in levels_at(frames, (0.5,), kv_frames)]
    profile = Profile(model="vggt-tiny", global_layers=layers, frames=frames, image_hw=(112, 112), layout=layout_doc,
                      clips=[{"name": f"c{frames}", "sha256": f"{frames:064d}", "frames": frames}],
                      options={"kv_method": "frame_stride", "keep_reference_frame": True, "group_frames": 20,
                               "weights": "none"},
                      kv_keep=keeps, query_merge=list(merges), metrics=["score"], kv={}, query={})
    kept = np.array([kept_frames(profile.frame_layout, Reduction(kv_keep=keep)) for keep in keeps])
    kv_laws, query_laws = np.resize(KV_LAW, (layers, 4)), np.resize(QUERY_LAW, (layers, 3))
    kv = np.where(kept < frames, kv_law(float(frames), np.minimum(kept, frames - 0.5), kv_laws), 0.0)
    query = np.where(np.asarray(merges) > 1, query_law(float(frames), np.maximum(merges, 2.0), query_laws), 0.0)
    profile.kv = {"score": MetricTable(kv, kv * 0, kv * 0)}
    profile.query = {"score": MetricTable(query, query * 0, query * 0)}
    return profile


def test_levels_in_kept_frames_and_their_counts():
    # at 16 frames kv: {frames: 4} keeps 1 / ceil(16 / 4) = 1/4; {frames: 3} keeps 1/6, i.e. frames 0, 6, 12
    assert levels_at(16, (0.5,), (3, 4, 16)) == (1.0, 0.5, 0.25, 1 / 6)
    layout = length_profile(16).frame_layout
    assert kept_frames(layout, Reduction(kv_keep=1 / 6)) == 3
    assert kept_frames(layout, Reduction(kv_keep=0.25, kv_method="grid")) == pytest.approx(1 + 15 * 16 / 64)


def test_profile_of_several_lengths_round_trip_and_old_profiles_still_load(tmp_path):
    combined = combine([length_profile(32), length_profile(8), length_profile(16)])
    assert combined.frames == 32 and [entry["frames"] for entry in combined.by_length] == [8, 16, 32]
    path = save_profile(combined, tmp_path / "p")
    loaded = load_profile(path)
    assert loaded.by_length == json.loads(json.dumps(combined.by_length))
    model = length_models(loaded)["score"]
    np.testing.assert_allclose(model.kv, KV_LAW, atol=1e-8)
    np.testing.assert_allclose(model.query[:, [0, 2]], QUERY_LAW[:, [0, 2]], atol=1e-8)
    assert model.held_out["frames"] == 32 and model.held_out["kv"]["rmse_log"] < 1e-8

    old = save_profile(length_profile(8), tmp_path / "old")  # one length: written (and read) as before
    assert "by_length" not in json.loads(old.read_text())
    assert load_profile(old).by_length == [] and length_models(load_profile(old)) == {}
    doc = json.loads(path.read_text())
    doc["length_model"]["score"]["kv"] = [[0.0, 1.0]]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(Spark3rError, match="rerun profile-layers"):
        length_models(load_profile(tmp_path / "bad.json"))


def test_merge_steps_and_lengths():
    assert merge_steps((100, 300, 1000), [1, 2, 2]) == merge_steps((100, 1000), [1, 2])
    assert merge_steps((100, 300, 1000), [3, 3, 3]) == 3
    assert merge_steps((100, 300, 1000), [1, 2, 4]).at(300) == 2
    assert parse_lengths("1000,100,300") == (100, 300, 1000)
    with pytest.raises(Spark3rError, match="whole numbers"):
        parse_lengths("100,x")


def brute_force(problem, budget):
    """The least-deviation candidate within budget over every K/V level per layer and merge per band."""
    best = None
    for kv in itertools.product(range(len(problem.kv_frames)), repeat=problem.global_layers):
        for merge in itertools.product(range(len(problem.query_merge)), repeat=len(problem.lengths)):
            if list(merge) != sorted(merge):
                continue
            candidate = LengthCandidate(kv, merge)
            if (problem.flops_fractions(candidate) <= budget).all() and \
                    (best is None or problem.deviation(candidate) < problem.deviation(best)):
                best = candidate
    return best


@pytest.mark.parametrize("lengths,budget", [((100,), 0.1), ((60, 200), 0.12)])
def test_search_finds_the_brute_force_optimum(lengths, budget):
    profile = combine([length_profile(s) for s in (8, 16, 32)])
    problem = build_length_problem(profile, TINY, lengths)
    found = search(problem, budget)
    assert found and all((problem.flops_fractions(c) <= budget).all() for c in found)
    assert problem.deviation(found[0]) == pytest.approx(problem.deviation(brute_force(problem, budget)), rel=1e-12)


def brute_force_fraction(schedule, frames):
    """Reduced / dense QK^T + AV FLOPs summed over the global layers, layer by layer from reduce/flops."""
    reductions = schedule.reductions(frames)
    reduced = model_flops(TINY, frames, reductions).global_attention
    return reduced / model_flops(TINY, frames).global_attention


def test_search_schedule_frames_exports_a_schedule_within_budget_at_every_length(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save_profile(combine([length_profile(s, layers=12) for s in (8, 16, 32)]), tmp_path / "profiles" / "vggt-tiny")
    assert search_main(["--budget", "0.06", "--frames", "100,300,1000", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    schedule = load_schedule(result["schedule"])
    assert schedule.budget.frames == 1000 and result["frames_stated"]
    for frames in (100, 300, 1000):
        fraction = brute_force_fraction(schedule, frames)
        assert fraction <= 0.06 and fraction == pytest.approx(schedule.predicted[f"flops_fraction_at_{frames}"])
        assert fraction == pytest.approx(global_attention_fraction(TINY, frames, schedule))
        assert schedule_deviation(length_models(load_profile(result["profile"]))["score"], schedule, TINY, frames) \
            == pytest.approx(schedule.predicted[f"deviation_at_{frames}"])
    for row in ("chosen", "uniform_best", "paper_rule"):
        assert set(result[row]["flops_fraction"]) == {"8", "16", "32", "100", "300", "1000"}
    assert result["chosen"]["deviation"]["1000"] <= result["uniform_best"]["deviation"]["1000"] + 1e-12 or \
        np.mean([result["chosen"]["deviation"][s] for s in ("100", "300", "1000")]) <= \
        np.mean([result["uniform_best"]["deviation"][s] for s in ("100", "300", "1000")]) + 1e-12

    assert search_main(["--budget", "0.06"]) == 0  # no --frames: the default deployment length, stated
    out = capsys.readouterr().out
    assert "1000 frames (the default; pass --frames to choose)" in out and "paper's rule" in out
    assert search_main(["--budget", "0.0001", "--frames", "1000"]) == 2
    assert "no schedule meets budget 0.0001" in capsys.readouterr().err


def test_verify_of_a_length_aware_search_exports_the_uniform_schedule_when_it_measures_best(
        tmp_path, monkeypatch, capsys):
    from test_search import uniform_measures_best

    monkeypatch.chdir(tmp_path)
    save_profile(combine([length_profile(s, layers=12) for s in (8, 16, 32)]), tmp_path / "profiles" / "vggt-tiny")
    uniform_measures_best(monkeypatch, frames=48)
    assert search_main(["--budget", "0.1", "--frames", "48", "--verify", "2", "--calib", "synthetic:1:77",
                        "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    uniform = result["uniform_best"]
    assert uniform["measured_deviation"] == 0.5 and len(result["verified"]) == 3
    assert {key: result["chosen"][key] for key in ("kv_frames", "query_merge")} == \
        {key: uniform[key] for key in ("kv_frames", "query_merge")}
    assert result["chosen"]["deviation"]["48"] > uniform["deviation"]["48"] - 1e-12  # measured, not predicted, won


def test_one_length_profile_refuses_several_frames(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save_profile(length_profile(8, layers=12), tmp_path / "profiles" / "vggt-tiny")
    assert search_main(["--budget", "0.5", "--frames", "100,300", "--trials", "5"]) == 2
    assert "names several lengths" in capsys.readouterr().err
    assert search_main(["--budget", "0.9", "--trials", "5"]) == 0
    assert "(the profile clip length, the default: pass --frames)" in capsys.readouterr().out


def test_profile_layers_at_several_lengths_then_verify_at_a_longer_one(tmp_path, monkeypatch, capsys):
    from spark3r.commands.profile_layers import main as profile_main

    monkeypatch.chdir(tmp_path)
    assert profile_main(["--model", "vggt-tiny", "--calib", "synthetic:1:5", "--frames", "4,6,8", "--kv-frames",
                         "1,2", "--kv-keep", "0.5", "--query-merge", "2", "--additivity", "0", "--device", "cpu",
                         "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "length model (score), fitted on [4, 6] frames, predicting 8" in out
    profile = load_profile(tmp_path / "profiles" / "vggt-tiny")
    assert [entry["frames"] for entry in profile.by_length] == [4, 6, 8]
    assert [entry["kv_frames"] for entry in profile.by_length][0] == [4, 2, 1]  # keep 1, 1/2 (= 2 frames), 1/4
    assert all((tmp_path / "profiles" / "vggt-tiny" / f"frames-{s}" / "profile.json").is_file() for s in (4, 6, 8))
    assert math.isfinite(profile.length_model["score"]["held_out"]["all"]["rmse_log"])
    assert search_main(["--budget", "0.5", "--frames", "12", "--verify", "2", "--calib", "synthetic:1:5",
                        "--device", "cpu"]) == 2  # the calibration scene at another length is not held out
    assert "not held out" in capsys.readouterr().err
    assert search_main(["--budget", "0.5", "--frames", "12", "--verify", "2", "--calib", "synthetic:1:77",
                        "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    uniform = result["uniform_best"]
    assert len(result["verified"]) in (2, 3) and result["chosen"]["measured_deviation"] == \
        min(row["measured_deviation"] for row in result["verified"])
    assert {"kv_frames": uniform["kv_frames"], "query_merge": uniform["query_merge"],
            "measured_deviation": uniform["measured_deviation"]} in result["verified"]  # always measured
    assert load_schedule(result["schedule"]).provenance["verify_frames"] == 12
