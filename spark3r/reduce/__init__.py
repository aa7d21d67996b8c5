"""Runtime reduction of global attention, the mechanism: K/V pruning, query merging, the reduced attention, patching
a model with any per-layer reduction, the FLOP model. Which reduction each layer gets is policy: spark3r.schedule."""
from spark3r.reduce.attention import frame_attention, is_dense, merged_attention, reduced_attention
from spark3r.reduce.flops import (
    FlopBreakdown,
    global_attention_fraction,
    layer_attention_flops,
    layer_overhead_flops,
    model_flops,
    model_fraction,
    skipped_projection_flops,
)
from spark3r.reduce.kv import kv_count, kv_index, select_kv
from spark3r.reduce.merge import key_metric, merge_queries, merge_slots, query_count, unit_rows, unmerge
from spark3r.reduce.patch import AttentionPatch, ReductionHandle, apply_reductions, frame_only_patch, patch_attention
from spark3r.reduce.reduction import DEFAULT_KV_METHOD, KV_METHODS, SIMILARITIES, LayerReductions, Reduction

__all__ = [
    "DEFAULT_KV_METHOD", "KV_METHODS", "SIMILARITIES", "AttentionPatch", "FlopBreakdown", "LayerReductions",
    "Reduction", "ReductionHandle", "apply_reductions", "frame_attention", "frame_only_patch",
    "global_attention_fraction", "is_dense", "key_metric", "kv_count", "kv_index", "layer_attention_flops",
    "layer_overhead_flops", "merge_queries", "merge_slots", "merged_attention", "model_flops", "model_fraction",
    "patch_attention", "query_count", "reduced_attention", "select_kv", "skipped_projection_flops", "unit_rows",
    "unmerge",
]
