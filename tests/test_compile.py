"""compile_model: the compiled parts trace whole, one graph per shape serves every layer, and a compiled model computes
what the eager one does (dynamo's "eager" backend runs the traced graphs on CPU without code generation; inductor's
rounding is measured on the GPU by benchmarks/block_profile.py)."""
import pytest
import torch
from torch._dynamo.utils import counters

from spark3r.models.blocks import (
    compile_model,
    compiled_for,
    normed_tokens,
    project_tokens,
    residual_mlp,
    rope_tables,
    token_qkv_heads,
)
from spark3r.models.loading import load_model
from spark3r.models.registry import build_model
from spark3r.reduce import Reduction, apply_reductions

OUTPUTS = ("depth", "depth_conf", "points", "pose_enc")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny(weights: str | None = None):
    """vggt-tiny with random weights (None) or the shipped ones ("auto")."""
    return load_model("vggt-tiny", weights=weights, device="cpu").requires_grad_(False)


def images(frames: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, frames, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def capturing_backend():
    """A torch.compile backend that runs each traced graph as traced and keeps it: (graphs, backend)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, backend


def op_names(graphs) -> set[str]:
    """The names of the operators called in traced graphs."""
    return {getattr(node.target, "__name__", str(node.target)) for gm in graphs for node in gm.graph.nodes}


def test_each_compiled_part_traces_as_one_graph_without_breaks():
    model = tiny()
    block = model.aggregator.global_blocks[0]
    x = torch.randn(1, 2 * 69, 128, generator=torch.Generator().manual_seed(2))
    pos = model.prepare(images(2)).extras["pos"]
    taps = [torch.randn(2, 64, 256, generator=torch.Generator().manual_seed(3)) for _ in range(4)]
    attended = torch.randn(1, 2, 2 * 69, 64)
    qkv = [torch.empty(1, 2, 2 * 69, 64) for _ in range(3)]
    parts = [(normed_tokens, (block, x)), (normed_tokens, (block, x, torch.empty_like(x))),
             (token_qkv_heads, (block.attn, x, pos)), (token_qkv_heads, (block.attn, x, pos, None, qkv)),
             (residual_mlp, (block, x, x)), (residual_mlp, (block, x, x, torch.empty_like(x))),
             (project_tokens, (block.attn, attended)), (project_tokens, (block.attn, attended, torch.empty_like(x))),
             (type(model.depth_head).forward_frames, (model.depth_head, taps, (112, 112)))]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for fn, args in parts:
            explanation = torch._dynamo.explain(fn)(*args)
            assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), (fn.__name__,
                                                                                      explanation.break_reasons)


def test_every_layer_shares_the_graphs_of_its_shape():
    model = compile_model(tiny(), "eager")
    counters.clear()
    with torch.inference_mode():
        model(images(3))
    # normed_tokens, token_qkv_heads, project_tokens and residual_mlp for the frame and the global blocks, the same
    # four for the camera trunk (no RoPE), a chunk of each DPT head (2 and 4 outputs): 14. Compiled per layer, the
    # 12 + 12 trunk blocks alone would make 96.
    assert counters["stats"]["unique_graphs"] <= 14


@pytest.mark.parametrize("chunked", [False, True])
def test_a_compiled_model_equals_the_eager_one_dense_and_reduced(monkeypatch, chunked):
    if chunked:  # the long-sequence path: per-frame rows of 2 frames, global layers in 2-frame token chunks
        monkeypatch.setattr("spark3r.models.blocks.INFERENCE_TOKEN_CHUNK", 2 * 69)
    model, clip = tiny("auto"), images(5)
    reduction = Reduction(kv_keep=0.5, query_merge=2, group_frames=2)
    with torch.inference_mode():
        eager = model(clip)
        with apply_reductions(model, {layer: reduction for layer in (3, 7)}):
            eager_reduced = model(clip)
        compile_model(model, "eager")
        compiled = model(clip)
        with apply_reductions(model, {layer: reduction for layer in (3, 7)}):
            compiled_reduced = model(clip)
    for key in OUTPUTS:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(compiled_reduced[key], eager_reduced[key], rtol=1e-6, atol=1e-6)
    assert (compiled_reduced["depth"] - compiled["depth"]).abs().max() > 1e-4  # the reduction did run


def test_backend_none_runs_eagerly_again():
    model = compile_model(tiny(), "eager")
    block = model.aggregator.frame_blocks[0]
    assert compiled_for(block, residual_mlp) is not residual_mlp
    assert model.depth_head.compile_backend == "eager"
    compile_model(model, None)
    assert compiled_for(block, residual_mlp) is residual_mlp and compiled_for(block.attn, project_tokens) is \
        project_tokens
    assert {module.compile_backend for module in model.modules() if hasattr(type(module), "compile_backend")} == {None}


@pytest.mark.parametrize("name, size, patch, extra", [("da3-tiny", (42, 56), 14, (True,)),
                                                    ("vggt-omega-tiny", (48, 64), 16, ())])
def test_the_dense_heads_of_da3_and_omega_compile_whole_and_equal_eager(name, size, patch, extra, monkeypatch):
    family = "spark3r.models." + ("da3" if name.startswith("da3") else "omega")
    asked = []
    real_compiled_for = compiled_for
    monkeypatch.setattr(f"{family}.compiled_for", lambda module, fn: asked.append((module, fn)) or real_compiled_for(
        module, fn))
    model = build_model(name, "cpu").eval().requires_grad_(False)
    head = next(module for module in model.modules() if type(module).__name__ in ("DualDPT", "DenseHead"))
    generator = torch.Generator().manual_seed(4)
    taps = [torch.randn(2, (size[0] // patch) * (size[1] // patch), head.norm.normalized_shape[0],
                        generator=generator) for _ in range(4)]
    clip = torch.rand(1, 3, 3, *size, generator=generator)
    with torch.inference_mode():
        explanation = torch._dynamo.explain(type(head).forward_frames)(head, taps, size, *extra)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
        eager = model(clip)
        compile_model(model, "eager")
        assert head.compile_backend == "eager"
        compiled = model(clip)
    assert (head, type(head).forward_frames) in asked  # the head's chunks go through compiled_for
    for key in ("depth", "depth_conf", "points"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-6, atol=1e-6)


def test_compiled_qkv_reads_the_rope_tables_instead_of_computing_cos_and_sin_per_element():
    """Traced, RoPE's cached tables cannot be read, so inductor fused cos, sin and pow into the qk-norm + RoPE kernel, per
    element of q and k (14-16 ms of a VGGT-1B block at 1000 frames, benchmarks/results/block-profile-vggt-1b-1000.md);
    qkv_heads hands the tables in. Under bf16 autocast, q reaches RoPE in fp32 (q_norm's output), so fp32 tables."""
    graphs, capture = capturing_backend()
    model = tiny("auto")
    compile_model(model, capture)
    clip = images(3)
    with torch.inference_mode():
        eager = tiny("auto")(clip)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(clip)
        compiled = model(clip)
    qkv = [gm for gm in graphs if any("qkv" in node.name for node in gm.graph.find_nodes(op="placeholder"))]
    assert len(qkv) >= 2  # the frame and the global blocks' token_qkv_heads (at least)
    traced = op_names(qkv)
    assert "mul" in traced and not {"cos", "sin", "pow"} & traced, "RoPE tables recomputed in a compiled graph"
    for key in OUTPUTS:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, size", [("vggt-tiny", (112, 112)), ("da3-tiny", (42, 56)),
                                        ("vggt-omega-tiny", (48, 64))])
