"""VGGT-Omega: release key layout (meta), the whole aggregator against a plain re-derivation of upstream's DINOv3
blocks (axial RoPE, K-bias mask, register attention), heads (vggt-omega-tiny on CPU), checkpoint renames and strict
loading, reduction patching and the FLOP config."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from spark3r.errors import Spark3rError
from spark3r.models.loading import load_model
from spark3r.models.omega import CONFIGS, VGGTOmega, convert_checkpoint
from spark3r.models.registry import build_model
from spark3r.reduce import Reduction, apply_reductions
from spark3r.schedule import apply_schedule, paper_schedule

TINY_MODEL = "vggt-omega-tiny"
H, W = 48, 64  # 3 x 4 patches of 16
TINY = CONFIGS["vggt-omega-tiny"]
RELEASE_TO_OLD = (  # upstream's rename record, backwards
    ("aggregator.patch_embed.", "patch_embed."),
    ("aggregator.inter_frame_blocks.", "aggregator.global_blocks."),
    ("dense_head.", "depth_head."),
    ("camera_head.token_norm.", "camera_head.extra_attention_pre_norm."),
    ("camera_head.trunk.", "camera_head.extra_attention_blocks."),
    ("camera_head.trunk_norm.", "camera_head.token_norm."),
    ("camera_head.camera_branch.", "camera_head.pose_branch."),
)
from support import check_patch_and_restore, read_manifest


@pytest.fixture(scope="module")
def images():
    return torch.rand(1, 3, 3, H, W, generator=torch.Generator().manual_seed(0))


def test_state_dict_equals_the_release_manifest():
    model = build_model("vggt-omega", "meta")
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert ours == dict(read_manifest("omega"))
    assert sum(value.numel() for value in model.state_dict().values()) == 1_144_059_977


def test_adapter_lists_only_the_full_global_layers(tiny, images):
    adapter = build_model("vggt-omega", "meta").adapter
    blocks = [int(name.split(".")[2]) for name in adapter.global_attention]
    assert len(blocks) == 19 and not {2, 6, 9, 14, 20} & set(blocks)
    assert adapter.global_attention[0] == "aggregator.inter_frame_blocks.0.attn"
    assert adapter.n_special == 17 and adapter.patch_size == 16 and not adapter.rope_in_global
    assert tiny.adapter.modules(tiny) == [tiny.aggregator.inter_frame_blocks[i].attn for i in (0, 1, 3, 4, 5)]
    assert tiny.global_layer_steps == [1, 3, 7, 9, 11]
    layout = tiny.adapter.layout(images)
    assert (layout.frames, layout.n_special, layout.grid_h, layout.grid_w) == (3, 5, 3, 4)


def test_tiny_forward_gives_the_common_outputs(dense):
    shapes = {name: tuple(value.shape) for name, value in dense.items()}
    assert shapes == {
        "depth": (1, 3, H, W), "depth_conf": (1, 3, H, W), "points": (1, 3, H, W, 3), "points_conf": (1, 3, H, W),
        "pose_enc": (1, 3, 9), "extrinsics": (1, 3, 3, 4), "intrinsics": (1, 3, 3, 3),
    }
    assert all(torch.isfinite(value).all() for value in dense.values())
    assert (dense["depth"] > 0).all() and (dense["depth_conf"] > 1).all() and (dense["pose_enc"][..., 7:] >= 0.01).all()


def rope_sin_cos(grid_h: int, grid_w: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv3 RopePositionEmbedding(base 100, normalize_coords "max"): sin, cos [Hp * Wp, D]."""
    periods = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    side = max(grid_h, grid_w)
    coords = torch.stack(torch.meshgrid((torch.arange(grid_h) + 0.5) / side, (torch.arange(grid_w) + 0.5) / side,
                                        indexing="ij"), dim=-1).reshape(-1, 2) * 2 - 1
    angles = (2 * math.pi * coords[:, :, None] / periods).reshape(grid_h * grid_w, -1).tile(2)
    return angles.sin(), angles.cos()


