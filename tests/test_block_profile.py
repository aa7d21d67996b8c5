"""benchmarks/block_profile.py: kernel classes of real kernel names, their shares by hand, the committed tables
regenerated from their result file, and a CPU smoke run."""
import json

import pytest
import torch
from support import BENCHMARKS, load_benchmark

profile = load_benchmark("block_profile")


@pytest.mark.parametrize("name, expected", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x", "attention"),
    ("sm90_xmma_fprop_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc_nhwc_tilesize256x128x32_warpgrou", "convolution"),
    ("sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x32_warpgroupsize1x1x1_execute_segme", "matrix product"),
    ("nvjet_sm90_tst_256x152_64x4_1x2_h_bz_coopA_bias_TNT", "matrix product"),
    ("triton_poi_fused__to_copy_add_arange_cos_div_mul_native_layer_norm_permute_pow_reciprocal_",
     "normalisation (+ fused RoPE)"),
    ("void at::native::(anonymous namespace)::upsample_bilinear2d_nhwc_out_frame<float, float>(f", "upsampling"),
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native:",
     "other (elementwise, copies)"),
    ("Memcpy DtoD (Device -> Device)", "other (elementwise, copies)"),
    # inductor's fused pointwise kernels are named after every op they fuse, a convolution's bias and ReLU included
    ("triton_poi_fused__to_copy__unsafe_index_add_arange_clamp_clone_convolution_mul_relu_sub_vi", "upsampling"),
    ("triton_poi_fused_add_clone_convolution_relu_33", "other (elementwise, copies)"),
    ("triton_red_fused__to_copy_native_layer_norm_permute_view_1", "normalisation (+ fused RoPE)"),
])
def test_kernel_names_fall_in_their_class(name, expected):
    assert profile.kernel_class(name) == expected


def test_shares_skip_op_rows_and_count_a_compiled_kernel_once():
    rows = [{"name": "aten::addmm", "calls": 4, "ms": 30.0},  # repeats the gemm below
            {"name": "nvjet_sm90_tst_256x128", "calls": 4, "ms": 30.0},
            {"name": "triton_poi_fused_gelu_view_3", "calls": 2, "ms": 10.0},
            {"name": "triton_poi_fused_gelu_view_3", "calls": 2, "ms": 10.0},  # its launch, the same time
            {"name": "upsample_bilinear2d_out_frame", "calls": 1, "ms": 20.0},
            {"name": "Command Buffer Full", "calls": 9, "ms": 50.0}]  # the host waiting, not a kernel
    shares = profile.kernel_shares(rows)
    assert shares["matrix product"] == pytest.approx(30 / 60)
    assert shares["other (elementwise, copies)"] == pytest.approx(10 / 60)
    assert shares["upsampling"] == pytest.approx(20 / 60)
    assert sum(shares.values()) == pytest.approx(1.0)


def test_committed_tables_are_their_result_files_regenerated():
    files = sorted((BENCHMARKS / "results").glob("block-profile-*.json"))
    assert files
    for path in files:
        assert path.with_suffix(".md").read_text() == profile.markdown(json.loads(path.read_text())), path


def test_a_cpu_smoke_run_writes_its_tables(tmp_path, one_thread):
    out = tmp_path / "block-profile.json"
    profile.main(["--model", "vggt-tiny", "--frames", "4", "--head-frames", "2", "--repeats", "1", "--skip-noise",
                  "--skip-compile", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["kernels"]) == {"frame block", "global block", "heads"}
    assert {"heads, shipped", "heads, compute dtype", "heads, cuDNN autotuned"} <= set(result["times_s"])
    # no cuDNN on the CPU: the same kernels, the same outputs; the flag is restored after
    assert result["autotuned heads vs shipped"] == {key: 0.0 for key in profile.OUTPUTS}
    assert torch.backends.cudnn.benchmark is False
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# Block profile: vggt-tiny, 4 frames") and "heads (2 frames, fp32)" in text


def test_a_model_with_encoder_blocks_gets_an_encoder_table(tmp_path, monkeypatch, one_thread):
    """VGGT-1B's DINOv2 has 24 blocks; vggt-tiny with one added stands in for it on the CPU."""
    from spark3r.models.blocks import Block
    from spark3r.models.registry import build_model

    def with_encoder_block(name, device):
        model = build_model(name, device)
        model.aggregator.patch_embed.blocks.append(Block(model.config.embed_dim, model.config.num_heads).to(device))
        return model

    monkeypatch.setattr(profile, "build_model", with_encoder_block)
    out = tmp_path / "block-profile.json"
    profile.main(["--model", "vggt-tiny", "--frames", "4", "--head-frames", "2", "--repeats", "1", "--skip-noise",
                  "--skip-compile", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert list(result["kernels"]) == ["encoder block", "frame block", "global block", "heads"]
    assert result["kernels"]["encoder block"] and result["times_s"]["encoder block, shipped"] > 0


def test_noise_rows_compare_bf16_and_bf16_heads_with_fp32(one_thread):
    row = profile.noise("vggt-tiny", 2, "cpu", compiled=False)
    for key in profile.OUTPUTS:
        trunk, heads = row[f"bf16 vs fp32 {key}"], row[f"bf16 with bf16 heads vs fp32 {key}"]
        assert 0 < trunk < 0.1 and 0 < heads < 0.1
    # the heads in bf16 move depth and points further from fp32; the camera head stays fp32 in both
    assert row["bf16 with bf16 heads vs fp32 depth"] > row["bf16 vs fp32 depth"]
    assert row["bf16 with bf16 heads vs fp32 pose_enc"] == row["bf16 vs fp32 pose_enc"]


def test_a_da3_model_runs_its_own_blocks(tmp_path, one_thread):
    """DA3's DINOv2 blocks: the encoder blocks before the first pair, an even block from alt_start on as the frame
    block (local RoPE), an odd one as the global block; the heads at the model's default size."""
    out = tmp_path / "block-profile.json"
    profile.main(["--model", "da3-tiny", "--frames", "4", "--head-frames", "2", "--repeats", "1", "--skip-noise",
                  "--skip-compile", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert list(result["kernels"]) == ["encoder block", "frame block", "global block", "heads"]
    from spark3r.models.registry import build_model
    model = build_model("da3-tiny", "cpu")
    parts = profile.model_parts(model, 4, "cpu")
    blocks = list(model.vit.blocks)
    config = model.config
    assert blocks.index(parts.frame_block) == 4 and [blocks.index(b) for b in parts.global_blocks] == [3, 5, 7, 9]
    assert len(parts.encoder_blocks) == config.global_blocks[0] - 1 and parts.image_size == config.default_size
    assert parts.tokens.shape == (4, 1 + (42 // 14) * (56 // 14), config.embed_dim)


def test_a_kernel_table_profiles_the_second_call_only():
    """The first call autotunes Triton kernels and loads modules (1149 autotuning launches of the merge kernel filled
    an eager global block's table before this): it runs unprofiled."""
    calls = []
    a = torch.randn(8, 8)

    def fn():
        calls.append(1)
        return a @ a

    rows = profile.kernel_table(torch.device("cpu"), fn)
    assert len(calls) == 2
    assert next(row["calls"] for row in rows if row["name"] == "aten::mm") == 1