def test_compiled_dpt_heads_take_the_uv_embedding_as_a_constant(name, size):
    """Traced, the UV position embedding's sin and cos were fused into the add per element of every frame (19% of the
    compiled bf16 heads of VGGT-1B on an H100); `uv_pos_embed` is a constant of the graph instead."""
    graphs, capture = capturing_backend()
    model = build_model(name, "cpu").eval().requires_grad_(False)
    clip = torch.rand(1, 2, 3, *size, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        eager = model(clip)
        compile_model(model, capture)
        compiled = model(clip)
    heads = [gm for gm in graphs if any("conv" in str(node.target) for node in gm.graph.nodes)]
    assert heads
    traced = op_names(heads)
    assert "add" in traced and not {"sin", "cos"} & traced, "UV embedding recomputed in a compiled head"
    for key in ("depth", "depth_conf"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qk_to_v_dtype", [False, True])
def test_rope_tables_come_in_the_dtype_q_reaches_rope_in(qk_to_v_dtype):
    model = tiny()
    attn = model.aggregator.global_blocks[0].attn
    attn.qk_to_v_dtype = qk_to_v_dtype
    x = torch.randn(1, 2 * 69, 128)
    pos = model.prepare(images(2)).extras["pos"]
    assert rope_tables(attn, x, pos)[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q_dtype = token_qkv_heads(attn, x, None)[2].dtype if qk_to_v_dtype else attn.q_norm(
            attn.qkv(x)[..., :64]).dtype
        assert rope_tables(attn, x, pos)[0].dtype == q_dtype


def test_inductor_writes_chunks_into_the_outputs_as_eager_computes_them(monkeypatch):
    """The writing forms under inductor itself (the other tests trace with the "eager" backend): a global-layer-like
    sequence in token chunks, so the compiled norm, qkv, projection and residual store into views of the outputs at
    nonzero offsets (q, k, v along dim 2, the others along dim 1), equals the eager block."""
    from spark3r.models.blocks import Block, RotaryPositionEmbedding2D, patch_positions

    block = Block(32, 2, mlp_ratio=2.0, init_values=0.5, qk_norm=True, rope=RotaryPositionEmbedding2D()).eval()
    generator = torch.Generator().manual_seed(12)
    for parameter in block.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.2
    pos = patch_positions(2, 3, 1, "cpu")  # 7 tokens per frame
    sequence = torch.randn(1, 5 * 7, 32, generator=generator)
    monkeypatch.setattr("spark3r.models.blocks.INFERENCE_TOKEN_CHUNK", 14)  # chunks of 2, 2 and 1 frames
    with torch.inference_mode():
        eager = block(sequence, pos=pos)
        compiled = compile_model(block, "inductor")(sequence, pos=pos)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
