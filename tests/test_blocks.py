"""Shared blocks against straightforward float64 references written out here, independently of the code."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spark3r.errors import Spark3rError
from spark3r.models.blocks import (
    Attention,
    Block,
    LayerScale,
    RotaryPositionEmbedding2D,
    SwiGLUFFN,
    chunked_map,
    frame_map,
    merge_heads,
    patch_positions,
    project_heads,
    qkv_heads,
    swiglu_hidden,
    written,
)
from spark3r.models.dinov2 import DinoVisionTransformer


def rope_reference(x: np.ndarray, pos: np.ndarray, base: float = 100.0) -> np.ndarray:
    """Pairwise 2D rotation: x [h, N, D], pos [N, 2] (y, x). Channel j of each axis half pairs with j + d/2."""
    out = x.copy()
    head_dim = x.shape[-1]
    d = head_dim // 2
    for axis in range(2):
        offset = axis * d
        for j in range(d // 2):
            theta = pos[:, axis] * base ** (-2.0 * j / d)
            c0, c1 = offset + j, offset + j + d // 2
            cos, sin = np.cos(theta), np.sin(theta)
            out[..., c0] = x[..., c0] * cos - x[..., c1] * sin
            out[..., c1] = x[..., c1] * cos + x[..., c0] * sin
    return out


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def attention_reference(attn: Attention, x: np.ndarray, pos: np.ndarray | None) -> np.ndarray:
    """x [N, C] (one sequence) -> [N, C], from the module's float64 weights."""
    p = {k: v.detach().numpy() for k, v in attn.state_dict().items()}
    tokens, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads
    qkv = x @ p["qkv.weight"].T + p["qkv.bias"]
    q, k, v = (qkv[:, i * width:(i + 1) * width].reshape(tokens, heads, head_dim).transpose(1, 0, 2) for i in range(3))
    if "q_norm.weight" in p:
        q = layer_norm(q, p["q_norm.weight"], p["q_norm.bias"], 1e-5)
        k = layer_norm(k, p["k_norm.weight"], p["k_norm.bias"], 1e-5)
    if pos is not None:
        q, k = rope_reference(q, pos), rope_reference(k, pos)
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ v).transpose(1, 0, 2).reshape(tokens, width)
    return out @ p["proj.weight"].T + p["proj.bias"]


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3 + (param.dim() == 1))
    return module


def test_patch_positions_row_major_with_special_tokens_at_origin():
    pos = patch_positions(2, 3, 2, "cpu")
    assert pos.dtype == torch.long
    assert pos.tolist() == [[0, 0], [0, 0], [1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]


def test_rope_matches_pairwise_rotation_reference():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, 16, generator=generator, dtype=torch.float64)
    pos = torch.randint(0, 9, (2, 10, 2), generator=generator)
    out = RotaryPositionEmbedding2D(100.0)(x, pos)
    for b in range(2):
        expected = rope_reference(x[b].numpy(), pos[b].numpy().astype(np.float64))
        # angles are computed in fp32 as upstream: |pos * inv_freq| < 10 rounds to ~1e-6
        np.testing.assert_allclose(out[b].numpy(), expected, atol=5e-6)


def test_rope_scores_depend_only_on_position_difference():
    generator = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 1, 1, 1, 8, generator=generator, dtype=torch.float64)
    rope = RotaryPositionEmbedding2D()

    def score(pq, pk):
        return (rope(q, torch.tensor([[pq]])) * rope(k, torch.tensor([[pk]]))).sum().item()

    assert score((3, 5), (1, 2)) == pytest.approx(score((6, 7), (4, 4)), abs=1e-5)
    assert score((3, 5), (1, 2)) != pytest.approx(score((3, 5), (2, 1)), abs=1e-3)


