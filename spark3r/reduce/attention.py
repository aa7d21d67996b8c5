"""The reduced global attention: pruned keys/values, merged queries, one scaled_dot_product_attention; and frame-only
attention, the baseline without any cross-frame attention."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from spark3r.errors import Spark3rError
from spark3r.models.base import FrameLayout
from spark3r.reduce.kv import kv_count, select_kv
from spark3r.reduce.merge import key_metric, merge_queries, merge_slots, query_count, unit_rows, unmerge
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
    slot = None
    if n_q < layout.tokens:
        if reduction.similarity == "input" and x is None:
            raise Spark3rError("similarity 'input' needs the attention input x: pass x or use similarity 'key'")
        slot = merge_slots(unit_rows(x) if reduction.similarity == "input" else key_metric(k), layout, reduction)
    if kv_count(layout, reduction) < layout.tokens:
        k, v = select_kv(k, v, layout, reduction)
    if slot is None:
        return F.scaled_dot_product_attention(q, k, v), None
    q = merge_queries(q, slot, n_q)
    return F.scaled_dot_product_attention(q, k, v), slot


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
