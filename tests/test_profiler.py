"""profile-layers: aggregation, resume files, sharding, the measurement engine and the CLI."""
from __future__ import annotations

import numpy as np
import pytest

from spark3r.errors import Spark3rError
from spark3r.profiler.aggregate import asymmetry_summary, predicted_sum, spearman, summarize
from spark3r.profiler.distributed import Ranks, shard
from spark3r.profiler.store import ClipResult, load_clip, save_clip


def test_summarize_matches_textbook_formulas():
    per_clip = np.array([[[0.0, 1.0]], [[0.0, 2.0]], [[0.0, 6.0]]])  # 3 clips, 1 layer, 2 levels
    table = summarize(per_clip)
    assert table.mean.tolist() == [[0.0, 3.0]]
    std = np.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    np.testing.assert_allclose(table.std, [[0.0, std]])
    np.testing.assert_allclose(table.ci95, [[0.0, 4.302652729911275 * std / np.sqrt(3)]])  # t(0.975, df=2)
    single = summarize(per_clip[:1])
    assert single.std.tolist() == [[0.0, 0.0]] and single.ci95.tolist() == [[0.0, 0.0]]


def test_spearman_and_predicted_sum():
    assert spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    kv = np.array([[0.0, 1.0, 2.0], [0.0, 10.0, 20.0]])      # 2 layers x 3 kv levels
    query = np.array([[0.0, 100.0], [0.0, 1000.0]])          # 2 layers x 2 query levels
    total = predicted_sum(kv, query, np.array([[2, 1], [0, 0]]), np.array([[0, 1], [1, 0]]))
    assert total.tolist() == [2 + 10 + 1000, 100]


def test_asymmetry_compares_equal_reduction():
    kv_keep, query_merge = [1.0, 0.5, 0.25], [1, 2, 3, 4, 8]
    kv = np.array([[0.0, 1.0, 3.0], [0.0, 3.0, 5.0]])
    query = np.array([[0.0, 4.0, 5.0, 6.0, 9.0], [0.0, 2.0, 5.0, 2.0, 9.0]])
    summary = asymmetry_summary(kv, kv_keep, query, query_merge)
    assert summary["factors"] == [2, 3, 4]  # merge 8 needs keep 1/8, beyond the measured K/V range
    kv_at_third = 1.0 + (np.log(1 / 3) - np.log(0.5)) / (np.log(0.25) - np.log(0.5)) * 2.0  # layer 0, log-linear
    np.testing.assert_allclose(summary["kv_mean"], [2.0, (kv_at_third + kv_at_third + 2.0) / 2, 4.0])
    np.testing.assert_allclose(summary["query_mean"], [3.0, 5.0, 4.0])
    assert summary["layers_query_worse"] == [1, 2, 1]


def test_shard_covers_every_clip_once():
    clips = list(range(7))
    parts = [shard(clips, Ranks(rank, 3)) for rank in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]


def test_clip_file_round_trip_and_option_mismatch(tmp_path):
    options = {"kv_keep": (1.0, 0.5), "score_weights": {"depth": 1.0}}
    result = ClipResult("synthetic-0", "ab" * 32, 4, {"kv_score": np.arange(6.0).reshape(3, 2)}, {"dense": 0.5})
    save_clip(result, tmp_path, options)
    assert load_clip(tmp_path, "cd" * 32, options) is None
    loaded = load_clip(tmp_path, "ab" * 32, options)
    assert loaded.name == "synthetic-0" and loaded.frames == 4 and loaded.timings == {"dense": 0.5}
    np.testing.assert_array_equal(loaded.arrays["kv_score"], result.arrays["kv_score"])
    with pytest.raises(Spark3rError, match=r"other options \(kv_keep differ\).*new --out"):
        load_clip(tmp_path, "ab" * 32, {**options, "kv_keep": (1.0, 0.25)})