@pytest.mark.parametrize("qk_norm, use_rope", [(False, False), (True, True)])
def test_attention_matches_float64_reference(qk_norm, use_rope):
    attn = Attention(32, 2, qk_norm=qk_norm, rope=RotaryPositionEmbedding2D() if use_rope else None)
    randomize(attn.double())
    x = torch.randn(2, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    pos = patch_positions(2, 3, 1, "cpu")[None].expand(2, -1, -1)
    out = attn(x, pos=pos)
    for b in range(2):
        expected = attention_reference(attn, x[b].numpy(), pos[b].numpy().astype(np.float64) if use_rope else None)
        np.testing.assert_allclose(out[b].detach().numpy(), expected, atol=2e-5)


def test_block_matches_float64_reference():
    block = Block(32, 2, mlp_ratio=2.0, init_values=0.5, norm_eps=1e-5, qk_norm=True, rope=RotaryPositionEmbedding2D())
    randomize(block.double(), seed=4)
    x = torch.randn(1, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    pos = patch_positions(2, 3, 1, "cpu")[None]
    out = block(x, pos=pos)[0].detach().numpy()

    p = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    h = x[0].numpy()
    y = layer_norm(h, p["norm1.weight"], p["norm1.bias"], 1e-5)
    h = h + attention_reference(block.attn, y, pos[0].numpy().astype(np.float64)) * p["ls1.gamma"]
    y = layer_norm(h, p["norm2.weight"], p["norm2.bias"], 1e-5)
    hidden = y @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
    hidden = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))  # exact GELU
    h = h + (hidden @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]) * p["ls2.gamma"]
    np.testing.assert_allclose(out, h, atol=2e-5)


def test_block_keys_follow_the_official_layout():
    plain = Block(64, 4)
    assert list(plain.state_dict()) == [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    ]
    full = Block(64, 4, init_values=0.01, qk_norm=True, ffn_layer="swiglu")
    assert [k for k in full.state_dict() if k.endswith(("_norm.weight", "gamma", "w12.weight", "w3.weight"))] == [
        "attn.q_norm.weight", "attn.k_norm.weight", "ls1.gamma", "mlp.w12.weight", "mlp.w3.weight", "ls2.gamma",
    ]


def test_swiglu_width_rule_and_forward():
    assert swiglu_hidden(4 * 1536) == 4096
    ffn = randomize(SwiGLUFFN(16, 64).double(), seed=6)
    hidden = swiglu_hidden(64)
    assert ffn.w12.weight.shape == (2 * hidden, 16) and ffn.w3.weight.shape == (16, hidden)
    x = torch.randn(5, 16, dtype=torch.float64)
    p = {k: v.detach().numpy() for k, v in ffn.state_dict().items()}
    packed = x.numpy() @ p["w12.weight"].T + p["w12.bias"]
    gate, value = packed[:, :hidden], packed[:, hidden:]
    expected = (gate / (1 + np.exp(-gate)) * value) @ p["w3.weight"].T + p["w3.bias"]
    np.testing.assert_allclose(ffn(x).detach().numpy(), expected, atol=1e-10)


def test_layer_scale_keeps_the_residual_stream_fp32_under_autocast():
    block = Block(32, 2, init_values=0.01, qk_norm=True, rope=RotaryPositionEmbedding2D())
    x = torch.randn(1, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LayerScale(32, 0.1)(torch.ones(3, 32, dtype=torch.bfloat16)).dtype == torch.float32
        assert block(x, pos=patch_positions(2, 3, 1, "cpu")[None]).dtype == torch.float32


def test_qkv_heads_reads_only_the_documented_attributes():
    """An upstream-like module with the same attributes (no rope, no qk_to_v_dtype) works with qkv_heads."""
    attn = Attention(32, 4, qk_norm=True)
    duck = nn.Module()
    duck.qkv, duck.q_norm, duck.k_norm, duck.proj, duck.num_heads = attn.qkv, attn.q_norm, attn.k_norm, attn.proj, 4
    x = torch.randn(2, 6, 32)
    q, k, v = qkv_heads(duck, x, None)
    assert q.shape == k.shape == v.shape == (2, 4, 6, 8)
    patched = duck.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))
    torch.testing.assert_close(patched, attn(x), rtol=0, atol=0)


class UpcastNorm(nn.Module):
    """Stands in for a LayerNorm under CUDA autocast, which returns fp32."""

    def forward(self, x):
        return x.float()


def test_qk_to_v_dtype_casts_normed_queries_and_keys_back():
    attn = Attention(32, 4, qk_to_v_dtype=True).to(torch.bfloat16)
    attn.q_norm, attn.k_norm = UpcastNorm(), UpcastNorm()
    x = torch.randn(1, 5, 32, dtype=torch.bfloat16)
    q, k, v = qkv_heads(attn, x, None)
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    attn.qk_to_v_dtype = False
    q, k, v = qkv_heads(attn, x, None)
    assert q.dtype == k.dtype == torch.float32 and v.dtype == torch.bfloat16


