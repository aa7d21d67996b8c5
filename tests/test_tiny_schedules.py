"""benchmarks/tiny_schedules.py: baseline FLOP matching, the paired verdict, stability statistics, and one smoke run
of the whole driver (4-frame clips, one clip per set) with its result files."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from spark3r.errors import Spark3rError
from spark3r.models.registry import build_model
from spark3r.profiler.format import MetricTable, Profile, load_profile
from support import load_benchmark

tiny = load_benchmark("tiny_schedules")

FLOP_CONFIG = build_model("vggt-tiny", device="meta").flop_config(112, 112)  # 5 special + 8 x 8 patches per frame


def uniform_fraction(frames: int, factor: int) -> float:
    """Frame stride by hand: every frame's 5 special tokens + 64 patches of ceil(S / r) frames, all queries."""
    return (frames * 5 + math.ceil(frames / factor) * 64) / (frames * 69)


def test_baselines_match_flops_by_hand():
    build = lambda factor: tiny.stride_schedule("vggt-tiny", [factor] * 12, 1, {}, "uniform")  # noqa: E731
    options = tiny.fractions(FLOP_CONFIG, 16, build)
    assert [r for _, r in options] == list(range(1, 17))
    assert [fraction for fraction, _ in options] == pytest.approx([uniform_fraction(16, r) for r in range(1, 17)])
    # r = 4 and 5 keep 4 frames (0.304), r = 6 and 7 keep 3 (0.246)
    fraction, factor, reached = tiny.least_at_or_above(options, 0.25)
    assert (factor, reached) == (4, True) and fraction == pytest.approx(uniform_fraction(16, 4))
    assert tiny.most_within(options, 0.25) == (pytest.approx(uniform_fraction(16, 6)), 6)
    assert tiny.least_at_or_above(options, 1.5)[1:] == (1, False)
    assert tiny.most_within(options, 0.01) is None
    assert tiny.two_tier_factors(6, [3, 4], 2, 3) == [6, 6, 6, 2, 2, 6]
    # at 16 frames one kept frame costs 144 / 1104 = 0.130 of the K/V: budget 0.1 needs merge 2, 0.05 merge 3
    assert [tiny.mildest_merge(FLOP_CONFIG, 16, [1, 2, 3, 4], 12, budget, {}, "vggt-tiny")
            for budget in (0.25, 0.1, 0.05)] == [1, 2, 3]
    with pytest.raises(Spark3rError, match="below every schedule"):
        tiny.mildest_merge(FLOP_CONFIG, 16, [1, 2], 12, 0.01, {}, "vggt-tiny")


def test_schedule_of_factors_resolves_per_layer():
    schedule = tiny.stride_schedule("vggt-tiny", [6, 2, 6, 6, 2, 6], 3, {"group_frames": 8}, "two-tier")
    assert tiny.factors_of(schedule, 16) == ([6, 2, 6, 6, 2, 6], 3)
    assert sorted(schedule.layers) == [1, 4] and schedule.resolve(0, 16).group_frames == 8


def test_compare_is_a_paired_sign_test():
    better = tiny.compare([1, 1, 1, 1, 1, 1, 1, 3], [2] * 8)
    assert (better["wins"], better["losses"]) == (7, 1)
    assert better["p_better"] == pytest.approx(9 / 256) and better["verdict"] == "gain"  # P(X >= 7 | n=8, 1/2)
    assert better["score_ratio"] == pytest.approx(10 / 16)
    assert tiny.compare([1, 3, 1, 3], [2, 2, 2, 2])["verdict"] == "no significant difference"
    assert tiny.compare([3] * 6, [1] * 6)["verdict"] == "loss"
    assert tiny.compare([1, 2], [1, 2])["verdict"] == "same schedule"


