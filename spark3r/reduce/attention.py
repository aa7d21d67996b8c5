"""The reduced global attention: pruned keys/values, merged queries, one scaled_dot_product_attention; and frame-only
attention, the baseline without any cross-frame attention."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from spark3r.errors import Spark3rError
from spark3r.models.base import FrameLayout
from spark3r.reduce.kv import kv_count, select_kv, span_kv
from spark3r.reduce.merge import key_metric, merge_cell, merge_queries, merge_slots, query_count, unit_rows, unmerge
from spark3r.reduce.reduction import Reduction


def is_dense(layout: FrameLayout, reduction: Reduction) -> bool:
    """True when `reduction` keeps every key/value and every query at this layout (the dense path runs)."""
    return kv_count(layout, reduction) == layout.tokens and query_count(layout, reduction) == layout.tokens


def reduced_attention(qkv: list[Tensor], layout: FrameLayout, reduction: Reduction,
                      x: Tensor | None = None) -> Tensor:
    """Global attention with `reduction`: qkv = [q, k, v], each [B, h, N, D] (after qk-norm and RoPE), N = S * P
    -> [B, h, N, D] (`merged_attention`, un-merged).

    The list is emptied and each full tensor is dropped as soon as it is used (k and v once selected, q once merged),
    so a caller holding nothing else lets the reduced layer peak below the dense one. x [B, N, C] is the attention
    input, needed only when `reduction.similarity` is "input". Keep 1 and merge 1 run the plain dense attention, so
    they equal it exactly.
    """
    out, slot = merged_attention(qkv, layout, reduction, x)
    return out if slot is None else unmerge(out.transpose(1, 2), slot).transpose(1, 2)


def merged_attention(qkv: list[Tensor], layout: FrameLayout, reduction: Reduction,
                     x: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """`reduced_attention` before un-merging: -> (out [B, h, n_q, D], slot [B, N]) when queries merge, else
    (out [B, h, N, D], None). A per-token map after the attention (the output projection) can run on the n_q rows and
    be un-merged after (`merge.unmerge`): the same result at n_q / N of its cost."""
    q, k, v = qkv
    qkv.clear()
    if q.shape[2] != layout.tokens:
        raise Spark3rError(
            f"the global attention got {q.shape[2]} tokens but the frame layout says {layout.frames} frames x "
            f"{layout.tokens_per_frame} tokens = {layout.tokens}: set the layout of the clip being run"
        )
    n_q = query_count(layout, reduction)
    slot = merge_slots(merge_metric(reduction, k, x), layout, reduction) if n_q < layout.tokens else None
    if kv_count(layout, reduction) < layout.tokens:
        k, v = select_kv(k, v, layout, reduction)
    if slot is None:
        return F.scaled_dot_product_attention(q, k, v), None
    q = merge_queries(q, slot, n_q)
    return F.scaled_dot_product_attention(q, k, v), slot


def merge_metric(reduction: Reduction, k: Tensor, x: Tensor | None) -> Tensor:
    """The unit rows query merging compares: the keys' mean over heads (k [B, h, n, D] -> [B, n, D]), or for similarity
    "input" the attention input's (x [B, n, C] -> [B, n, C])."""
    if reduction.similarity != "input":
        return key_metric(k)
    if x is None:
        raise Spark3rError("similarity 'input' needs the attention input x: pass x or use similarity 'key'")
    return unit_rows(x)


SPAN_CHUNKS = 4
"""A span of a long reduced layer holds up to this many token chunks (`qkv_chunk`): few spans per layer (each merges
and selects in one set of kernel launches; 6 spans of 180 frames for VGGT-1B at 1000), while q, k and v of a span stay
a small part of the whole (under a fifth there)."""


def span_frames(layout: FrameLayout, reduction: Reduction, chunk: int | None) -> int | None:
    """Frames per span for `spanned_attention` when the layer's q, k and v are made `chunk` tokens at a time: the most
    whole merge groups (whole frames when queries do not merge) within SPAN_CHUNKS chunks, at least one; None (one
    pass) without a chunk, or when one span would hold every frame."""
    if chunk is None:
        return None
    unit = min(reduction.group_frames, layout.frames) if query_count(layout, reduction) < layout.tokens else 1
    frames = max(1, SPAN_CHUNKS * chunk // (unit * layout.tokens_per_frame)) * unit
    return frames if frames < layout.frames else None


def spanned_attention(heads: Callable[[slice], list[Tensor]], layout: FrameLayout, reduction: Reduction,
                      frames_per_span: int, x: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """`merged_attention` with q, k and v produced a span of `frames_per_span` frames at a time (whole merge groups):
    heads(index) -> [q, k, v], each [B, h, n, D], of the tokens `index`. Each span's queries merge and its kept keys
    and values are selected before the next span is made, so the layer never holds q, k and v whole, only the merged
    queries and kept keys/values; they are the rows `merged_attention` makes, in its order."""
    n_q, n_kv, tokens_per_frame = query_count(layout, reduction), kv_count(layout, reduction), layout.tokens_per_frame
    merging, pruning = n_q < layout.tokens, n_kv < layout.tokens
    cell = merge_cell(layout, reduction)
    merged = kept_k = kept_v = slot = None
    first_query = 0
    for start in range(0, layout.frames, frames_per_span):
        span = dataclasses.replace(layout, frames=min(frames_per_span, layout.frames - start))
        index = slice(start * tokens_per_frame, (start + span.frames) * tokens_per_frame)
        q, k, v = heads(index)
        if merged is None:
            batch, num_heads, _, head_dim = q.shape
            merged = q.new_empty(batch, num_heads, n_q, head_dim)
            kept_k, kept_v = (t.new_empty(batch, num_heads, n_kv, head_dim) for t in (k, v))
            slot = torch.empty(batch, layout.tokens, dtype=torch.long, device=q.device) if merging else None
        if merging:
            local = merge_slots(merge_metric(reduction, k, None if x is None else x[:, index]), span, reduction, cell)
            count = query_count(span, reduction, cell)
            merged[:, :, first_query:first_query + count] = merge_queries(q, local, count)
            slot[:, index] = local + first_query
            first_query += count
        else:
            merged[:, :, index] = q
        if pruning:
            positions, keys, values = span_kv(k, v, layout, reduction, start)
            if positions.dim() == 1:
                kept_k.index_copy_(2, positions, keys)
                kept_v.index_copy_(2, positions, values)
            else:  # key_norm: per-head positions
                positions = positions[..., None].expand(-1, -1, -1, head_dim)
                kept_k.scatter_(2, positions, keys)
                kept_v.scatter_(2, positions, values)
        else:
            kept_k[:, :, index], kept_v[:, :, index] = k, v
    return F.scaled_dot_product_attention(merged, kept_k, kept_v), slot


def frame_attention(q: Tensor, k: Tensor, v: Tensor, layout: FrameLayout) -> Tensor:
    """Every token attends to the tokens of its own frame only (block-diagonal attention over the
    `layout.tokens_per_frame` tokens of each frame): q, k, v [B, h, N, D], N = S * P -> [B, h, N, D]."""
    batch, heads, tokens, head_dim = q.shape
    if tokens != layout.tokens:
        raise Spark3rError(f"global attention got {tokens} tokens but the layout holds {layout.tokens}: "
                           "give the layout of the clip being run")
    per_frame = (batch, heads, layout.frames, layout.tokens_per_frame, head_dim)
    out = F.scaled_dot_product_attention(q.reshape(per_frame), k.reshape(per_frame), v.reshape(per_frame))
    return out.reshape(batch, heads, tokens, head_dim)
