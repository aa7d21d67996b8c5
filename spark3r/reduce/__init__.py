"""Runtime reduction of global attention: K/V pruning, query merging, the reduced attention, patching, FLOP model."""
from spark3r.reduce.attention import is_dense, reduced_attention
from spark3r.reduce.flops import (
    FlopBreakdown,
    global_attention_fraction,
    layer_attention_flops,
    layer_overhead_flops,
    model_flops,
    model_fraction,
)
from spark3r.reduce.kv import kv_count, kv_index, select_kv
from spark3r.reduce.merge import merge_queries, merge_slots, query_count, unmerge
from spark3r.reduce.patch import ReductionHandle, apply_reductions, apply_schedule, reduced
from spark3r.reduce.reduction import KV_METHODS, SIMILARITIES, Reduction

__all__ = [
    "KV_METHODS", "SIMILARITIES", "FlopBreakdown", "Reduction", "ReductionHandle", "apply_reductions",
    "apply_schedule", "global_attention_fraction", "is_dense", "kv_count", "kv_index", "layer_attention_flops",
    "layer_overhead_flops", "merge_queries", "merge_slots", "model_flops", "model_fraction", "query_count",
    "reduced", "reduced_attention", "select_kv", "unmerge",
]
