"""profile-layers: aggregation, resume files, sharding, the measurement engine and the CLI."""
from __future__ import annotations

import re

import numpy as np
import pytest

from spark3r.commands.arguments import error_message
from spark3r.commands.profile_layers import FLAGS as PROFILE_FLAGS
from spark3r.errors import Spark3rError
from spark3r.profiler.aggregate import asymmetry_summary, predicted_sum, spearman, summarize
from spark3r.profiler.distributed import Ranks, shard
from spark3r.profiler.store import ClipResult, load_clip, save_clip
from support import load_benchmark


def test_summarize_matches_textbook_formulas():
    per_clip = np.array([[[0.0, 1.0]], [[0.0, 2.0]], [[0.0, 6.0]]])  # 3 clips, 1 layer, 2 levels
    table = summarize(per_clip)
    assert table.mean.tolist() == [[0.0, 3.0]]
    std = np.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    np.testing.assert_allclose(table.std, [[0.0, std]])
    np.testing.assert_allclose(table.ci95, [[0.0, 4.302652729911275 * std / np.sqrt(3)]])  # t(0.975, df=2)
    single = summarize(per_clip[:1])
    assert single.std.tolist() == [[0.0, 0.0]] and single.ci95.tolist() == [[0.0, 0.0]]


def test_spearman_and_predicted_sum():
    assert spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    kv = np.array([[0.0, 1.0, 2.0], [0.0, 10.0, 20.0]])      # 2 layers x 3 kv levels
    query = np.array([[0.0, 100.0], [0.0, 1000.0]])          # 2 layers x 2 query levels
    total = predicted_sum(kv, query, np.array([[2, 1], [0, 0]]), np.array([[0, 1], [1, 0]]))
    assert total.tolist() == [2 + 10 + 1000, 100]


def test_asymmetry_compares_equal_reduction():
    kv_keep, query_merge = [1.0, 0.5, 0.25], [1, 2, 3, 4, 8]
    kv = np.array([[0.0, 1.0, 3.0], [0.0, 3.0, 5.0]])
    query = np.array([[0.0, 4.0, 5.0, 6.0, 9.0], [0.0, 2.0, 5.0, 2.0, 9.0]])
    summary = asymmetry_summary(kv, kv_keep, query, query_merge)
    assert summary["factors"] == [2, 3, 4]  # merge 8 needs keep 1/8, beyond the measured K/V range
    kv_at_third = 1.0 + (np.log(1 / 3) - np.log(0.5)) / (np.log(0.25) - np.log(0.5)) * 2.0  # layer 0, log-linear
    np.testing.assert_allclose(summary["kv_mean"], [2.0, (kv_at_third + kv_at_third + 2.0) / 2, 4.0])
    np.testing.assert_allclose(summary["query_mean"], [3.0, 5.0, 4.0])
    assert summary["layers_query_worse"] == [1, 2, 1]


def test_shard_covers_every_clip_once():
    clips = list(range(7))
    parts = [shard(clips, Ranks(rank, 3)) for rank in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]


def test_clip_file_round_trip_and_option_mismatch(tmp_path):
    options = {"kv_keep": (1.0, 0.5), "score_weights": {"depth": 1.0}}
    result = ClipResult("synthetic-0", "ab" * 32, 4, {"kv_score": np.arange(6.0).reshape(3, 2)}, {"dense": 0.5})
    save_clip(result, tmp_path, options)
    assert load_clip(tmp_path, "cd" * 32, options) is None
    loaded = load_clip(tmp_path, "ab" * 32, options)
    assert loaded.name == "synthetic-0" and loaded.frames == 4 and loaded.timings == {"dense": 0.5}
    np.testing.assert_array_equal(loaded.arrays["kv_score"], result.arrays["kv_score"])
    with pytest.raises(Spark3rError) as error:
        load_clip(tmp_path, "ab" * 32, {**options, "kv_keep": (1.0, 0.25)})
    assert re.search(r"other options \(kv_keep differ\).*new --out", error_message(error.value, PROFILE_FLAGS))


