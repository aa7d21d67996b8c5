"""The FLOP model against hand counts."""
import math
from pathlib import Path

import pytest

from spark3r.errors import Spark3rError
from spark3r.models.base import BlockGroup, FlopConfig
from spark3r.reduce import (
    Reduction, global_attention_fraction, layer_attention_flops, layer_overhead_flops, model_flops, model_fraction,
)
from spark3r.schedule import load_schedule, paper_schedule

SCHEDULES = Path(__file__).resolve().parent.parent / "schedules"

# C = 8, P = 6 (2 special + 2 x 2 patches); per-token linear: 8 C^2 + 2 * 2 * C * 32 = 512 + 1024 = 1536.
SMALL = FlopConfig(
    layout_n_special=2,
    tokens_per_frame=6,
    groups=(
        BlockGroup("encoder", 2, 8, 32, "frame", 7),
        BlockGroup("frame", 3, 8, 32, "frame", 6),
        BlockGroup("global", 3, 8, 32, "global", 6),
        BlockGroup("camera", 2, 16, 48, "camera", 1, mlp_matrices=3),
    ),
    other_flops_per_frame=1000.0,
    patch_grid=(2, 2),
)


def test_dense_counts_equal_hand_counts():
    frames = 4
    flops = model_flops(SMALL, frames)
    encoder_linear = 2 * (4 * 7) * 1536
    frame_linear = 3 * (4 * 6) * 1536
    global_linear = 3 * (4 * 6) * 1536
    camera_linear = 2 * 4 * (8 * 16 * 16 + 2 * 3 * 16 * 48)
    assert flops.linear == encoder_linear + frame_linear + global_linear + camera_linear
    assert flops.frame_attention == 2 * 4 * (4 * 8 * 7 * 7) + 3 * 4 * (4 * 8 * 6 * 6)
    assert flops.global_attention == 3 * 4 * 8 * 24 * 24
    assert flops.other_attention == 2 * 4 * 16 * 4 * 4
    assert flops.other == 4000.0 and flops.overhead == 0.0
    assert flops.groups["encoder"] == encoder_linear + 2 * 4 * (4 * 8 * 49)
    assert flops.total == pytest.approx(sum(flops.groups.values()) + flops.other)


def test_reduced_counts_equal_hand_counts():
    frames = 4
    stride = Reduction(kv_keep=0.5)  # frames 0 and 2 whole, specials of all: n_kv = 4 * 2 + 2 * 4 = 16
    assert layer_attention_flops(SMALL, frames, stride) == 4 * 8 * 24 * 16
    assert layer_attention_flops(SMALL, frames) == 4 * 8 * 24 * 24
    # one group of 4 frames, 2 x 2 cells: destinations 6 + 3 * (2 + 1) = 15, sources 9; target ceil(24 / 2) = 12,
    # so all 9 sources merge: n_q = 15.
    merge = Reduction(query_merge=2, group_frames=4)
    assert layer_attention_flops(SMALL, frames, merge) == 4 * 8 * 15 * 24
    # key metric 8 * 24, normalising 3 * 64 * 24, similarities 2 * 64 * 9 * 15, means 8 * (24 + 15)
    assert layer_overhead_flops(SMALL, frames, merge) == 8 * 24 + 3 * 64 * 24 + 2 * 64 * 9 * 15 + 8 * (24 + 15)
    key_norm = Reduction(kv_keep=0.5, kv_method="key_norm")  # norms of every patch token: 2 * C * 16
    assert layer_overhead_flops(SMALL, frames, key_norm) == 2 * 8 * 16
    schedule = [stride, merge, None]
    reduced = model_flops(SMALL, frames, schedule)
    dense = model_flops(SMALL, frames)
    assert reduced.global_attention == 4 * 8 * 24 * 16 + 4 * 8 * 15 * 24 + 4 * 8 * 24 * 24
    # the merging layer projects its 15 merged outputs, not the 24 tokens: 2 C^2 (24 - 15) fewer FLOPs
    assert reduced.linear == dense.linear - 2 * 8**2 * (24 - 15)
    assert reduced.frame_attention == dense.frame_attention
    assert global_attention_fraction(SMALL, frames, schedule) == reduced.global_attention / dense.global_attention
    assert model_fraction(SMALL, frames, schedule) == reduced.total / dense.total
    with pytest.raises(Spark3rError, match="2 global layers but the model has 3"):
        model_flops(SMALL, frames, [None, None])


def vggt_1b_config():
    """VGGT-1B at 518 x 518 written out by hand: 24 encoder + 24 frame + 24 global blocks, C 1024, P 1374."""
    return FlopConfig(5, 1374, (
        BlockGroup("aggregator.patch_embed.blocks", 24, 1024, 4096, "frame", 1374),
        BlockGroup("aggregator.frame_blocks", 24, 1024, 4096, "frame", 1374),
        BlockGroup("aggregator.global_blocks", 24, 1024, 4096, "global", 1374),
    ), 0.0, (37, 37))


def test_vggt_1b_matches_the_architecture_spec():
    config = vggt_1b_config()
    assert layer_attention_flops(config, 10) / 100 == pytest.approx(7.73e9, rel=1e-3)  # 7.73 S^2 GFLOP per layer
    one, two = model_flops(config, 1).total, model_flops(config, 2).total
    quadratic = (two - 2 * one) / 2
    assert quadratic == pytest.approx(185.6e9, rel=1e-3) and one - quadratic == pytest.approx(2861e9, rel=1e-3)
    assert model_flops(config, 32).global_attention / model_flops(config, 32).total == pytest.approx(0.67, abs=0.01)


def test_shipped_uniform_schedule_has_comparable_flops():
    config = vggt_1b_config()
    paper = load_schedule(SCHEDULES / "vggt-1b-paper.yaml")
    uniform = load_schedule(SCHEDULES / "vggt-1b-uniform.yaml")
    for frames in (32, 300, 1000):
        ratio = global_attention_fraction(config, frames, uniform) / global_attention_fraction(config, frames, paper)
        assert ratio == pytest.approx(1.0, abs=0.03)
    assert global_attention_fraction(config, 1000, paper) < 0.01
    assert model_fraction(config, 1000, paper) < model_fraction(config, 100, paper) < 1


def test_vggt_tiny_flop_config_runs():
    import torch

    from spark3r.models.vggt import VGGT, VGGT_TINY

    with torch.device("meta"):
        model = VGGT(VGGT_TINY)
    config = model.flop_config(112, 112)
    schedule = paper_schedule("vggt-tiny", 12, [6, 7, 8])
    fraction = model_fraction(config, 8, schedule)
    assert 0 < fraction < 1 and math.isfinite(fraction)