def fake_profile(kv_score: np.ndarray, sha: str) -> Profile:
    layers = kv_score.shape[0]
    kv = np.concatenate([np.zeros((layers, 1)), kv_score], axis=1)
    query = np.concatenate([np.zeros((layers, 1)), kv_score[:, :2] / 10], axis=1)
    tables = lambda mean: {"score": MetricTable(mean, mean * 0, mean * 0)}  # noqa: E731
    return Profile(model="vggt-tiny", global_layers=layers, frames=16, image_hw=(112, 112),
                   layout={"n_special": 5, "grid_h": 8, "grid_w": 8},
                   clips=[{"name": sha, "sha256": sha, "frames": 16}], options={}, kv_keep=[1.0, 0.5, 0.25, 0.125],
                   query_merge=[1, 2, 4], metrics=["score"], kv=tables(kv), query=tables(query))


def test_stability_rank_correlations_by_hand():
    first = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]], dtype=float) / 100
    second = first[[1, 0, 2, 3]]  # layers 0 and 1 swap ranks: sum d^2 = 2 -> rho = 1 - 6 * 2 / (4 * 15) = 0.8
    result = tiny.stability(fake_profile(first, "a"), fake_profile(second, "b"), 0.25)
    assert result["spearman"]["score.kv_keep_0.25"] == pytest.approx(0.8)
    assert result["spearman"]["score.kv_mean"] == pytest.approx(0.8)
    assert result["spearman"]["score.query_mean"] == pytest.approx(0.8)
    assert result["per_layer"]["score.kv_mean"][0] == pytest.approx([0.02, 0.05, 0.08, 0.11])
    reverse = tiny.stability(fake_profile(first, "a"), fake_profile(first[::-1].copy(), "b"), 0.125)
    assert reverse["spearman"]["score.kv_keep_0.125"] == pytest.approx(-1)
    with pytest.raises(Spark3rError, match="share 1 clip"):
        tiny.stability(fake_profile(first, "a"), fake_profile(second, "a"), 0.25)
    with pytest.raises(Spark3rError, match="not among the profiled"):
        tiny.stability(fake_profile(first, "a"), fake_profile(second, "b"), 0.3)


def test_restricted_profile_keeps_the_chosen_merge_level():
    profile = fake_profile(np.arange(12, dtype=float).reshape(4, 3) / 100, "a")
    restricted = tiny.restrict_query(profile, 4, Path("profile.json"))
    assert restricted.query_merge == [1, 4]
    assert restricted.query["score"].mean == pytest.approx(profile.query["score"].mean[:, [0, 2]])
    assert restricted.kv["score"].mean is profile.kv["score"].mean
    assert tiny.restrict_query(profile, 1, Path("profile.json")).query_merge == [1]


def test_bad_arguments_are_one_sentence():
    with pytest.raises(Spark3rError, match="--probe-factor 3 must exceed --probe-base 4"):
        tiny.parse_args(["--probe-base", "4", "--probe-factor", "3"])
    with pytest.raises(Spark3rError, match="outside"):
        tiny.parse_args(["--budgets", "0.1,1.5"])
    assert tiny.run(["--frames", "1"]) == 2


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    out = root / "results" / "tiny"
    result = tiny.main(["--frames", "4", "--calib", "synthetic:1:100", "--replica", "synthetic:1:200", "--held-out",
                        "synthetic:1:300", "--kv-keep", "0.5,0.25", "--query-merge", "2", "--additivity", "1",
                        "--trials", "20", "--budgets", "0.5,0.3", "--probe-base", "2", "--probe-factor", "4",
                        "--fixed-keep", "0.5", "--work", str(root / "work"), "--out", str(out)])
    return result, out


