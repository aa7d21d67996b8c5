"""benchmarks/readme.py: the README's result sections are generated from benchmarks/results/*.json and agree with
them."""
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from support import load_benchmark

REPO = Path(__file__).resolve().parents[1]
readme = load_benchmark("readme")


def sections(text: str) -> dict[str, str]:
    return {match["name"]: match["body"] for match in readme.MARKERS.finditer(text)}


def test_readme_agrees_with_the_result_files(capsys):
    assert readme.main(["--check"]) == 0, capsys.readouterr().err


def test_a_changed_result_file_or_readme_fails_the_check(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(REPO / "benchmarks" / "results", results)
    copy = tmp_path / "README.md"
    copy.write_text((REPO / "README.md").read_text())
    assert readme.main(["--check", "--readme", str(copy), "--results", str(results)]) == 0

    latest = results / readme.SPEED_ALL_RUNS[-1]  # the newest run: its rows are the README's
    speed = json.loads(latest.read_text())
    row = next(r for r in speed["rows"] if r["kind"] == "speed" and r["frames"] == 1000)
    row["end_to_end_s"] = 30.0
    latest.write_text(json.dumps(speed))
    assert readme.main(["--check", "--readme", str(copy), "--results", str(results)]) == 1
    assert "disagrees with benchmarks/results/ in speed" in capsys.readouterr().err
    assert readme.main(["--readme", str(copy), "--results", str(results)]) == 0  # regenerating repairs it
    assert "30.0 s end to end" in copy.read_text()
    assert readme.main(["--check", "--readme", str(copy), "--results", str(results)]) == 0

    copy.write_text(copy.read_text().replace("0.943 (A) / 1.000 (B)", "1.00 (A) / 0.94 (B)"))  # hand-edited
    assert readme.main(["--check", "--readme", str(copy), "--results", str(results)]) == 1
    assert "in search" in capsys.readouterr().err


def test_a_section_is_one_function_plus_two_markers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(readme, "SECTIONS", dict(readme.SECTIONS))
    readme.section("extra")(lambda results: "| a | how |\n|---|---|\n| 1 | measured |")
    copy = tmp_path / "README.md"
    text = (REPO / "README.md").read_text()
    copy.write_text(text)
    assert readme.main(["--readme", str(copy)]) == 2
    assert "no <!-- results:extra -->" in capsys.readouterr().err
    copy.write_text(text + "\n<!-- results:extra -->\nstale\n<!-- /results:extra -->\n")
    assert readme.main(["--check", "--readme", str(copy)]) == 1
    assert readme.main(["--readme", str(copy)]) == 0
    assert sections(copy.read_text())["extra"] == "| a | how |\n|---|---|\n| 1 | measured |\n"
    copy.write_text(text + "\n<!-- results:nobody -->\n<!-- /results:nobody -->\n")
    assert readme.main(["--readme", str(copy)]) == 2
    assert "markers for nobody" in capsys.readouterr().err


def test_every_generated_table_row_says_measured_or_assembled():
    for name, body in sections((REPO / "README.md").read_text()).items():
        rows = [line for line in body.splitlines() if line.startswith("|") and not line.startswith("|---")]
        header, data = rows[0], rows[1:]
        assert header.rstrip(" |").endswith("how"), name
        assert data, name
        for row in data:
            how = row.rstrip(" |").rsplit("|", 1)[1]
            assert re.search(r"\b(measured|assembled)\b", how), (name, row)


def test_search_text_says_what_the_results_file_says():
    """Figures read off tiny-schedules.json by hand (the run of 2026-12-07 on stage 8's weights)."""
    text = " ".join(sections((REPO / "README.md").read_text())["search"].split())  # unwrapped
    assert "Measured on vggt-tiny (stage 8, shipped, 12 global layers) at 16 frames." in text
    assert "1.000 at K/V keep 1/8 and 1.000 averaged over K/V levels" in text
    assert "0.943 (A) / 1.000 (B)" in text  # additivity: Spearman 0.942857 and 1.0
    assert "measured 0.41-0.69 of the sum" in text  # B's 0.414 and 0.693
    assert "0.58 / 0.57 / 0.67 (A) and 0.57 / 0.61 / 0.66 (B)" in text  # query / K/V cost at 2x, 3x, 4x
    assert "6 / 5 / 6 (A) and 5 / 4 / 5 (B) of 12 layers" in text  # layers where queries cost more
    assert "took 656 s" in text and "cache of an earlier run" not in text  # 655.67 s, a first run


@pytest.mark.parametrize("name", sorted(path.name for path in (REPO / "benchmarks" / "results").glob("*.json")))
def test_every_result_file_records_command_commit_and_device(name):
    data = json.loads((REPO / "benchmarks" / "results" / name).read_text())
    assert {"command", "commit", "device_name"} <= set(data), name
    if data["command"] is None:
        assert data["command_note"], name  # says why there is none


def test_length_section_reads_the_gpu_run_when_there_is_one(tmp_path, monkeypatch):
    monkeypatch.setattr(readme, "LENGTH_FURTHER_RUNS", ())  # the main run alone
    small = json.loads((REPO / "benchmarks" / "results" / "length-schedules-cpu-small.json").read_text())
    (tmp_path / "length-schedules-cpu-small.json").write_text(json.dumps(small))
    assert "small CPU run" in readme.length_section(tmp_path)
    for budget in small["budgets"]:
        for comparison in budget["versus"].values():
            comparison["score"]["ratio"] = 0.5
    (tmp_path / "length-schedules.json").write_text(json.dumps(small))
    text = " ".join(readme.length_section(tmp_path).split())
    assert "0.500x the paper rule's and 0.500x the best uniform" in text and "is met here." in text
    assert "small CPU run" not in text and "`benchmarks/results/length-schedules.json`" in text
    assert "The dense model's own pose at 128 frames is weak (ATE 0.89, AUC@30 0.03;" in text  # the small run's dense
    assert "6-layer vggt-tiny (the 6 + 6 model) profiled" in text  # the weights its weights_sha256 names
    bundled = hashlib.sha256((REPO / "spark3r" / "weights" / "vggt-tiny.safetensors").read_bytes()).hexdigest()
    for sha, label in ((bundled, f"{readme.TINY_STAGES[bundled]}, shipped"), ("ab" * 32, "weights abababababab"),
                       (None, "weights not recorded")):
        small["weights_sha256"] = sha
        (tmp_path / "length-schedules.json").write_text(json.dumps({k: v for k, v in small.items() if v is not None}))
        assert f"6-layer vggt-tiny ({label}) profiled" in " ".join(readme.length_section(tmp_path).split())
    small["budgets"][0]["versus"]["searched vs paper"]["ate"]["verdict"] = "loss"
    (tmp_path / "length-schedules.json").write_text(json.dumps(small))
    text = " ".join(readme.length_section(tmp_path).split())
    assert "significantly worse (Wilcoxon, p < 0.05) in 1x paper ate" in text and "is not met here." in text
    assert "whole dense attention" not in text
    small["budgets"][0]["budget"] = 1.0  # 2x a rule that spends over half of dense: capped at dense
    (tmp_path / "length-schedules.json").write_text(json.dumps(small))
    text = " ".join(readme.length_section(tmp_path).split())
    assert "(at 1x the budget is the whole dense attention, so the uniform schedule there is the dense model itself)" \
        in text
    assert "Where the prediction errs" not in text
    assert "Verification (" not in text  # the small run predates it
    uniform = {"kv_frames": [4] * 6, "query_merge": {"12": 2}}
    small["budgets"][0]["verification"] = {"candidates": [{"measured_deviation": 0.5}], "exported": 0.25,
                                           "uniform": {**uniform, "measured_deviation": 0.25}}
    small["budgets"][1]["verification"] = {"candidates": [{"measured_deviation": 0.5}], "exported": 0.5,
                                           "uniform": {**uniform, "measured_deviation": 0.75}}
    small["budgets"][1]["versus"]["searched vs uniform"]["score"]["verdict"] = "loss"
    (tmp_path / "length-schedules.json").write_text(json.dumps(small))
    text = " ".join(readme.length_section(tmp_path).split())
    assert ("Verification (`--verify 2` on `synthetic:1:200:walk`) measured the best uniform schedule beside the "
            "predicted best and exported it at 1x; at 0.5x it measured the searched 0.500 there against the "
            "uniform's 0.750, an order the held-out clips reverse.") in text
    small["budgets"][0]["verification"]["exported"] = 0.2  # a candidate measured better than the uniform
    (tmp_path / "length-schedules.json").write_text(json.dumps(small))
    assert "and exported it at no budget; at 0.5x" in " ".join(readme.length_section(tmp_path).split())
    small["settings"]["deployment_profile"] = "at-128.json"
    small["prediction"]["deployment_profile"] = {
        "clips": ["a", "b"], "kv_frames": [6, 3], "query_merge": [2], "kv_ratio": [[2.0, 4.0], [1.0, None]],
        "query_ratio": [[0.5], [0.25]], "kv": {"spearman": 0.9}, "query": {"spearman": 0.8},
        "measured_over_summed": [0.2, 0.4, None, 0.6], "summed_spearman": 0.95}
    (tmp_path / "length-schedules.json").write_text(json.dumps(small))
    text = " ".join(readme.length_section(tmp_path).split())
    assert ("against a profile at 128 frames on 2 other clips (`at-128.json`): the length model's single-layer K/V "
            "deviation over the profiled one, mean over layers by frames kept, is 6: 1.50, 3: 4.00 (from 1.00 (layer 1) "
            "to 4.00 (layer 0); Spearman over cells 0.900); its query deviation by merge factor 2x: 0.38 (from 0.25 "
            "(layer 1) to 0.50 (layer 0); Spearman 0.800)") in text
    assert ("ranks the 3 random schedules at Spearman 0.950 (the length model: "
            f"{small['prediction']['spearman']:.3f}); their measured deviation is 0.20 to 0.60 (median 0.40) of that "
            "sum, so layers' deviations add up to less than their sum.") in text


def test_a_further_length_run_gets_its_weights_and_ratios_in_one_paragraph(tmp_path, monkeypatch):
    small = json.loads((REPO / "benchmarks" / "results" / "length-schedules-cpu-small.json").read_text())
    (tmp_path / "length-schedules.json").write_text(json.dumps(small))
    small["budgets"][1]["versus"]["searched vs uniform"]["score"].update(ratio=1.25, verdict="loss")
    (tmp_path / "further.json").write_text(json.dumps(small))
    monkeypatch.setattr(readme, "LENGTH_FURTHER_RUNS", ("further.json",))
    text = " ".join(readme.length_section(tmp_path).split())
    paper = {budget["scale"]: budget["versus"]["searched vs paper"]["score"]["ratio"] for budget in small["budgets"]}
    assert ("On vggt-tiny (the 6 + 6 model) profiled at 8,16,32 frames and measured at 128 on `synthetic:2:300:walk` "
            "(dense ATE 0.89, AUC@30 0.03; `benchmarks/results/further.json`,") in text
    assert (f"the searched schedule deviates {paper[0.5]:.2f}x the paper rule's and 1.25x the best uniform schedule's "
            f"at 0.5x, {paper[1.0]:.2f}x the paper rule's and") in text  # budgets[1] is 0.5x; tightest first
    assert "significantly worse (Wilcoxon, p < 0.05) in 0.5x uniform score." in text


def test_length_section_says_nothing_of_dense_pose_where_it_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(readme, "LENGTH_FURTHER_RUNS", ())  # the main run alone
    small = json.loads((REPO / "benchmarks" / "results" / "length-schedules-cpu-small.json").read_text())
    small["dense"]["auc30"] = 0.4
    (tmp_path / "length-schedules.json").write_text(json.dumps(small))
    text = " ".join(readme.length_section(tmp_path).split())
    assert "own pose" not in text


def test_length_section_states_the_1b_timing_ratio_from_its_file(tmp_path, monkeypatch):
    monkeypatch.setattr(readme, "LENGTH_FURTHER_RUNS", ())  # the main run alone
    small = (REPO / "benchmarks" / "results" / "length-schedules-cpu-small.json").read_text()
    (tmp_path / "length-schedules-cpu-small.json").write_text(small)
    assert "vggt-1b" not in readme.length_section(tmp_path)  # no timing file, no sentence
    timing = json.loads((REPO / "benchmarks" / "results" / "length-1b-speed.json").read_text())
    for row in timing["rows"]:
        row["end_to_end_s"] = {"vggt-1b-paper": 20.0, "vggt-1b-searched-f1000": 23.0}.get(row["schedule"], 400.0)
    (tmp_path / "length-1b-speed.json").write_text(json.dumps(timing))
    text = " ".join(readme.length_section(tmp_path).split())
    assert "in 23.00 s against 20.00 s (1.150x, measured whole" in text and "is not met." in text


def test_head_dtype_section_follows_the_benchmark_decision(tmp_path):
    data = json.loads((REPO / "benchmarks" / "results" / "profile-head-dtype-vggt-1b.json").read_text())
    assert "The default is therefore **fp32**: level scores move by more than the tolerance" in \
        readme.head_dtype_section(REPO / "benchmarks" / "results")
    for row in data["comparison"]["per_level"]:
        row["max_relative_difference"] = 0.02
    data["profiles"]["compute"]["seconds"]["decode"] = 30.0
    (tmp_path / "profile-head-dtype-vggt-1b.json").write_text(json.dumps(data))
    text = readme.head_dtype_section(tmp_path)
    assert "The default is therefore **compute**." in text and "| decode (s) | 62.4 | 30.0 |" in text


def test_speed_rows_of_the_one_gpu_benchmark_at_1000_frames_only(tmp_path):
    assert readme.speed_all_lines(tmp_path) == []  # no file, no row
    rows = [{"kind": "speed", "model": model, "frames": frames, "schedule": schedule, "end_to_end_s": seconds,
             "peak_gib": peak, "how": how, "measured_by": {"commit": "0123456789abcdef"},
             "predicted": {"ceiling_end_to_end_s": ceiling}, "speedup": speedup, "flop_speedup": 41.0}
            for model, frames, schedule, seconds, peak, ceiling, speedup, how in (
                ("vggt-1b", 1000, "paper", 11.96, 40.04, 7.14, 40.1, "measured whole"),
                ("vggt-1b", 1000, "dense", 480.0, 47.9, None, 1.0, "assembled"),
                ("pi3", 100, "paper", 1.0, 5.0, 0.5, 2.0, "measured whole"))]
    profile = {"kind": "profile", "model": "vggt-1b", "global_layers": 24, "kv_levels": 6, "query_levels": 4,
               "clips": 1, "frames": 32, "seconds_per_clip": 150.4, "goal_clips": 8, "goal_clips_s": 1203.2,
               "how": "1 clip(s) measured, 8 extrapolated from the mean clip", "measured_by": {"commit": "fedcba987"}}
    (tmp_path / "speed-all.json").write_text(json.dumps({"settings": {"device_name": "NVIDIA H200",
                                                                      "blocks": "compiled"},
                                                         "rows": rows + [profile]}))
    (tmp_path / "speed-all-eager.json").write_text(json.dumps({"settings": {"device_name": "NVIDIA H200"},
                                                               "rows": rows[:1]}))
    lines = [line for _, line in readme.speed_all_lines(tmp_path)]
    assert lines == [
        "| VGGT-1B + paper rule, 1000 frames, eager blocks (NVIDIA H200, `benchmarks/speed_all.py`) | 12.0 s end to "
        "end (the FLOP model at the measured ceilings: 7.1 s), 40.1x over dense (FLOP model: 41.0x; paper: 26-28x), "
        "40.0 GiB peak | measured whole at 0123456 (`speed-all-eager.json`; stages and goals in "
        "`speed-all-eager.md`) |",
        "| VGGT-1B + paper rule, 1000 frames, compiled blocks (NVIDIA H200, `benchmarks/speed_all.py`) | 12.0 s end "
        "to end (the FLOP model at the measured ceilings: 7.1 s), 40.1x over dense (FLOP model: 41.0x; paper: "
        "26-28x), 40.0 GiB peak | measured whole at 0123456 (`speed-all.json`; stages and goals in `speed-all.md`) |",
        "| VGGT-1B dense, 1000 frames, compiled blocks (NVIDIA H200, `benchmarks/speed_all.py`) | 480.0 s end to end, "
        "47.9 GiB peak (its largest measured part's: a lower bound) | assembled at 0123456 (`speed-all.json`; stages "
        "and goals in `speed-all.md`) |",
        "| profile-layers on VGGT-1B, 24 layers x 10 levels, 1 x 32 frames, compiled blocks (NVIDIA H200, "
        "`benchmarks/speed_all.py`) | 150 s per clip; 8 clips: 1203 s (the first clip compiles its shapes) | 1 clip(s) "
        "measured, 8 extrapolated from the mean clip at fedcba9 (`speed-all.json`) |"]

    # a later run of the same configuration (SPEED_ALL_RUNS order) replaces its row in the README's table
    later = dict(rows[0], end_to_end_s=9.0, measured_by={"commit": "abcdef0123"})
    (tmp_path / "speed-all-h100.json").write_text(json.dumps({"settings": {"device_name": "NVIDIA H200",
                                                                           "blocks": "compiled"}, "rows": [later]}))
    table = readme.speed_section(tmp_path)
    compiled_paper = next(line for line in table.splitlines()
                          if line.startswith("| VGGT-1B + paper rule, 1000 frames, compiled blocks"))
    assert "9.0 s end to end" in compiled_paper and "at abcdef0 (`speed-all-h100.json`" in compiled_paper
    assert table.count("| VGGT-1B + paper rule, 1000 frames, compiled blocks") == 1
    assert table.index("| VGGT-1B dense") < table.index("| VGGT-1B + paper rule, 1000 frames, compiled blocks") < \
        table.index("| VGGT-1B + paper rule, 1000 frames, eager blocks") < table.index("| profile-layers")
    assert "`speed-all-eager.md`, `speed-all.md`, `speed-all-h100.md` in `benchmarks/results/`" in " ".join(
        table.split())


def test_stage_bounds_name_the_memory_bound_share_of_each_slow_stage(tmp_path):
    assert readme.stage_bounds(tmp_path) == []  # no run, no sentence
    shares = {"encoder": 0.7, "frame blocks": 0.5, "global blocks": 0.65, "heads": 0.2}
    rows = [{"kind": "speed", "model": model, "frames": 1000, "schedule": "paper",
             "predicted": {"ceiling_fraction": shares}} for model in ("vggt-1b", "pi3")]
    (tmp_path / readme.BOUNDS_RUN).write_text(json.dumps({"rows": rows}))
    kernels = {"frame block, compiled": [{"name": "nvjet_sm90_tst_bias_TNT", "calls": 4, "ms": 60.0},
                                         {"name": "vectorized_layer_norm_kernel", "calls": 4, "ms": 40.0}],
               "heads": [{"name": "cudnn_generated_fprop_conv", "calls": 2, "ms": 25.0},
                         {"name": "upsample_bilinear2d_out_frame", "calls": 2, "ms": 75.0}]}
    (tmp_path / readme.BOUNDS_PROFILES["vggt-1b"]).write_text(json.dumps({"tf32": {"cudnn": True},
                                                                          "kernels": kernels}))
    text = " ".join(" ".join(readme.stage_bounds(tmp_path)).split())
    assert "vggt-1b encoder" not in text and "global blocks" not in text  # at or above 60%
    assert "vggt-1b frame blocks, 50% of its ceiling: 40% of the kernel time" in text
    assert "alone would put the stage at 83%." in text  # 0.5 / 0.6
    assert "vggt-1b heads, 20% of its ceiling: 75% of the kernel time" in text
    assert "alone would put the stage at 80%, and its convolutions run in TF32" in text  # 0.2 / 0.25
    assert "pi3 frame blocks, 50% of its ceiling: not in a block profile yet." in text

    # a later profile with the compiled fp32 heads and an encoder block: those parts speak for their stages
    shares["encoder"] = 0.45
    (tmp_path / readme.BOUNDS_RUN).write_text(json.dumps({"rows": rows}))
    kernels["encoder block, compiled"] = [{"name": "nvjet_sm90_tst", "calls": 1, "ms": 75.0},
                                          {"name": "triton_per_fused_native_layer_norm_0", "calls": 1, "ms": 25.0}]
    kernels["heads, compiled"] = [{"name": "sm90_xmma_fprop_implicit_gemm", "calls": 1, "ms": 50.0},
                                  {"name": "upsample_bilinear2d_nhwc_out_frame", "calls": 1, "ms": 50.0}]
    (tmp_path / readme.BOUNDS_PROFILES["vggt-1b"]).write_text(json.dumps({"tf32": {"cudnn": False},
                                                                          "kernels": kernels}))
    text = " ".join(" ".join(readme.stage_bounds(tmp_path)).split())
    assert "vggt-1b encoder, 45% of its ceiling: 25% of the kernel time of a compiled encoder block" in text
    assert "alone would put the stage at 60%." in text  # 0.45 / 0.75
    assert "vggt-1b heads, 20% of its ceiling: 50% of the kernel time of a compiled call of the DPT heads" in text
    assert "alone would put the stage at 40%." in text and "TF32" not in text  # 0.2 / 0.5


def test_autotuned_heads_say_whether_cudnn_benchmark_pays(tmp_path):
    assert readme.autotuned_heads(tmp_path) == []  # no profile, no sentence

    def profile(autotuned, distance):
        return json.dumps({"device_name": "NVIDIA H100 80GB HBM3", "autotuned heads vs shipped": {"depth": distance},
                           "times_s": {"heads, compiled": 0.2, "heads, compiled, cuDNN autotuned": autotuned}})

    (tmp_path / readme.AUTOTUNE_PROFILES["vggt-1b"]).write_text(profile(0.199, 0.0))
    text = " ".join(" ".join(readme.autotuned_heads(tmp_path)).split())
    assert "leave the compiled fp32 heads within 3% of their time" in text
    assert "vggt-1b 0.199 s against 0.200 s" in text and "H100" in text
    assert "the outputs are identical, so the heads keep cuDNN's default algorithms." in text

    (tmp_path / readme.AUTOTUNE_PROFILES["vggt-1b"]).write_text(profile(0.16, 2e-7))
    text = " ".join(" ".join(readme.autotuned_heads(tmp_path)).split())
    assert "speed up the compiled fp32 heads by 25% (vggt-1b)" in text  # 0.2 / 0.16 - 1
    assert "the outputs differ by at most 2.0e-07 (relative L2), so they could become the default." in text


def test_screening_section_names_each_runs_weights_and_how_many_runs_hold_the_bar(tmp_path, monkeypatch):
    def run(frames, weights, spearman, seconds, **sha):
        rows = [{"kind": "kv", "level": 0.5, "resumed": True, "spearman": 1.0, "max_rel_diff": 0.0},
                {"kind": "kv", "level": 0.25, "resumed": False, "spearman": spearman, "max_rel_diff": 0.5}]
        return json.dumps({"frames": frames, "device_name": "CPU", "all_s": 100.0, "all_wall_s": 120.0,
                           "profile_command": f"profile-layers --model vggt-tiny --weights {weights} --calib "
                                              f"synthetic:{frames // 32}:2000:walk --frames {frames}",
                           "screens": [{"resume": "alternate", "seconds": seconds, "wall_s": 70.0, "rows": rows}],
                           **sha})

    bundled = hashlib.sha256((REPO / "spark3r" / "weights" / "vggt-tiny.safetensors").read_bytes()).hexdigest()
    stage2 = "5099ea1298fc34029c023bc5073bbcb765f8716e72f7335664920a5fbcd561a7"  # bundled from 4376b5b to 7c096a7
    runs = (run(32, "auto", 0.993, 60.0),  # a record without weights_sha256
            run(256, "auto", 0.995, 80.0, weights_sha256=stage2),
            run(32, "auto", 0.986, 50.0, weights_sha256=bundled),
            run(256, "ckpt/other.safetensors", 0.97, 90.0))  # a file, and a record without its hash
    monkeypatch.setattr(readme, "SCREENING_RUNS", tuple(f"run-{i}.json" for i in range(len(runs))))
    for name, data in zip(readme.SCREENING_RUNS, runs, strict=True):
        (tmp_path / name).write_text(data)
    text = " ".join(readme.profile_screening_section(tmp_path).split())
    shipped = f"{readme.TINY_STAGES[bundled]}, shipped"
    assert (f"| | 32 frames, `synthetic:1:2000:walk`, weights not recorded, CPU | 256 frames, `synthetic:8:2000:walk`, "
            f"stage 2, CPU | 32 frames, `synthetic:1:2000:walk`, {shipped}, CPU | 256 frames, `synthetic:8:2000:walk`, "
            "`other.safetensors`, CPU | how |") in text
    assert ("Spearman 0.993 or more at 32 frames (weights not recorded), 0.995 or more at 256 frames (stage 2), "
            f"0.986 or more at 32 frames ({shipped}), 0.970 or more at 256 frames (`other.safetensors`) (at or above "
            "the bar of 0.99 in 2 of 4 runs)") in text
    assert (f"saves 40% at 32 frames (weights not recorded), 20% at 256 frames (stage 2), 50% at 32 frames "
            f"({shipped}), 10%") in text


def test_the_readmes_tables_of_the_shipped_vggt_tiny_measured_the_bundled_weights():
    bundled = hashlib.sha256((REPO / "spark3r" / "weights" / "vggt-tiny.safetensors").read_bytes()).hexdigest()
    for name in ("eval-vggt-tiny.json", readme.SHIPPED_TINY_EVAL):  # the tiny-model and tiny-long sections
        assert readme.load(readme.RESULTS, name).get("weights_sha256") == bundled, name
