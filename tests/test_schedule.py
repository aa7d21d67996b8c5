"""Schedule YAML: validation sentences, exact round trip, resolution, the shipped rule schedules."""
import math
import os
from pathlib import Path

import pytest

from spark3r.commands.rule_schedule import main
from spark3r.errors import Spark3rError
from spark3r.reduce import Reduction
from spark3r.schedule import (
    Budget, KVSpec, LayerSpec, QuerySpec, Schedule, Stepped, check_model, load_schedule, paper_schedule,
    save_schedule, uniform_schedule,
)

SCHEDULES = Path(__file__).resolve().parent.parent / "schedules"

VALID = """\
spark3r_schedule: 1
model: vggt-1b
global_layers: 24
default:
  query: {merge: 2, group_frames: 20}
  kv: {keep: 0.04, method: frame_stride, keep_reference_frame: true}
layers:
  11: {kv: {keep: 0.12}}
budget: {fraction: 0.1, of: global_attention, frames: 1000}
"""


def write(tmp_path, text, name="schedule.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_schedule_loads(tmp_path):
    schedule = load_schedule(write(tmp_path, VALID))
    assert schedule.model == "vggt-1b" and schedule.global_layers == 24
    assert schedule.resolve(11, 1000) == Reduction(kv_keep=0.12, query_merge=2)
    assert schedule.resolve(0, 1000) == Reduction(kv_keep=0.04, query_merge=2)
    assert schedule.budget == Budget(0.1, "global_attention", 1000)


MALFORMED = [
    ("", "the schedule is empty"),
    ("spark3r_schedule: 1\nmodel: [vggt\n", r"not valid YAML at line"),
    ("- 1\n- 2\n", "a schedule must be a YAML mapping"),
    (VALID.replace("spark3r_schedule: 1", "spark3r_schedule: 2"), "spark3r_schedule must be 1"),
    (VALID.replace("model: vggt-1b\n", ""), r"model is missing: add it"),
    (VALID.replace("  kv: {keep: 0.04, method: frame_stride, keep_reference_frame: true}\n", ""),
     r"default\.kv is missing"),
    (VALID + "layer: {}\n", r"layer is not a known key: the top level takes"),
    (VALID.replace("keep: 0.04", "keeep: 0.04"), r"default\.kv\.keeep is not a known key"),
    (VALID.replace("keep: 0.04", "keep: a lot"), r"default\.kv\.keep must be a number, got str 'a lot'"),
    (VALID.replace("global_layers: 24", "global_layers: '24'"), r"global_layers must be an integer, got str '24'"),
    (VALID.replace("group_frames: 20", "group_frames: true"), r"default\.query\.group_frames must be an integer"),
    (VALID.replace("keep: 0.04", "keep: 1.5"), r"default\.kv\.keep must be in \(0, 1\], got 1\.5"),
    (VALID.replace("merge: 2", "merge: 0"), r"default\.query\.merge must be >= 1, got 0"),
    (VALID.replace("  11: {kv", "  30: {kv"), r"layers\.30 is beyond the model: its global layers are 0\.\.23"),
    (VALID.replace("  11: {kv", "  eleven: {kv"), r"layers key 'eleven' must be a global-layer index"),
    (VALID.replace("keep: 0.04", "keep: 0.04, frames: 40"), r"default\.kv gives both keep and frames"),
    (VALID.replace("keep: 0.04, ", ""), r"default needs kv\.keep \(a fraction\) or kv\.frames"),
    (VALID.replace("method: frame_stride", "method: stride"), r"default\.kv\.method must be one of frame_stride"),
    (VALID.replace("merge: 2", "merge: {100: 1, 300: 2}"), r"default\.query\.merge needs an 'else' entry"),
    (VALID.replace("merge: 2", "merge: {300: 2, 100: 1, else: 3}"), r"thresholds \[300, 100\] must increase"),
    (VALID.replace("model: vggt-1b", "model: vggt-1b\nmodel: pi3"), r"the key 'model' is given twice"),
    (VALID.replace("of: global_attention", "of: everything"), r"budget\.of must be one of global_attention, model"),
    (VALID.replace("keep: 0.04", "keep: 0.04, full_up_to: 100"), r"full_up_to without kv\.frames"),
    (VALID.replace("  11: {kv: {keep: 0.12}}", "  11: [1]"), r"layers\.11 must be a mapping"),
    (VALID + "predicted: {deviation: small}\n", r"predicted\.deviation must be a number"),
]


@pytest.mark.parametrize("text, sentence", MALFORMED)
def test_malformed_schedules_give_one_clear_sentence(tmp_path, text, sentence):
    path = write(tmp_path, text)
    with pytest.raises(Spark3rError, match=sentence) as error:
        load_schedule(path)
    message = str(error.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_missing_file_and_model_mismatch(tmp_path):
    with pytest.raises(Spark3rError, match="does not exist"):
        load_schedule(tmp_path / "nope.yaml")
    schedule = load_schedule(write(tmp_path, VALID))
    with pytest.raises(Spark3rError, match="made for vggt-1b, not pi3"):
        check_model(schedule, "pi3", 24)
    with pytest.raises(Spark3rError, match="24 global layers but the vggt-1b model has 18"):
        check_model(schedule, "vggt-1b", 18)
    check_model(schedule, "vggt-1b", 24)


def full_schedule():
    return Schedule(
        model="da3-giant",
        global_layers=14,
        default=LayerSpec(kv=KVSpec(frames=40, full_up_to=100, factor=2.5, method="grid", keep_reference_frame=False,
                                    seed=7),
                          query=QuerySpec(merge=Stepped(((100, 1), (300, 2)), 3), group_frames=10,
                                          similarity="input")),
        layers={3: LayerSpec(kv=KVSpec(keep=1 / 3)), 12: LayerSpec(query=QuerySpec(merge=1), kv=KVSpec(factor=1))},
        budget=Budget(0.1, "model", 1000),
        predicted={"flops_fraction": 0.0971, "deviation": 0.031},
        provenance={"sampler": "tpe", "trials": 2000, "clips": ["a", "b"], "created": "2026-01-01T00:00:00"},
    )


def test_save_load_round_trip_is_exact(tmp_path):
    schedule = full_schedule()
    path = save_schedule(schedule, tmp_path / "out" / "s.yaml", header="what it is\nMade by: a command")
    text = path.read_text()
    assert text.startswith("# what it is\n# Made by: a command\nspark3r_schedule: 1\n")
    loaded = load_schedule(path)
    assert loaded == schedule
    assert save_schedule(loaded, tmp_path / "again.yaml", header="what it is\nMade by: a command").read_text() == text
    assert sorted(os.listdir(path.parent)) == ["s.yaml"]  # atomic: no temporary left behind
    assert load_schedule(schedule.to_dict()) == schedule


def test_saving_an_invalid_schedule_is_refused(tmp_path):
    schedule = Schedule("vggt-1b", 24, LayerSpec(kv=KVSpec(keep=2.0)))
    with pytest.raises(Spark3rError, match=r"default\.kv\.keep must be in"):
        save_schedule(schedule, tmp_path / "bad.yaml")
    assert not (tmp_path / "bad.yaml").exists()


def test_override_semantics_and_resolution():
    schedule = full_schedule()
    assert schedule.layer(3).kv == KVSpec(keep=1 / 3, factor=2.5, method="grid", keep_reference_frame=False, seed=7)
    assert schedule.resolve(3, 1000).kv_keep == pytest.approx(1 / 7.5)
    assert schedule.resolve(0, 100).kv_keep == pytest.approx(1 / 2.5)  # full up to 100 frames, times the factor
    assert schedule.resolve(0, 101).kv_keep == pytest.approx(1 / (3 * 2.5))  # ceil(101 / 40) = 3
    assert schedule.resolve(12, 1000) == Reduction(kv_keep=1 / 25, kv_method="grid", keep_reference_frame=False,
                                                   query_merge=1, group_frames=10, similarity="input", seed=7)
    assert [schedule.resolve(0, s).query_merge for s in (1, 100, 101, 300, 301)] == [1, 1, 2, 2, 3]
    with pytest.raises(Spark3rError, match="layers 0..13"):
        schedule.resolve(14, 10)


def test_paper_rule_values():
    schedule = paper_schedule("vggt-1b", 24, list(range(11, 17)))
    factors = {frames: [round(1 / r.kv_keep) for r in schedule.reductions(frames)] for frames in (32, 100, 101, 1000)}
    assert factors[32] == factors[100] == [3] * 11 + [1] * 6 + [3] * 7
    assert factors[101] == [9] * 11 + [3] * 6 + [9] * 7
    assert factors[1000] == [75] * 11 + [25] * 6 + [75] * 7
    merges = [schedule.resolve(0, s).query_merge for s in (100, 300, 500, 501, 1000)]
    assert merges == [1, 2, 3, 4, 4]
    assert all(r.kv_method == "frame_stride" and r.keep_reference_frame and r.group_frames == 20
               for r in schedule.reductions(1000))


def test_uniform_rule_keeps_the_paper_mean():
    for layers, sensitive in ((24, 6), (6, 2)):
        uniform = uniform_schedule("m", layers, sensitive)
        paper = paper_schedule("m", layers, list(range(sensitive)))
        for frames in (40 * 25, 40 * 60):
            mean = sum(r.kv_keep for r in paper.reductions(frames)) / layers
            assert uniform.resolve(0, frames).kv_keep == pytest.approx(mean, rel=1e-5)


@pytest.mark.parametrize("model, layers, sensitive", [("vggt-1b", 24, range(11, 17)), ("vggt-tiny", 12, range(6, 9))])
def test_shipped_schedules_match_their_rule(model, layers, sensitive):
    paper = load_schedule(SCHEDULES / f"{model}-paper.yaml")
    uniform = load_schedule(SCHEDULES / f"{model}-uniform.yaml")
    assert paper == paper_schedule(model, layers, list(sensitive))
    assert uniform == uniform_schedule(model, layers, len(sensitive))
    for name in ("paper", "uniform"):
        header = (SCHEDULES / f"{model}-{name}.yaml").read_text().splitlines()[0]
        assert header.startswith("# ")


def test_module_command_writes_the_paper_schedule(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["--rule", "paper", "--model", "pi3", "--global-layers", "18", "--sensitive", "11-16",
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert "# Made by: python -m spark3r.commands.rule_schedule --rule paper --model pi3" in text
    assert load_schedule(out) == paper_schedule("pi3", 18, list(range(11, 17)))
    assert math.isclose(load_schedule(out).resolve(0, 1000).kv_keep, 1 / 75)