def test_bad_block_configs_raise_one_sentence():
    with pytest.raises(Spark3rError, match="not divisible"):
        Attention(30, 4)
    with pytest.raises(Spark3rError, match="ffn_layer"):
        Block(32, 2, ffn_layer="glu")


def pos_embed_encoder(**kwargs) -> DinoVisionTransformer:
    """A 4x4 pretraining grid whose pos_embed channel 0 = row and channel 1 = column of the patch."""
    encoder = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=8, depth=0, num_heads=1, **kwargs)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    with torch.no_grad():
        encoder.pos_embed.zero_()
        encoder.pos_embed[0, 1:, 0] = rows.flatten()
        encoder.pos_embed[0, 1:, 1] = cols.flatten()
    return encoder


@pytest.mark.parametrize("variant", [{}, {"interpolate_offset": 0.1, "interpolate_antialias": False}])
def test_pos_embed_interpolation_keeps_rows_and_columns_apart(variant):
    encoder = pos_embed_encoder(**variant)
    assert encoder.interpolate_pos_encoding(56, 56, torch.float32) is encoder.pos_embed
    resized = encoder.interpolate_pos_encoding(28, 112, torch.float32)[0, 1:].reshape(2, 8, 8)
    assert torch.equal(encoder.interpolate_pos_encoding(28, 112, torch.float32)[0, 0], encoder.pos_embed[0, 0])
    row, col = resized[..., 0], resized[..., 1]
    assert torch.allclose(row, row[:, :1].expand_as(row), atol=1e-5)  # row index is constant along a row
    assert (row[1] > row[0]).all() and (col[:, 1:] > col[:, :-1]).all()
    assert torch.allclose(col[0], col[1], atol=1e-5)


def test_pos_embed_variants_differ():
    vggt_style = pos_embed_encoder().interpolate_pos_encoding(42, 70, torch.float32)
    da3_style = pos_embed_encoder(interpolate_offset=0.1, interpolate_antialias=False)
    assert vggt_style.shape == (1, 1 + 15, 8)
    assert not torch.allclose(vggt_style, da3_style.interpolate_pos_encoding(42, 70, torch.float32))


def test_encoder_token_order_and_registers():
    encoder = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=8, depth=1, num_heads=2,
                                    num_register_tokens=3)
    images = torch.rand(2, 3, 28, 42)
    tokens = encoder.prepare_tokens(images)
    assert tokens.shape == (2, 1 + 3 + 6, 8)
    torch.testing.assert_close(tokens[0, 1:4], encoder.register_tokens[0])
    torch.testing.assert_close(tokens[0, 0], encoder.cls_token[0, 0] + encoder.pos_embed[0, 0])
    assert encoder.forward_features(images).shape == (2, 6, 8)


