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
