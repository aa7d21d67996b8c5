"""benchmarks/tiny_long.py: the long-clip tiny model's report is the one its result files make."""
from __future__ import annotations

from support import load_benchmark

bench = load_benchmark("tiny_long")


def test_report_is_regenerated_from_its_result_files():
    assert (bench.RESULTS / "train-vggt-tiny-long.md").read_text() == bench.report()


def test_held_out_lines_of_a_training_log(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("step 100/100000  lr 3.00e-04  loss 1.0864\n"
                   "eval step 500: depth abs_rel 0.099 delta 0.950 | rot 37.61 deg (frame-only 93.44) | trans 0.268 "
                   "(frame-only 0.718) | auc30 0.148 [synthetic:16:999:walk, 256 frames]\n")
    assert bench.held_out_evals(log) == [{"step": 500, "rotation_deg": 37.61, "translation": 0.268, "auc30": 0.148}]


def test_step_rates_of_a_training_log(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("step 100/100000  lr 3.00e-04  loss 0.8826 (camera 0.0765 depth 0.0745 points 0.4258)  0.4 steps/s  "
                   "3.9 min\neval step 100: depth abs_rel 0.1 delta 0.9 | rot 1.00 deg (frame-only 2.00) | trans 0.1 "
                   "(frame-only 0.2) | auc30 0.5 [synthetic:1:999, 8 frames]\n"
                   "step 200/100000  lr 1.85e-04  loss 1.0163 (camera 0.0863 depth 0.0940 points 0.4909)  3.3 steps/s  "
                   "4.4 min\n")
    assert bench.step_rates(log) == [(100, 0.4, 3.9), (200, 3.3, 4.4)]


def report_of(rows: dict[int, tuple[float, float, float, float]]) -> dict:
    """An evaluation report whose model has (rotation, ATE, AUC@30) and frame-only ATE per length."""
    return {"lengths": {str(frames): {"results": {
        "model": {"rotation_deg": rotation, "ate": ate, "auc30": auc},
        "frame_only": {"rotation_deg": 90.0, "ate": frame_only, "auc30": 0.0}}}
        for frames, (rotation, ate, auc, frame_only) in rows.items()}}


def test_worse_than_names_every_metric_that_moved_the_wrong_way():
    old = report_of({8: (2.0, 0.010, 0.40, 0.030), 256: (40.0, 0.250, 0.12, 0.300)})
    new = report_of({8: (1.5, 0.012, 0.40, 0.030), 256: (20.0, 0.200, 0.10, 0.300)})
    # 8: rotation better, ATE worse (and so frame-only / model ATE 3.00 -> 2.50), AUC equal; 256: AUC worse, the
    # ratio 1.20 -> 1.50 better
    assert bench.worse_than(new, old) == ["ATE at 8 (0.010 -> 0.012)", "AUC@30 at 256 (0.120 -> 0.100)",
                                          "frame-only / model ATE at 8 (3.00 -> 2.50)"]
    assert bench.worse_than(old, old) == []


def profile_of(kv: list[float], query: list[float]) -> dict:
    """A one-factor (2x) profile of len(kv) layers: K/V keep 1/2 and query merge 2 scores per layer."""
    layers = len(kv)
    query_mean, kv_mean = sum(query) / layers, sum(kv) / layers
    return {"clips": [0], "frames": 256, "global_layers": layers,
            "levels": {"kv_keep": [1.0, 0.5], "query_merge": [1, 2]},
            "kv": {"score": {"mean": [[0.0, value] for value in kv]}},
            "query": {"score": {"mean": [[0.0, value] for value in query]}},
            "asymmetry": {"factors": [2], "query_mean": [query_mean], "kv_mean": [kv_mean],
                          "query_over_kv": [query_mean / kv_mean],
                          "layers_query_worse": [sum(q > k for q, k in zip(query, kv))]}}


def test_asymmetry_says_when_most_layers_show_it_but_the_mean_does_not():
    # layers 0-2: queries cost more (0.2 > 0.1); layer 3: K/V pruning costs 1.0 against 0.1, so the mean ratio is
    # (0.2 * 3 + 0.1) / (0.1 * 3 + 1.0) = 0.7 / 1.3 = 0.54
    text = bench.asymmetry(profile_of([0.1, 0.1, 0.1, 1.0], [0.2, 0.2, 0.2, 0.1]))[-1]
    assert "costs 0.54x of what pruning K/V" in text and "more in 3 of 4 layers: most layers show" in text
    assert "(layer 3 at 2x) outweigh them in the mean." in text
    text = bench.asymmetry(profile_of([0.1, 0.1, 0.1, 1.0], [0.2, 0.05, 0.05, 0.1]))[-1]  # 1 of 4: no more said
    assert text.endswith("more in 1 of 4 layers.")
    assert "holds here" in bench.asymmetry(profile_of([0.1, 0.1], [0.2, 0.3]))[-1]