# ---------------------------------------------------------------- the engine, on vggt-tiny with random weights

import dataclasses
import json
import os
import subprocess
import sys

import torch

from spark3r.commands import profile_layers as cli
from spark3r.data.clips import open_clips
from spark3r.evaluate.deviation import output_deviation
from spark3r.models.loading import weights_identity
from spark3r.profiler import pipeline
from spark3r.profiler.format import load_profile
from spark3r.profiler.run import (
    PhaseTimer, ProfileOptions, dense_run, end_to_end, estimate_from_local, local_deviation, profile_clip,
    resumed_columns,
)
from spark3r.reduce import Reduction, apply_reductions

FRAMES = 4
CLI_ARGS = ["--model", "vggt-tiny", "--weights", "none", "--calib", "synthetic:2", "--frames", str(FRAMES),
            "--kv-keep", "0.5", "--query-merge", "2", "--additivity", "3", "--device", "cpu", "--dtype", "fp32"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return open_clips("synthetic:1", preprocess="vggt:112", frames=FRAMES)[0].images


def reference_outputs(model, images, reductions=None):
    """A plain full forward (optionally with `reductions` patched), recording every global attention output."""
    attention = {}
    hooks = [attn.register_forward_hook(lambda module, args, out, layer=layer: attention.__setitem__(layer, out))
             for layer, attn in enumerate(model.adapter.modules(model))]
    try:
        with torch.inference_mode(), (apply_reductions(model, reductions) if reductions else torch.no_grad()):
            outputs = model(images[None])
    finally:
        for hook in hooks:
            hook.remove()
    finite = {key: value for key, value in outputs.items() if torch.isfinite(value).all()}  # random fov: inf focal
    return finite, attention


def test_resume_from_any_layer_equals_full_forward(tiny, images):
    model = tiny
    full, _ = reference_outputs(model, images)
    with torch.inference_mode():
        run = dense_run(model, images[None], PhaseTimer(images.device))
        for layer in (0, 3, 5):
            resumed = model.decode(model.run_steps(run.states[layer]), images[None])
            for key in ("depth", "points", "extrinsics"):
                assert torch.equal(resumed[key], full[key]), (layer, key)


def test_local_deviation_matches_a_full_reduced_forward(tiny, images):
    model = tiny
    _, dense_attention = reference_outputs(model, images)
    reduction = Reduction(kv_keep=0.5)
    _, reduced_attention = reference_outputs(model, images, {2: reduction})
    reference = reduced_attention[2].double() - dense_attention[2].double()
    expected_l2 = float(reference.norm() / dense_attention[2].double().norm())
    a, b = reduced_attention[2].double().flatten(0, 1), dense_attention[2].double().flatten(0, 1)
    expected_cos = float((1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean())
    with torch.inference_mode():
        run = dense_run(model, images[None], PhaseTimer(images.device))
        rel_l2, cos = local_deviation(model, run, 2, reduction)
        assert local_deviation(model, run, 2, Reduction()) == (0.0, 0.0)  # keep 1.0: exactly dense
    assert expected_l2 > 1e-3
    assert rel_l2 == pytest.approx(expected_l2, rel=1e-5) and cos == pytest.approx(expected_cos, rel=1e-4)


def test_batched_end_to_end_matches_full_reduced_forwards(tiny, images):
    model = tiny
    dense, _ = reference_outputs(model, images)
    reductions = [Reduction(kv_keep=0.5), Reduction(kv_keep=0.25), Reduction(query_merge=2)]
    with torch.inference_mode():
        run = dense_run(model, images[None], PhaseTimer(images.device))
        batched = end_to_end(model, run, 4, [{4: reduction} for reduction in reductions], {}, PhaseTimer(images.device))
        multi = end_to_end(model, run, 1, [{1: reductions[0], 4: reductions[2]}], {}, PhaseTimer(images.device))[0]
    for reduction, measured in zip(reductions, batched):
        reduced, _ = reference_outputs(model, images, {4: reduction})
        expected = output_deviation(dense, reduced)
        assert expected["score"] > 0
        for term, value in expected.items():
            # abs: float32 rounding of a relative deviation, which moves with the batch shape and the CPU (~2e-7 seen);
            # the K/V levels' terms (~1e-2 to 1e-1) are held to rel 1e-4, the merge level's (~1e-5) to ~10%
            assert measured[term] == pytest.approx(value, rel=1e-4, abs=2e-6), term
    reduced, _ = reference_outputs(model, images, {1: reductions[0], 4: reductions[2]})
    assert multi["score"] == pytest.approx(output_deviation(dense, reduced)["score"], rel=1e-4)


def test_profile_clip_dense_levels_are_exactly_zero(tiny, images):
    model = tiny
    options = ProfileOptions(kv_keep=(1.0, 0.5), query_merge=(1, 2), additivity_schedules=2)
    measured = profile_clip(model, images, options)
    for kind in ("kv", "query"):
        for metric in ("local_rel_l2", "local_cos", "score", "depth"):
            table = measured.arrays[f"{kind}_{metric}"]
            assert table.shape == (12, 2)
            assert (table[:, 0] == 0).all() and (table[:, 1] > 0).all(), (kind, metric)
    assert measured.arrays["additivity_score"].shape == (2,)
    assert set(measured.timings) >= {"dense", "local", "resume", "decode"}


def test_alternate_resumes_every_other_level_from_the_strongest():
    assert resumed_columns(6, "all") == [1, 2, 3, 4, 5]
    assert resumed_columns(6, "alternate") == [1, 3, 5]  # keep 1/2, 1/8, 1/32 of 1, 1/2 ... 1/32
    assert resumed_columns(5, "alternate") == [1, 2, 4]  # the mildest too: 3 lies between 2 and 4
    assert resumed_columns(4, "alternate") == [1, 3]  # merge 2 and 4 of 1 ... 4
    assert resumed_columns(3, "alternate") == [1, 2]  # two non-dense levels: both
    assert resumed_columns(1, "alternate") == []


def test_ends_resumes_the_mildest_and_the_strongest_level_of_each_kind():
    assert resumed_columns(6, "ends") == [1, 5]  # keep 1/2 and 1/32: the three between are estimated
    assert resumed_columns(4, "ends") == [1, 3]
    assert resumed_columns(2, "ends") == [1]
    assert resumed_columns(1, "ends") == []


def test_strongest_resumes_only_the_strongest_level_of_each_kind():
    assert resumed_columns(6, "strongest") == [5]  # keep 1/32 of 1, 1/2 ... 1/32
    assert resumed_columns(4, "strongest") == [3]  # merge 4 of 1 ... 4
    assert resumed_columns(2, "strongest") == [1]
    assert resumed_columns(1, "strongest") == []


def test_one_resumed_level_scales_every_other_by_its_ratio():
    local = np.array([0.0, 1.0, 2.0, 4.0])
    measured = np.array([9.0, 9.0, 9.0, 2.0])  # resumed at column 3 only: ratio 0.5 for all
    np.testing.assert_allclose(estimate_from_local(local, measured, [3]), [0.0, 0.5, 1.0, 2.0], rtol=0, atol=1e-15)


def test_estimates_scale_the_local_deviation_by_the_interpolated_ratio():
    local = np.array([0.0, 1.0, 2.0, 4.0, 5.0])
    measured = np.array([9.0, 0.5, 9.0, 4.0, 9.0])  # resumed at columns 1 and 3: ratios 0.5 and 1.0
    estimate = estimate_from_local(local, measured, [1, 3])
    # column 2: ratio halfway, 0.75 x 2; column 4: beyond the last resumed one, ratio held at 1.0
    np.testing.assert_allclose(estimate, [0.0, 0.5, 1.5, 4.0, 5.0], rtol=0, atol=1e-15)


def test_alternate_profile_resumes_fewer_levels_and_estimates_the_rest(tiny, images, monkeypatch):
    import spark3r.profiler.run as run_module

    options = ProfileOptions(kv_keep=(1.0, 0.5, 0.25, 0.125), query_merge=(1, 2, 3, 4), additivity_schedules=0)
    resumed_levels = []

    def counting(model, run, layer, reductions, *args, **kwargs):
        resumed_levels.append(len(reductions))
        return end_to_end(model, run, layer, reductions, *args, **kwargs)

    monkeypatch.setattr(run_module, "end_to_end", counting)
    every = profile_clip(tiny, images, options).arrays
    assert sum(resumed_levels) == 12 * 6
    resumed_levels.clear()
    screened = profile_clip(tiny, images, dataclasses.replace(options, resume="alternate")).arrays
    assert sum(resumed_levels) == 12 * 4  # K/V columns 1 and 3, query columns 1 and 3
    for kind, resumed, estimated in (("kv", [1, 3], [2]), ("query", [1, 3], [2])):
        for metric in ("score", "depth", "camera_rotation_deg"):
            table, full = screened[f"{kind}_{metric}"], every[f"{kind}_{metric}"]
            # resumed levels: the same measurement in another batch shape, so float32 rounding apart (up to 4e-6 on
            # the merge levels' ~1e-5 terms of random weights, as in test_batched_end_to_end_...)
            np.testing.assert_allclose(table[:, resumed], full[:, resumed], rtol=1e-4, atol=1e-5)
            for layer in range(12):
                expected = estimate_from_local(screened[f"{kind}_local_rel_l2"][layer], table[layer], resumed)
                np.testing.assert_array_equal(table[layer, estimated], expected[estimated])
            # estimated, not left empty; a layer whose resumed levels measure 0 (the last layer's camera rotation can
            # round to 0 degrees in float32 on some CPUs) estimates 0
            assert (table[:, estimated] >= 0).all() and (table[:, estimated] > 0).sum() >= 10
            assert not np.array_equal(table[:, estimated], full[:, estimated])
    resumed_levels.clear()
    strongest = profile_clip(tiny, images, dataclasses.replace(options, resume="strongest")).arrays
    assert sum(resumed_levels) == 12 * 2  # K/V column 3 and query column 3
    for kind in ("kv", "query"):
        np.testing.assert_allclose(strongest[f"{kind}_score"][:, 3], every[f"{kind}_score"][:, 3], rtol=1e-4, atol=1e-5)
        for layer in range(12):
            expected = estimate_from_local(strongest[f"{kind}_local_rel_l2"][layer], strongest[f"{kind}_score"][layer],
                                           [3])
            np.testing.assert_array_equal(strongest[f"{kind}_score"][layer], expected)


# ---------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert cli.main([*CLI_ARGS, "--out", str(out)]) == 0
    return out


def test_cli_end_to_end(full_run, capsys):
    profile = load_profile(full_run)
    assert profile.model == "vggt-tiny" and profile.frames == FRAMES and profile.kv_keep == [1.0, 0.5]
    assert profile.query_merge == [1, 2] and len(profile.clips) == 2 and profile.global_layers == 12
    assert {"local_rel_l2", "local_cos", "depth", "points", "score"} <= set(profile.metrics)
    assert (profile.kv["local_rel_l2"].mean[:, 0] == 0).all() and (profile.kv["score"].mean[:, 1] > 0).all()
    assert len(profile.additivity["measured"]) == 3 and profile.asymmetry["factors"] == [2]
    assert (full_run / "heatmap.png").stat().st_size > 1000
    raw = np.load(full_run / "profile.npz")
    assert raw["kv_score"].shape == (2, 12, 2)
    np.testing.assert_allclose(raw["kv_score"].mean(axis=0), profile.kv["score"].mean)
    # rerunning finds every clip done and only rebuilds the profile
    assert cli.main([*CLI_ARGS, "--out", str(full_run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["clips"] == 2 and np.allclose(summary["score"]["kv"], profile.kv["score"].mean)


def _tables(out):
    profile = load_profile(out)
    return {f"{kind}.{metric}.{stat}": getattr(getattr(profile, kind)[metric], stat)
            for kind in ("kv", "query") for metric in profile.metrics for stat in ("mean", "std", "ci95")}


def test_interrupted_run_resumes_to_the_same_profile(full_run, tmp_path, monkeypatch, capsys):
    measure = pipeline.profile_clip
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(pipeline, "profile_clip", interrupted)
    assert cli.main([*CLI_ARGS, "--out", str(tmp_path)]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert len(list((tmp_path / "clips").glob("*.npz"))) == 1 and not (tmp_path / "profile.json").exists()
    calls.clear()
    monkeypatch.setattr(pipeline, "profile_clip", lambda *a, **k: (calls.append(1), measure(*a, **k))[1])
    assert cli.main([*CLI_ARGS, "--out", str(tmp_path)]) == 0
    assert len(calls) == 1  # only the missing clip was measured
    resumed, full = _tables(tmp_path), _tables(full_run)
    assert resumed.keys() == full.keys()
    for key in full:
        np.testing.assert_array_equal(resumed[key], full[key], err_msg=key)
    # other options on the same folder: a sentence, nothing measured
    assert cli.main([*CLI_ARGS[:-6], "--additivity", "2", "--device", "cpu", "--dtype", "fp32", "--out",
                     str(tmp_path)]) == 2
    assert "other options (additivity_schedules differ)" in capsys.readouterr().err


def test_two_gloo_ranks_equal_one(full_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "spark3r.commands.profile_layers", *CLI_ARGS, "--out", str(tmp_path), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["clips"] == 2
    assert load_profile(tmp_path).timings["ranks"] == 2
    sharded, single = _tables(tmp_path), _tables(full_run)
    assert sharded.keys() == single.keys()
    for key in single:
        np.testing.assert_allclose(sharded[key], single[key], rtol=1e-6, atol=1e-12, err_msg=key)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """An empty folder, a clip of 2 frames and a checkpoint with foreign keys."""
    from safetensors.torch import save_file

    from spark3r.data.clips import write_clip

    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty").mkdir()
    write_clip(open_clips("synthetic:1", preprocess="vggt:112", frames=2)[0], folder / "short", format="npz")
    save_file({"not_a_vggt_key": torch.zeros(2)}, str(folder / "wrong.safetensors"))
    return folder


@pytest.mark.parametrize("change, message", [
    ({"--calib": "{tmp}/missing"}, "does not exist"),
    ({"--calib": "{tmp}/empty"}, "is empty"),
    ({"--model": "vggt-huge"}, "unknown model 'vggt-huge'"),
    ({"--weights": "{tmp}/wrong.safetensors"}, "not_a_vggt_key"),
    ({"--kv-keep": "0"}, "--kv-keep level 0 is out of range"),
    ({"--kv-keep": "half"}, "is not a comma-separated list of numbers"),
    ({"--query-merge": "0"}, "--query-merge level 0 is out of range"),
    ({"--score-weights": "depth:1"}, "--score-weights item 'depth:1' is malformed"),
    ({"--score-weights": "color=1"}, "unknown term 'color'"),
    ({"--frames": "0"}, "--frames '0' must list whole numbers >= 1"),
    ({"--calib": "{tmp}/short"}, "has only 2 frames but --frames 4 was asked"),
])
def test_bad_inputs_give_one_sentence(change, message, bad_files, capsys):
    args = dict(zip(CLI_ARGS[::2], CLI_ARGS[1::2]))
    args.update({key: value.format(tmp=bad_files) for key, value in change.items()})
    argv = [item for pair in args.items() for item in pair] + ["--out", str(bad_files / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_benchmark_smoke_run(tmp_path, monkeypatch):
    benchmark = load_benchmark("profile_layers")
    profiled = []
    original = benchmark.profile_clip
    monkeypatch.setattr(benchmark, "profile_clip", lambda model, images, options: profiled.append(options) or original(
        model, images, options))
    out = tmp_path / "bench.json"
    result = benchmark.main(["--model", "vggt-tiny", "--clips", "1", "--frames", "4", "--size", "112", "--device",
                             "cpu", "--dtype", "fp32", "--kv-keep", "0.5", "--query-merge", "2", "--additivity", "1",
                             "--head-dtype", "compute", "--resume-levels", "alternate", "--trace",
                             str(tmp_path / "trace.txt"), "--out", str(out)])
    assert [(options.head_dtype, options.resume) for options in profiled] == [("compute", "alternate")]
    trace = (tmp_path / "trace.txt").read_text()
    # the profiled clip's operators, and the phases as ranges (the 50 rows with the most self time: the matrix
    # products and the phases lead it; a small operator such as the SDPA wrapper may fall off)
    assert "Self CPU" in trace and "aten::addmm" in trace and "decode" in trace and "resume" in trace
    assert result["seconds_by_clip"] == [result["seconds"]]
    assert json.loads(out.read_text())["global_layers"] == 12
    assert result["seconds"]["resume"] > 0 and result["seconds"]["decode"] > 0
    assert sum(result["seconds"].values()) <= result["wall_seconds"] * 1.01


def test_weights_replaced_in_place_are_a_change_of_options(tmp_path):
    """Cached clips must not be reused when the weights file at the same path changes."""
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    before = weights_identity(str(path), None)
    save_file({"a": torch.zeros(3)}, str(path))
    assert weights_identity(str(path), None) != before
    assert weights_identity("none", None) == "none"


def test_calibration_clips_of_other_aspect_ratios_are_fitted_and_the_crop_said_once(tmp_path):
    """vggt:28 makes a 28x56 (h x w) clip 14x28 and a 56x56 clip 28x28: the square clip is centre-cropped to the
    first clip's 14x28 (half of it kept), in one warning, instead of being refused."""
    from spark3r.data.clips import write_clip
    from spark3r.data.synthetic import render_clip
    from spark3r.errors import Spark3rWarning
    from spark3r.profiler.pipeline import load_calibration

    write_clip(render_clip(1, frames=2, height=28, width=56, name="a-wide"), tmp_path, "folder")
    write_clip(render_clip(2, frames=2, height=56, width=56, name="b-square"), tmp_path, "folder")
    with pytest.warns(Spark3rWarning) as caught:
        clips, frames, _ = load_calibration(str(tmp_path), "vggt:28", None)
    assert len(caught) == 1 and "1 of 2 clips are resized and centre-cropped to the first clip's 28x14: " \
        "b-square (28x28) keeps 50%" in str(caught[0].message)
    assert frames == 2 and [clip.images.shape[-2:] for clip, _ in clips] == [(14, 28), (14, 28)]


def test_the_profile_records_its_preprocessing_and_verify_clips_follow_it(full_run):
    """--verify's held-out clips are preprocessed as the profiled ones (recorded in the profile), at the profile's
    frame count unless sampled otherwise, or at --size."""
    from types import SimpleNamespace

    from spark3r.search.verify import held_out_clips

    assert load_profile(full_run).options["preprocess"] == "vggt:112"
    profile = SimpleNamespace(model="vggt-tiny", options={"preprocess": "vggt:56"}, frames=3, clips=[], by_length=[])
    default = held_out_clips(profile, "synthetic:1:5")[0]
    assert default.images.shape == (3, 3, 56, 56)
    sampled = held_out_clips(profile, "synthetic:1:5", size=28, every=2)[0]
    assert sampled.images.shape == (2, 3, 28, 28)  # frames 0 and 2 of the 3 rendered


def test_calibration_sampled_every_nth_frame(tmp_path):
    from spark3r.profiler.pipeline import load_calibration

    clips, frames, _ = load_calibration("synthetic:2", "vggt:28", None, every=3)  # 8 rendered frames: 0, 3, 6
    assert frames == 3 and all(clip.frames == 3 for clip, _ in clips)
