"""The FLOP model: dense and reduced FLOPs of one forward, per component.

Multiply-adds count 2; softmax, norms and biases are ignored. Per block: linear = (8 C^2 + 2 m C H) per token (qkv and
proj, then m MLP matrices of width H: 24 C^2 for a 4x GELU MLP, SwiGLU differs); attention = 4 C L^2 per sequence of
length L. A global layer is one sequence of S*P tokens: 4 C (S P)^2 dense, 4 C n_q n_kv reduced; a layer that merges
queries runs its output projection on the n_q merged outputs (2 C^2 n_q) and un-merges after it. Counts are per scene
(batch 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from spark3r.errors import Spark3rError
from spark3r.models.base import BlockGroup, FlopConfig, FrameLayout
from spark3r.reduce.kv import kv_count
from spark3r.reduce.merge import (
    group_destinations, group_spans, merge_cell, merged_per_group, query_count,
)
from spark3r.reduce.reduction import LayerReductions, Reduction

KEY_METRIC_DIM = 64  # head dim of every supported model: width of the key metric


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs of one forward over S frames.

    linear: qkv, proj and MLP of every block; frame_attention: attention of per-frame block lists (patch encoder,
    frame blocks); global_attention: QK^T and AV of the global layers; other_attention: attention over all frames'
    special or camera tokens (e.g. a camera-head trunk); other: everything outside blocks (patch embedding, DPT
    heads, head MLPs); overhead: K/V selection and query merging. groups: each block list's linear + attention;
    group_linear: each block list's linear alone.
    """

    linear: float
    frame_attention: float
    global_attention: float
    other_attention: float
    other: float
    overhead: float
    groups: dict[str, float] = field(default_factory=dict)
    group_linear: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return (self.linear + self.frame_attention + self.global_attention + self.other_attention + self.other
                + self.overhead)


def frame_layout(flop_config: FlopConfig, frames: int) -> FrameLayout:
    """The global layers' token layout at `frames` frames."""
    patches = flop_config.tokens_per_frame - flop_config.layout_n_special
    if flop_config.patch_grid is not None:
        grid_h, grid_w = flop_config.patch_grid
    else:
        grid_h = max(rows for rows in range(1, math.isqrt(patches) + 1) if patches % rows == 0)
        grid_w = patches // grid_h
    if grid_h * grid_w != patches:
        raise Spark3rError(
            f"the FLOP config's patch grid {grid_h}x{grid_w} does not hold its {patches} patches per frame: "
            f"fix patch_grid"
        )
    return FrameLayout(frames, flop_config.layout_n_special, grid_h, grid_w)


def global_width(flop_config: FlopConfig) -> int:
    """Width C of the global layers."""
    widths = {group.width for group in flop_config.groups if group.sequence == "global"}
    if len(widths) != 1:
        raise Spark3rError(f"the FLOP config needs global block lists of one width, found widths {sorted(widths)}")
    return widths.pop()


def linear_flops_per_token(group: BlockGroup) -> float:
    """qkv + proj + MLP FLOPs of one block for one token."""
    return 8.0 * group.width**2 + 2.0 * group.mlp_matrices * group.width * group.mlp_hidden


def layer_attention_flops(flop_config: FlopConfig, frames: int, reduction: Reduction | None = None) -> float:
    """QK^T + AV FLOPs of one global layer at `frames` frames: 4 C n_q n_kv (dense: 4 C (S P)^2)."""
    layout = frame_layout(flop_config, frames)
    if reduction is None:
        return 4.0 * global_width(flop_config) * layout.tokens**2
    return 4.0 * global_width(flop_config) * query_count(layout, reduction) * kv_count(layout, reduction)


def skipped_projection_flops(flop_config: FlopConfig, frames: int, reduction: Reduction | None = None) -> float:
    """Output-projection FLOPs one global layer skips by projecting its n_q merged outputs before un-merging them:
    2 C^2 (S P - n_q); 0 when no query merges."""
    if reduction is None:
        return 0.0
    layout = frame_layout(flop_config, frames)
    return 2.0 * global_width(flop_config) ** 2 * (layout.tokens - query_count(layout, reduction))