def rope_uncached(x: torch.Tensor, pos: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    """The RoPE formula straight from per-token positions [N, 2]: angles in fp32, cast to x's dtype before cos/sin,
    x * cos + rotate_half(x) * sin per axis half (VGGT's upstream order of operations)."""
    halves = []
    for axis, part in enumerate(x.chunk(2, dim=-1)):
        dim = part.shape[-1]
        inv_freq = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
        angles = pos[:, axis].float()[:, None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1).to(x.dtype)
        first, second = part.chunk(2, dim=-1)
        halves.append(part * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin())
    return torch.cat(halves, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cached_rope_equals_the_uncached_formula_exactly(dtype):
    """One frame's positions repeated over 3 frames (as a global layer passes them), full per-token positions, with
    and without autograd: all bit-identical to the formula; the tables are computed once per positions tensor."""
    rope = RotaryPositionEmbedding2D()
    frame_pos = patch_positions(3, 4, 2)
    full_pos = frame_pos.repeat(3, 1)
    x = torch.randn(2, 3, full_pos.shape[0], 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = rope_uncached(x, full_pos)
    with torch.no_grad():
        assert torch.equal(rope(x, frame_pos), expected)
        assert torch.equal(rope(x, full_pos[None]), expected)
        assert torch.equal(rope(x, frame_pos), expected)  # second call: from the cache
    assert torch.equal(rope(x.requires_grad_(), frame_pos).detach(), expected)
    tables = rope.tables(frame_pos, 16, dtype)
    assert all(a is b for a, b in zip(tables, rope.tables(frame_pos, 16, dtype)))
    assert rope.tables(frame_pos, 16, torch.float16)[0].dtype == torch.float16


def test_rope_rounds_once_to_the_output_dtype():
    rope = RotaryPositionEmbedding2D()
    pos = patch_positions(2, 3, 1)[None]
    x = torch.randn(1, 2, 7, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = rope(x, pos, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, rope_uncached(x, pos[0]).to(torch.bfloat16))
    with pytest.raises(Spark3rError, match="divides the token count"):
        rope(torch.randn(1, 2, 8, 8), pos)


def test_qkv_heads_hands_the_autocast_dtype_to_the_attention():
    """fp32 qk-norm outputs (as under CUDA autocast) are rotated in fp32 and rounded once to the autocast dtype."""
    attn = Attention(32, 4, rope=RotaryPositionEmbedding2D())
    attn.q_norm, attn.k_norm = UpcastNorm(), UpcastNorm()
    x = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))
    pos = patch_positions(2, 3, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = qkv_heads(attn, x, pos)
        raw = attn.qkv(x).reshape(1, 7, 3, 4, 8).permute(2, 0, 3, 1, 4).float()
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    assert torch.equal(q, rope_uncached(raw[0], pos).to(torch.bfloat16))
    assert torch.equal(k, rope_uncached(raw[1], pos).to(torch.bfloat16))


@pytest.mark.parametrize("ffn_layer", ["mlp", "swiglu"])
def test_long_sequences_without_autograd_run_in_chunks_with_the_same_values(monkeypatch, ffn_layer):
    block = Block(32, 2, mlp_ratio=2.0, init_values=0.5, norm_eps=1e-5, qk_norm=True, rope=RotaryPositionEmbedding2D(),
                  ffn_layer=ffn_layer)
    randomize(block.double(), seed=6)
    x = torch.randn(1, 5 * 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    pos = patch_positions(2, 3, 1, "cpu")  # one frame's 7 positions, repeated over 5 frames as in a global layer
    whole = block(x, pos=pos).detach()  # autograd on: one pass
    calls = []
    monkeypatch.setattr("spark3r.models.blocks.INFERENCE_TOKEN_CHUNK", 14)  # 14 tokens (2 frames) per chunk
    block.mlp.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    with torch.no_grad():
        chunked = block(x, pos=pos)
    assert calls == [7, 14, 14]  # the last, short chunk first: its outputs give the outputs' shapes and dtypes
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    expected = [[attention_reference(block.attn, layer_norm(x[b].numpy(), *(p.detach().numpy() for p in
                 (block.norm1.weight, block.norm1.bias)), 1e-5), np.tile(pos.numpy(), (5, 1)).astype(np.float64))]
                for b in range(1)]
    with torch.no_grad():
        attn = block.attn(block.norm1(x), pos=pos)
    np.testing.assert_allclose(attn.numpy(), np.concatenate(expected), atol=1e-6)  # RoPE angles are fp32


def test_chunked_block_keeps_the_promoted_residual_dtype(monkeypatch):
    block = Block(16, 2, init_values=0.1)
    x = torch.randn(1, 40, 16).bfloat16()
    block.attn.forward = lambda x, pos=None: x  # keep the residual bf16 through the attention half
    block.ls1 = nn.Identity()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = block(x).detach()  # bf16 residual + fp32 LayerScale branch: fp32 out
        monkeypatch.setattr("spark3r.models.blocks.INFERENCE_TOKEN_CHUNK", 16)
        with torch.no_grad():
            chunked = block(x)
    assert chunked.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(chunked, expected, rtol=0, atol=0)


def test_a_large_batch_without_autograd_runs_a_few_sequences_at_a_time_with_the_same_values(monkeypatch):
    block = Block(32, 2, mlp_ratio=2.0, init_values=0.5, norm_eps=1e-5, qk_norm=True, rope=RotaryPositionEmbedding2D())
    randomize(block.double(), seed=8)
    x = torch.randn(5, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    per_frame = patch_positions(2, 3, 1, "cpu")
    per_row = per_frame[None].repeat(5, 1, 1).flip(1)  # [B, N, 2]: positions differ from row to row's default
    for pos in (per_frame, per_row):
        whole = block(x, pos=pos).detach()  # autograd on: one call
        monkeypatch.setattr("spark3r.models.blocks.INFERENCE_TOKEN_CHUNK", 14)  # 2 sequences of 7 tokens per call
        calls = []
        handle = block.attn.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
        with torch.no_grad():
            rows = block(x, pos=pos)
        handle.remove()
        monkeypatch.undo()
        assert calls == [1, 2, 2]
        torch.testing.assert_close(rows, whole, rtol=0, atol=1e-12)


def test_project_heads_in_token_chunks_equals_one_pass(monkeypatch):
    attn = randomize(Attention(32, 4).double(), seed=10)
    out = torch.randn(1, 4, 45, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    whole = attn.proj(merge_heads(out)).detach()
    monkeypatch.setattr("spark3r.models.blocks.INFERENCE_TOKEN_CHUNK", 16)
    calls = []
    attn.proj.register_forward_hook(lambda module, args, result: calls.append(args[0].shape[1]))
    with torch.no_grad():
        chunked = project_heads(attn, out)
    assert calls == [13, 16, 16]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)


def test_norm1_reaches_the_attention_in_the_autocast_dtype_with_the_same_qkv_input(monkeypatch):
    """norm1(x) is stored in bf16 under bf16 autocast, whole and in chunks: the qkv projection casts its input to bf16
    anyway, so its output equals the one from the fp32 norm, to the bit."""
    block = Block(32, 2, init_values=0.1, qk_norm=True)
    x = torch.randn(1, 40, 32)
    inputs = []
    block.attn.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole = block.norm1(x)
        block(x)
        monkeypatch.setattr("spark3r.models.blocks.INFERENCE_TOKEN_CHUNK", 16)
        block(x)
        assert whole.dtype == torch.float32
        for normed in inputs:
            assert normed.dtype == torch.bfloat16
            torch.testing.assert_close(block.attn.qkv(normed), block.attn.qkv(whole), rtol=0, atol=0)
    assert len(inputs) == 2


def test_chunked_map_lets_parts_write_into_the_outputs():
    """Parts that write into their views (as the compiled ones do) and parts that return their values stitch the same
    outputs, a tuple of two dtypes along dim 1; the last slice, which returns, runs first."""
    source = torch.arange(2 * 10 * 3, dtype=torch.float64).reshape(2, 10, 3)
    calls = []

    def part(index, out):
        calls.append((index.start, out is None))
        value = (source[:, index] * 2, source[:, index].long())
        return written(value, out)

    doubled, as_long = chunked_map(part, 10, 4)
    assert calls == [(8, True), (0, False), (4, False)]
    assert torch.equal(doubled, source * 2) and as_long.dtype == torch.int64 and torch.equal(as_long, source.long())
    returned = chunked_map(lambda index, out: (source[:, index] * 2, source[:, index].long()), 10, 4)
    assert torch.equal(returned[0], doubled) and torch.equal(returned[1], as_long)


def test_frame_map_chunks_flattened_frames_of_every_batch_item_alike():
    """frame_map stitches per-chunk outputs (tensor, tuple and dict) into [B, S, ...] equal to one call over every
    frame, and its chunks hold `chunk` frames whatever B is (profile-layers decodes 5 levels x 8 frames as 8-frame
    chunks, the dense run's shape, not as 40-frame ones)."""
    generator = torch.Generator().manual_seed(0)
    taps = [torch.randn(5, 8, 3, 4, generator=generator), torch.randn(5, 8, 3, 2, generator=generator)]
    sizes = []

    def heads(chunk):
        sizes.append(chunk[0].shape[0])
        first, second = chunk
        return {"sum": first.sum(-1), "pair": (first[..., :2] * second, second.amax(-1))}

    out = frame_map(heads, taps, chunk=8)
    assert sizes == [8] * 5
    first, second = taps
    torch.testing.assert_close(out["sum"], first.sum(-1), rtol=0, atol=0)
    torch.testing.assert_close(out["pair"][0], first[..., :2] * second, rtol=0, atol=0)
    torch.testing.assert_close(out["pair"][1], second.amax(-1), rtol=0, atol=0)

    sizes.clear()
    odd = frame_map(lambda chunk: heads(chunk)["sum"], [tap[:, :7] for tap in taps], chunk=8)
    assert sizes == [3] + [8] * 4  # 35 frames of 5 items x 7: chunks straddle the items; the last runs first
    torch.testing.assert_close(odd, first[:, :7].sum(-1), rtol=0, atol=0)
    sizes.clear()
    assert frame_map(lambda chunk: heads(chunk)["sum"], taps, chunk=None).shape == (5, 8, 3) and sizes == [40]
