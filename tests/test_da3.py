"""Depth-Anything-3: official key layouts (meta), the backbone steps against a plain upstream-style loop, reference-view
reordering, heads and geometry (da3-tiny on CPU), strict loading, reduction patching and the FLOP config."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.spatial.transform import Rotation
from torch.utils.flop_counter import FlopCounterMode

from spark3r.errors import Spark3rError
from spark3r.models.da3 import (
    CONFIGS,
    DA3,
    GSDPT,
    DA3Config,
    gather_frames,
    pose_encoding_to_camera,
    reference_order,
    select_reference_view,
)
from spark3r.models.geometry import unproject_pixel_indices
from spark3r.models.loading import load_model
from spark3r.models.registry import build_model, resolve_model_name
from spark3r.reduce import Reduction, apply_reductions
from spark3r.schedule import apply_schedule, paper_schedule
from support import check_patch_and_restore, read_manifest

TINY_MODEL = "da3-tiny"
H, W = 42, 56  # 3 x 4 patches
TINY = CONFIGS["da3-tiny"]
EVEN_ALT = DA3Config("da3-tiny-even", 64, 10, 2, 2, (3, 5, 7, 9), 16, (8, 16, 32, 32), cam_enc_heads=4,
                     cam_enc_depth=1, img_size=56)  # alt_start even, as small/base/large: camera token before a local block
PARAMS = {"da3-small": 34_299_655, "da3-base": 135_366_791, "da3-large": 410_941_959, "da3-giant": 1_355_674_317}


@pytest.fixture(scope="module")
def images():
    return torch.rand(1, 4, 3, H, W, generator=torch.Generator().manual_seed(1))  # saddle_balanced picks frame 3


@pytest.mark.parametrize("name", ["da3-small", "da3-base", "da3-large", "da3-giant"])
def test_state_dict_equals_the_official_manifest(name):
    model = build_model(name, "meta")
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert ours == dict(read_manifest(name))
    assert sum(value.numel() for value in model.state_dict().values()) == PARAMS[name]


def test_da3_alias_resolves_to_giant_and_says_so(capsys):
    assert resolve_model_name("da3") == "da3-giant"
    assert "'da3' is 'da3-giant'" in capsys.readouterr().err


def test_adapter_names_the_cross_view_blocks(tiny, images):
    giant = build_model("da3-giant", "meta").adapter
    assert giant.global_attention == [f"model.backbone.pretrained.blocks.{i}.attn" for i in range(13, 40, 2)]
    assert giant.n_special == 1 and giant.patch_size == 14 and giant.rope_in_global
    assert tiny.adapter.modules(tiny) == [tiny.vit.blocks[i].attn for i in (3, 5, 7, 9)]
    assert tiny.global_layer_steps == [1, 3, 5, 7] and tiny.num_steps == 8  # steps start at block 2
    layout = tiny.adapter.layout(images)
    assert (layout.frames, layout.n_special, layout.grid_h, layout.grid_w) == (4, 1, 3, 4)


def test_tiny_forward_gives_the_common_outputs(dense):
    shapes = {name: tuple(value.shape) for name, value in dense.items()}
    assert shapes == {
        "depth": (1, 4, H, W), "depth_conf": (1, 4, H, W), "extrinsics": (1, 4, 3, 4), "intrinsics": (1, 4, 3, 3),
        "pose_enc": (1, 4, 9), "points": (1, 4, H, W, 3), "points_conf": (1, 4, H, W),
    }
    assert all(torch.isfinite(value).all() for value in dense.values())
    assert (dense["depth"] > 0).all() and (dense["depth_conf"] > 1).all()
    assert dense["intrinsics"][..., 0, 2].eq(W / 2).all() and dense["intrinsics"][..., 1, 2].eq(H / 2).all()


def upstream_taps(model: DA3, images: torch.Tensor) -> dict[int, torch.Tensor]:
    """DA3's DinoVisionTransformer._get_intermediate_layers_not_chunked + get_intermediate_layers, in plain code:
    per-frame blocks before alt_start without positions; from alt_start on, odd blocks over all frames with position
    (1, 1) for every patch, even blocks per frame with grid positions + 1; camera token written in place into slot 0
    at alt_start (which also changes the last local output it aliases); taps [local | norm(global)]."""
    config, vit = model.config, model.vit
    batch, frames = images.shape[:2]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    x = vit.prepare_tokens(((images - mean) / std).flatten(0, 1)).unflatten(0, (batch, frames))
    tokens, dim = x.shape[2], x.shape[3]
    ys, xs = torch.meshgrid(torch.arange(H // 14), torch.arange(W // 14), indexing="ij")
    pos = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.stack([ys, xs], -1).reshape(-1, 2) + 1])
    pos_nodiff = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones(tokens - 1, 2, dtype=torch.long)])
    taps, local_x = {}, None
    for i, block in enumerate(vit.blocks):
        if i == config.alt_start:
            x[:, 0, 0] = vit.camera_token[0, 0]
            x[:, 1:, 0] = vit.camera_token[0, 1]
        if i >= config.alt_start and i % 2 == 1:
            x = block(x.reshape(batch, frames * tokens, dim), pos=pos_nodiff.repeat(frames, 1)[None])
            x = x.reshape(batch, frames, tokens, dim)
        else:
            local_pos = pos[None].repeat(batch * frames, 1, 1) if i >= config.alt_start else None
            x = block(x.reshape(batch * frames, tokens, dim), pos=local_pos).reshape(batch, frames, tokens, dim)
            local_x = x
        if i in config.out_layers:
            taps[i] = torch.cat([local_x, vit.norm(x)], dim=-1)
    return taps


@pytest.mark.parametrize("config", [TINY, EVEN_ALT], ids=["alt_start odd (giant)", "alt_start even (small/base/large)"])
def test_backbone_steps_equal_a_plain_upstream_loop(config, images):
    torch.manual_seed(1)
    model = DA3(config, ref_view_strategy="first").eval()
    with torch.no_grad():
        expected = upstream_taps(model, images)
        state = model.prepare(images)
        half = model.run_steps(state, stop=3)
        finished = model.run_steps(half)
    assert state.step == 0 and not state.taps  # the input state is not advanced
    assert finished.taps.keys() == expected.keys()
    for layer, tap in expected.items():
        torch.testing.assert_close(finished.taps[layer], tap, atol=1e-5, rtol=1e-5)
    camera = torch.cat([expected[9][:, :, 0, :64], finished.tokens[:, :, 0]], dim=-1)
    torch.testing.assert_close(finished.extras["camera_token"], camera, atol=1e-5, rtol=1e-5)


def test_reference_selection_matches_a_float64_reference():
    cls = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(4))
    x = cls.double().numpy()
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    similarity = (np.einsum("bsc,btc->bst", unit, unit).sum(-1) - 1.0) / 5  # mean similarity to the other views

    def normalise(metric):
        return (metric - metric.min(1, keepdims=True)) / (metric.max(1, keepdims=True) - metric.min(1, keepdims=True))

    score = sum(np.abs(normalise(m) - 0.5) for m in (similarity, np.linalg.norm(x, axis=-1), unit.var(-1, ddof=1)))
    assert select_reference_view(cls, "saddle_balanced").tolist() == score.argmin(1).tolist()
    assert select_reference_view(cls, "first").tolist() == [0, 0, 0]


def test_reference_order_puts_the_reference_first_and_restores():
    order = reference_order(torch.tensor([2, 0, 4]), 5)
    assert order.tolist() == [[2, 0, 1, 3, 4], [0, 1, 2, 3, 4], [4, 0, 1, 2, 3]]
    x = torch.arange(15.0).reshape(3, 5)
    assert torch.equal(gather_frames(gather_frames(x, order), torch.argsort(order, dim=1)), x)


def test_reordering_equals_feeding_the_reference_first(images):
    """saddle_balanced picks a reference from per-frame features and runs the trunk reference-first; the outputs, in
    input order, must equal those of the reordered clip with frame 0 kept as the reference ("first")."""
    torch.manual_seed(0)
    model = build_model("da3-tiny").eval()
    with torch.no_grad():
        model.vit.camera_token.normal_()  # make the reference's camera token clearly distinct
        picked = model(images)
        order = model.prepare(images).extras["order"]
        assert order is not None and order[0, 0] != 0  # the seed makes a non-trivial choice
        model.ref_view_strategy = "first"
        reordered = model(images[:, order[0]])
        unordered = model(images)
    restore = torch.argsort(order[0])
    for name, value in picked.items():
        torch.testing.assert_close(reordered[name][:, restore], value, atol=1e-4, rtol=1e-4, msg=name)
    assert not torch.allclose(unordered["depth"], picked["depth"])  # the reference view matters


def test_camera_token_replaces_slot_zero(tiny):
    x = torch.randn(2, 3, 5, 64)
    out = tiny.insert_camera_token(x)
    camera = tiny.vit.camera_token
    assert torch.equal(out[:, 0, 0], camera[0, :1].expand(2, -1)) and torch.equal(out[:, 2, 0], camera[0, 1:].expand(2, -1))
    assert torch.equal(out[:, :, 1:], x[:, :, 1:])


def test_unprojected_points_project_back_to_their_pixels():
    generator = torch.Generator().manual_seed(5)
    depth = torch.rand(1, 2, 5, 7, dtype=torch.float64, generator=generator) + 1.0
    intrinsics = torch.tensor([[9.0, 0, 3.5], [0, 8.0, 2.5], [0, 0, 1]], dtype=torch.float64).expand(1, 2, 3, 3)
    cam_to_world = torch.eye(4, dtype=torch.float64).repeat(1, 2, 1, 1)
    cam_to_world[..., :3, :3] = torch.from_numpy(Rotation.random(2, random_state=0).as_matrix())
    cam_to_world[..., :3, 3] = torch.randn(1, 2, 3, dtype=torch.float64, generator=generator)
    points = unproject_pixel_indices(depth, intrinsics, cam_to_world)
    camera = torch.einsum("bsji,bshwj->bshwi", cam_to_world[..., :3, :3], points - cam_to_world[:, :, None, None, :3, 3])
    pixels = torch.einsum("bsij,bshwj->bshwi", intrinsics, camera)
    torch.testing.assert_close(camera[..., 2], depth, atol=1e-12, rtol=0)
    v, u = torch.meshgrid(torch.arange(5.0, dtype=torch.float64), torch.arange(7.0, dtype=torch.float64),
                          indexing="ij")
    torch.testing.assert_close(pixels[..., 0] / pixels[..., 2], u.expand(1, 2, 5, 7), atol=1e-10, rtol=0)
    torch.testing.assert_close(pixels[..., 1] / pixels[..., 2], v.expand(1, 2, 5, 7), atol=1e-10, rtol=0)


def test_pose_decoding_clamps_the_field_of_view_like_upstream():
    pose_enc = torch.tensor([[[1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.2]]], dtype=torch.float64)
    pose, intrinsics = pose_encoding_to_camera(pose_enc, (40, 60), min_tan=1e-6)
    torch.testing.assert_close(pose[0, 0], torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 2], [0, 0, 1, 3]],
                                                        dtype=torch.float64))
    assert intrinsics[0, 0, 1, 1] == pytest.approx(20 / 1e-6) and intrinsics[0, 0, 0, 0] == pytest.approx(30 / np.tan(0.6))


def test_heads_rays_camera_encoder_and_gaussian_head_shapes(tiny, images):
    with torch.no_grad():
        state = tiny.run_steps(tiny.prepare(images))
        taps = [state.taps[layer] for layer in TINY.out_layers]
        out = tiny.model.head(taps, (H, W), rays=True)
        tokens = tiny.model.cam_enc(torch.randn(1, 4, 9))
        gs = GSDPT(128, 14, 16, (8, 16, 32, 32))
        raw = gs.forward_frames([t[0, :, 1:] for t in taps], images[0])
    assert out["ray"].shape == (1, 4, 24, 32, 6) and (out["ray_conf"] > 1).all()
    assert tokens.shape == (1, 4, 64) and raw.shape == (4, 38, H, W)


def test_reduction_patch_changes_outputs_and_remove_restores_them_bit_for_bit(tiny, images, dense):
    handle = apply_reductions(tiny, {1: Reduction(kv_keep=0.5, query_merge=2, group_frames=2),
                                     3: Reduction(kv_keep=0.25, kv_method="grid")})
    check_patch_and_restore(tiny, images, dense, handle)


def test_paper_rule_schedule_applies_and_remove_restores_bit_for_bit(tiny, images, dense):
    schedule = paper_schedule("da3-tiny", 4, [2])  # short clips: 3 x frame-stride K/V off the sensitive layer
    handle = apply_schedule(tiny, schedule)
    assert handle.reduction(0, images.shape[1]).kv_keep < 1
    check_patch_and_restore(tiny, images, dense, handle)
    with pytest.raises(Spark3rError, match="vggt-tiny"):
        apply_schedule(tiny, paper_schedule("vggt-tiny", 6, [3]))


def test_strict_load_of_model_prefixed_keys(tiny, images, dense, tmp_path):
    state_dict = tiny.state_dict()
    assert all(key.startswith("model.") for key in state_dict)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    with torch.no_grad():
        out = load_model("da3-tiny", weights=tmp_path)(images)
    for name in dense:
        assert torch.equal(out[name], dense[name]), name
    save_file({k.removeprefix("model."): v.contiguous() for k, v in state_dict.items()}, str(path))
    with pytest.raises(Spark3rError, match="missing keys"):
        load_model("da3-tiny", weights=path)


def test_lean_taps_are_lossless_in_fp32(tiny, images, dense):
    tiny.lean = False
    try:
        with torch.no_grad():
            out = tiny(images)
    finally:
        tiny.lean = True
    for name in dense:
        assert torch.equal(out[name], dense[name]), name


def test_bad_input_raises_one_sentence(tiny):
    with pytest.raises(Spark3rError, match="ref_view_strategy 'middle' is unknown"):
        DA3(TINY, ref_view_strategy="middle")
    with pytest.raises(Spark3rError, match="multiple of the patch size"):
        tiny.prepare(torch.rand(2, 3, H, W + 3))
    with pytest.raises(Spark3rError, match="shape"):
        tiny.prepare(torch.rand(2, 4, H, W))
    with torch.no_grad():
        state = tiny.run_steps(tiny.prepare(torch.rand(2, 3, H, W)), stop=2)
    with pytest.raises(Spark3rError, match="finish it with run_steps"):
        tiny.decode(state, torch.rand(2, 3, H, W))


def test_flop_config_blocks_plus_other_equal_a_counted_forward():
    flops = build_model("da3-tiny", "meta").flop_config(56, 70)
    assert flops.tokens_per_frame == 1 + 4 * 5 and flops.patch_grid == (4, 5)
    assert [(g.count, g.sequence) for g in flops.groups] == [(6, "frame"), (4, "global")]
    blocks = sum(g.count * (2 * g.tokens_per_frame * g.width * (4 * g.width + g.mlp_matrices * g.mlp_hidden)
                            + 4 * g.width * g.tokens_per_frame**2) for g in flops.groups)
    with torch.device("meta"):
        meta = DA3(TINY).requires_grad_(False)
    counter = FlopCounterMode(display=False)
    with counter:
        meta(torch.empty(1, 1, 3, 56, 70, device="meta"))
    assert flops.other_flops_per_frame > 0
    assert blocks + flops.other_flops_per_frame == counter.get_total_flops()
    giant = build_model("da3-giant", "meta").flop_config(504, 504).groups
    assert all(g.mlp_matrices == 3 and g.mlp_hidden == 4096 for g in giant)