def layer_overhead_flops(flop_config: FlopConfig, frames: int, reduction: Reduction | None = None) -> float:
    """FLOPs of one global layer's K/V selection and query merging (0 for the dense path).

    key_norm: 2 C per patch token (norms). Merging: the key metric (mean over heads, C per token), unit-normalising it
    (3 d per token), the source x destination similarities (2 d n_src n_dst per group) and the means (C per token and
    per merged query); d = KEY_METRIC_DIM for keys, C for the attention input.
    """
    if reduction is None:
        return 0.0
    layout = frame_layout(flop_config, frames)
    width = global_width(flop_config)
    flops = 0.0
    if reduction.kv_method == "key_norm" and kv_count(layout, reduction) < layout.tokens:
        flops += 2.0 * width * layout.frames * layout.patches_per_frame
    n_q = query_count(layout, reduction)
    if n_q < layout.tokens:
        dim = KEY_METRIC_DIM if reduction.similarity == "key" else width
        cell = merge_cell(layout, reduction)
        similarity = sum(
            count * 2.0 * dim * (group * layout.tokens_per_frame - group_destinations(layout, group, cell))
            * group_destinations(layout, group, cell)
            for count, group in group_spans(layout.frames, reduction.group_frames)
            if merged_per_group(layout, reduction, group, cell)
        )
        metric = width * layout.tokens if reduction.similarity == "key" else 0.0
        flops += metric + 3.0 * dim * layout.tokens + similarity + width * (layout.tokens + n_q)
    return flops


def _reductions(flop_config: FlopConfig, frames: int,
                schedule: LayerReductions | Sequence[Reduction | None] | None) -> list[Reduction | None]:
    layers = sum(group.count for group in flop_config.groups if group.sequence == "global")
    if schedule is None:
        return [None] * layers
    reductions = schedule.reductions(frames) if hasattr(schedule, "reductions") else list(schedule)
    if len(reductions) != layers:
        raise Spark3rError(f"the schedule has {len(reductions)} global layers but the model has {layers}: "
                           f"use a schedule made for this model")
    return reductions


def model_flops(flop_config: FlopConfig, frames: int,
                schedule: LayerReductions | Sequence[Reduction | None] | None = None) -> FlopBreakdown:
    """FLOPs of one forward over `frames` frames, dense (schedule None) or with a schedule (anything with
    `reductions(frames)`, such as a Schedule, or one Reduction or None per global layer in order)."""
    reductions = _reductions(flop_config, frames, schedule)
    totals = dict(linear=0.0, frame_attention=0.0, global_attention=0.0, other_attention=0.0, overhead=0.0)
    groups, group_linear, global_layer = {}, {}, 0
    for group in flop_config.groups:
        tokens = frames * group.tokens_per_frame
        linear = group.count * tokens * linear_flops_per_token(group)
        if group.sequence == "frame":
            attention, kind = group.count * frames * 4.0 * group.width * group.tokens_per_frame**2, "frame_attention"
        elif group.sequence == "global":
            layer_reductions = reductions[global_layer: global_layer + group.count]
            global_layer += group.count
            attention = sum(layer_attention_flops(flop_config, frames, r) for r in layer_reductions)
            linear -= sum(skipped_projection_flops(flop_config, frames, r) for r in layer_reductions)
            totals["overhead"] += sum(layer_overhead_flops(flop_config, frames, r) for r in layer_reductions)
            kind = "global_attention"
        elif group.sequence in ("special", "camera"):
            attention, kind = group.count * 4.0 * group.width * tokens**2, "other_attention"
        else:
            raise Spark3rError(f"block list {group.name!r} has sequence {group.sequence!r}: use frame, global, "
                               f"special or camera")
        totals["linear"] += linear
        totals[kind] += attention
        groups[group.name] = groups.get(group.name, 0.0) + linear + attention
        group_linear[group.name] = group_linear.get(group.name, 0.0) + linear
    return FlopBreakdown(other=frames * flop_config.other_flops_per_frame, groups=groups, group_linear=group_linear,
                         **totals)


def global_attention_fraction(flop_config: FlopConfig, frames: int,
                              schedule: LayerReductions | Sequence[Reduction | None]) -> float:
    """Reduced / dense global-attention FLOPs (QK^T and AV of the global layers; overhead not included)."""
    return (model_flops(flop_config, frames, schedule).global_attention
            / model_flops(flop_config, frames).global_attention)


def model_fraction(flop_config: FlopConfig, frames: int,
                   schedule: LayerReductions | Sequence[Reduction | None]) -> float:
    """Reduced (overhead included) / dense FLOPs of the whole forward."""
    return model_flops(flop_config, frames, schedule).total / model_flops(flop_config, frames).total
