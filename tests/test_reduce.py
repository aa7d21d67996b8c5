"""Runtime reduction against independent loop references (float64), and patching on vggt-tiny."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spark3r.errors import Spark3rError
from spark3r.models.base import FrameLayout
from spark3r.reduce import (
    KV_METHODS, Reduction, apply_reductions, kv_count, kv_index, merged_attention, query_count, reduced_attention,
)
from spark3r.reduce import attention as reduce_attention
from spark3r.reduce import merge as merge_module
from spark3r.reduce import patch as reduce_patch
from spark3r.reduce.kv import grid_steps, select_kv, span_kv
from spark3r.schedule import apply_schedule, load_schedule, reduced
from support import load_benchmark

SCHEDULES = Path(__file__).resolve().parent.parent / "schedules"

LAYOUT = FrameLayout(frames=7, n_special=2, grid_h=4, grid_w=6)


def qkv(layout, batch=2, heads=3, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, batch, heads, layout.tokens, dim, generator=generator, dtype=torch.float64).unbind(0)


def attention(q, k, v):
    """Plain softmax attention in float64 (the reference)."""
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def token(layout, frame, index):
    return frame * layout.tokens_per_frame + index


# ---------------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("method", KV_METHODS)
def test_keep_one_and_merge_one_are_dense_exactly(method):
    q, k, v = qkv(LAYOUT, dim=8)
    q, k, v = q.float(), k.float(), v.float()
    dense = F.scaled_dot_product_attention(q, k, v)
    for reduction in (Reduction(kv_keep=1.0, kv_method=method), Reduction(kv_keep=1.0, kv_method=method,
                                                                          query_merge=1, keep_reference_frame=False)):
        assert torch.equal(reduced_attention([q, k, v], LAYOUT, reduction), dense)
    assert kv_count(LAYOUT, Reduction(kv_keep=0.7)) == LAYOUT.tokens  # frame stride round(1 / 0.7) = 1: dense


# ---------------------------------------------------------------------------------------------------- K/V pruning


def reference_frame_stride(layout, stride):
    return {token(layout, f, t) for f in range(layout.frames) for t in range(layout.tokens_per_frame)
            if t < layout.n_special or f % stride == 0}


def reference_grid(layout, steps, keep_reference_frame):
    step_y, step_x = steps
    kept = set()
    for f in range(layout.frames):
        phase_y, phase_x = (f // step_x) % step_y, f % step_x
        for t in range(layout.tokens_per_frame):
            if t < layout.n_special or (f == 0 and keep_reference_frame):
                kept.add(token(layout, f, t))
                continue
            y, x = divmod(t - layout.n_special, layout.grid_w)
            inside = y < (layout.grid_h // step_y) * step_y and x < (layout.grid_w // step_x) * step_x
            if inside and y % step_y == phase_y and x % step_x == phase_x:
                kept.add(token(layout, f, t))
    return kept


def reference_key_norm(layout, keys, per_frame, keep_reference_frame):
    """{(b, h): kept tokens} by looping over frames and sorting patch norms."""
    kept = {}
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            chosen = set()
            for f in range(layout.frames):
                patches = range(layout.n_special, layout.tokens_per_frame)
                chosen.update(token(layout, f, t) for t in range(layout.n_special))
                if f == 0 and keep_reference_frame:
                    chosen.update(token(layout, f, t) for t in patches)
                    continue
                norms = sorted(patches, key=lambda t: -keys[b, h, token(layout, f, t)].norm().item())
                chosen.update(token(layout, f, t) for t in norms[:per_frame])
            kept[b, h] = chosen
    return kept


def test_grid_steps_are_the_squarest_factorisation():
    assert grid_steps(4, 10, 10) == (2, 2)
    assert grid_steps(6, 10, 10) == (2, 3)
    assert grid_steps(3, 10, 10) == (1, 3)
    assert grid_steps(25, 10, 10) == (5, 5)
    assert grid_steps(25, 3, 10) == (3, 5)  # capped by the grid


@pytest.mark.parametrize("stride", [2, 3, 10])
def test_frame_stride_equals_reference(stride):
    _, k, _ = qkv(LAYOUT)
    reduction = Reduction(kv_keep=1 / stride)
    index = kv_index(k, LAYOUT, reduction)
    assert len(index) == kv_count(LAYOUT, reduction) == len(set(index.tolist()))
    assert set(index.tolist()) == reference_frame_stride(LAYOUT, stride)


@pytest.mark.parametrize("keep, steps", [(1 / 4, (2, 2)), (1 / 6, (2, 3)), (1 / 3, (1, 3))])
@pytest.mark.parametrize("keep_reference_frame", [True, False])
def test_grid_equals_reference(keep, steps, keep_reference_frame):
    _, k, _ = qkv(LAYOUT)
    reduction = Reduction(kv_keep=keep, kv_method="grid", keep_reference_frame=keep_reference_frame)
    index = kv_index(k, LAYOUT, reduction)
    assert len(index) == kv_count(LAYOUT, reduction) == len(set(index.tolist()))
    assert set(index.tolist()) == reference_grid(LAYOUT, steps, keep_reference_frame)


@pytest.mark.parametrize("keep_reference_frame", [True, False])
def test_key_norm_equals_reference(keep_reference_frame):
    _, k, _ = qkv(LAYOUT)
    reduction = Reduction(kv_keep=0.25, kv_method="key_norm", keep_reference_frame=keep_reference_frame)
    index = kv_index(k, LAYOUT, reduction)
    assert index.shape == (2, 3, kv_count(LAYOUT, reduction))
    expected = reference_key_norm(LAYOUT, k, round(0.25 * LAYOUT.patches_per_frame), keep_reference_frame)
    for (b, h), kept in expected.items():
        assert set(index[b, h].tolist()) == kept


def test_random_is_seeded_per_frame_and_static():
    _, k, _ = qkv(LAYOUT)
    reduction = Reduction(kv_keep=0.25, kv_method="random", seed=3)
    index = kv_index(k, LAYOUT, reduction).tolist()
    assert index == kv_index(k * 2, LAYOUT, reduction).tolist()  # data-independent
    assert len(index) == len(set(index)) == kv_count(LAYOUT, reduction)
    per_frame = [sorted(t % LAYOUT.tokens_per_frame for t in index
                        if t // LAYOUT.tokens_per_frame == f and t % LAYOUT.tokens_per_frame >= LAYOUT.n_special)
                 for f in range(LAYOUT.frames)]
    assert len(per_frame[0]) == LAYOUT.patches_per_frame
    assert all(len(kept) == 6 for kept in per_frame[1:])
    assert len({tuple(kept) for kept in per_frame[1:]}) > 1  # frames differ
    assert index != kv_index(k, LAYOUT, Reduction(kv_keep=0.25, kv_method="random", seed=4)).tolist()


@pytest.mark.parametrize("method", KV_METHODS)
@pytest.mark.parametrize("keep_reference_frame", [True, False])
def test_special_and_reference_tokens_survive(method, keep_reference_frame):
    _, k, _ = qkv(LAYOUT)
    reduction = Reduction(kv_keep=0.1, kv_method=method, keep_reference_frame=keep_reference_frame)
    index = kv_index(k, LAYOUT, reduction)
    kept = set(index.reshape(-1, index.shape[-1])[0].tolist())
    specials = {token(LAYOUT, f, t) for f in range(LAYOUT.frames) for t in range(LAYOUT.n_special)}
    assert specials <= kept
    reference = set(range(LAYOUT.tokens_per_frame))
    assert (reference <= kept) == (keep_reference_frame or method == "frame_stride")


@pytest.mark.parametrize("method", KV_METHODS)
def test_pruned_attention_equals_attention_over_the_reference_subset(method):
    q, k, v = qkv(LAYOUT)
    reduction = Reduction(kv_keep=1 / 3, kv_method=method, seed=1)
    out = reduced_attention([q, k, v], LAYOUT, reduction)
    index = kv_index(k, LAYOUT, reduction)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            kept = sorted((index if index.dim() == 1 else index[b, h]).tolist())
            expected = attention(q[b, h], k[b, h, kept], v[b, h, kept])
            torch.testing.assert_close(out[b, h], expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- query merging


def reference_merged_attention(q, k, v, layout, merge, group_frames, metric, kv_tokens=None):
    """Bipartite merging written out with loops: groups, destinations, best match, top-M, mean, attention, copy."""
    batch, heads, tokens, _ = q.shape
    out = torch.empty_like(q)
    tokens_per_frame, n_special = layout.tokens_per_frame, layout.n_special

    def is_destination(cell, local_frame, t):
        if local_frame == 0 or t < n_special:
            return True
        y, x = divmod(t - n_special, layout.grid_w)
        return y % cell == 0 and x % cell == 0

    def destinations_in(group, cell):
        return sum(is_destination(cell, f, t) for f in range(group) for t in range(tokens_per_frame))

    first_group = min(group_frames, layout.frames)
    target = math.ceil(first_group * tokens_per_frame / merge)
    cell = next(c for c in range(2, 100) if destinations_in(first_group, c) <= target
                or c >= max(layout.grid_h, layout.grid_w))
    for b in range(batch):
        slots = []  # list of lists of token positions, each merged into one query
        for start in range(0, layout.frames, group_frames):
            group = min(group_frames, layout.frames - start)
            positions = [token(layout, start + f, t) for f in range(group) for t in range(tokens_per_frame)]
            roles = [is_destination(cell, f, t) for f in range(group) for t in range(tokens_per_frame)]
            dst = [p for p, d in zip(positions, roles) if d]
            src = [p for p, d in zip(positions, roles) if not d]
            unit = metric[b] / metric[b].norm(dim=-1, keepdim=True)
            best = []
            for s in src:
                similarity = [(unit[s] @ unit[d]).item() for d in dst]
                j = max(range(len(dst)), key=lambda i: similarity[i])
                best.append((similarity[j], s, j))
            best.sort(key=lambda item: -item[0])
            merged = max(0, min(len(src), len(positions) - math.ceil(len(positions) / merge)))
            members = [[d] for d in dst]
            for _, s, j in best[:merged]:
                members[j].append(s)
            slots += members + [[s] for _, s, _ in best[merged:]]
        for h in range(heads):
            kept = list(range(tokens)) if kv_tokens is None else kv_tokens
            queries = torch.stack([q[b, h, members].mean(0) for members in slots])
            result = attention(queries, k[b, h, kept], v[b, h, kept])
            for row, members in enumerate(slots):
                out[b, h, members] = result[row]
    return out


@pytest.mark.parametrize("merge, group_frames", [(2, 3), (2, 20), (3, 4), (5, 3)])
def test_merge_and_unmerge_equal_reference_loop(merge, group_frames):
    q, k, v = qkv(LAYOUT)
    reduction = Reduction(query_merge=merge, group_frames=group_frames)
    out = reduced_attention([q, k, v], LAYOUT, reduction)
    expected = reference_merged_attention(q, k, v, LAYOUT, merge, group_frames, k.mean(dim=1))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert query_count(LAYOUT, reduction) < LAYOUT.tokens


def test_merge_with_input_similarity_and_pruned_kv_equals_reference():
    q, k, v = qkv(LAYOUT)
    x = torch.randn(2, LAYOUT.tokens, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    reduction = Reduction(kv_keep=0.5, query_merge=2, group_frames=3, similarity="input")
    out = reduced_attention([q, k, v], LAYOUT, reduction, x=x)
    kept = sorted(kv_index(k, LAYOUT, reduction).tolist())
    expected = reference_merged_attention(q, k, v, LAYOUT, 2, 3, x, kv_tokens=kept)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(Spark3rError, match="needs the attention input"):
        reduced_attention([q, k, v], LAYOUT, reduction)


def test_merge_reaches_about_n_over_r_and_keeps_special_tokens():
    layout = FrameLayout(frames=100, n_special=5, grid_h=37, grid_w=37)
    for merge in (2, 3, 4, 8):
        count = query_count(layout, Reduction(query_merge=merge))
        assert abs(count - layout.tokens / merge) <= 0.01 * layout.tokens / merge
    small = FrameLayout(frames=5, n_special=2, grid_h=4, grid_w=4)
    q, k, v = qkv(small, batch=1, heads=1)
    slot = merge_module.merge_slots(merge_module.key_metric(k), small, Reduction(query_merge=3, group_frames=5))
    specials = [token(small, f, t) for f in range(1, small.frames) for t in range(small.n_special)]
    firsts = list(range(small.tokens_per_frame))
    owners = slot[0, specials + firsts].tolist()
    assert len(set(owners)) == len(owners)  # each special / reference token owns its own query


def test_similarity_chunking_does_not_change_the_result(monkeypatch):
    q, k, v = qkv(LAYOUT)
    reduction = Reduction(query_merge=2, group_frames=4)
    whole = reduced_attention([q, k, v], LAYOUT, reduction)
    monkeypatch.setattr(merge_module, "SIMILARITY_CHUNK_ELEMENTS", 7)
    assert torch.equal(reduced_attention([q, k, v], LAYOUT, reduction), whole)


def test_best_destinations_is_the_brute_force_max_at_any_chunk():
    generator = torch.Generator().manual_seed(3)
    sources, destinations = torch.randn(2, 9, 4, generator=generator), torch.randn(2, 5, 4, generator=generator)
    similarity = torch.einsum("gsd,gtd->gst", sources.double(), destinations.double())
    for chunk in (1, 10, 2**26):  # one row per chunk, a few rows, everything in one chunk
        values, indices = merge_module.torch_best_destinations(sources, destinations, chunk)
        torch.testing.assert_close(values.double(), similarity.max(dim=-1).values)
        assert torch.equal(indices, similarity.argmax(dim=-1))


def test_wrong_token_count_is_a_clear_error():
    q, k, v = qkv(LAYOUT)
    with pytest.raises(Spark3rError, match="set the layout"):
        reduced_attention([q, k, v], FrameLayout(6, 2, 4, 6), Reduction(kv_keep=0.5))


# ---------------------------------------------------------------------------------------------------- patching


@pytest.fixture(scope="module")
def images():
    return torch.rand(1, 6, 3, 112, 112, generator=torch.Generator().manual_seed(1))


def run(model, images):
    with torch.no_grad():
        return model(images)


def assert_same(outputs, expected):
    assert all(torch.equal(outputs[name], expected[name]) for name in expected)


def test_apply_then_remove_restores_bit_exact_outputs(tiny, images, dense):
    model = tiny
    handle = apply_reductions(model, {layer: Reduction(kv_keep=0.5, query_merge=2, group_frames=3)
                                      for layer in range(6)})
    reduced_out = run(model, images)
    assert not torch.equal(reduced_out["depth"], dense["depth"])
    assert torch.isfinite(reduced_out["depth"]).all()
    handle.remove()
    handle.remove()  # idempotent
    assert all("forward" not in vars(attn) for attn in model.adapter.modules(model))
    assert_same(run(model, images), dense)


def test_identity_schedule_is_bit_exact_and_shipped_schedule_reduces(tiny, images, dense):
    model = tiny
    identity = {"spark3r_schedule": 1, "model": "vggt-tiny", "global_layers": 12, "default": {"kv": {"keep": 1.0}}}
    with reduced(model, identity):
        assert_same(run(model, images), dense)
    with reduced(model, SCHEDULES / "vggt-tiny-paper.yaml") as handle:
        assert handle.reduction(0, 6).kv_factor == 3 and handle.reduction(7, 6).kv_factor == 1
        assert not torch.equal(run(model, images)["depth"], dense["depth"])
    assert_same(run(model, images), dense)


@pytest.mark.parametrize("method", KV_METHODS)
def test_one_layer_reduction_matches_manual_layer(tiny, images, method):
    model = tiny
    layer, reduction = 2, Reduction(kv_keep=0.5, kv_method=method, query_merge=2, group_frames=3)
    attn = model.adapter.modules(model)[layer]
    captured = {}
    hook = attn.register_forward_hook(lambda module, args, kwargs, out: captured.update(x=args[0], pos=kwargs["pos"],
                                                                                       out=out), with_kwargs=True)
    try:
        with apply_reductions(model, {layer: reduction}):
            run(model, images)
    finally:
        hook.remove()
    from spark3r.models.blocks import merge_heads, qkv_heads

    layout = model.adapter.layout(images)
    with torch.no_grad():
        q, k, v = qkv_heads(attn, captured["x"], captured["pos"])
        expected = attn.proj(merge_heads(reduced_attention([q, k, v], layout, reduction)))
    assert torch.equal(captured["out"], expected)


def test_run_steps_needs_the_layout_and_uses_set_layout(tiny, images):
    model = tiny
    reduction = Reduction(kv_keep=0.5, query_merge=2, group_frames=3)
    with apply_reductions(model, {1: reduction}) as handle:
        with torch.no_grad():
            with pytest.raises(Spark3rError, match="set_layout"):
                model.run_steps(model.prepare(images))
            handle.set_layout(model.adapter.layout(images))
            stepped = model.decode(model.run_steps(model.prepare(images)), images)
            assert_same(stepped, model(images))


def test_patch_errors_are_clear(tiny):
    model = tiny
    with pytest.raises(Spark3rError, match="made for vggt-1b, not vggt-tiny"):
        apply_schedule(model, SCHEDULES / "vggt-1b-paper.yaml")
    with pytest.raises(Spark3rError, match="layers 0..11"):
        apply_reductions(model, {12: Reduction()})
    with apply_reductions(model, {0: Reduction(kv_keep=0.5)}):
        with pytest.raises(Spark3rError, match="already patched"):
            apply_schedule(model, load_schedule(SCHEDULES / "vggt-tiny-paper.yaml"))
    assert all("forward" not in vars(attn) for attn in model.adapter.modules(model))


def test_reduced_layers_run_in_the_autocast_dtype(tiny, images, monkeypatch):
    import spark3r.reduce.patch as patch_module
    from spark3r.models.blocks import qkv_heads

    model = tiny
    seen = []

    def recording(qkv, *args, **kwargs):
        seen.append(tuple(t.dtype for t in qkv))
        return merged_attention(qkv, *args, **kwargs)

    def fp32_qk(attn, x, pos):  # as qk-norm leaves q and k under CUDA autocast
        q, k, v = qkv_heads(attn, x, pos)
        return q.float(), k.float(), v

    monkeypatch.setattr(patch_module, "merged_attention", recording)
    monkeypatch.setattr(patch_module, "qkv_heads", fp32_qk)
    with apply_reductions(model, {0: Reduction(kv_keep=0.5, query_merge=2, group_frames=3)}):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(images)
    assert seen == [(torch.bfloat16,) * 3]
    assert torch.isfinite(outputs["depth"]).all()


def test_speed_benchmark_smoke_on_vggt_tiny(tmp_path, capsys):
    import json

    speed = load_benchmark("speed")
    out = tmp_path / "speed.json"
    assert speed.main(["--model", "vggt-tiny", "--frames", "2", "4", "--size", "112", "--repeats", "1",
                       "--dense-max-frames", "2", "--dtype", "fp32", "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["frames"], row["schedule"]) for row in rows] == [
        (frames, name) for frames in (2, 4) for name in ("dense", "vggt-tiny-paper", "vggt-tiny-uniform")]
    assert rows[3]["note"].startswith("assembled") and rows[0]["note"] == "measured"
    assert all(row["end_to_end_s"] > 0 and row["flop_speedup"] >= 1 for row in rows)
    assert 0 < rows[4]["global_attention_flop_fraction"] < 1 and rows[4]["select_merge_over_attention"] > 0
    for row in rows:  # the stages add up to the totals; parts never exceed their whole
        stages = row["stages_s"]
        assert min(stages.values()) > 0 and set(row["stages_tflop"]) == set(speed.STAGES)
        assert stages["encoder"] + stages["frame blocks"] + stages["global blocks"] == row["aggregator_s"]
        assert stages["global attention modules"] < stages["global blocks"]
        assert row["aggregator_s"] + stages["heads"] == row["end_to_end_s"]
    for layer in rows[4]["select_merge_layers"]:
        assert layer["select_merge_s"] > 0 and layer["attention_s"] > 0 and layer["queries"] < 4 * 5 * 65
    printed = capsys.readouterr().out
    assert "| 4 | vggt-tiny-paper |" in printed and "of which select+merge" in printed


def test_speed_benchmark_stage_flops_add_up():
    """Per-stage TFLOP of the breakdown: encoder + frame + global blocks + heads = the FLOP model's total."""

    from spark3r.models.registry import build_model
    from spark3r.reduce import model_flops

    speed = load_benchmark("speed")
    model = build_model("vggt-1b", "meta")
    flop_config = model.flop_config(518, 518)
    schedule = load_schedule(SCHEDULES / "vggt-1b-paper.yaml")
    stages = speed.stage_tflop(model, flop_config, 1000, schedule)
    total = model_flops(flop_config, 1000, schedule).total / 1e12
    whole = stages["encoder"] + stages["frame blocks"] + stages["global blocks"] + stages["heads"]
    assert abs(whole - total) < 1e-9 * total
    assert 0 < stages["select+merge"] < stages["global attention modules"] < stages["global blocks"]
    assert abs(stages["frame blocks"] - 24 * 1000 * 1374 * (24 * 1024**2 + 4 * 1024 * 1374) / 1e12) < 1e-6


