"""Fused Triton kernels of query merging, for CUDA tensors: the keys' similarity metric (their mean over heads as unit
rows) in one pass, each source's best destination without writing the similarity matrix, and the mean of each slot's
queries.

`spark3r.reduce.merge` calls them on CUDA tensors when Triton imports and runs its torch path otherwise; each kernel
computes what that path computes, up to the order of fp32 sums (tests/test_fused.py runs them in Triton's interpreter
on CPU against the torch path and a float64 brute force).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # inputs the kernels take; others run the torch path
MAX_DIM = 128  # widest metric / head the kernels hold in registers
# Triton's interpreter (TRITON_INTERPRET=1, CPU) multiplies 16-bit blocks as their raw bits; there the similarity
# blocks are cast to fp32 first, which changes nothing but the order of sums (16-bit products are exact in fp32)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """fp32 x rounded to the nearest `dtype` value, ties to even, returned as fp32. bf16 is rounded on the bits (its
    conversion in Triton's interpreter truncates), so the interpreter rounds as the GPU does."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _rounding_threshold(x, dtype: tl.constexpr):
    """For fp32 x [M]: the least fp32 t with round(t) >= round(x), rounding to the nearest `dtype` value, ties to even
    (so for y <= x: round(y) == round(x) exactly when y >= t). For 16-bit dtypes t lies halfway between round(x) and
    the next `dtype` value below it, one fp32 step above when that halfway point rounds down (round(x) odd)."""
    if dtype == tl.bfloat16:
        bits = _rounded(x, dtype).to(tl.uint32, bitcast=True) >> 16
    elif dtype == tl.float16:
        bits = x.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    else:
        return x
    positive = (bits & 0x8000) == 0
    below = tl.where(positive & (bits != 0), bits - 1, tl.where(bits == 0, 0x8001, bits + 1))
    if dtype == tl.bfloat16:
        rounded = (bits << 16).to(tl.float32, bitcast=True)
        lower = (below << 16).to(tl.float32, bitcast=True)
    else:
        rounded = bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        lower = below.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    halfway = (rounded + lower) * 0.5  # exact: both have at most 11 significant bits
    step = tl.where(halfway > 0, 1, -1)
    above = (halfway.to(tl.uint32, bitcast=True) + step).to(tl.float32, bitcast=True)  # the next fp32 up
    return tl.where((bits & 1) == 0, halfway, above)


@triton.jit
def _key_metric_kernel(k, metric, n_tokens, heads, dim, stride_b, stride_h, stride_n,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_N tokens of one batch item; their keys summed over heads in fp32, the mean rounded to the key
    dtype (as k.mean(dim=1) leaves it), then divided by its fp32 norm and rounded again."""
    batch = tl.program_id(1).to(tl.int64)
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    mask = (tokens[:, None] < n_tokens) & (dims[None, :] < dim)
    rows = k + batch * stride_b + tokens[:, None].to(tl.int64) * stride_n + dims[None, :]
    total = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for head in range(0, heads):
        total += tl.load(rows + head * stride_h, mask=mask, other=0.0).to(tl.float32)
    mean = _rounded(total * (1.0 / heads), metric.dtype.element_ty)
    unit = mean / tl.maximum(tl.sqrt(tl.sum(mean * mean, axis=1)), 1e-12)[:, None]
    out = metric + (batch * n_tokens + tokens[:, None]) * dim + dims[None, :]
    tl.store(out, _rounded(unit, metric.dtype.element_ty).to(metric.dtype.element_ty), mask=mask)


@triton.jit
def _best_destinations_kernel(src, dst, values, indices, n_src, n_dst, dim,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One program: BLOCK_M sources of one group against all of its destinations, a running max over blocks.

    The torch path rounds each similarity to the input dtype before its max, so ties (common in bf16) go to the lowest
    index among the destinations whose rounded similarity is the largest. Here a block's fp32 max is rounded once per
    row, and that lowest index is the first column at or above its rounding threshold: one comparison per similarity
    instead of rounding each."""
    group = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    src_block = tl.load(src + (group * n_src + rows[:, None]) * dim + dims[None, :],
                        mask=(rows[:, None] < n_src) & (dims[None, :] < dim), other=0.0)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_index = tl.zeros((BLOCK_M,), tl.int32)
    for start in range(0, n_dst, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        dst_block = tl.load(dst + (group * n_dst + cols[:, None]) * dim + dims[None, :],
                            mask=(cols[:, None] < n_dst) & (dims[None, :] < dim), other=0.0)
        if UPCAST:
            src_block, dst_block = src_block.to(tl.float32), dst_block.to(tl.float32)
        similarity = tl.dot(src_block, tl.trans(dst_block), input_precision=PRECISION)
        similarity = tl.where(cols[None, :] < n_dst, similarity, float("-inf"))
        block_max = tl.max(similarity, axis=1)
        threshold = _rounding_threshold(block_max, values.dtype.element_ty)
        block_index = tl.min(tl.where(similarity >= threshold[:, None], cols[None, :], n_dst), axis=1)
        block_best = _rounded(block_max, values.dtype.element_ty)
        better = block_best > best  # strict: ties keep the lowest destination index, as torch.max does
        best = tl.where(better, block_best, best)
        best_index = tl.where(better, block_index, best_index)
    tl.store(values + group * n_src + rows, best.to(values.dtype.element_ty), mask=rows < n_src)
    tl.store(indices + group * n_src + rows, best_index.to(tl.int64), mask=rows < n_src)


@triton.jit
def _merge_kernel(q, order, starts, counts, merged, n_tokens, n_q, heads, head_dim, stride_b, stride_h, stride_n,
                  BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_Q slots of one (batch, head); sums each slot's tokens (listed in `order`) in fp32."""
    pair = tl.program_id(1)
    batch, head = (pair // heads).to(tl.int64), (pair % heads).to(tl.int64)
    slots = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, BLOCK_D)
    valid = slots < n_q
    start = tl.load(starts + batch * n_q + slots, mask=valid, other=0)
    count = tl.load(counts + batch * n_q + slots, mask=valid, other=0)
    base = q + batch * stride_b + head * stride_h
    total = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    for member in range(0, tl.max(count, axis=0)):
        take = member < count
        token = tl.load(order + batch * n_tokens + start + member, mask=take, other=0).to(tl.int64)
        rows = tl.load(base + token[:, None] * stride_n + dims[None, :],
                       mask=take[:, None] & (dims[None, :] < head_dim), other=0.0)
        total += rows.to(tl.float32)
    scale = 1.0 / tl.maximum(count, 1).to(tl.float32)
    out = merged + (pair.to(tl.int64) * n_q + slots[:, None]) * head_dim + dims[None, :]
    tl.store(out, _rounded(total * scale[:, None], merged.dtype.element_ty).to(merged.dtype.element_ty),
             mask=valid[:, None] & (dims[None, :] < head_dim))


def supports(tensor: Tensor) -> bool:
    """True when the kernels take `tensor` (a metric [..., n, d] or heads [B, h, N, D]): dtype and last dim."""
    return tensor.dtype in DTYPES and tensor.shape[-1] <= MAX_DIM


def key_metric(k: Tensor) -> Tensor:
    """The keys' similarity metric: k [B, h, N, D] (last dim contiguous) -> their mean over heads as unit rows
    [B, N, D] in k's dtype, read once (the torch path reads k, then the mean twice)."""
    batch, heads, tokens, head_dim = k.shape
    if k.stride(-1) != 1:
        k = k.contiguous()
    metric = k.new_empty(batch, tokens, head_dim)
    grid = (triton.cdiv(tokens, 64), batch)
    _key_metric_kernel[grid](k, metric, tokens, heads, head_dim, k.stride(0), k.stride(1), k.stride(2),
                             BLOCK_N=64, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), num_warps=4)
    return metric


# (BLOCK_M, BLOCK_N, num_warps, num_stages) that `best_destinations` times on a GPU, once per shape (triton.autotune);
# the blocks change only the tiling, not a value or a tie (tests/test_fused.py runs each in the interpreter)
BEST_DESTINATIONS_BLOCKS = ((128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (256, 64, 8, 3), (64, 64, 4, 4),
                            (256, 128, 8, 3))
_tuned_best_destinations = triton.autotune(
    [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in BEST_DESTINATIONS_BLOCKS],
    key=["n_src", "n_dst", "dim"])(_best_destinations_kernel)


def best_destinations(sources: Tensor, destinations: Tensor,
                      blocks: tuple[int, int, int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Most similar destination of each source: [..., n_src, d] x [..., n_dst, d] -> (similarity in the input dtype,
    index long) [..., n_src]; ties go to the lowest index. Reads each block of destinations once per block of sources,
    so the n_src x n_dst similarity matrix is never written. `blocks` (one of BEST_DESTINATIONS_BLOCKS) fixes the
    tiling; by default a GPU times them all once per shape and Triton's interpreter takes the first."""
    *lead, n_src, dim = sources.shape
    n_dst = destinations.shape[-2]
    src = sources.reshape(-1, n_src, dim).contiguous()
    dst = destinations.reshape(-1, n_dst, dim).contiguous()
    values = sources.new_empty(src.shape[:2])
    indices = torch.empty(src.shape[:2], dtype=torch.long, device=sources.device)
    arguments = (src, dst, values, indices, n_src, n_dst, dim)
    constants = {"BLOCK_D": max(16, triton.next_power_of_2(dim)), "UPCAST": INTERPRETED,
                 "PRECISION": "ieee" if sources.dtype == torch.float32 or INTERPRETED else "tf32"}
    if blocks is None and not INTERPRETED:
        def grid(meta: dict) -> tuple[int, int]:
            return triton.cdiv(n_src, meta["BLOCK_M"]), src.shape[0]

        _tuned_best_destinations[grid](*arguments, **constants)
    else:
        block_m, block_n, warps, stages = blocks or BEST_DESTINATIONS_BLOCKS[0]
        _best_destinations_kernel[(triton.cdiv(n_src, block_m), src.shape[0])](
            *arguments, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **constants)
    return values.reshape(*lead, n_src), indices.reshape(*lead, n_src)


def slot_members(slot: Tensor, n_q: int) -> tuple[Tensor, Tensor, Tensor]:
    """The tokens of each slot, listed: slot [B, N] -> (order [B, N] int32: tokens sorted by slot, starts [B, n_q]
    and counts [B, n_q] int32: where each slot's tokens begin in `order` and how many there are)."""
    counts = torch.zeros(slot.shape[0], n_q, dtype=torch.int32, device=slot.device)
    counts.scatter_add_(1, slot, torch.ones(slot.shape, dtype=torch.int32, device=slot.device))
    starts = (counts.cumsum(1, dtype=torch.int32) - counts).contiguous()
    order = torch.argsort(slot.to(torch.int32), dim=1, stable=True).to(torch.int32)  # 32-bit keys: half the radix
    return order, starts, counts                                                      # passes of long ones


def merge_queries(q: Tensor, slot: Tensor, n_q: int) -> Tensor:
    """Mean of the queries of each slot: q [B, h, N, D] (last dim contiguous), slot [B, N] -> [B, h, n_q, D],
    summed in fp32 and scaled by the reciprocal count."""
    batch, heads, tokens, head_dim = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    order, starts, counts = slot_members(slot, n_q)
    merged = q.new_empty(batch, heads, n_q, head_dim)
    grid = (triton.cdiv(n_q, 64), batch * heads)
    _merge_kernel[grid](q, order, starts, counts, merged, tokens, n_q, heads, head_dim, q.stride(0), q.stride(1),
                        q.stride(2), BLOCK_Q=64, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), num_warps=4)
    return merged
