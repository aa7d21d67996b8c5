"""The fused Triton kernels of query merging (spark3r/reduce/fused.py), run on CPU in Triton's interpreter, against a
float64 brute force and the torch paths they replace on CUDA."""
from __future__ import annotations

import os

import pytest
import torch

from spark3r.models.base import FrameLayout
from spark3r.reduce import merge
from spark3r.reduce.attention import reduced_attention
from spark3r.reduce.reduction import Reduction

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from spark3r.reduce.fused import _rounding_threshold  # noqa: E402


@triton.jit
def _threshold_kernel(x, out, DTYPE: tl.constexpr):
    """`_rounding_threshold` of 1024 values."""
    offsets = tl.arange(0, 1024)
    tl.store(out + offsets, _rounding_threshold(tl.load(x + offsets), DTYPE))


@pytest.fixture(scope="module")
def fused():
    """spark3r.reduce.fused, whose kernels run in Triton's interpreter here (conftest sets TRITON_INTERPRET=1)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from spark3r.reduce import fused

    return fused


def unit(*shape, seed, dtype=torch.float32):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)),
                                         dim=-1).to(dtype)


@pytest.mark.parametrize("dim", [64, 48])  # a head width and one that is not a power of two (masked lanes)
def test_best_destinations_is_the_float64_max(fused, dim):
    # 150 sources and 70 destinations: neither a multiple of the kernel's 128 x 64 blocks
    sources, destinations = unit(2, 3, 150, dim, seed=0), unit(2, 3, 70, dim, seed=1)
    similarity = torch.einsum("bgsd,bgtd->bgst", sources.double(), destinations.double())
    values, indices = fused.best_destinations(sources, destinations)
    assert values.shape == indices.shape == (2, 3, 150) and indices.dtype == torch.long
    assert torch.equal(indices, similarity.argmax(dim=-1))
    torch.testing.assert_close(values.double(), similarity.max(dim=-1).values, rtol=0, atol=1e-6)


def test_best_destinations_breaks_ties_to_the_lowest_index_across_blocks(fused):
    sources, destinations = unit(1, 5, 64, seed=2), unit(1, 130, 64, seed=3)
    destinations[0, [3, 70, 129]] = sources[0, 0]  # equal best in the first, second and third block of 64
    destinations[0, [100, 101]] = sources[0, 1]  # equal best inside one block
    _, indices = fused.best_destinations(sources, destinations)
    assert indices[0, :2].tolist() == [3, 100]


def test_every_tiling_the_gpu_may_pick_gives_the_same_values_and_ties(fused):
    """A GPU times BEST_DESTINATIONS_BLOCKS and keeps the fastest: each must give the same answer, ties included."""
    sources = unit(2, 300, 64, seed=6, dtype=torch.bfloat16)
    destinations = unit(2, 270, 64, seed=7, dtype=torch.bfloat16)
    destinations[0, [5, 130, 260]] = sources[0, 0]  # equal best in blocks of 64, 128 and the ragged last one
    destinations[1, [200, 201]] = sources[1, 299]  # equal best inside one block, for a source in the last row block
    first_values, first_indices = fused.best_destinations(sources, destinations, fused.BEST_DESTINATIONS_BLOCKS[0])
    assert first_indices[0, 0] == 5 and first_indices[1, 299] == 200
    similarity = torch.einsum("gsd,gtd->gst", sources.double(), destinations.double())
    assert (first_indices == similarity.argmax(dim=-1)).double().mean() >= 0.97  # bf16 rounding makes ties
    for blocks in fused.BEST_DESTINATIONS_BLOCKS[1:]:
        values, indices = fused.best_destinations(sources, destinations, blocks)
        assert torch.equal(values, first_values) and torch.equal(indices, first_indices), blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_best_destinations_is_the_lowest_index_of_the_rounded_max(fused, dtype):
    """Against float64: each similarity rounded to the input dtype (from fp32, as the product writes it), the largest
    rounded value, and the lowest destination that has it."""
    sources, destinations = unit(3, 200, 64, seed=8, dtype=dtype), unit(3, 150, 64, seed=9, dtype=dtype)
    destinations[:, 40:60] = destinations[:, 20:40]  # exact duplicates: ties in every dtype
    rounded = torch.einsum("gsd,gtd->gst", sources.double(), destinations.double()).float().to(dtype).double()
    best = rounded.max(dim=-1, keepdim=True).values
    lowest = torch.where(rounded == best, torch.arange(150, dtype=torch.double), 1e9).argmin(dim=-1)
    values, indices = fused.best_destinations(sources, destinations)
    assert torch.equal(values.double(), best[..., 0]) and torch.equal(indices, lowest)
    assert (rounded == best).sum(-1).gt(1).double().mean() > 0.05  # ties are common: the tie rule is exercised


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_threshold_is_the_least_value_that_rounds_as_high(fused, dtype):
    grid = torch.linspace(-1.0, 1.0, 997, dtype=torch.float64).float()
    representable = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, 2.0 ** -9, -(2.0 ** -9)]).to(dtype).float()
    halfway = (representable + torch.nextafter(representable.to(dtype), torch.tensor(-2.0, dtype=dtype)).float()) / 2
    x = torch.cat([grid, representable, halfway, torch.full((1024 - 997 - 14,), 0.3)])
    out = torch.empty_like(x)
    _threshold_kernel[(1,)](x, out, DTYPE=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16)
    below = torch.nextafter(out, torch.tensor(-2.0))  # the fp32 value just below each threshold
    assert (out.to(dtype) >= x.to(dtype)).all()  # the threshold rounds at least as high as x
    assert (below.to(dtype) < x.to(dtype)).all()  # and nothing below it does


def test_bf16_similarity_is_rounded_as_the_torch_path_rounds_it(fused):
    """In bf16 the torch path's product rounds each similarity to bf16 before the max (cosines near 1 are 2^-8 apart,
    so ties are common); the kernel rounds the same way, so it picks the same best value and, with ties to the lowest
    index on both sides, the same destination but where fp32 sums in another order round across a bf16 step."""
    sources, destinations = unit(1, 4, 300, 64, seed=4, dtype=torch.bfloat16), unit(1, 4, 90, 64, seed=5,
                                                                                     dtype=torch.bfloat16)
    values, indices = fused.best_destinations(sources, destinations)
    torch_values, torch_indices = merge.torch_best_destinations(sources, destinations)
    assert values.dtype == torch.bfloat16
    assert (values == torch_values).double().mean() >= 0.99
    assert (indices == torch_indices).double().mean() >= 0.98
    exact = torch.einsum("bgsd,bgtd->bgst", sources.double(), destinations.double())
    chosen = exact.gather(-1, indices[..., None])[..., 0]
    assert (exact.max(dim=-1).values - chosen).max() <= 2**-7  # a near-tie at worst: within one bf16 step near 1


@pytest.mark.parametrize("heads, dim", [(4, 64), (3, 48)])  # 48: masked lanes; 3 heads: a mean that is not a shift
def test_key_metric_is_the_float64_unit_mean_over_heads(fused, heads, dim):
    """k [B, h, N, D] as qkv_heads leaves it (a permuted view, last dim contiguous), 150 tokens: not a multiple of the
    kernel's 64-token blocks."""
    qkv = torch.randn(2, 150, 3, heads, dim, generator=torch.Generator().manual_seed(20))
    k = qkv.permute(2, 0, 3, 1, 4)[1]
    mean = k.double().mean(dim=1)
    expected = mean / mean.norm(dim=-1, keepdim=True)
    metric = fused.key_metric(k)
    assert metric.shape == (2, 150, dim) and metric.dtype == torch.float32
    torch.testing.assert_close(metric.double(), expected, rtol=0, atol=1e-6)