def reference_block(block, x, sin_cos=None, qk_norm=False):
    """Upstream SelfAttentionBlock in plain code: qkv with the K part of the bias masked out, optional q/k norm, RoPE
    on the last Hp * Wp tokens only (x * cos + [-x2 | x1] * sin), SDPA, proj, LayerScale, then the MLP."""
    batch, tokens, width = x.shape
    attn, heads = block.attn, block.attn.num_heads
    mask = torch.ones(3 * width)
    mask[width : 2 * width] = 0
    qkv = F.linear(block.norm1(x), attn.qkv.weight, attn.qkv.bias * mask)
    q, k, v = qkv.reshape(batch, tokens, 3, heads, width // heads).unbind(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if sin_cos is not None:
        sin, cos = sin_cos
        prefix = tokens - sin.shape[0]

        def rotate(t):
            body = t[:, :, prefix:]
            half = body.shape[-1] // 2
            turned = torch.cat([-body[..., half:], body[..., :half]], dim=-1)
            return torch.cat([t[:, :, :prefix], body * cos + turned * sin], dim=2)

        q, k = rotate(q), rotate(k)
    out = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width))
    x = x + block.ls1.gamma * out
    return x + block.ls2.gamma * block.mlp(block.norm2(x))


def reference_aggregator(model: VGGTOmega, images: torch.Tensor):
    """Upstream Aggregator.forward (DINOv3 encoder, [camera, registers, patches], frame / inter-frame blocks) in
    plain code on the model's weights -> {layer: [frame | inter-frame]}, last layer's special tokens."""
    config, aggregator = model.config, model.aggregator
    batch, frames = images.shape[:2]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    flat = ((images - mean) / std).flatten(0, 1)
    encoder = aggregator.patch_embed
    x = encoder.patch_embed.proj(flat).flatten(2).transpose(1, 2)
    x = torch.cat([encoder.cls_token.expand(len(x), -1, -1), encoder.storage_tokens.expand(len(x), -1, -1), x], 1)
    sin_cos = rope_sin_cos(H // 16, W // 16, config.embed_dim // config.num_heads)
    for block in encoder.blocks:
        x = reference_block(block, x, sin_cos)
    patches = encoder.norm(x)[:, 1 + config.n_storage_tokens :].unflatten(0, (batch, frames))
    special = torch.cat([aggregator.camera_token, aggregator.register_token], dim=2)  # [1, 2, 1 + R, C]
    special = torch.cat([special[:, :1], special[:, 1:].expand(batch, frames - 1, -1, -1)], dim=1)
    tokens = torch.cat([special.expand(batch, -1, -1, -1), patches], dim=2)
    per_frame, width, n_special = tokens.shape[2], tokens.shape[3], config.n_special
    outputs = {}
    for i in range(config.depth):
        frame = reference_block(aggregator.frame_blocks[i], tokens.reshape(batch * frames, per_frame, width), sin_cos,
                                qk_norm=True).reshape(batch, frames, per_frame, width)
        block = aggregator.inter_frame_blocks[i]
        if i in config.register_blocks:
            mixed = reference_block(block, frame[:, :, :n_special].reshape(batch, frames * n_special, width),
                                    qk_norm=True).reshape(batch, frames, n_special, width)
            tokens = torch.cat([mixed, frame[:, :, n_special:]], dim=2)
        else:
            tokens = reference_block(block, frame.reshape(batch, frames * per_frame, width),
                                     qk_norm=True).reshape(batch, frames, per_frame, width)
        outputs[i] = torch.cat([frame, tokens], dim=-1)
    return outputs


def test_aggregator_equals_a_plain_rederivation_of_upstream(tiny, images):
    with torch.no_grad():
        expected = reference_aggregator(tiny, images)
        state = tiny.prepare(images)
        half = tiny.run_steps(state, stop=5)
        finished = tiny.run_steps(half)
    assert state.step == 0 and not state.taps  # the input state is not advanced
    assert finished.taps.keys() == set(TINY.taps)
    for layer in TINY.taps:
        torch.testing.assert_close(finished.taps[layer], expected[layer], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(finished.extras["camera_tokens"], expected[5][:, :, :5], atol=1e-5, rtol=1e-5)
    n_special = TINY.n_special
    assert torch.equal(expected[2][:, :, n_special:, 64:], expected[2][:, :, n_special:, :64])  # register block 2


def test_register_block_step_passes_patch_tokens_through(tiny, images):
    with torch.no_grad():
        before = tiny.run_steps(tiny.prepare(images), stop=5)  # frame block 2 done, register block 2 next
        after = tiny.run_steps(before, stop=6)
    assert torch.equal(after.tokens[:, :, 5:], before.tokens[:, :, 5:])
    assert not torch.equal(after.tokens[:, :, :5], before.tokens[:, :, :5])


def test_pre_release_checkpoint_names_load_strictly(tiny, images, dense, tmp_path):
    old = {}
    for key, value in tiny.state_dict().items():
        for new, previous in RELEASE_TO_OLD:
            if key.startswith(new):
                key = previous + key.removeprefix(new)
                break
        old[key] = value
    assert "camera_head.token_norm.weight" in old and "camera_head.extra_attention_pre_norm.weight" in old
    assert convert_checkpoint(old).keys() == tiny.state_dict().keys()
    assert list(convert_checkpoint(tiny.state_dict())) == list(tiny.state_dict())  # release names pass through
    torch.save({"model": old}, tmp_path / "vggt_omega_tiny.pt")
    with torch.no_grad():
        out = load_model("vggt-omega-tiny", weights=tmp_path / "vggt_omega_tiny.pt")(images)
    for name in dense:
        assert torch.equal(out[name], dense[name]), name
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(tmp_path / "release.safetensors"))
    load_model("vggt-omega-tiny", weights=tmp_path / "release.safetensors")
    with pytest.raises(Spark3rError, match="both map to"):
        convert_checkpoint({"depth_head.proj.bias": torch.zeros(1), "dense_head.proj.bias": torch.zeros(1)})


def test_reduction_patch_changes_outputs_and_remove_restores_them_bit_for_bit(tiny, images, dense):
    handle = apply_reductions(tiny, {0: Reduction(kv_keep=0.5, query_merge=2, group_frames=2),
                                     4: Reduction(kv_keep=0.25, kv_method="key_norm")})
    check_patch_and_restore(tiny, images, dense, handle)


def test_paper_rule_schedule_applies_and_remove_restores_bit_for_bit(tiny, images, dense):
    schedule = paper_schedule("vggt-omega-tiny", 5, [2])  # short clips: 3 x frame-stride K/V off the sensitive layer
    handle = apply_schedule(tiny, schedule)
    assert handle.reduction(0, images.shape[1]).kv_keep < 1
    check_patch_and_restore(tiny, images, dense, handle)
    with pytest.raises(Spark3rError, match="vggt-tiny"):
        apply_schedule(tiny, paper_schedule("vggt-tiny", 6, [3]))


def test_bad_input_raises_one_sentence(tiny):
    with pytest.raises(Spark3rError, match="multiple of the patch size 16"):
        tiny.prepare(torch.rand(2, 3, 42, 56))
    with pytest.raises(Spark3rError, match="stop must lie"):
        tiny.run_steps(tiny.prepare(torch.rand(2, 3, H, W)), stop=99)


def test_flop_config_blocks_plus_other_equal_a_counted_forward():
    flops = build_model("vggt-omega-tiny", "meta").flop_config(64, 80)
    assert flops.tokens_per_frame == 5 + 4 * 5 and flops.patch_grid == (4, 5)
    assert [(g.count, g.sequence) for g in flops.groups] == [(2, "frame"), (6, "frame"), (5, "global"), (1, "special"),
                                                             (1, "special")]
    blocks = sum(g.count * (2 * g.tokens_per_frame * g.width * (4 * g.width + g.mlp_matrices * g.mlp_hidden)
                            + 4 * g.width * g.tokens_per_frame**2) for g in flops.groups)
    with torch.device("meta"):
        meta = VGGTOmega(TINY).requires_grad_(False)
    counter = FlopCounterMode(display=False)
    with counter:
        meta(torch.empty(1, 1, 3, 64, 80, device="meta"))
    assert flops.other_flops_per_frame > 0
    assert blocks + flops.other_flops_per_frame == counter.get_total_flops()
