"""Query merging: bipartite soft matching inside groups of consecutive frames, un-merge by copy.

Frames are cut into groups of `group_frames` (the last group may be shorter). In a group of g frames:

* destinations: every token of the group's first frame, the special tokens of the other frames, and one patch per
  c x c cell of the other frames (the cell's top-left patch; c = 2 by default, see `merge_cell`);
* sources: all other patches. Each source is matched to its most similar destination of the group (cosine similarity
  of a metric: keys averaged over heads, or the attention input); the M sources with the highest similarity merge
  into their destination (mean), M = g*P - ceil(g*P / r_Q), capped by the number of sources.

The metric is a unit row per token (`key_metric`: the keys averaged over heads; `unit_rows`: any other, e.g. the
attention input).

The merging is described by `slot` [B, N]: the index of the merged query each token belongs to. Merging averages the
queries of one slot; un-merging copies each slot's output back to all of its tokens. Shapes depend only on the layout
and the reduction.

On CUDA tensors the key metric, the similarity + max and the merge run as fused Triton kernels
(`spark3r.reduce.fused`), which compute what the torch paths here (`torch_key_metric`, `torch_best_destinations`,
`torch_merge_queries`) compute, up to the order of fp32 sums;
elsewhere, without Triton, or with SPARK3R_FUSED=0 in the environment, the torch paths run.
"""
from __future__ import annotations

import functools
import math
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from spark3r.models.base import FrameLayout
from spark3r.reduce.reduction import Reduction

SIMILARITY_CHUNK_ELEMENTS = 2**26  # entries of one chunk of the source x destination similarity matrix


