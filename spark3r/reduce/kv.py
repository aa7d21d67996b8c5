"""K/V pruning: which of the S*P tokens of a global layer stay as keys and values.

Every method keeps the special tokens of every frame. The rest is chosen per frame:

* frame_stride: all patches of every `kv_factor`-th frame (frames 0, r, 2r, ...), none of the others (the paper's);
* grid: a (sy x sx) patch grid with sy * sx ~ kv_factor, whose phase steps through the sy * sx cell offsets from frame
  to frame, so consecutive frames keep different patches;
* random: a seeded per-frame random subset (a counter hash, the same on every device);
* key_norm: the per-frame, per-head top-k patches by key norm.

With `keep_reference_frame`, frame 0 is kept whole (frame_stride keeps it anyway). Counts depend only on the layout
and the reduction, so shapes are static.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import Tensor

from spark3r.models.base import FrameLayout
from spark3r.reduce.reduction import Reduction

HASH_MASK = 0xFFFFFFFF
HASH_MULTIPLIER = 0x45D9F3B
SEED_STRIDE = 0x9E3779B9


def grid_steps(factor: int, grid_h: int, grid_w: int) -> tuple[int, int]:
    """The (sy, sx) patch-grid steps whose product is closest to `factor` (squarest on ties), capped by the grid."""
    best, best_cost = (1, factor), (0, factor)
    for rows in range(1, factor + 1):
        cols = max(1, round(factor / rows))
        cost = (abs(rows * cols - factor), abs(rows - cols))
        if cost < best_cost:
            best, best_cost = (rows, cols), cost
    return min(best[0], grid_h), min(best[1], grid_w)


def first_partial_frame(reduction: Reduction) -> int:
    """The first frame whose patches are chosen rather than kept whole (grid, random and key_norm): 1 with
    `keep_reference_frame`, else 0."""
    return 1 if reduction.keep_reference_frame else 0


def patches_per_frame(layout: FrameLayout, reduction: Reduction) -> int:
    """Patches kept in a frame that is not kept whole (grid, random and key_norm)."""
    if reduction.kv_method == "grid":
        step_y, step_x = grid_steps(reduction.kv_factor, layout.grid_h, layout.grid_w)
        return (layout.grid_h // step_y) * (layout.grid_w // step_x)
    return min(layout.patches_per_frame, max(1, round(reduction.kv_keep * layout.patches_per_frame)))


def kv_count(layout: FrameLayout, reduction: Reduction) -> int:
    """Number of K/V tokens kept; `layout.tokens` means K/V are not pruned."""
    frames, patches = layout.frames, layout.patches_per_frame
    if reduction.kv_method == "frame_stride":
        return frames * layout.n_special + math.ceil(frames / reduction.kv_factor) * patches
    per_frame = patches_per_frame(layout, reduction)
    whole = first_partial_frame(reduction)
    return frames * layout.n_special + whole * patches + (frames - whole) * per_frame


def hash32(values: Tensor) -> Tensor:
    """A bijective 32-bit integer mix of int64 `values` in [0, 2^32) (xorshift-multiply; products stay < 2^63)."""
    for _ in range(2):
        values = ((values ^ (values >> 16)) * HASH_MULTIPLIER) & HASH_MASK
    return values ^ (values >> 16)


def grid_patches(layout: FrameLayout, reduction: Reduction, frames: Tensor) -> Tensor:
    """Grid patch indices of `frames` [F]: [F, k], row-major, phase (f // sx % sy, f % sx) for frame f."""
    step_y, step_x = grid_steps(reduction.kv_factor, layout.grid_h, layout.grid_w)
    rows = torch.arange(layout.grid_h // step_y, device=frames.device) * step_y
    cols = torch.arange(layout.grid_w // step_x, device=frames.device) * step_x
    phase_y = (frames // step_x) % step_y
    phase_x = frames % step_x
    patch_rows = rows[None, :, None] + phase_y[:, None, None]
    patch_cols = cols[None, None, :] + phase_x[:, None, None]
    return (patch_rows * layout.grid_w + patch_cols).flatten(1)


def random_patches(layout: FrameLayout, reduction: Reduction, frames: Tensor) -> Tensor:
    """Seeded random patch indices of `frames` [F]: [F, k] sorted; frame f's subset depends only on (f, seed)."""
    patches = layout.patches_per_frame
    counter = frames[:, None] * patches + torch.arange(patches, device=frames.device)
    scores = hash32((counter + reduction.seed * SEED_STRIDE) & HASH_MASK)
    chosen = torch.argsort(scores, dim=-1, stable=True)[:, : patches_per_frame(layout, reduction)]
    return chosen.sort(dim=-1).values


def key_norm_patches(layout: FrameLayout, reduction: Reduction, frames: Tensor, keys: Tensor) -> Tensor:
    """Top-k patch indices by key norm of `frames` [F], per batch and head: keys [B, h, N, D] -> [B, h, F, k]."""
    batch, heads, _, head_dim = keys.shape
    per_frame = keys.view(batch, heads, layout.frames, layout.tokens_per_frame, head_dim)
    accumulate = torch.promote_types(keys.dtype, torch.float32)
    norms = torch.linalg.vector_norm(per_frame[:, :, :, layout.n_special:], dim=-1, dtype=accumulate)
    norms = norms.index_select(2, frames)
    return norms.topk(patches_per_frame(layout, reduction), dim=-1).indices


def kv_index(keys: Tensor, layout: FrameLayout, reduction: Reduction) -> Tensor:
    """Token indices of the kept K/V, for keys [B, h, N, D]: [n_kv] long, or [B, h, n_kv] for key_norm.

    Order: the special tokens of every frame, then the patches of whole frames, then the chosen patches of the others.
    """
    fixed = fixed_kv_index(layout, reduction, keys.device)
    if reduction.kv_method != "key_norm":
        return fixed
    partial = torch.arange(first_partial_frame(reduction), layout.frames, device=keys.device)
    if len(partial) == 0:
        return fixed
    chosen = key_norm_patches(layout, reduction, partial, keys)
    batch, heads = keys.shape[:2]
    chosen = (chosen + (partial[:, None] * layout.tokens_per_frame + layout.n_special)).flatten(2)
    return torch.cat([fixed.expand(batch, heads, -1), chosen], dim=-1)


@functools.lru_cache(maxsize=256)
def fixed_kv_index(layout: FrameLayout, reduction: Reduction, device: torch.device) -> Tensor:
    """The kept K/V that do not depend on the keys [n]: all of them but for key_norm, whose per-head patches follow;
    made once per layout, reduction and device (read, never written; ordinary tensors even under inference mode)."""
    with torch.inference_mode(False):
        tokens_per_frame, n_special = layout.tokens_per_frame, layout.n_special
        frames = torch.arange(layout.frames, device=device)
        special = (frames[:, None] * tokens_per_frame + torch.arange(n_special, device=device)).flatten()
        patch_offsets = torch.arange(n_special, tokens_per_frame, device=device)
        if reduction.kv_method == "frame_stride":
            whole, partial = frames[:: reduction.kv_factor], frames[:0]
        else:
            start = first_partial_frame(reduction)
            whole, partial = frames[:start], frames[start:]
        whole_patches = (whole[:, None] * tokens_per_frame + patch_offsets).flatten()
        fixed = torch.cat([special, whole_patches])
        if len(partial) == 0 or reduction.kv_method == "key_norm":
            return fixed
        pick = grid_patches if reduction.kv_method == "grid" else random_patches
        chosen = pick(layout, reduction, partial) + (partial[:, None] * tokens_per_frame + n_special)
        return torch.cat([fixed, chosen.flatten()])


@functools.lru_cache(maxsize=1024)
def span_fixed_kv(layout: FrameLayout, reduction: Reduction, start: int, frames: int,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """The entries of `fixed_kv_index` among frames [start, start + frames): (their positions in it [m], their token
    indices within those frames [m]); made once per span on the CPU (no device sync), read, never written."""
    with torch.inference_mode(False):
        index = fixed_kv_index(layout, reduction, torch.device("cpu"))
        first = start * layout.tokens_per_frame
        inside = ((index >= first) & (index < first + frames * layout.tokens_per_frame)).nonzero().flatten()
        return inside.to(device), (index[inside] - first).to(device)


def span_kv(k: Tensor, v: Tensor, layout: FrameLayout, reduction: Reduction,
            start: int) -> tuple[Tensor, Tensor, Tensor]:
    """The kept keys and values among frames start.. of the clip `layout`: k, v [B, h, n, D] of whole frames from
    `start` -> (their positions in `kv_index`'s order: [m], or [B, h, m] for key_norm; keys and values [B, h, m, D])."""
    frames = k.shape[2] // layout.tokens_per_frame
    positions, tokens = span_fixed_kv(layout, reduction, start, frames, k.device)
    keys, values = k.index_select(2, tokens), v.index_select(2, tokens)
    first_partial = max(start, first_partial_frame(reduction))
    if reduction.kv_method != "key_norm" or first_partial >= start + frames:
        return positions, keys, values
    span = dataclasses.replace(layout, frames=frames)
    local = torch.arange(first_partial - start, frames, device=k.device)
    chosen = key_norm_patches(span, reduction, local, k)  # [B, h, F, k] patches of the span's partial frames
    per_frame = chosen.shape[-1]
    tokens = (chosen + (local[:, None] * layout.tokens_per_frame + layout.n_special)).flatten(2)
    # the chosen patches of earlier frames come first
    after = len(fixed_kv_index(layout, reduction, torch.device("cpu"))) + (
        first_partial - first_partial_frame(reduction)) * per_frame
    batch, heads = k.shape[:2]
    gathered = tokens[..., None].expand(-1, -1, -1, k.shape[-1])
    return (torch.cat([positions.expand(batch, heads, -1),
                       torch.arange(after, after + tokens.shape[-1], device=k.device).expand(batch, heads, -1)], -1),
            torch.cat([keys, k.gather(2, gathered)], 2), torch.cat([values, v.gather(2, gathered)], 2))


def select_kv(k: Tensor, v: Tensor, layout: FrameLayout, reduction: Reduction) -> tuple[Tensor, Tensor]:
    """The kept keys and values: k, v [B, h, N, D] -> [B, h, n_kv, D] each."""
    index = kv_index(k, layout, reduction)
    if index.dim() == 1:
        return k.index_select(2, index), v.index_select(2, index)
    index = index[..., None].expand(-1, -1, -1, k.shape[-1])
    return k.gather(2, index), v.gather(2, index)
