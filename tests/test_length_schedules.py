"""benchmarks/length_schedules.py: the baselines at equal FLOPs, the paper's rule for other layer counts, the paired
test."""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from spark3r.models.registry import build_model
from spark3r.reduce import global_attention_fraction
from support import load_benchmark

bench = load_benchmark("length_schedules")

TINY = build_model("vggt-tiny", device="meta").flop_config(112, 112)  # 5 special + 64 patches per frame


def test_paper_rule_for_another_layer_count_scales_the_sensitive_tier():
    assert bench.paper_rule("vggt-tiny", 6).layers.keys() == {3, 4}  # 11-16 of 24 -> 2.75-4 -> 3-4
    twelve = bench.paper_rule("vggt-tiny", 12)  # the shipped one: 11-16 of 24 -> 5.5-8 -> 6-8
    assert twelve.global_layers == 12 and sorted(twelve.layers) == [6, 7, 8]
    # at 256 frames: r = ceil(256 / 40) = 7 on 6-8 (37 frames kept), 21 elsewhere (13 kept); merge 2
    assert [r.kv_factor for r in twelve.reductions(256)] == [21] * 6 + [7] * 3 + [21] * 3


def test_uniform_and_rescaled_paper_have_flops_within_five_percent():
    args = argparse.Namespace(frames=256, model="vggt-tiny")
    rule = bench.paper_rule("vggt-tiny", 12)
    target = 0.5 * global_attention_fraction(TINY, 256, rule)
    options = bench.uniform_options(args, 12, [1, 2, 3, 4], {}, target, TINY)
    assert options and all(abs(global_attention_fraction(TINY, 256, s) / target - 1) <= 0.05 for s in options)
    assert all(len({r for r in s.reductions(256)}) == 1 for s in options)  # one level on every layer
    # by hand: keeping n frames by stride on every layer, merge 4 -> (256 * 5 + n * 64) / (256 * 69) / ~4
    assert any(s.provenance["merge"] == 4 for s in options)
    rescaled = bench.rescaled_paper(rule, 256, [1, 2, 3, 4], target, TINY)
    assert abs(global_attention_fraction(TINY, 256, rescaled) / target - 1) <= 0.05
    assert sorted(rescaled.layers) == [6, 7, 8]  # the rule's structure: sensitive layers 3x the K/V of the others


def test_random_schedules_span_mild_to_heavy():
    args = argparse.Namespace(frames=256, model="vggt-tiny", seed=0)
    schedules = bench.random_schedules(args, 6, [1, 2, 4], {}, 20)
    reduced = [sum(r.kv_keep < 1 for r in s.reductions(256)) for s in schedules]
    assert len(schedules) == 20 and reduced[0] <= 3 and reduced[-1] == 6


def test_paired_is_a_two_sided_wilcoxon_signed_rank_test():
    first, second = [1.0, 2.0, 3.0, 4.0, 5.0, 6.5], [1.5, 2.5, 3.6, 4.9, 6.1, 7.0]
    result = bench.paired(first, second, lower_is_better=True)
    assert result["p"] == pytest.approx(stats.wilcoxon(first, second).pvalue)
    assert result["p"] == pytest.approx(2 / 2**6)  # all 6 differences one sign: exact two-sided p = 2 / 64
    assert (result["better"], result["verdict"]) == (6, "gain")
    assert result["ratio"] == pytest.approx(np.mean(first) / np.mean(second))
    assert bench.paired(first, second, lower_is_better=False)["verdict"] == "loss"  # AUC: higher is better
    assert bench.paired(first, first, True)["verdict"] == "same"
    assert not math.isnan(bench.paired([1, 2, 1, 2], [2, 1, 2, 1], True)["p"])


SMALL = ["--weights", "none", "--profile-frames", "4,8", "--frames", "12", "--kv-frames", "1,2", "--kv-keep", "0.5",
         "--query-merge", "1,2", "--calib", "synthetic:1:100:walk", "--replica", "synthetic:1:200:walk",
         "--held-out", "synthetic:2:300:walk", "--random", "3", "--verify", "1", "--budget-scales", "1"]