def test_bf16_key_metric_rounds_as_the_torch_path(fused):
    """The mean is rounded to bf16 (as k.mean leaves it), then normalised in fp32 and rounded again: the torch path's
    two roundings, so the entries agree but where fp32 sums in another order round across a bf16 step."""
    k = torch.randn(1, 16, 300, 64, generator=torch.Generator().manual_seed(21)).bfloat16()
    metric, plain = fused.key_metric(k), merge.torch_key_metric(k)
    assert metric.dtype == torch.bfloat16
    assert (metric == plain).double().mean() >= 0.99
    assert (metric.double() - plain.double()).abs().max() <= 2**-8  # one bf16 step of a unit vector's entry at most


def slots_of(layout: FrameLayout, reduction: Reduction, seed: int) -> tuple[torch.Tensor, int]:
    keys = torch.randn(1, layout.tokens, 16, generator=torch.Generator().manual_seed(seed))
    return merge.merge_slots(merge.unit_rows(keys), layout, reduction), merge.query_count(layout, reduction)


LAYOUT = FrameLayout(frames=6, n_special=2, grid_h=4, grid_w=6)  # 156 tokens
REDUCTION = Reduction(query_merge=3, group_frames=4)


def test_merge_is_the_float64_mean_of_each_slot(fused):
    slot, n_q = slots_of(LAYOUT, REDUCTION, seed=6)
    q = torch.randn(1, 3, LAYOUT.tokens, 32, generator=torch.Generator().manual_seed(7))
    merged = fused.merge_queries(q, slot, n_q)
    one_hot = torch.nn.functional.one_hot(slot[0], n_q).double()  # [N, n_q]
    expected = torch.einsum("hnd,nq->hqd", q[0].double(), one_hot) / one_hot.sum(0)[:, None]
    assert merged.shape == (1, 3, n_q, 32)
    torch.testing.assert_close(merged[0].double(), expected, rtol=0, atol=1e-6)


