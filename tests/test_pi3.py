"""pi3: official key layout (meta), the step interface against a plain upstream-style loop, heads and geometry
(pi3-tiny on CPU), strict loading, reduction patching, FLOP config, and the models benchmark smoke run."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from spark3r.errors import Spark3rError
from spark3r.models.loading import load_model
from spark3r.models.pi3 import CONFIGS, Pi3, centred_focal_lengths, svd_orthogonalize
from spark3r.models.registry import build_model
from spark3r.reduce import Reduction, apply_reductions
from spark3r.schedule import apply_schedule, paper_schedule
from support import check_patch_and_restore, read_manifest

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = "pi3-tiny"
H, W = 42, 56  # 3 x 4 patches
TINY = CONFIGS["pi3-tiny"]


@pytest.fixture(scope="module")
def images():
    return torch.rand(1, 4, 3, H, W, generator=torch.Generator().manual_seed(0))


def test_pi3_state_dict_equals_the_official_manifest():
    model = build_model("pi3", "meta")
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert ours == dict(read_manifest("pi3"))
    assert sum(value.numel() for value in model.state_dict().values()) == 958_696_738


def test_tiny_forward_gives_the_common_outputs(dense):
    shapes = {name: tuple(value.shape) for name, value in dense.items()}
    assert shapes == {
        "depth": (1, 4, H, W), "depth_conf": (1, 4, H, W), "points": (1, 4, H, W, 3), "points_conf": (1, 4, H, W),
        "extrinsics": (1, 4, 3, 4), "intrinsics": (1, 4, 3, 3), "local_points": (1, 4, H, W, 3),
        "conf": (1, 4, H, W), "camera_poses": (1, 4, 4, 4),
    }
    assert all(torch.isfinite(value).all() for value in dense.values())
    assert (dense["depth"] > 0).all() and torch.equal(dense["depth"], dense["local_points"][..., 2])
    assert torch.equal(dense["depth_conf"], torch.sigmoid(dense["conf"]))


def test_points_extrinsics_and_poses_agree(dense):
    """points = c2w (local points); extrinsics (world-to-camera) take them back; rotations are proper."""
    poses = dense["camera_poses"].double()
    rotation = poses[..., :3, :3]
    eye = torch.eye(3, dtype=torch.float64).expand_as(rotation)
    torch.testing.assert_close(rotation @ rotation.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.det(rotation), torch.ones(1, 4, dtype=torch.float64), atol=1e-5, rtol=0)
    extrinsics = dense["extrinsics"].double()
    back = torch.einsum("bsij,bshwj->bshwi", extrinsics[..., :3], dense["points"].double()) \
        + extrinsics[:, :, None, None, :, 3]
    torch.testing.assert_close(back, dense["local_points"].double(), atol=1e-4, rtol=1e-4)


def test_trunk_steps_equal_a_plain_upstream_loop(tiny, images):
    """Upstream Pi3.decode: registers in front, pos = grid + 1 (registers 0), even blocks per frame, odd blocks over
    all frames, output [block 34 | block 35]. Re-done here with plain tensor code on the model's own blocks."""
    batch, frames = images.shape[:2]
    grid_h, grid_w = H // 14, W // 14
    with torch.no_grad():
        normed = (images - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(3, 1, 1)
        hidden = tiny.encoder(normed.reshape(batch * frames, 3, H, W))
        hidden = torch.cat([tiny.register_token.repeat(batch, frames, 1, 1).reshape(batch * frames, 5, -1), hidden], 1)
        ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
        pos = torch.cat([torch.zeros(5, 2, dtype=torch.long), torch.stack([ys, xs], -1).reshape(-1, 2) + 1])
        pos = pos[None].repeat(batch * frames, 1, 1)
        tokens = hidden.shape[1]
        outputs = []
        for i, block in enumerate(tiny.decoder):
            if i % 2 == 0:
                hidden, pos = hidden.reshape(batch * frames, tokens, -1), pos.reshape(batch * frames, tokens, 2)
            else:
                hidden, pos = hidden.reshape(batch, frames * tokens, -1), pos.reshape(batch, frames * tokens, 2)
            hidden = block(hidden, pos=pos)
            if i + 1 >= len(tiny.decoder) - 1:
                outputs.append(hidden.reshape(batch * frames, tokens, -1))
        expected = torch.cat(outputs, dim=-1).reshape(batch, frames, tokens, -1)

        state = tiny.prepare(images)
        half = tiny.run_steps(state, stop=1)
        finished = tiny.run_steps(half)
    assert state.step == 0 and not state.taps  # the input state is not advanced
    assert tiny.global_layer_steps == [1, 3] and tiny.num_steps == 4
    torch.testing.assert_close(finished.taps[3], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(finished.tokens, tiny.run_steps(state).tokens)


def test_centred_focal_lengths_recover_a_pinhole_camera():
    height, width, fx, fy = 6, 8, 31.0, 17.5
    depth = torch.rand(2, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    points = torch.stack([(u - (width - 1) / 2) / fx * depth, (v - (height - 1) / 2) / fy * depth, depth], dim=-1)
    intrinsics = centred_focal_lengths(points)
    expected = torch.tensor([[fx, 0, (width - 1) / 2], [0, fy, (height - 1) / 2], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(intrinsics, expected.expand(2, 3, 3), atol=1e-9, rtol=1e-8)  # z + 1e-10 guard


def test_svd_orthogonalize_gives_the_nearest_rotation_of_the_row_normalised_matrix():
    matrices = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rotations = svd_orthogonalize(matrices).numpy()
    for matrix, rotation in zip(matrices.numpy().reshape(-1, 3, 3), rotations):
        normalised = matrix / np.linalg.norm(matrix, axis=-1, keepdims=True)
        u, _, vt = np.linalg.svd(normalised)
        expected = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt  # orthogonal Procrustes, proper rotation
        np.testing.assert_allclose(rotation, expected, atol=1e-10)


def test_adapter_names_the_odd_decoder_blocks(tiny, images):
    assert build_model("pi3", "meta").adapter.global_attention == [f"decoder.{i}.attn" for i in range(1, 36, 2)]
    modules = tiny.adapter.modules(tiny)
    assert modules == [tiny.decoder[1].attn, tiny.decoder[3].attn]
    layout = tiny.adapter.layout(images)
    assert (layout.frames, layout.n_special, layout.grid_h, layout.grid_w) == (4, 5, 3, 4)


def test_reduction_patch_changes_outputs_and_remove_restores_them_bit_for_bit(tiny, images, dense):
    handle = apply_reductions(tiny, {0: Reduction(kv_keep=0.5, query_merge=2, group_frames=2),
                                     1: Reduction(kv_keep=0.25, kv_method="grid")})
    check_patch_and_restore(tiny, images, dense, handle)


def test_paper_rule_schedule_applies_and_remove_restores_bit_for_bit(tiny, images, dense):
    schedule = paper_schedule("pi3-tiny", 2, [1])  # short clips: 3 x frame-stride K/V off the sensitive layer
    handle = apply_schedule(tiny, schedule)
    assert handle.reduction(0, images.shape[1]).kv_keep < 1
    check_patch_and_restore(tiny, images, dense, handle)
    with pytest.raises(Spark3rError, match="vggt-tiny"):
        apply_schedule(tiny, paper_schedule("vggt-tiny", 6, [3]))


def test_strict_load_round_trip_and_key_errors(tiny, images, dense, tmp_path):
    path = tmp_path / "pi3-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    loaded = load_model("pi3-tiny", weights=path)
    with torch.no_grad():
        out = loaded(images)
    for name in dense:
        assert torch.equal(out[name], dense[name]), name
    broken = {k: v for k, v in tiny.state_dict().items() if k != "register_token"}
    save_file({k: v.contiguous() for k, v in broken.items()}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(Spark3rError, match="1 missing keys \\('register_token'\\)"):
        load_model("pi3-tiny", weights=tmp_path / "broken.safetensors")


def test_bf16_compute_keeps_fp32_residuals_and_stays_close(tiny, images, dense):
    tiny.compute_dtype = torch.bfloat16
    try:
        with torch.no_grad():
            state = tiny.run_steps(tiny.prepare(images))
            out = tiny.decode(state, images)
    finally:
        tiny.compute_dtype = torch.float32
    assert state.tokens.dtype == torch.float32 and state.taps[3].dtype == torch.bfloat16
    relative = (out["depth"] - dense["depth"]).abs().max() / dense["depth"].abs().max()
    assert out["depth"].dtype == torch.float32 and relative < 0.05


@pytest.mark.parametrize("bad, message", [
    (torch.rand(3, H, W), "shape"),
    (torch.rand(2, 3, H + 1, W), "multiple of the patch size"),
    (torch.zeros(2, 3, H, W, dtype=torch.uint8), "dtype"),
])
def test_bad_images_raise_one_sentence(tiny, bad, message):
    with pytest.raises(Spark3rError, match=message):
        tiny.prepare(bad)


def test_step_misuse_raises_one_sentence(tiny, images):
    with torch.no_grad():
        state = tiny.run_steps(tiny.prepare(images), stop=1)
    with pytest.raises(Spark3rError, match="finish it with run_steps"):
        tiny.decode(state, images)
    with pytest.raises(Spark3rError, match="stop must lie"):
        tiny.run_steps(state, stop=9)


def test_flop_config_blocks_plus_other_equal_a_counted_forward():
    """At S = 1 every block's sequence is one frame: block-formula FLOPs + other FLOPs = the counted total."""
    flops = build_model("pi3-tiny", "meta").flop_config(56, 70)
    assert flops.tokens_per_frame == 5 + 4 * 5 and flops.patch_grid == (4, 5)
    blocks = sum(g.count * (2 * g.tokens_per_frame * g.width * (4 * g.width + g.mlp_matrices * g.mlp_hidden)
                            + 4 * g.width * g.tokens_per_frame**2) for g in flops.groups)
    with torch.device("meta"):
        meta = Pi3(TINY).requires_grad_(False)
    counter = FlopCounterMode(display=False)
    with counter:
        meta(torch.empty(1, 1, 3, 56, 70, device="meta"))
    assert flops.other_flops_per_frame > 0
    assert blocks + flops.other_flops_per_frame == counter.get_total_flops()


def test_models_benchmark_smoke_run(tmp_path):
    out = tmp_path / "models.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "models.py"), "--models", "pi3-tiny", "da3-tiny",
         "vggt-omega-tiny", "--frames", "4", "6", "--dtype", "fp32", "--device", "cpu", "--repeats", "1",
         "--whole-reduced", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert {(row["model"], row["frames"]) for row in rows} == {
        (model, frames) for model in ("pi3-tiny", "da3-tiny", "vggt-omega-tiny") for frames in (4, 6)}
    for row in rows:
        assert row["dense_s"] > 0 and row["reduced_s"] > 0 and row["flop_speedup"] >= 1.0
        assert row["speedup"] == pytest.approx(row["dense_s"] / row["reduced_s"])
        assert row["reduced_whole_s"] > 0 and row["reduced_whole_peak_gib"] is None  # no CUDA peak on the CPU
    assert "| pi3-tiny | 4 |" in result.stdout