def test_reduced_attention_captures_as_one_graph():
    """No graph breaks (hence no host syncs or data-dependent shapes) under torch.compile(fullgraph=True)."""
    q, k, v = (t.float() for t in qkv(LAYOUT, batch=1))
    reduction = Reduction(kv_keep=0.25, kv_method="key_norm", query_merge=2, group_frames=3)
    compiled = torch.compile(lambda q, k, v: reduced_attention([q, k, v], LAYOUT, reduction), backend="eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), reduced_attention([q, k, v], LAYOUT, reduction))


def test_reduction_validates_and_normalises_its_fields():
    import numpy as np

    reduction = Reduction(kv_keep=np.float32(0.5), query_merge=np.int64(2), seed=np.int64(3))
    assert reduction == Reduction(kv_keep=0.5, query_merge=2, seed=3)
    assert type(reduction.query_merge) is int and type(reduction.kv_keep) is float
    for bad, sentence in [({"kv_keep": 0}, "kv_keep must be a number in"), ({"kv_keep": 1.5}, "kv_keep"),
                          ({"kv_method": "stride"}, "kv_method 'stride' is unknown"),
                          ({"query_merge": 0}, "query_merge must be an integer >= 1"),
                          ({"query_merge": 2.5}, "query_merge"), ({"group_frames": True}, "group_frames"),
                          ({"similarity": "value"}, "similarity 'value' is unknown"),
                          ({"keep_reference_frame": 1}, "keep_reference_frame must be true or false")]:
        with pytest.raises(Spark3rError, match=sentence):
            Reduction(**bad)


def test_merging_identical_frames_changes_nothing():
    """Frames that repeat the first one merge into it (similarity 1), and their merged queries are their own."""
    layout = FrameLayout(frames=4, n_special=1, grid_h=4, grid_w=4)
    frame = torch.randn(3, 1, 2, layout.tokens_per_frame, 8, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(2))
    q, k, v = frame.repeat(1, 1, 1, layout.frames, 1).unbind(0)
    reduction = Reduction(query_merge=2, group_frames=4)
    assert query_count(layout, reduction) == math.ceil(layout.tokens / 2)
    torch.testing.assert_close(reduced_attention([q, k, v], layout, reduction), attention(q, k, v))


# ---------------------------------------------------------------------------------------------------- boundaries


def test_apply_remove_cycles_leave_no_hook_behind(tiny, images, dense):
    model = tiny
    hooks = len(model._forward_pre_hooks)
    for _ in range(3):
        apply_reductions(model, {0: Reduction(kv_keep=0.5)}).remove()
        with reduced(model, SCHEDULES / "vggt-tiny-paper.yaml"):
            pass
    assert len(model._forward_pre_hooks) == hooks
    assert_same(run(model, images), dense)


def paper_factor(frames: int, insensitive_factor: float) -> int:
    """The paper's K/V factor by hand: 1 up to 100 frames, else ceil(S / 40), times the layer's factor."""
    return round(insensitive_factor * (1 if frames <= 100 else -(-frames // 40)))


def test_kv_factor_is_the_nearest_integer_of_one_over_keep():
    assert 1.0 / 0.33333333333333337 < 3  # the reciprocal falls just short of 3 in floating point
    assert Reduction(kv_keep=0.33333333333333337).kv_factor == 3
    assert kv_count(FrameLayout(9, 1, 2, 2), Reduction(kv_keep=0.33333333333333337)) == 9 + 3 * 4  # frames 0, 3, 6
    paper, uniform = load_schedule(SCHEDULES / "vggt-1b-paper.yaml"), load_schedule(SCHEDULES / "vggt-1b-uniform.yaml")
    assert 1.0 / paper.resolve(0, 481).kv_keep < 39  # 3 * ceil(481 / 40) = 39, read as 38.99999999999999
    for frames in range(1, 2001):
        assert paper.resolve(0, frames).kv_factor == paper_factor(frames, 3), frames
        assert paper.resolve(11, frames).kv_factor == paper_factor(frames, 1), frames
        assert uniform.resolve(0, frames).kv_factor == paper_factor(frames, 2), frames


@pytest.mark.parametrize("method", ["random", "key_norm"])
def test_patches_per_frame_is_the_nearest_integer(method):
    # VGGT-1B's 37 x 37 grid at keep 1/16: 1369 / 16 = 85.56 patches, so 86 in every frame but the reference frame
    layout = FrameLayout(frames=3, n_special=5, grid_h=37, grid_w=37)
    reduction = Reduction(kv_keep=1 / 16, kv_method=method)
    assert kv_count(layout, reduction) == 3 * 5 + 1369 + 2 * 86
    keys = torch.randn(1, 2, layout.tokens, 4, generator=torch.Generator().manual_seed(0))
    assert kv_index(keys, layout, reduction).shape[-1] == 3 * 5 + 1369 + 2 * 86


def test_bf16_queries_are_averaged_in_fp32():
    """Means of 100 bf16 queries each are the float64 means rounded once to bf16 (summing in bf16 rounds the sum, the
    count's reciprocal and the product: about a quarter of the means then land one bf16 step off)."""
    q = torch.randn(1, 4, 600, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    slot = torch.arange(600)[None] // 100  # six slots of 100 tokens
    merged = merge_module.merge_queries(q, slot, 6)
    assert merged.dtype == torch.bfloat16
    expected = q.double().reshape(1, 4, 6, 100, 64).mean(3).bfloat16()
    assert (merged == expected).double().mean() >= 0.99


def test_whole_peaks_benchmark_smoke_on_tiny_models(tmp_path):
    import json

    whole_peaks = load_benchmark("whole_peaks")
    out = tmp_path / "peaks.json"
    assert whole_peaks.main(["--models", "vggt-tiny", "pi3-tiny", "--frames", "3", "--dtype", "fp32", "--device",
                             "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("python benchmarks/whole_peaks.py --models vggt-tiny pi3-tiny")
    assert [(row["model"], row["frames"], row["size"]) for row in result["rows"]] == [
        ("vggt-tiny", 3, [112, 112]), ("pi3-tiny", 3, [42, 56])]
    assert all(row["seconds"] > 0 and row["peak_gib"] is None for row in result["rows"])  # no CUDA peak on the CPU
    with pytest.raises(Spark3rError, match="is a folder"):
        whole_peaks.main(["--models", "vggt-tiny", "--frames", "2", "--device", "cpu", "--out", str(tmp_path)])


@pytest.mark.parametrize("query_merge", [1, 2])
def test_reduced_attention_drops_the_full_tensors_before_attending(query_merge, monkeypatch):
    """The attention runs on the kept keys/values (and merged queries) with the full q, k, v already freed: what keeps
    the reduced layer's peak below the dense one's."""
    import weakref

    q, k, v = qkv(LAYOUT)
    expected = reduced_attention([q.clone(), k.clone(), v.clone()], LAYOUT,
                                 Reduction(kv_keep=1 / 3, query_merge=query_merge, group_frames=3))
    full = {"q": weakref.ref(q), "k": weakref.ref(k), "v": weakref.ref(v)}
    alive_at_attention = []
    sdpa = F.scaled_dot_product_attention

    def attend(*args, **kwargs):
        alive_at_attention.append(sorted(name for name, ref in full.items() if ref() is not None))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", attend)
    tensors = [q, k, v]
    del q, k, v
    out = reduced_attention(tensors, LAYOUT, Reduction(kv_keep=1 / 3, query_merge=query_merge, group_frames=3))
    assert tensors == []
    assert alive_at_attention == [[] if query_merge > 1 else ["q"]]  # q itself is the query when nothing merges
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_patched_layer_keeps_no_reference_to_the_full_tensors(tiny, images, monkeypatch):
    import weakref

    import spark3r.reduce.patch as patch_module
    from spark3r.models.blocks import qkv_heads

    made, alive_at_attention = [], []

    def recorded_qkv(attn, x, pos):
        q, k, v = qkv_heads(attn, x, pos)
        made[:] = [weakref.ref(t) for t in (q, k, v)]
        return q, k, v

    sdpa = F.scaled_dot_product_attention

    def attend(query, *args, **kwargs):
        if made:  # the first attention after the patched layer's qkv: its own, on merged queries
            alive_at_attention.append((query.shape[2], sum(ref() is not None for ref in made)))
            made.clear()
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(patch_module, "qkv_heads", recorded_qkv)
    monkeypatch.setattr(F, "scaled_dot_product_attention", attend)
    with apply_reductions(tiny, {0: Reduction(kv_keep=0.5, query_merge=2, group_frames=3)}), torch.no_grad():
        tiny(images)
    frames = images.shape[1]  # 8 x 8 patches and 5 special tokens per frame
    assert alive_at_attention == [(query_count(FrameLayout(frames, 5, 8, 8), Reduction(query_merge=2, group_frames=3)),
                                   0)]


@pytest.mark.parametrize("reduction", [Reduction(kv_keep=0.25, query_merge=2, group_frames=3),
                                       Reduction(kv_keep=1 / 3), Reduction(query_merge=3, group_frames=3)],
                         ids=["kv-and-queries", "kv", "queries"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_reduced_attention_peaks_below_dense_attention(reduction, dtype):
    from support import PeakBytes

    base = [t.to(dtype) for t in qkv(LAYOUT, batch=1, heads=16, dim=8)]  # 16 heads, as the models have

    def peak(attend) -> int:
        with PeakBytes() as memory:
            tensors = [t.clone() for t in base]  # made inside the counter, as a layer's qkv projection makes them
            attend(tensors)
        return memory.peak

    dense = peak(lambda tensors: F.scaled_dot_product_attention(*tensors))
    one = base[0].numel() * base[0].element_size()
    log_sum_exp = base[0][..., 0].numel() * torch.promote_types(dtype, torch.float32).itemsize
    assert 4 * one <= dense <= 4 * one + log_sum_exp  # q, k, v, the output and the attention's log-sum-exp
    assert peak(lambda tensors: reduced_attention(tensors, LAYOUT, reduction)) <= dense


def test_projecting_the_merged_outputs_equals_projecting_every_token(tiny, images):
    """The patched layer projects its n_q merged outputs and then copies rows; un-merging first and projecting all N
    tokens (the output projection is per-token affine) gives the same model outputs."""
    from spark3r.reduce import AttentionPatch

    reduction = Reduction(kv_keep=0.5, query_merge=3, group_frames=3)
    layers = range(tiny.adapter.num_global_layers)
    with torch.no_grad():
        with AttentionPatch(tiny, tiny.adapter, layers,
                            lambda layer, layout: lambda heads, x, chunk: reduced_attention(heads(slice(None)), layout,
                                                                                            reduction, x)):
            projected_after = tiny(images)
        with apply_reductions(tiny, {layer: reduction for layer in layers}):
            projected_first = tiny(images)
    assert not torch.equal(projected_first["depth"], tiny(images)["depth"])  # the reduction does change the output
    assert projected_first.keys() == projected_after.keys()
    for name in projected_first:
        torch.testing.assert_close(projected_first[name], projected_after[name], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- spans of a long sequence

SPAN_LAYOUT = FrameLayout(frames=11, n_special=2, grid_h=4, grid_w=6)  # 286 tokens


@pytest.mark.parametrize("method", sorted(KV_METHODS))
@pytest.mark.parametrize("merge, keep_reference, similarity", [(3, True, "key"), (2, False, "input"), (1, True, "key")])
def test_spans_make_the_rows_one_pass_makes(method, merge, keep_reference, similarity):
    """Groups of 3 frames, spans of 6 frames (two groups) and a last span of 5 (a short last group): the merged
    queries, kept keys/values (per head for key_norm) and slots equal one pass over whole tensors, in float64; heads
    is asked for each span's tokens, never the whole."""
    reduction = Reduction(kv_keep=0.25, kv_method=method, keep_reference_frame=keep_reference, query_merge=merge,
                          group_frames=3, similarity=similarity)
    q, k, v = qkv(SPAN_LAYOUT)
    x = torch.randn(2, SPAN_LAYOUT.tokens, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    whole, whole_slot = merged_attention([q, k, v], SPAN_LAYOUT, reduction, x=x)
    asked = []

    def heads(index):
        asked.append((index.start, index.stop))
        return [t[:, :, index] for t in (q, k, v)]

    chunk = 6 * SPAN_LAYOUT.tokens_per_frame // reduce_attention.SPAN_CHUNKS
    assert reduce_attention.span_frames(SPAN_LAYOUT, reduction, chunk) == 6
    spanned, slot = reduce_attention.spanned_attention(heads, SPAN_LAYOUT, reduction, 6, x=x)
    assert asked == [(0, 6 * 26), (6 * 26, 11 * 26)]
    torch.testing.assert_close(spanned, whole, rtol=0, atol=1e-12)
    assert (slot is None) == (whole_slot is None) and (slot is None or torch.equal(slot, whole_slot))


def test_span_frames_are_whole_merge_groups_within_the_chunk():
    merging, pruning = Reduction(query_merge=2, group_frames=3), Reduction(kv_keep=0.5)
    frame = SPAN_LAYOUT.tokens_per_frame
    span_frames, chunks = reduce_attention.span_frames, reduce_attention.SPAN_CHUNKS
    assert span_frames(SPAN_LAYOUT, merging, None) is None  # no chunk: one pass
    assert span_frames(SPAN_LAYOUT, merging, 8 * frame // chunks) == 6  # two groups of 3 fit in 8 frames
    assert span_frames(SPAN_LAYOUT, merging, 2 * frame // chunks) == 3  # at least one group
    assert span_frames(SPAN_LAYOUT, pruning, 2 * frame // chunks) == 2  # no merging: whole frames
    assert span_frames(SPAN_LAYOUT, merging, 12 * frame // chunks) is None  # one span would hold every frame


@pytest.mark.parametrize("method", ["frame_stride", "key_norm"])
def test_a_long_sequence_runs_its_reduced_layers_in_spans_with_the_same_outputs(tiny, images, monkeypatch, method):
    """The patched model with 1-frame token chunks (spans of SPAN_CHUNKS frames: two 2-frame groups) against one pass
    (the 6 frames fit in one default chunk): the same outputs; the spanned path ran."""
    reduction = Reduction(kv_keep=0.5, kv_method=method, query_merge=2, group_frames=2)
    layers = {layer: reduction for layer in range(tiny.adapter.num_global_layers)}
    with apply_reductions(tiny, layers), torch.no_grad():
        whole = tiny(images)
        calls = []
        spanned = reduce_attention.spanned_attention
        monkeypatch.setattr(reduce_patch, "spanned_attention",
                            lambda *args, **kwargs: calls.append(args[3]) or spanned(*args, **kwargs))
        per_frame = tiny.adapter.layout(images).tokens_per_frame
        monkeypatch.setattr("spark3r.models.blocks.INFERENCE_TOKEN_CHUNK", per_frame)
        assert reduce_attention.SPAN_CHUNKS == 4
        chunked = tiny(images)
    assert calls == [4] * tiny.adapter.num_global_layers
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", sorted(KV_METHODS))
@pytest.mark.parametrize("keep_reference", [True, False])
def test_span_kv_puts_each_kept_key_where_one_pass_puts_it(method, keep_reference):
    """The kept keys and values of spans of 4, 4 and 3 frames, written at their positions, are select_kv's on the
    whole tensors, row for row and in its order (an attention over them would hide a misordering)."""
    reduction = Reduction(kv_keep=0.25, kv_method=method, keep_reference_frame=keep_reference)
    _, k, v = qkv(SPAN_LAYOUT)
    expected_k, expected_v = select_kv(k, v, SPAN_LAYOUT, reduction)
    kept_k, kept_v = torch.full_like(expected_k, float("nan")), torch.full_like(expected_v, float("nan"))
    per_frame = SPAN_LAYOUT.tokens_per_frame
    for start in (0, 4, 8):
        index = slice(start * per_frame, min(start + 4, SPAN_LAYOUT.frames) * per_frame)
        positions, keys, values = span_kv(k[:, :, index], v[:, :, index], SPAN_LAYOUT, reduction, start)
        if positions.dim() == 1:
            kept_k[:, :, positions], kept_v[:, :, positions] = keys, values
        else:
            kept_k.scatter_(2, positions[..., None].expand_as(keys), keys)
            kept_v.scatter_(2, positions[..., None].expand_as(values), values)
    assert torch.equal(kept_k, expected_k) and torch.equal(kept_v, expected_v)