def profile_at(frames: int, out) -> str:
    assert bench.profiler_cli.main(["--model", "vggt-tiny", "--weights", "none", "--calib", "synthetic:1:400:walk",
                                    "--frames", str(frames), "--kv-keep", "0.5,0.25", "--query-merge", "1,2",
                                    "--additivity", "0", "--device", "cpu", "--out", str(out)]) == 0
    return str(out)


def test_whole_run_with_verify_records_provenance_and_a_rerun_searches_and_measures_nothing(tmp_path, monkeypatch):
    deployed = profile_at(12, tmp_path / "at-12")
    argv = [*SMALL, "--deployment-profile", deployed, "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out" / "small")]
    monkeypatch.setenv("SPARK3R_COMMIT", "0123abc")
    first = bench.main(argv)
    assert first["commit"] == "0123abc" and first["device_name"] and first["command"].startswith(
        "python benchmarks/length_schedules.py")
    (budget,) = first["budgets"]
    assert set(budget["schedules"]) == {"searched", "uniform", "paper"}
    assert all(len(entry["per_clip"]["score"]) == 2 for entry in budget["schedules"].values())
    assert len(first["prediction"]["schedules"]) == 3
    assert "git 0123abc" in (tmp_path / "out" / "small.md").read_text()
    check_verification(budget["verification"])
    assert "Verified (`--verify 1` on `synthetic:1:200:walk`)" in (tmp_path / "out" / "small.md").read_text()
    check_deployment_profile(first, tmp_path / "work", deployed, (tmp_path / "out" / "small.md").read_text())

    def refuse(*args, **kwargs):
        raise AssertionError("the rerun ran a search or a forward")

    monkeypatch.setattr(bench.search_cli, "main", refuse)
    monkeypatch.setattr(bench.tiny, "finite_outputs", refuse)  # every measured clip starts with the dense forward
    second = bench.main(argv)
    assert second["budgets"][0]["schedules"]["searched"]["measured"] == budget["schedules"]["searched"]["measured"]
    assert second["budgets"][0]["verification"] == budget["verification"]  # the earlier search's summary


def check_verification(verification: dict) -> None:
    """--verify 1 measured the predicted best candidate (none apart when it is the uniform one) and the best uniform
    schedule, and exported the better."""
    assert len(verification["candidates"]) <= 1
    measured = [c["measured_deviation"] for c in verification["candidates"]]
    measured.append(verification["uniform"]["measured_deviation"])
    assert verification["exported"] == min(measured)
    assert len(set(verification["uniform"]["kv_frames"])) == 1  # one K/V level on every layer



def check_deployment_profile(result: dict, work, deployed: str, report: str) -> None:
    """The length model's single-layer error against the deployment profile, by hand, and the sum over layers."""
    check = result["prediction"]["deployment_profile"]
    assert check["kv_frames"] == [6, 3] and check["query_merge"] == [2]  # keep 1/2 and 1/4 of 12 frames
    # the length model exp(a) S^b n^c (1 - n/S)^e of the study's profile, over the profiled table at 12 frames
    coefficients = json.loads((work / "profile" / "profile.json").read_text())["length_model"]["score"]["kv"]
    profiled = json.loads((Path(deployed) / "profile.json").read_text())["kv"]["score"]["mean"]
    for layer, (a, b, c, e) in enumerate(coefficients):
        for j, n in enumerate((6, 3)):
            predicted = math.exp(a + b * math.log(12) + c * math.log(n) + e * math.log(1 - n / 12))
            assert check["kv_ratio"][layer][j] == pytest.approx(predicted / profiled[layer][j + 1], rel=1e-9)
    measured = [row["measured"] for row in result["prediction"]["schedules"]]
    assert check["measured_over_summed"] == pytest.approx(np.divide(measured, check["summed"]))
    assert check["summed_spearman"] == pytest.approx(stats.spearmanr(measured, check["summed"]).statistic)
    assert "Where the prediction errs, against a profile at 12 frames on 1 other clips" in report


def test_a_deployment_profile_of_another_length_is_refused_before_anything_runs(tmp_path, capsys):
    deployed = profile_at(4, tmp_path / "at-4")
    assert bench.run([*SMALL, "--deployment-profile", deployed, "--work", str(tmp_path / "work")]) == 2
    assert "profiles vggt-tiny at 4 frames" in capsys.readouterr().err and not (tmp_path / "work").exists()