def test_merge_reads_strided_heads_and_batches(fused):
    """q as qkv_heads leaves it (a permuted view of the fused qkv), two scenes with their own slots."""
    first, n_q = slots_of(LAYOUT, REDUCTION, seed=8)
    second, _ = slots_of(LAYOUT, REDUCTION, seed=9)
    slot = torch.cat([first, second])
    qkv = torch.randn(2, LAYOUT.tokens, 3, 2, 16, generator=torch.Generator().manual_seed(10))
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # [B, h, N, D], last dim contiguous
    torch.testing.assert_close(fused.merge_queries(q, slot, n_q), merge.torch_merge_queries(q, slot, n_q),
                               rtol=0, atol=1e-6)


def test_bf16_merge_rounds_the_fp32_mean_once(fused):
    q = torch.randn(1, 2, 600, 64, generator=torch.Generator().manual_seed(11)).bfloat16()
    slot = torch.arange(600)[None] // 100  # six slots of 100 tokens
    expected = q.double().reshape(1, 2, 6, 100, 64).mean(3).bfloat16()
    assert (fused.merge_queries(q, slot, 6) == expected).double().mean() >= 0.99


def test_reduced_attention_on_the_fused_path_equals_the_torch_path(fused, monkeypatch):
    generator = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(1, 2, LAYOUT.tokens, 32, generator=generator) for _ in range(3))
    reduction = Reduction(kv_keep=0.5, query_merge=3, group_frames=4)
    plain = reduced_attention([q, k, v], LAYOUT, reduction)
    monkeypatch.setattr(merge, "fused_kernels", lambda tensor: fused)
    torch.testing.assert_close(reduced_attention([q, k, v], LAYOUT, reduction), plain, rtol=0, atol=1e-6)


def test_the_fused_path_is_taken_only_on_cuda_for_the_dtypes_it_takes(fused):
    assert merge.fused_kernels(torch.zeros(2, 64)) is None  # CPU: the torch path
    assert fused.supports(torch.zeros(2, 64, dtype=torch.bfloat16))
    assert not fused.supports(torch.zeros(2, 64, dtype=torch.float64))
    assert not fused.supports(torch.zeros(2, 1024))  # the attention input as the metric: wider than the kernels hold


def test_slot_members_list_each_slots_tokens_in_token_order(fused):
    """order / starts / counts against a loop over the slots: each slot's tokens, ascending (the stable sort)."""
    slot = torch.randint(0, 7, (2, 50), generator=torch.Generator().manual_seed(11))
    order, starts, counts = fused.slot_members(slot, 7)
    assert order.dtype == starts.dtype == counts.dtype == torch.int32
    for batch in range(2):
        for index in range(7):
            members = [token for token in range(50) if slot[batch, token] == index]
            start, count = starts[batch, index].item(), counts[batch, index].item()
            assert count == len(members) and order[batch, start:start + count].tolist() == members