def test_smoke_run_writes_consistent_results(smoke):
    result, out = smoke
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["budgets"] == [0.5, 0.3]
    text = out.with_suffix(".md").read_text()
    assert "profile-layers --model vggt-tiny --calib synthetic:1:100" in text and "search-schedule --profile" in text
    assert set(result["stability"]["spearman"]) >= {"score.kv_keep_0.5", "score.kv_mean", "score.query_mean"}
    assert [entry["two_tier_query_merge"] for entry in result["budgets"]] == [1, 2]  # 4 frames: K/V floor 0.304
    for entry in result["budgets"]:
        budget, rows = entry["budget"], entry["schedules"]
        assert set(rows) == set(tiny.ROWS)
        for name in ("searched", "searched_at_m", "two_tier"):
            assert rows[name]["flops_fraction"] <= budget + 1e-9
        for name, uniform in (("searched", "uniform"), ("searched_at_m", "uniform_at_m")):
            below = rows[f"{uniform}_below"]
            searched = rows[name]["flops_fraction"]
            assert below["flops_fraction"] <= searched + 1e-9 and rows[uniform]["flops_fraction"] >= searched - 1e-9
            for row in (rows[uniform], below):
                assert len(set(row["kv_factor"])) == 1 and row["query_merge"] == rows[name]["query_merge"]
        assert rows["two_tier"]["query_merge"] == entry["two_tier_query_merge"]
        for name in ("searched", "searched_at_m"):  # the exported schedule is the knapsack optimum of profile A
            assert rows[name]["predicted"] == pytest.approx(entry["searches"][name]["knapsack"]["deviation"])
        assert all(row["predicted_b"] > 0 for row in rows.values())
        for name, row in rows.items():
            measured = row["measured"]
            assert measured["score"] == pytest.approx(measured["depth"] + measured["points"] + measured["cameras"])
            assert len(row["per_clip_score"]) == 1 and 0 < row["flops_fraction"] <= 1
            assert f"| {budget:g} | " in text
    assert result["budgets"][0]["schedules"]["searched_at_m"]["query_merge"] == 1


def test_smoke_run_profiles_are_disjoint_and_ground_truth_is_sane(smoke):
    result, _ = smoke
    profiles = [load_profile(Path(result["profiles"][name]["path"])) for name in ("A", "B")]
    assert not {clip["sha256"] for clip in profiles[0].clips} & {clip["sha256"] for clip in profiles[1].clips}
    dense = result["held_out_dense"]
    assert 0 < dense["abs_rel"] < 1 and dense["rpe_rot"] >= 0
    assert result["probe"]["base_score"] > 0 and len(result["probe"]["ratio"]) == 12


def test_measure_resumes_from_its_per_clip_cache(tmp_path):
    """A second measure over the same clips and schedules reads every row back and runs no forward."""
    import torch

    from spark3r.models.loading import load_model

    model = load_model("vggt-tiny", weights="none", seed=0)
    clips = tiny.load_clips("synthetic:2:5", "vggt-tiny", 4)
    schedules = {"r2": tiny.stride_schedule("vggt-tiny", [2] * 12, 1, {}, "uniform"),
                 "r4": tiny.stride_schedule("vggt-tiny", [4] * 12, 1, {}, "uniform"),
                 "r4 again": tiny.stride_schedule("vggt-tiny", [4] * 12, 1, {}, "uniform")}
    first = tiny.measure(model, clips, schedules, {}, ground_truth=True, desc="t", cache=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2  # one file per clip
    assert first["r2"][0]["score"] != first["r4"][0]["score"] and first["r4"] == first["r4 again"]

    class NoForward(torch.nn.Module):
        def forward(self, images):
            raise AssertionError("measured again instead of read back")

    model.forward = NoForward().forward
    assert tiny.measure(model, clips, schedules, {}, ground_truth=True, desc="t", cache=tmp_path) == first
    with pytest.raises(AssertionError, match="measured again"):  # other schedules are not in the cache
        tiny.measure(model, clips, {"r3": tiny.stride_schedule("vggt-tiny", [3] * 12, 1, {}, "uniform")}, {},
                     ground_truth=True, desc="t", cache=tmp_path)
