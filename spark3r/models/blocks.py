"""Shared transformer blocks with the official (DINOv2 / VGGT) key names.

Every attention module here exposes `qkv`, `q_norm`, `k_norm`, `rope`, `proj`, `num_heads`, `head_dim` and
`qk_to_v_dtype`. `spark3r.reduce` patches global attention through those attributes only, using the module-level
`qkv_heads` and `project_heads`, so it works on upstream-built modules with the same attributes too.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from spark3r.errors import Spark3rError


def patch_positions(grid_h: int, grid_w: int, n_special: int, device: torch.device | str | None = None) -> Tensor:
    """RoPE positions of one frame: [n_special + grid_h * grid_w, 2] long (y, x).

    Special tokens get (0, 0); patches get (row + 1, col + 1) in row-major order.
    """
    rows = torch.arange(grid_h, device=device)
    cols = torch.arange(grid_w, device=device)
    patches = torch.cartesian_prod(rows, cols) + 1
    special = torch.zeros(n_special, 2, dtype=torch.long, device=device)
    return torch.cat([special, patches], dim=0)


def rotate_half(x: Tensor) -> Tensor:
    """[x1 | x2] -> [-x2 | x1] over the last dim (split-half RoPE convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RotaryPositionEmbedding2D(nn.Module):
    """2D RoPE: the first half of the head dim rotates with y (row), the second half with x (col).

    Inside each half of d channels, frequency j = base^(-2j/d) pairs channel j with channel j + d/2. Angles are
    computed in fp32 and cast to the input dtype before cos/sin, as upstream. No parameters.

    Positions may cover one period of the sequence: pos [n, 2] or [B, n, 2] with n dividing N, token i taking
    position i mod n (a global layer passes one frame's positions, which repeat frame after frame). The cos/sin
    tables [B or 1, n, 2, D / 4] are cached per (positions tensor, head dim, dtype); the entry dies with the tensor,
    so positions must not be changed in place. `qkv_heads` looks them up outside torch.compile and hands them to the
    compiled part (`rope_tables`).
    """

    def __init__(self, base: float = 100.0):
        super().__init__()
        self.base = base
        self._tables = WeakIdKeyDictionary()

    def axis_angles(self, positions: Tensor, dim: int) -> Tensor:
        """positions [..., N] long, dim = channels of one axis half -> angles [..., N, dim / 2] fp32."""
        inv_freq = 1.0 / self.base ** (torch.arange(0, dim, 2, device=positions.device).float() / dim)
        return positions.float()[..., None] * inv_freq

    def compute_tables(self, pos: Tensor, head_dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """pos [..., n, 2] -> cos, sin [..., n, 2, head_dim / 4] in `dtype` (axis 0: y, axis 1: x)."""
        angles = self.axis_angles(pos, head_dim // 2).to(dtype)
        return angles.cos(), angles.sin()

    def tables(self, pos: Tensor, head_dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """`compute_tables`, cached per positions tensor (recomputed when traced by torch.compile, where no cache can
        be read: inductor then computes cos and sin per element of q and k, so `qkv_heads` passes them in)."""
        if torch.compiler.is_compiling():
            return self.compute_tables(pos, head_dim, dtype)
        key = (head_dim, dtype, torch.is_inference_mode_enabled())
        per_pos = self._tables.setdefault(pos, {})
        if key not in per_pos:
            per_pos[key] = self.compute_tables(pos, head_dim, dtype)
        return per_pos[key]

    def forward(self, x: Tensor, pos: Tensor, out_dtype: torch.dtype | None = None,
                tables: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [B, h, N, D], pos [n, 2] or [B, n, 2] (y, x), n dividing N -> [B, h, N, D] in `out_dtype` (default
        x's dtype); the rotation runs in x's dtype and is rounded to `out_dtype` once. tables: `tables(pos, D,
        x.dtype)` looked up by the caller (looked up here when None or of another dtype). Without autograd or
        torch.compile (which fuses the plain form) it writes straight into the output, with no temporary concat."""
        batch, heads, tokens, head_dim = x.shape
        period = pos.shape[-2]
        if tokens % period or head_dim % 4:
            raise Spark3rError(
                f"RoPE got {tokens} tokens of head dim {head_dim} with {period} positions: pass positions whose "
                f"count divides the token count, and a head dim divisible by 4"
            )
        if tables is None or tables[0].dtype != x.dtype:
            tables = self.tables(pos, head_dim, x.dtype)
        cos, sin = tables
        if pos.dim() == 3:
            cos, sin = cos[:, None, None], sin[:, None, None]
        pairs = x.unflatten(-1, (2, 2, head_dim // 4)).unflatten(2, (tokens // period, period))
        first, second = pairs.unbind(-2)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
            out = torch.stack([first * cos - second * sin, second * cos + first * sin], dim=-2)
            return out.to(out_dtype or x.dtype).flatten(-3).flatten(2, 3)
        out = torch.empty(pairs.shape, dtype=out_dtype or x.dtype, device=x.device)
        out_first, out_second = out.unbind(-2)
        rotated = second * sin
        torch.sub(first * cos, rotated, out=out_first)
        torch.mul(first, sin, out=rotated)
        torch.add(second * cos, rotated, out=out_second)
        return out.view(batch, heads, tokens, head_dim)


INFERENCE_TOKEN_CHUNK = 1 << 16
"""Without autograd, a block call of more than this many tokens (batch x length) runs in parts: a batch of sequences
(per-frame blocks) a few sequences at a time, one long sequence (a global layer) its token-wise parts (qkv, qk-norm and
RoPE; norm2 + MLP) this many tokens at a time. 1000 frames then never hold a whole [N, 4C] MLP hidden or fp32 q/k."""


def inference_chunk(x: Tensor, period: int = 1) -> int | None:
    """Tokens per chunk for the token-wise work on x [B, N, C] (a multiple of `period`, the RoPE position period), or
    None where it runs whole: under autograd, or when N fits in one chunk."""
    periods = frame_chunk(x.shape[0], -(-x.shape[1] // period), period)
    return None if periods is None else periods * period


def frame_chunk(batch: int, frames: int, per_frame: int) -> int | None:
    """Frames per chunk for frame-wise work on tokens [B, S, P, C] (at most INFERENCE_TOKEN_CHUNK tokens, at least one
    frame), or None where it runs whole: under autograd, or when the S frames fit in one chunk."""
    chunk = max(1, INFERENCE_TOKEN_CHUNK // (batch * per_frame))
    return None if torch.is_grad_enabled() or frames <= chunk else chunk


def chunked_map(fn, length: int, chunk: int, dim: int = 1):
    """fn over slices of `chunk` positions of a dimension of `length`, into preallocated outputs -> a tensor, or a
    tuple or dict of them, over all `length` positions in `dim`.

    fn(index, None) returns the outputs of positions `index`; fn(index, out) may instead write them into `out`, views
    of the outputs there, and return None (compiled parts do, `written`: the copy fuses into the kernel computing
    them, so no slice is stored twice). The last slice runs first: its outputs give the shapes and dtypes."""
    starts = range(0, length, chunk)
    last = slice(starts[-1], length)
    parts, spec = tree_flatten(fn(last, None))
    outputs = [torch.empty((*part.shape[:dim], length, *part.shape[dim + 1:]), dtype=part.dtype, device=part.device)
               for part in parts]

    def views(index: slice) -> list[Tensor]:
        return [output[(slice(None),) * dim + (index,)] for output in outputs]

    written(parts, views(last))
    for start in starts[:-1]:
        index = slice(start, start + chunk)
        out = views(index)
        parts = fn(index, tree_unflatten(out, spec))
        if parts is not None:
            written(parts, out)
    return tree_unflatten(outputs, spec)


def written(value, out):
    """A part's result: `value` (a tensor, or a tuple or list of them) where out is None, else None after copying it
    into `out`, tensors of the same structure. Compiled, the copy is the store of the kernel computing `value`."""
    if out is None:
        return value
    for target, part in zip(tree_leaves(out), tree_leaves(value), strict=True):
        target.copy_(part)
    return None


def frame_map(fn, tensors: list[Tensor], chunk: int | None):
    """fn over chunks of at most `chunk` frames (all at once for None or 0) of tensors [B, S, ...] sharing B and S,
    with the batch items and frames flattened together: fn(list of [n, ...]) returns a tensor, or a tuple or dict of
    them, [n, ...] -> the same structure [B, S, ...]. Every chunk but the last holds `chunk` frames at any B, so a
    compiled head runs the same graph at every batch size (profile-layers decodes its levels as one batch)."""
    batch, frames = tensors[0].shape[:2]
    flat = [tensor.flatten(0, 1) for tensor in tensors]
    total = batch * frames
    if not chunk or chunk >= total:
        out = fn(flat)
    else:
        out = chunked_map(lambda index, _: fn([tensor[index] for tensor in flat]), total, chunk, dim=0)
    return tree_map(lambda tensor: tensor.unflatten(0, (batch, frames)), out)


COMPILE_CACHE_SIZE = 64
"""Graphs dynamo may keep per compiled part: one per input shape, block kind (frame rows, global chunks, their
remainders, encoder and head blocks) and form (returning, or writing into a chunk of the output), not one per layer."""


@functools.cache
def compiled(fn, backend: str):
    """torch.compile(fn, backend=backend), made once per function and backend. Every module that runs `fn` shares its
    graphs (dynamo takes the module argument's parameters as inputs), so 24 layers of one shape compile once."""
    config = torch._dynamo.config
    config.cache_size_limit = max(config.cache_size_limit, COMPILE_CACHE_SIZE)
    return torch.compile(fn, backend=backend)


def compiled_for(module: nn.Module, fn):
    """fn, or its `compiled` form where `module.compile_backend` names a torch.compile backend (`compile_model`)."""
    backend = getattr(module, "compile_backend", None)
    return fn if backend is None else compiled(fn, backend)


def compile_model(model: nn.Module, backend: str | None = "inductor") -> nn.Module:
    """Run the compilable parts of `model` through torch.compile with `backend` (None: eagerly again): in every Block,
    norm1 (`normed_tokens`), qkv + qk-norm + RoPE (`token_qkv_heads`), the output projection (`project_tokens`) and
    the residuals + MLP (`residual_mlp`), each returning its result or writing it into a chunk of a preallocated one
    (`written`); in a DPT head (VGGT's DPTHead, DA3's DualDPT, VGGT-Omega's DenseHead), each chunk of frames. The
    attention itself stays F.scaled_dot_product_attention (or a reduction's) and convolutions stay cuDNN's. Each part
    compiles one graph per input shape (and output strides), shared by all layers. Outputs differ from eager ones by
    rounding only.
    Sets `compile_backend` on every module whose class declares it."""
    for module in model.modules():
        if hasattr(type(module), "compile_backend"):
            module.compile_backend = backend
    return model


def qkv_heads(attn: nn.Module, x: Tensor, pos: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The pre-attention math of `attn`: x [B, N, C] -> q, k, v each [B, h, N, D], after qk-norm and RoPE.

    Long sequences without autograd run it over whole RoPE periods at a time (`inference_chunk`), writing into the
    outputs; every token's values are those of one pass over the whole sequence.

    Reads only `attn.qkv`, `attn.num_heads`, `attn.q_norm`, `attn.k_norm`, and optionally `attn.rope` and
    `attn.qk_to_v_dtype` (pi3 casts q and k back to v's dtype after qk-norm). Under autocast, q and k leave in the
    autocast dtype (our RoPE rounds to it once; another `rope(x, pos)` module is cast after), as the attention would
    cast them anyway; qk-norm and RoPE still run in the dtype qk-norm returns (fp32 under CUDA autocast, as upstream).
    """
    chunk = qkv_chunk(attn, x, pos)
    heads = compiled_for(attn, token_qkv_heads)
    tables = rope_tables(attn, x, pos)
    if chunk is None:
        return heads(attn, x, pos, tables)
    return chunked_map(lambda index, out: heads(attn, x[:, index], pos, tables, out), x.shape[1], chunk, dim=2)


def rope_period(pos: Tensor | None) -> int:
    """Tokens after which RoPE positions repeat: pos [..., n, 2] -> n (a frame's in a global layer), 1 without."""
    return 1 if pos is None else pos.shape[-2]


def qkv_chunk(attn: nn.Module, x: Tensor, pos: Tensor | None = None) -> int | None:
    """Tokens per slice (a multiple of `rope_period`) in which `qkv_heads` runs over x [B, N, C], or None where it
    runs whole: under autograd, when N fits in one chunk, when N is not whole periods, or with another RoPE module
    (whose positions may not repeat)."""
    rope = getattr(attn, "rope", None)
    period = rope_period(pos)
    if not (rope is None or isinstance(rope, RotaryPositionEmbedding2D)) or x.shape[1] % period:
        return None
    return inference_chunk(x, period)


def rope_tables(attn: nn.Module, x: Tensor, pos: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """The cos/sin tables our RoPE rotates q and k of `token_qkv_heads` with (None without our RoPE): looked up in the
    RoPE module's cache in the dtype q reaches RoPE in, which the qkv projection (the autocast dtype, else x's) and
    q_norm give (`qk_to_v_dtype`: v's). Passed into the compiled part as inputs, they are read, not recomputed."""
    rope = getattr(attn, "rope", None)
    if not isinstance(rope, RotaryPositionEmbedding2D) or pos is None:
        return None
    head_dim = x.shape[-1] // attn.num_heads
    dtype = active_compute_dtype(x.device.type, x.dtype)
    if not getattr(attn, "qk_to_v_dtype", False):
        dtype = attn.q_norm(torch.empty(0, head_dim, dtype=dtype, device=x.device)).dtype
    return rope.tables(pos, head_dim, dtype)


def token_qkv_heads(attn: nn.Module, x: Tensor, pos: Tensor | None = None,
                    tables: tuple[Tensor, Tensor] | None = None, out: tuple[Tensor, Tensor, Tensor] | None = None):
    """`qkv_heads` in one pass: x [B, N, C] -> q, k, v [B, h, N, D] (or written into `out`); tables: `rope_tables`."""
    batch, tokens, width = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if getattr(attn, "qk_to_v_dtype", False):
        q, k = q.to(v.dtype), k.to(v.dtype)
    out_dtype = active_compute_dtype(x.device.type, q.dtype)
    rope = getattr(attn, "rope", None)
    if isinstance(rope, RotaryPositionEmbedding2D) and pos is not None:
        q, k = rope(q, pos, out_dtype, tables), rope(k, pos, out_dtype, tables)
    elif rope is not None and pos is not None:
        q, k = rope(q, pos), rope(k, pos)
    return written((q.to(out_dtype), k.to(out_dtype), v), out)


def merge_heads(out: Tensor) -> Tensor:
    """[B, h, N, D] -> [B, N, h * D]."""
    batch, heads, tokens, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def project_tokens(attn: nn.Module, attended: Tensor, out: Tensor | None = None) -> Tensor | None:
    """attn.proj(merge_heads(attended)): [B, h, n, D] -> [B, n, C] (or written into `out`)."""
    return written(attn.proj(merge_heads(attended)), out)


def project_heads(attn: nn.Module, attended: Tensor) -> Tensor:
    """The post-attention math of `attn`: attention output [B, h, N, D] -> attn.proj(merge_heads(attended)) [B, N, C].

    Long sequences without autograd merge and project `inference_chunk` tokens at a time into one output, so no merged
    copy of the whole output is made."""
    chunk = inference_chunk(attended.transpose(1, 2))
    project = compiled_for(attn, project_tokens)
    if chunk is None:
        return project(attn, attended)
    return chunked_map(lambda index, out: project(attn, attended[:, :, index], out), attended.shape[2], chunk)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, optional per-head qk-norm and optional 2D RoPE.

    x [B, N, C], pos [B, N, 2] or None -> [B, N, C]. `compile_backend`: see compile_model.
    """

    compile_backend: str | None = None

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        rope: nn.Module | None = None,
        qk_to_v_dtype: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise Spark3rError(
                f"attention width {dim} is not divisible by num_heads {num_heads}: "
                "pick a head count that divides it"
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_to_v_dtype = qk_to_v_dtype
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-5) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-5) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        return project_heads(self, F.scaled_dot_product_attention(*qkv_heads(self, x, pos)))


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf) -> fc2. x [..., C] -> [..., out]."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden(hidden_features: int) -> int:
    """DINOv2's packed SwiGLU width: 2/3 of the MLP width rounded up to a multiple of 8 (4096 for C = 1536)."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """w12 (packed gate and value) -> silu(gate) * value -> w3. `hidden_features` is the plain-MLP width (4C)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True):
        super().__init__()
        hidden = swiglu_hidden(hidden_features)
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, out_features or in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    """x * gamma, out of place: an fp32 gamma promotes a bf16 branch to fp32 under autocast, as upstream."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


FFN_LAYERS = {"mlp": Mlp, "swiglu": SwiGLUFFN}


def residual_mlp(block: nn.Module, x: Tensor, branch: Tensor, out: Tensor | None = None) -> Tensor | None:
    """The rest of `block` once its attention branch is known: y = x + ls1(branch), then y + ls2(mlp(norm2(y))).
    x, branch [B, n, C] -> [B, n, C] (or written into `out`)."""
    x = x + block.ls1(branch)
    return written(x + block.ls2(block.mlp(block.norm2(x))), out)


def normed_tokens(block: nn.Module, x: Tensor, out: Tensor | None = None) -> Tensor | None:
    """block.norm1(x) in the autocast dtype if one is active (the qkv projection casts its input to it anyway, so q, k
    and v are unchanged; compiled, the norm and the cast are one kernel): x [B, n, C] -> [B, n, C] (or written into
    `out`)."""
    normed = block.norm1(x)
    return written(normed.to(active_compute_dtype(x.device.type, normed.dtype)), out)


class Block(nn.Module):
    """Pre-norm ViT block: x + ls1(attn(norm1(x), pos)), then x + ls2(mlp(norm2(x))). x [B, N, C] -> [B, N, C].
    norm1(x) reaches the attention in the autocast dtype if one is active (`normed_tokens`).

    Without autograd, a batch of more than INFERENCE_TOKEN_CHUNK tokens runs a few sequences at a time
    (`forward_rows`), and one long sequence runs norm1, and the residuals + MLP (`residual_mlp`), over
    `inference_chunk` tokens at a time, so no whole scaled branch or MLP hidden is held.

    init_values None drops LayerScale (ls1/ls2 become Identity, no keys); `rope` is a shared RoPE module or None.
    `compile_backend`: see compile_model.
    """

    compile_backend: str | None = None

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        norm_eps: float = 1e-6,
        qk_norm: bool = False,
        rope: nn.Module | None = None,
        ffn_layer: str = "mlp",
        qk_to_v_dtype: bool = False,
    ):
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise Spark3rError(f"ffn_layer {ffn_layer!r} is unknown: use one of {sorted(FFN_LAYERS)}")
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, qk_norm, rope, qk_to_v_dtype)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = FFN_LAYERS[ffn_layer](dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        batch, tokens = x.shape[:2]
        if batch > 1 and batch * tokens > INFERENCE_TOKEN_CHUNK and not torch.is_grad_enabled():
            return self.forward_rows(x, pos)
        return self.forward_sequences(x, pos)

    def forward_sequences(self, x: Tensor, pos: Tensor | None, out: Tensor | None = None) -> Tensor | None:
        """The block over x [B, N, C] -> [B, N, C] (or written into `out`): one pass, or for one long sequence
        without autograd, its token-wise parts over `inference_chunk` tokens at a time."""
        normed = compiled_for(self, normed_tokens)
        residual = compiled_for(self, residual_mlp)
        chunk = inference_chunk(x)
        if chunk is None:
            return residual(self, x, self.attn(normed(self, x), pos=pos), out)
        branch = self.attn(chunked_map(lambda index, part: normed(self, x[:, index], part), x.shape[1], chunk),
                           pos=pos)
        return written(chunked_map(lambda index, part: residual(self, x[:, index], branch[:, index], part),
                                   x.shape[1], chunk), out)

    def forward_rows(self, x: Tensor, pos: Tensor | None) -> Tensor:
        """The block over x [B, N, C] a few sequences at a time (each attends within itself, so this is exact), at
        most INFERENCE_TOKEN_CHUNK tokens per call: 1000 frames through a per-frame block never hold their q/k/v and
        MLP hidden whole. pos [B, N, 2] is split with x; [N, 2] or [1, N, 2] is shared."""
        batch, tokens = x.shape[:2]
        per_row_pos = pos is not None and pos.dim() == 3 and pos.shape[0] == batch
        return chunked_map(lambda index, out: self.forward_sequences(x[index], pos[index] if per_row_pos else pos,
                                                                     out),
                           batch, max(1, INFERENCE_TOKEN_CHUNK // tokens), dim=0)


def init_weights(model: nn.Module) -> nn.Module:
    """Random init of every parameter, e.g. after building on meta and `to_empty`: Linear weights trunc-normal
    (std 0.02) with zero bias; every other module with `reset_parameters` (convs, norms, LayerScale, the models' own
    tokens) resets its own tensors. Seed the global RNG first for reproducible weights."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def compute_autocast(device_type: str, dtype: torch.dtype):
    """autocast to `dtype` for a model's trunk; fp32 is a no-op context, so an outer autocast stays in force."""
    if dtype == torch.float32 or device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def no_autocast(device_type: str):
    """autocast off (heads run in fp32 as upstream); a no-op on the meta device, which has no autocast."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def head_autocast(device_type: str, dtype: torch.dtype):
    """The heads' context: autocast off for fp32 (upstream's heads), else autocast to `dtype` as the trunk runs
    (profile-layers --head-dtype compute); a no-op on the meta device."""
    if dtype == torch.float32:
        return no_autocast(device_type)
    return compute_autocast(device_type, dtype)


def active_compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The autocast dtype in force on `device_type`, else `default`."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


def expand_special(token: Tensor, batch: int, frames: int) -> Tensor:
    """[1, 2, X, C] -> [B * S, X, C]: index 0 for frame 0 of every scene, index 1 for frames 1..S-1."""
    first = token[:, :1].expand(batch, 1, *token.shape[2:])
    others = token[:, 1:].expand(batch, frames - 1, *token.shape[2:])
    return torch.cat([first, others], dim=1).flatten(0, 1)