def group_spans(frames: int, group_frames: int) -> list[tuple[int, int]]:
    """[(number of groups, frames per group)]: the full groups, then the shorter last group if any."""
    spans = [(frames // group_frames, group_frames)] if frames >= group_frames else []
    if frames % group_frames:
        spans.append((1, frames % group_frames))
    return spans


def cell_count(layout: FrameLayout, cell: int) -> int:
    """Destination patches per non-first frame: one per cell x cell patch cell."""
    return math.ceil(layout.grid_h / cell) * math.ceil(layout.grid_w / cell)


def group_destinations(layout: FrameLayout, group: int, cell: int) -> int:
    """Destinations in a group of `group` frames."""
    return layout.tokens_per_frame + (group - 1) * (layout.n_special + cell_count(layout, cell))


def merge_cell(layout: FrameLayout, reduction: Reduction) -> int:
    """Edge of the destination cells: 2, or the smallest larger edge with few enough destinations to reach r_Q.

    With 2 x 2 cells at most ~3/4 of the patches can merge (r_Q up to ~3.3 with 20-frame groups); larger factors use
    larger cells so that ceil(g*P / r_Q) queries are reachable in a full group.
    """
    group = min(reduction.group_frames, layout.frames)
    target = math.ceil(group * layout.tokens_per_frame / reduction.query_merge)
    largest = max(2, layout.grid_h, layout.grid_w)
    return next((cell for cell in range(2, largest + 1) if group_destinations(layout, group, cell) <= target), largest)


def merged_per_group(layout: FrameLayout, reduction: Reduction, group: int, cell: int) -> int:
    """Sources merged away in a group of `group` frames."""
    tokens = group * layout.tokens_per_frame
    sources = tokens - group_destinations(layout, group, cell)
    return max(0, min(sources, tokens - math.ceil(tokens / reduction.query_merge)))


def query_count(layout: FrameLayout, reduction: Reduction, cell: int | None = None) -> int:
    """Number of queries after merging; `layout.tokens` means nothing merges. `cell`: the destination cells' edge
    (default `merge_cell(layout, reduction)`; a span of a longer clip gives the clip's)."""
    cell = merge_cell(layout, reduction) if cell is None else cell
    return sum(
        count * (group * layout.tokens_per_frame - merged_per_group(layout, reduction, group, cell))
        for count, group in group_spans(layout.frames, reduction.group_frames)
    )


@functools.lru_cache(maxsize=64)
def group_positions(layout: FrameLayout, group: int, cell: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Positions of the destinations [n_dst] and sources [n_src] inside a group of `group` frames (frame-major); made
    once per layout, group, cell and device (read, never written; ordinary tensors even under inference mode)."""
    with torch.inference_mode(False):
        tokens_per_frame, n_special = layout.tokens_per_frame, layout.n_special
        rows = torch.arange(layout.grid_h, device=device)
        cols = torch.arange(layout.grid_w, device=device)
        is_cell = ((rows[:, None] % cell == 0) & (cols[None, :] % cell == 0)).flatten()
        by_role = torch.argsort(is_cell.int(), dim=0, descending=True, stable=True)
        cell_patches, other_patches = by_role[: cell_count(layout, cell)], by_role[cell_count(layout, cell):]
        others = torch.arange(1, group, device=device)[:, None] * tokens_per_frame
        destinations = torch.cat([
            torch.arange(tokens_per_frame, device=device),
            (others + torch.cat([torch.arange(n_special, device=device), cell_patches + n_special])).flatten(),
        ])
        return destinations, (others + other_patches + n_special).flatten()


@functools.cache
def _fused_module() -> ModuleType | None:
    try:
        import spark3r.reduce.fused as fused
    except ImportError:  # no Triton: the torch paths run
        return None
    return fused


def fused_kernels(tensor: Tensor) -> ModuleType | None:
    """`spark3r.reduce.fused` when `tensor` is on a CUDA device, Triton imports, the kernels take its dtype and last
    dimension and SPARK3R_FUSED is not "0"; None otherwise."""
    if tensor.device.type != "cuda" or os.environ.get("SPARK3R_FUSED") == "0":
        return None
    fused = _fused_module()
    return fused if fused is not None and fused.supports(tensor) else None


def unit_rows(metric: Tensor) -> Tensor:
    """metric [..., d] as unit rows (normalised in fp32), in its dtype."""
    return F.normalize(metric.float(), dim=-1).to(metric.dtype)


def key_metric(k: Tensor) -> Tensor:
    """The keys' similarity metric: k [B, h, N, D] -> their mean over heads as unit rows [B, N, D]; the fused kernel on
    CUDA, else `torch_key_metric`."""
    fused = fused_kernels(k)
    if fused is not None:
        return fused.key_metric(k)
    return torch_key_metric(k)


def torch_key_metric(k: Tensor) -> Tensor:
    """`key_metric` in torch: unit_rows(k.mean(dim=1))."""
    return unit_rows(k.mean(dim=1))


def best_destinations(sources: Tensor, destinations: Tensor) -> tuple[Tensor, Tensor]:
    """Most similar destination of each source: [..., n_src, d] x [..., n_dst, d] -> (similarity, index) [..., n_src];
    the fused kernel on CUDA, else `torch_best_destinations`."""
    fused = fused_kernels(sources)
    if fused is not None:
        return fused.best_destinations(sources, destinations)
    return torch_best_destinations(sources, destinations)


def torch_best_destinations(sources: Tensor, destinations: Tensor,
                            chunk_elements: int | None = None) -> tuple[Tensor, Tensor]:
    """`best_destinations` in torch, chunked over sources so that no similarity chunk exceeds `chunk_elements`
    entries (SIMILARITY_CHUNK_ELEMENTS)."""
    rows = max(1, (chunk_elements or SIMILARITY_CHUNK_ELEMENTS) // max(1, destinations[..., 0].numel()))
    best = [
        (chunk @ destinations.transpose(-1, -2)).max(dim=-1)
        for chunk in sources.split(rows, dim=-2)
    ]
    return torch.cat([b.values for b in best], dim=-1), torch.cat([b.indices for b in best], dim=-1)


def group_slots(metric: Tensor, layout: FrameLayout, group: int, cell: int, merged: int) -> Tensor:
    """Local slots of groups of `group` frames: metric [B, G, group*P, d] (unit rows) -> [B, G, group*P] long.

    Slots 0..n_dst-1 are the destinations in order, then the unmerged sources by decreasing similarity; a merged
    source takes its destination's slot.
    """
    batch, groups, tokens, _ = metric.shape
    if merged == 0:
        return torch.arange(tokens, device=metric.device).expand(batch, groups, tokens)
    destinations, sources = group_positions(layout, group, cell, metric.device)
    similarity, match = best_destinations(metric[:, :, sources], metric[:, :, destinations])
    order = torch.argsort(similarity, dim=-1, descending=True, stable=True)
    ranks = torch.arange(len(sources), device=metric.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, ranks)
    slots = torch.empty(batch, groups, tokens, dtype=torch.long, device=metric.device)
    slots[:, :, destinations] = torch.arange(len(destinations), device=metric.device)
    slots[:, :, sources] = torch.where(rank < merged, match, len(destinations) + rank - merged)
    return slots


def merge_slots(metric: Tensor, layout: FrameLayout, reduction: Reduction, cell: int | None = None) -> Tensor:
    """The merged query of every token: metric [B, N, d] unit rows (`key_metric`, `unit_rows`) -> slot [B, N] long in
    [0, query_count). `cell` as in `query_count`."""
    batch, tokens, width = metric.shape
    cell = merge_cell(layout, reduction) if cell is None else cell
    slots, start, first_slot = [], 0, 0
    for groups, group in group_spans(layout.frames, reduction.group_frames):
        size = group * layout.tokens_per_frame
        merged = merged_per_group(layout, reduction, group, cell)
        span = metric[:, start: start + groups * size].reshape(batch, groups, size, width)
        offsets = first_slot + torch.arange(groups, device=metric.device) * (size - merged)
        slots.append((group_slots(span, layout, group, cell, merged) + offsets[:, None]).flatten(1))
        start += groups * size
        first_slot += groups * (size - merged)
    return torch.cat(slots, dim=1)


def merge_queries(q: Tensor, slot: Tensor, n_q: int) -> Tensor:
    """Mean of the queries of each slot: q [B, h, N, D], slot [B, N] -> [B, h, n_q, D]; the fused kernel on CUDA, else
    `torch_merge_queries`."""
    fused = fused_kernels(q)
    if fused is not None:
        return fused.merge_queries(q, slot, n_q)
    return torch_merge_queries(q, slot, n_q)


def torch_merge_queries(q: Tensor, slot: Tensor, n_q: int) -> Tensor:
    """`merge_queries` in torch, accumulated in >= fp32 one head at a time (so the accumulator is one head's
    [B, n_q, D], not the whole merged tensor)."""
    batch, heads, tokens, head_dim = q.shape
    accumulate = torch.promote_types(q.dtype, torch.float32)
    ones = torch.ones(slot.shape, dtype=accumulate, device=q.device)
    counts = torch.zeros(batch, n_q, dtype=accumulate, device=q.device).scatter_add_(1, slot, ones)
    scale = counts.reciprocal_()[:, :, None]
    index = slot[:, :, None].expand(batch, tokens, head_dim)
    merged = q.new_empty(batch, heads, n_q, head_dim)
    for head in range(heads):
        sums = torch.zeros(batch, n_q, head_dim, dtype=accumulate, device=q.device)
        merged[:, head] = sums.scatter_add_(1, index, q[:, head].to(accumulate)).mul_(scale)
    return merged


def unmerge(x: Tensor, slot: Tensor) -> Tensor:
    """Copy each slot's row to all of its tokens: x [B, n_q, ...], slot [B, N] -> [B, N, ...] (row copies).

    Un-merging commutes with any per-token map, so the patched attention projects the n_q merged outputs [B, n_q, C]
    first and un-merges the projected rows (the output projection then costs n_q / N of the dense one)."""
    out = x.new_empty(x.shape[0], slot.shape[1], *x.shape[2:])
    for rows, index, target in zip(x, slot, out):
        torch.index_select(rows, 0, index, out=target)
    return out
