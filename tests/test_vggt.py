"""VGGT: official key layout (vggt-1b on meta), the step interface, lean taps and heads (vggt-tiny on CPU)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation
from torch.utils.flop_counter import FlopCounterMode

from spark3r.errors import Spark3rError
from spark3r.models.blocks import merge_heads, qkv_heads
from spark3r.models.geometry import pose_encoding_to_extrinsics_intrinsics, quaternion_to_matrix
from spark3r.models.loading import adapt_state_dict, check_state_dict
from spark3r.models.registry import build_model
from spark3r.models.vggt import VGGT, VGGT_TINY
from support import read_manifest

REPO = Path(__file__).resolve().parents[1]
H, W = 42, 56  # 3 x 4 patches


@pytest.fixture(scope="module")
def images():
    return torch.rand(1, 4, 3, H, W, generator=torch.Generator().manual_seed(0))


def test_vggt_1b_state_dict_equals_the_official_manifest_in_order():
    model = build_model("vggt-1b", "meta")
    manifest = read_manifest("vggt")
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [row for row in manifest if not row[0].startswith("track_head.")]
    checkpoint = {key: torch.empty(shape, device="meta") for key, shape in manifest}
    kept, dropped = adapt_state_dict(checkpoint, drop_prefixes=("track_head.",))
    assert dropped == {"track_head.": 394}
    check_state_dict(model, kept, "vggt-1b")  # strict: nothing missing, unexpected or mis-shaped
    assert sum(v.numel() for v in model.state_dict().values()) == 1_256_537_516 - 65_941_396


def test_tiny_forward_on_four_frames_gives_the_documented_shapes(tiny, images):
    start = time.perf_counter()
    with torch.no_grad():
        out = tiny(images[0])  # [S, 3, H, W] gets B = 1
    assert time.perf_counter() - start < 10
    shapes = {name: tuple(value.shape) for name, value in out.items()}
    assert shapes == {
        "depth": (1, 4, H, W), "depth_conf": (1, 4, H, W), "points": (1, 4, H, W, 3), "points_conf": (1, 4, H, W),
        "pose_enc": (1, 4, 9), "extrinsics": (1, 4, 3, 4), "intrinsics": (1, 4, 3, 3),
    }
    for name in ("depth", "depth_conf", "points", "points_conf", "pose_enc", "extrinsics"):
        assert torch.isfinite(out[name]).all(), name
    assert (out["depth"] > 0).all() and (out["depth_conf"] > 1).all()
    assert out["intrinsics"][..., 0, 2].eq(W / 2).all() and out["intrinsics"][..., 1, 2].eq(H / 2).all()


def test_run_steps_in_two_halves_equals_one_go(tiny, images):
    with torch.no_grad():
        state = tiny.prepare(images)
        whole = tiny.run_steps(state)
        half = tiny.run_steps(state, stop=5)
        assert state.step == 0 and not state.taps  # the input state is not advanced
        rest = tiny.run_steps(half)
    assert whole.step == rest.step == tiny.num_steps
    assert torch.equal(whole.tokens, rest.tokens)
    assert whole.taps.keys() == rest.taps.keys() == {3, 7, 9, 11}
    for layer in whole.taps:
        assert torch.equal(whole.taps[layer], rest.taps[layer])


def test_taps_are_frame_output_then_global_output(tiny, images):
    with torch.no_grad():
        state = tiny.prepare(images)
        before_global = tiny.run_steps(state, stop=2 * 3 + 1)
        after_global = tiny.run_steps(before_global, stop=2 * 3 + 2)
    tap = after_global.taps[3]  # a tapped layer of the 12
    assert torch.equal(tap[..., :VGGT_TINY.embed_dim], before_global.tokens)
    assert torch.equal(tap[..., VGGT_TINY.embed_dim:], after_global.tokens)


def test_lean_mode_leaves_taps_and_outputs_unchanged_in_fp32(tiny, images):
    with torch.no_grad():
        lean_state = tiny.run_steps(tiny.prepare(images))
        lean_out = tiny.decode(lean_state, images)
        tiny.lean = False
        try:
            full_state = tiny.run_steps(tiny.prepare(images))
            full_out = tiny.decode(full_state, images)
        finally:
            tiny.lean = True
    assert set(full_state.taps) == set(range(12)) and set(lean_state.taps) == {3, 7, 9, 11}
    for layer in lean_state.taps:
        assert lean_state.taps[layer].dtype == torch.float32
        assert torch.equal(lean_state.taps[layer], full_state.taps[layer])
    for name in lean_out:
        assert torch.equal(lean_out[name], full_out[name]), name


def test_bf16_compute_stores_lean_taps_in_bf16_and_stays_close(tiny, images):
    with torch.no_grad():
        reference = tiny(images)
        tiny.compute_dtype = torch.bfloat16
        try:
            state = tiny.run_steps(tiny.prepare(images))
            out = tiny.decode(state, images)
        finally:
            tiny.compute_dtype = torch.float32
    assert state.tokens.dtype == torch.float32  # residual stream stays fp32 (LayerScale promotion)
    assert all(tap.dtype == torch.bfloat16 for tap in state.taps.values())
    assert out["depth"].dtype == torch.float32
    relative = (out["depth"] - reference["depth"]).abs().max() / reference["depth"].abs().max()
    assert relative < 0.05


def test_special_tokens_distinguish_frame_zero(tiny, images):
    with torch.no_grad():
        tokens = tiny.prepare(images).tokens
    camera, registers = tiny.aggregator.camera_token, tiny.aggregator.register_token
    assert tokens.shape == (1, 4, 5 + 12, VGGT_TINY.embed_dim)
    assert torch.equal(tokens[0, 0, 0], camera[0, 0, 0]) and torch.equal(tokens[0, 2, 0], camera[0, 1, 0])
    assert torch.equal(tokens[0, 0, 1:5], registers[0, 0]) and torch.equal(tokens[0, 3, 1:5], registers[0, 1])


def test_adapter_finds_the_global_attention_and_its_layout(tiny, images):
    modules = tiny.adapter.modules(tiny)
    assert len(modules) == 12 and modules[2] is tiny.aggregator.global_blocks[2].attn
    assert tiny.global_layer_steps == list(range(1, 24, 2)) and tiny.num_steps == 24
    layout = tiny.adapter.layout(images)
    assert (layout.frames, layout.n_special, layout.grid_h, layout.grid_w) == (4, 5, 3, 4)


def test_patched_global_attention_through_qkv_heads_is_exact(tiny, images):
    """The contract spark3r.reduce relies on: qkv_heads -> attention -> merge_heads -> proj reproduces forward."""
    attn = tiny.aggregator.global_blocks[1].attn
    with torch.no_grad():
        expected = tiny(images)
        attn.forward = lambda x, pos=None: attn.proj(merge_heads(F.scaled_dot_product_attention(
            *qkv_heads(attn, x, pos))))
        try:
            patched = tiny(images)
        finally:
            del attn.forward
    for name in expected:
        assert torch.equal(expected[name], patched[name]), name


def test_dpt_heads_do_not_depend_on_the_frame_chunk(tiny, images):
    with torch.no_grad():
        state = tiny.run_steps(tiny.prepare(images))
        taps = [state.taps[layer] for layer in (3, 7, 9, 11)]
        one, one_conf = tiny.depth_head(taps, (H, W), 5, frames_chunk_size=1)
        all_frames, all_conf = tiny.depth_head(taps, (H, W), 5, frames_chunk_size=None)
    torch.testing.assert_close(one, all_frames, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_conf, all_conf, rtol=1e-5, atol=1e-5)


def test_pose_decoding_matches_scipy_and_the_pinhole_formula():
    generator = torch.Generator().manual_seed(3)
    quaternions = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    expected = Rotation.from_quat(quaternions.numpy()).as_matrix()  # scipy: xyzw, normalises
    np.testing.assert_allclose(quaternion_to_matrix(quaternions).numpy(), expected, atol=1e-12)
    pose_enc = torch.cat([torch.randn(5, 3, dtype=torch.float64), quaternions,
                          torch.tensor([[0.8, 1.1]] * 5, dtype=torch.float64)], dim=-1)
    extrinsics, intrinsics = pose_encoding_to_extrinsics_intrinsics(pose_enc, (40, 60))
    np.testing.assert_allclose(extrinsics[:, :, :3].numpy(), expected, atol=1e-12)
    assert torch.equal(extrinsics[:, :, 3], pose_enc[:, :3])
    np.testing.assert_allclose(intrinsics[0].numpy(), [[30 / np.tan(0.55), 0, 30], [0, 20 / np.tan(0.4), 20],
                                                       [0, 0, 1]], atol=1e-12)


@pytest.mark.parametrize("bad, message", [
    (torch.rand(1, 0, 3, H, W), "0 images"),
    (torch.rand(3, H, W), "shape"),
    (torch.rand(2, 4, H, W), "shape"),
    (torch.rand(2, 3, H + 1, W), "multiple of the patch size"),
    (torch.zeros(2, 3, H, W, dtype=torch.uint8), "dtype"),
    ([1, 2, 3], "tensor"),
])
def test_bad_images_raise_one_sentence(tiny, bad, message):
    with pytest.raises(Spark3rError, match=message):
        tiny.prepare(bad)


def test_step_misuse_raises_one_sentence(tiny, images):
    with torch.no_grad():
        state = tiny.run_steps(tiny.prepare(images), stop=3)
        with pytest.raises(Spark3rError, match="finish it with run_steps"):
            tiny.decode(state, images)
        with pytest.raises(Spark3rError, match="stop must lie"):
            tiny.run_steps(state, stop=2)


def test_flop_config_blocks_plus_other_equal_a_counted_forward():
    """At S = 1 every block's sequence is one frame: block formula FLOPs + other FLOPs = the counted total."""
    config = VGGT_TINY
    model = build_model("vggt-tiny", "meta")
    flops = model.flop_config(112, 140)
    assert flops.tokens_per_frame == 5 + 8 * 10 and flops.patch_grid == (8, 10)
    assert [g.name for g in flops.groups] == ["aggregator.frame_blocks", "aggregator.global_blocks",
                                             "camera_head.trunk"]
    blocks = sum(g.count * (2 * g.tokens_per_frame * g.width * (4 * g.width + 2 * g.mlp_hidden)
                            + 4 * g.width * g.tokens_per_frame**2) for g in flops.groups)
    with torch.device("meta"):
        meta = VGGT(config).requires_grad_(False)
    counter = FlopCounterMode(display=False)
    with counter:
        meta(torch.empty(1, 1, 3, 112, 140, device="meta"))
    assert flops.other_flops_per_frame > 0
    assert blocks + flops.other_flops_per_frame == counter.get_total_flops()
    with pytest.raises(Spark3rError, match="multiple of the patch size"):
        model.flop_config(100, 140)


def test_foundation_benchmark_smoke_run(tmp_path):
    out = tmp_path / "foundation.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "foundation.py"), "--model", "vggt-tiny", "--frames", "4", "6",
         "--size", "28", "42", "--dtype", "fp32", "--device", "cpu", "--full-trunk-frames", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "| 4 | trunk | " in result.stdout and "| 6 | trunk | " in result.stdout and "assembled" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {row["stage"] for row in rows if row["frames"] == 4} == {
        "encoder", "trunk", "camera head", "depth head", "point head"}
    assert all(row["seconds"] >= 0 for row in rows)


def test_chunked_encoder_matches_one_pass(tiny, images):
    """encoder_chunk_frames = 3 over 4 frames (one full and one short chunk) gives the unchunked outputs."""
    import dataclasses

    chunked = VGGT(dataclasses.replace(VGGT_TINY, encoder_chunk_frames=3)).eval()
    chunked.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        expected, out = tiny(images), chunked(images)
        state = chunked.prepare(images)
    assert state.tokens.shape == (1, 4, 5 + 12, 128)
    for name in expected:
        torch.testing.assert_close(out[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
