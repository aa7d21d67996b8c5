"""benchmarks/profile_screening.py: its level-by-level comparison of a screened profile with a full one."""
from types import SimpleNamespace

import numpy as np
import pytest
from support import load_benchmark

bench = load_benchmark("profile_screening")


def profile(kv, query, resume):
    table = lambda values: {"score": SimpleNamespace(mean=np.asarray(values, dtype=float))}  # noqa: E731
    return SimpleNamespace(kv_keep=[1.0, 0.5, 0.25, 0.125], query_merge=[1, 2, 3], kv=table(kv), query=table(query),
                           options={"resume": resume}, timings={"resume": 3.0, "decode": 1.0, "wall": 5.0})


def test_levels_are_compared_layer_by_layer_and_marked_resumed_or_estimated():
    layers_kv = [[0, 1, 2, 4], [0, 2, 3, 5], [0, 3, 4, 6], [0, 4, 5, 7]]
    layers_query = [[0, 1, 2], [0, 2, 3], [0, 3, 1], [0, 4, 4]]
    full = profile(layers_kv, layers_query, "all")
    estimate_kv = [row[:2] + [row[2] * 1.5] + row[3:] for row in layers_kv]  # K/V column 2: 50% off, same order
    estimate_query = [[0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 4]]  # query column 2 of layer 2: 1 -> 4 (order changes)
    rows = bench.compare(full, profile(estimate_kv, estimate_query, "alternate"))
    assert [(row["kind"], row["level"], row["resumed"]) for row in rows] == [
        ("kv", 0.5, True), ("kv", 0.25, False), ("kv", 0.125, True), ("query", 2, True), ("query", 3, True)]
    kv_estimated = rows[1]
    assert kv_estimated["spearman"] == pytest.approx(1.0) and kv_estimated["max_rel_diff"] == pytest.approx(0.5)
    query_strongest = rows[4]
    # layers' values 2, 3, 1, 4 against 2, 3, 4, 4: ranks (2, 3, 1, 4) vs (1, 2, 3.5, 3.5)
    assert query_strongest["spearman"] == pytest.approx(np.corrcoef([2, 3, 1, 4], [1, 2, 3.5, 3.5])[0, 1])
    assert query_strongest["max_rel_diff"] == pytest.approx(3.0)
    assert bench.seconds(full) == 4.0


def test_markdown_has_one_table_per_screen_with_its_own_seconds():
    row = {"kind": "kv", "level": 0.5, "resumed": False, "spearman": 0.98, "median_rel_diff": 0.1, "max_rel_diff": 0.2}
    result = {"command": "c", "commit": "x", "device_name": "d", "torch": "t", "created": "now", "model": "m",
              "frames": 4, "profile_command": "p", "all_s": 10.0, "all_wall_s": 12.0,
              "screens": [{"resume": "alternate", "rows": [{**row, "resumed": True, "spearman": 1.0}],
                           "seconds": 6.0, "wall_s": 8.0},
                          {"resume": "strongest", "rows": [row], "seconds": 2.5, "wall_s": 4.0}]}
    text = bench.markdown(result)
    alternate, strongest = text.split("## --resume-levels alternate")[1].split("## --resume-levels strongest")
    assert "Resumed 1 of 1" in alternate and "6.0 s screened (0.60 of it)" in alternate and ", met)" in alternate
    assert "Resumed 0 of 1" in strongest and "2.5 s screened (0.25 of it)" in strongest and "not met" in strongest


def test_a_full_profile_differs_from_a_screened_one_in_what_it_profiled_not_in_how():
    def made(frames=4, resume="all", **options):
        return SimpleNamespace(model="vggt-tiny", frames=frames, kv_keep=[1.0, 0.5], query_merge=[1, 2],
                               clips=[{"name": "synthetic-0"}], options={"resume": resume, "seed": 0, **options})
    assert bench.differing(made(), made(resume="strongest")) is None
    assert bench.differing(made(), made(frames=8)) == "frames"
    assert bench.differing(made(), made(seed=1)) == "options['seed']"
    assert bench.differing(made(), made(dtype="bf16")) == "options['dtype']"


PROFILE = ["--model", "vggt-tiny", "--weights", "none", "--calib", "synthetic:1", "--frames", "2"]
SMALL = ["--kv-keep", "0.5", "--query-merge", "2", "--device", "cpu", "--dtype", "fp32"]


def test_full_reuses_an_earlier_run_and_refuses_one_of_other_options(tmp_path, capsys):
    from spark3r.commands import profile_layers
    full = tmp_path / "full"
    assert profile_layers.main([*PROFILE, *SMALL, "--additivity", "0", "--out", str(full)]) == 0
    result = bench.main([*PROFILE, "--screens", "strongest", "--full", str(full), "--out", str(tmp_path / "s.json"),
                         "--", *SMALL])
    assert result["full_from"]["path"] == str(full)
    assert result["all_wall_s"] == bench.load_profile(full).timings["wall"]
    assert "an earlier one" in (tmp_path / "s.md").read_text()
    with pytest.raises(SystemExit) as stop:
        bench.main([*PROFILE, "--screens", "strongest", "--full", str(full), "--out", str(tmp_path / "t.json"),
                    "--", *SMALL, "--seed", "1"])
    assert stop.value.code == 2 and "profiled another options['seed']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        bench.main([*PROFILE, "--full", str(tmp_path / "missing"), "--out", str(tmp_path / "u.json")])
    assert stop.value.code == 2 and "does not exist" in capsys.readouterr().err
