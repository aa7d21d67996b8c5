"""The heads' dtype of profile-layers (--head-dtype fp32|compute): fp32 is the decode of before, bit for bit; the
compute dtype runs the dense heads of every family in it, moves the scores of a bf16 vggt-tiny little, is recorded in
the profile and kept apart on resume; benchmarks/profile_head_dtype.py runs end to end."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spark3r.commands import profile_layers as cli
from spark3r.data.clips import open_clips
from spark3r.errors import ParameterError, Spark3rError
from spark3r.models.geometry import pose_encoding_to_extrinsics_intrinsics
from spark3r.models.loading import load_model
from spark3r.models.registry import get_entry
from spark3r.profiler.format import load_profile
from spark3r.profiler.pipeline import ProfileRequest, check_request
from spark3r.profiler import run
from spark3r.profiler.run import PhaseTimer, ProfileOptions, dense_run, end_to_end, profile_clip
from spark3r.reduce import Reduction
from support import load_benchmark

REPO = Path(__file__).resolve().parents[1]
FRAMES = 4
OPTIONS = ProfileOptions(kv_keep=(1.0, 0.5, 0.25), query_merge=(1, 2), additivity_schedules=1)
CLI_ARGS = ["--model", "vggt-tiny", "--weights", "none", "--calib", "synthetic:1", "--frames", "3", "--size", "56",
            "--kv-keep", "0.5", "--query-merge", "2", "--additivity", "1", "--device", "cpu", "--dtype", "bf16"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return open_clips("synthetic:1", preprocess="vggt:112", frames=FRAMES)[0].images


@pytest.fixture(scope="module")
def bf16_tiny():
    """vggt-tiny with random weights (seed 0), its trunk in bf16 on the CPU."""
    return load_model("vggt-tiny", weights="none", dtype=torch.bfloat16, seed=0)


def test_fp32_heads_decode_as_before(bf16_tiny, images):
    """The decode of before this option, written out (the three heads in fp32 with autocast off, then the cameras),
    equals decode with the default and with an explicit fp32 head dtype bit for bit (bf16 taps: the casts run too)."""
    model, images = bf16_tiny, images[None]
    with torch.inference_mode():
        state = model.run_steps(model.prepare(images))
        taps = [state.taps[layer] for layer in model.config.taps]
        size, special, chunk = tuple(images.shape[-2:]), model.config.n_special, model.config.head_chunk_frames
        with torch.autocast("cpu", enabled=False):
            pose_enc = model.camera_head(state.extras["camera_token"])
            depth, depth_conf = model.depth_head(taps, size, special, chunk)
            points, points_conf = model.point_head(taps, size, special, chunk)
        extrinsics, intrinsics = pose_encoding_to_extrinsics_intrinsics(pose_enc, size)
        before = {"depth": depth[..., 0], "depth_conf": depth_conf, "points": points, "points_conf": points_conf,
                  "pose_enc": pose_enc, "extrinsics": extrinsics, "intrinsics": intrinsics}
        for outputs in (model.decode(state, images), model.decode(state, images, torch.float32)):
            assert outputs.keys() == before.keys()
            for key, value in before.items():
                assert torch.equal(outputs[key], value), key


@pytest.mark.parametrize("head_dtype, decoded", [("fp32", torch.float32), ("compute", torch.bfloat16)])
def test_load_model_head_dtype_is_what_forward_decodes_in(images, head_dtype, decoded):
    """`load_model(head_dtype=...)` (the inference commands' --head-dtype): forward equals decode in fp32 or in the
    compute dtype bit for bit; "compute" moves the dense outputs, not the cameras."""
    model = load_model("vggt-tiny", weights="none", dtype=torch.bfloat16, seed=0, head_dtype=head_dtype)
    with torch.inference_mode():
        state = model.run_steps(model.prepare(images[None]))
        forward, fp32 = model(images[None]), model.decode(state, images[None], torch.float32)
        expected = model.decode(state, images[None], decoded)
    assert model.decode_dtype() == decoded
    for key, value in expected.items():
        assert torch.equal(forward[key], value), key
    assert torch.equal(forward["extrinsics"], fp32["extrinsics"])
    assert torch.equal(forward["depth"], fp32["depth"]) == (head_dtype == "fp32")


def test_an_unknown_model_head_dtype_is_one_sentence(bf16_tiny):
    with pytest.raises(Spark3rError, match="head dtype 'bf16' is not one of fp32, compute"):
        load_model("vggt-tiny", weights="none", head_dtype="bf16")
    with pytest.raises(Spark3rError, match="head dtype 'half' is not one of fp32, compute"):
        bf16_tiny.decode_dtype("half")


def test_fp32_head_dtype_profiles_as_the_default(bf16_tiny, images):
    """ProfileOptions' default is fp32 heads; its dense reference is the model's own forward, bit for bit (and every
    level decodes in the dense run's head dtype, `end_to_end`)."""
    assert OPTIONS.head_dtype == "fp32" and OPTIONS.decode_dtype(bf16_tiny) == torch.float32
    with torch.inference_mode():
        run = dense_run(bf16_tiny, images[None], PhaseTimer(images.device))
        forward = bf16_tiny(images[None])
    assert run.head_dtype == torch.float32
    for key, value in run.outputs.items():
        assert torch.equal(value, forward[key]), key


@pytest.mark.parametrize("name", ["vggt-tiny", "pi3-tiny", "da3-tiny", "vggt-omega-tiny"])
def test_every_family_decodes_its_dense_heads_in_the_compute_dtype(name):
    """bf16 dense heads give fp32 outputs within bf16 rounding of the fp32 heads' (measured: relative L2 <= 3e-3 on
    depth and points); the camera heads stay fp32, so the cameras are equal bit for bit."""
    entry = get_entry(name)
    images = open_clips("synthetic:1", preprocess=entry.recipe(None), frames=3)[0].images[None]
    model = load_model(name, weights="none", dtype=torch.bfloat16, seed=0)
    with torch.inference_mode():
        state = model.run_steps(model.prepare(images))
        fp32, compute = model.decode(state, images), model.decode(state, images, torch.bfloat16)
    assert all(value.dtype == torch.float32 for value in compute.values() if value.is_floating_point())
    assert torch.equal(compute["extrinsics"], fp32["extrinsics"])
    for key in ("depth", "points"):
        assert not torch.equal(compute[key], fp32[key]), key  # the dense heads did run in bf16
        error = (compute[key].double() - fp32[key].double()).norm() / fp32[key].double().norm()
        assert error < 1e-2, (key, float(error))


def test_compute_dtype_heads_score_close_to_fp32_heads(bf16_tiny, images, monkeypatch):
    """Tolerance |compute - fp32| <= 2% of fp32 + 5e-3: bf16 rounds each value to 2^-9, and the dense heads' rounding
    leaves a floor of about 2e-3 under every score (measured: 2e-3 where the fp32 score is 1e-6, at the last layer's
    query merge) and at most 0.7% on the K/V levels' scores (0.03-0.17); the local deviations never see the heads.
    The dense reference decodes in the compute dtype too."""
    head_dtypes = []

    def recording(model, clip, timer, head_dtype=torch.float32):
        head_dtypes.append(head_dtype)
        return dense_run(model, clip, timer, head_dtype)

    monkeypatch.setattr(run, "dense_run", recording)
    fp32 = profile_clip(bf16_tiny, images, OPTIONS)
    compute = profile_clip(bf16_tiny, images, dataclasses.replace(OPTIONS, head_dtype="compute"))
    assert head_dtypes == [torch.float32, torch.bfloat16]
    for kind in ("kv", "query"):
        np.testing.assert_allclose(compute.arrays[f"{kind}_score"], fp32.arrays[f"{kind}_score"], rtol=0.02,
                                   atol=5e-3, err_msg=kind)
        for metric in ("local_rel_l2", "local_cos"):
            np.testing.assert_array_equal(compute.arrays[f"{kind}_{metric}"], fp32.arrays[f"{kind}_{metric}"])
    assert not np.array_equal(compute.arrays["kv_score"], fp32.arrays["kv_score"])


def test_a_dense_level_with_compute_dtype_heads_deviates_by_exactly_zero(bf16_tiny, images):
    """Like with like: the dense reference and the levels decode in one head dtype, so keep 1 / merge 1 (bit-exact
    dense) deviates by 0, not by the bf16 heads' difference from fp32 heads."""
    timer = PhaseTimer(images.device)
    with torch.inference_mode():
        dense = dense_run(bf16_tiny, images[None], timer, torch.bfloat16)
        deviation = end_to_end(bf16_tiny, dense, 5, [{5: Reduction()}], {}, timer)[0]
    assert dense.head_dtype == torch.bfloat16 and deviation["score"] == 0.0


def test_the_head_dtype_is_recorded_and_resume_refuses_another(tmp_path, capsys):
    assert cli.main([*CLI_ARGS, "--head-dtype", "compute", "--out", str(tmp_path)]) == 0
    profile = load_profile(tmp_path)
    assert profile.options["head_dtype"] == "compute" and profile.options["dtype"] == "bfloat16"
    assert ProfileOptions.of_profile(profile).head_dtype == "compute"
    capsys.readouterr()
    assert cli.main([*CLI_ARGS, "--out", str(tmp_path)]) == 2  # fp32 heads, the default, on the same folder
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other options (head_dtype differ): use a new --out" in err, err


def test_an_unknown_profile_head_dtype_is_one_sentence():
    request = ProfileRequest(model="vggt-tiny", calib="synthetic:1",
                             options=dataclasses.replace(OPTIONS, head_dtype="bf16"))
    with pytest.raises(ParameterError, match=r"^head_dtype is 'bf16': use one of fp32, compute$") as error:
        check_request(request)
    assert error.value.parameters == ("head_dtype",)


def test_benchmark_smoke_run(tmp_path):
    benchmark = load_benchmark("profile_head_dtype")
    out = tmp_path / "head-dtype.json"
    result = benchmark.main(["--model", "vggt-tiny", "--device", "cpu", "--frames", "3", "--size", "56",
                             "--kv-keep", "0.5", "--query-merge", "2", "--additivity", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["comparison"] == json.loads(json.dumps(result["comparison"]))
    assert {"command", "commit", "device_name", "torch", "created"} <= saved.keys()
    comparison = saved["comparison"]
    assert [row["level"] for row in comparison["per_level"]] == ["K/V keep 0.5", "query merge 2"]
    assert isinstance(comparison["passes_rule"], bool) and comparison["layer_mean_spearman"] is not None
    assert {head_dtype: saved["profiles"][head_dtype]["decode_dtype"] for head_dtype in ("fp32", "compute")} == \
        {"fp32": "float32", "compute": "bfloat16"}
    assert all(profile["wall_seconds"] > 0 for profile in saved["profiles"].values())
    assert "Default head dtype: **" in out.with_suffix(".md").read_text()
    out.with_suffix(".md").unlink()
    benchmark.main(["--render", str(out)])
    assert "Default head dtype: **" in out.with_suffix(".md").read_text()


def _result(spearman: float, change: float, decode_fp32: float, decode_compute: float) -> dict:
    rows = [{"level": "K/V keep 0.5", "spearman": spearman, "max_relative_difference": 0.01},
            {"level": "query merge 2", "spearman": 1.0, "max_relative_difference": change}]
    return {"comparison": {"per_level": rows, "passes_rule": spearman >= 0.99},
            "profiles": {"fp32": {"seconds": {"decode": decode_fp32}},
                         "compute": {"seconds": {"decode": decode_compute}}}}


@pytest.mark.parametrize("case, default, reasons", [
    (_result(1.0, 0.05, 60.0, 30.0), "compute", []),
    (_result(0.98, 0.05, 60.0, 30.0), "fp32", ["the layer ranking changes"]),
    (_result(1.0, 9.56, 62.4, 64.7), "fp32", ["level scores move by more than the tolerance",
                                              "it saves too little decode time"]),  # the VGGT-1B run of 2026-12-02
    (_result(1.0, 0.05, 60.0, 55.0), "fp32", ["it saves too little decode time"]),  # 8% saved, 10% needed
])
def test_the_compute_head_dtype_becomes_the_default_only_if_it_ranks_alike_scores_alike_and_is_faster(
        case, default, reasons):
    benchmark = load_benchmark("profile_head_dtype")
    decision = benchmark.decide(case)
    assert (decision["default"], decision["reasons"]) == (default, reasons)
