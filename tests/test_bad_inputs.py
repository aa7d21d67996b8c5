"""Bad input gets one sentence: a table of Python-API cases (a Spark3rError) and of command cases (exit code 2 and one
`error:` line on stderr, no traceback).

The command table names commands by their console-script names; each is resolved at test time from
pyproject.toml's [project.scripts], so moving a command module does not touch the table. A row is
(command, arguments, files to create first, expected exit code, fragment of the sentence); files are made by the
`make_*` helpers below in the test's working folder.
"""
import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spark3r.errors import Spark3rError

REPO = Path(__file__).resolve().parents[1]


def console_scripts() -> dict[str, str]:
    """name -> "module:function" of pyproject.toml's [project.scripts]."""
    text = (REPO / "pyproject.toml").read_text()
    table = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)[1]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.]+:\w+)"', table, re.M))


def run_command(name: str, argv: list[str]) -> int:
    module, function = console_scripts()[name].split(":")
    try:
        return getattr(importlib.import_module(module), function)(argv)
    except SystemExit as exit:  # argparse usage errors
        return exit.code


# ---------------------------------------------------------------------------------------------------- files


def tiny_weights():
    from spark3r.models.loading import find_weights, load_state_dict
    from spark3r.models.registry import get_entry

    return load_state_dict(find_weights(get_entry("vggt-tiny")))


def make_nan_weights(folder: Path) -> None:
    state = tiny_weights()
    key = next(key for key, value in state.items() if value.is_floating_point())
    state[key] = state[key].clone().fill_(float("nan"))
    save_file(state, str(folder / "nan.safetensors"))


def make_binary_schedule(folder: Path) -> None:
    (folder / "binary.yaml").write_bytes(bytes(range(128, 256)) * 4)


def make_schedule_folder(folder: Path) -> None:
    (folder / "schedule-folder").mkdir()


def make_nan_profile(folder: Path) -> None:
    from test_search import synthetic_profile

    from spark3r.profiler.format import save_profile

    path = save_profile(synthetic_profile(), folder / "profile")
    path.write_text(path.read_text().replace("0.0,", "NaN,", 1))


def make_truncated_cache(folder: Path) -> None:
    """The per-clip cache file of synthetic:1:5 (2 frames) under prof/, cut short."""
    from spark3r.data.clips import open_clips
    from spark3r.models.registry import get_entry

    entry = get_entry("vggt-tiny")
    clip = open_clips("synthetic:1:5", preprocess=f"{entry.preprocess}:{entry.image_width}", max_frames=2,
                      frames=2)[0]
    path = folder / "prof" / "clips" / f"{clip.fingerprint()}.npz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 40)


def make_existing_file(folder: Path) -> None:
    (folder / "taken").write_text("not a folder")


def make_tiny_profile(folder: Path) -> None:
    from test_search import write_profile

    write_profile(folder)


CLI_CASES = [
    # command, arguments, files, exit code, message fragment
    ("search-schedule", ["--budget", "0"], [], 2, "not a fraction of dense FLOPs"),
    ("search-schedule", ["--budget", "0.1", "--profile", "missing.json"], [], 2, "does not exist"),
    ("search-schedule", ["--budget", "0.1", "--profile", "profile"], [make_nan_profile], 2, "holds NaN"),
    ("search-schedule", ["--budget", "0.1", "--trials", "0"], [], 2, "--trials is 0"),
    ("search-schedule", ["--budget", "0.1", "--nope"], [], 2, "unrecognized arguments"),
    ("search-schedule", ["--budget", "0.3", "--trials", "5", "--storage", "nosuch://db"], [make_tiny_profile], 2,
     "cannot open the study storage nosuch://db"),
    ("evaluate-schedule", ["--model", "vggt-tiny", "--schedule", "binary.yaml", "--clips", "synthetic:1"],
     [make_binary_schedule], 2, "is not a text file"),
    ("evaluate-schedule", ["--model", "vggt-tiny", "--schedule", "schedule-folder", "--clips", "synthetic:1"],
     [make_schedule_folder], 2, "is a folder"),
    ("evaluate-schedule", ["--model", "vggt-tiny", "--schedule", "missing.yaml", "--clips", "synthetic:1"], [], 2,
     "does not exist"),
    ("evaluate-schedule", ["--model", "banana", "--schedule", "missing.yaml", "--clips", "synthetic:1"], [], 2,
     "banana"),
    ("profile-layers", ["--model", "vggt-tiny", "--weights", "nan.safetensors", "--calib", "synthetic:1"],
     [make_nan_weights], 2, "holds NaN or Inf values"),
    ("profile-layers", ["--model", "vggt-tiny", "--calib", "synthetic:1:5", "--frames", "2", "--out", "prof"],
     [make_truncated_cache], 2, "is unreadable: delete it and rerun"),
    ("profile-layers", ["--model", "vggt-tiny", "--calib", "synthetic:1:5", "--frames", "1", "--out", "prof"], [], 2,
     "too short to profile"),
    ("profile-layers", ["--model", "vggt-tiny", "--calib", "missing-clips/"], [], 2, "missing-clips"),
    ("profile-layers", ["--model", "vggt-tiny", "--calib", "synthetic:1", "--device", "banana"], [], 2,
     "is not a device"),
    ("profile-layers", ["--model", "vggt-tiny", "--calib", "synthetic:1", "--head-dtype", "bf16"], [], 2,
     "argument --head-dtype: invalid choice: 'bf16'"),
    ("make-clips", ["synthetic:0"], [], 2, "bad clip spec"),
    # output locations, checked before any model is built or clip is made
    ("profile-layers", ["--model", "vggt-tiny", "--calib", "synthetic:1:5", "--frames", "2", "--out", "taken"],
     [make_existing_file], 2, "--out taken is a file"),
    ("search-schedule", ["--budget", "0.3", "--trials", "5", "--out", "."], [make_tiny_profile], 2,
     "--out . is a folder"),
    ("make-clips", ["synthetic:1", "--out", "taken"], [make_existing_file], 2, "--out taken is a file"),
    ("reconstruct", ["missing-video.mp4", "--model", "vggt-tiny"], [], 2, "missing-video.mp4 does not exist"),
    ("reconstruct", ["synthetic:1", "--model", "vggt-tiny", "--schedule", "nope.yaml"], [], 2,
     "--schedule nope.yaml is not a file"),
    ("reconstruct", ["clip", "--model", "vggt-tiny", "--every", "2", "--max-frames", "3"], [], 2, "not allowed with"),
]



def check_command(tmp_path, monkeypatch, capsys, command, argv, files, code, fragment):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    for make in files:
        make(tmp_path)
    capsys.readouterr()
    assert run_command(command, argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and fragment in errors[0], err


@pytest.mark.parametrize("command, argv, files, code, fragment", CLI_CASES,
                         ids=[f"{case[0]} {' '.join(case[1])}" for case in CLI_CASES])
def test_command_bad_input(tmp_path, monkeypatch, capsys, command, argv, files, code, fragment):
    check_command(tmp_path, monkeypatch, capsys, command, argv, files, code, fragment)


def test_the_table_covers_every_console_script():
    assert {case[0] for case in CLI_CASES} == set(console_scripts())


# ---------------------------------------------------------------------------------------------------- Python API


@pytest.fixture(scope="module")
def tiny():
    from spark3r import load_model

    return load_model("vggt-tiny")


def nan_weights_model(tmp_path):
    from spark3r import load_model

    make_nan_weights(tmp_path)
    return load_model("vggt-tiny", weights=tmp_path / "nan.safetensors")


def frames(**change):
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    if change.get("nan"):
        images[0, 0, 0, 0] = float("nan")
    return images * change.get("scale", 1.0)


def run_reduced(model, images):
    from spark3r import reduced

    identity = {"spark3r_schedule": 1, "model": "vggt-tiny", "global_layers": 12, "default": {"kv": {"keep": 0.5}}}
    with reduced(model, identity):
        return model(images)


API_CASES = [
    # name, call(tiny model, tmp_path), message fragment
    ("device banana", lambda model, tmp: __import__("spark3r").load_model("vggt-tiny", device="banana"),
     "is not a device"),
    ("device 7", lambda model, tmp: __import__("spark3r").load_model("vggt-tiny", device=7), "device must be"),
    ("weights 123", lambda model, tmp: __import__("spark3r").load_model("vggt-tiny", weights=123), "weights must be"),
    ("NaN weights", lambda model, tmp: nan_weights_model(tmp), "holds NaN or Inf values"),
    ("unknown model", lambda model, tmp: __import__("spark3r").load_model("banana"), "banana"),
    ("schedule None", lambda model, tmp: __import__("spark3r").apply_schedule(model, None), "a schedule is a Schedule"),
    ("schedule of binary bytes", lambda model, tmp: (make_binary_schedule(tmp), __import__("spark3r").load_schedule(
        tmp / "binary.yaml")), "is not a text file"),
    ("schedule folder", lambda model, tmp: __import__("spark3r").load_schedule(tmp), "is a folder"),
    ("[3, H, W] images", lambda model, tmp: model(frames()[0]), "images have shape [3, 112, 112]"),
    ("[3, H, W] images, reduced", lambda model, tmp: run_reduced(model, frames()[0]), "images have shape"),
    ("NaN pixels", lambda model, tmp: model(frames(nan=True)), "NaN or Inf pixels"),
    ("[0, 255] pixels", lambda model, tmp: model(frames(scale=255.0)), "divide frames in [0, 255] by 255"),
    ("[0, 255] pixels, reduced", lambda model, tmp: run_reduced(model, frames(scale=255.0)), "not in [0, 1]"),
]


@pytest.mark.parametrize("name, call, fragment", API_CASES, ids=[case[0] for case in API_CASES])
def test_api_bad_input(tiny, tmp_path, name, call, fragment):
    with torch.no_grad(), pytest.raises(Spark3rError) as error:
        call(tiny, tmp_path)
    message = str(error.value)
    assert fragment in message and "\n" not in message


def test_cuda_without_cuda_is_a_sentence():
    from spark3r import load_model

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(Spark3rError, match="asks for CUDA but none is available"):
        load_model("vggt-tiny", device="cuda")


def test_nan_profile_and_truncated_cache_are_named(tmp_path):
    from test_search import synthetic_profile

    from spark3r.profiler.format import load_profile, save_profile
    from spark3r.profiler.store import load_clip

    path = save_profile(synthetic_profile(), tmp_path / "profile")
    doc = json.loads(path.read_text())
    doc["kv"]["score"]["mean"][0][1] = float("nan")
    path.write_text(json.dumps(doc))
    with pytest.raises(Spark3rError, match="holds NaN where numbers belong"):
        load_profile(path)
    cache = tmp_path / "clips" / ("0" * 64 + ".npz")
    cache.parent.mkdir()
    buffer = tmp_path / "whole.npz"
    np.savez(buffer, meta=np.array("{}"), kv_score=np.zeros((2, 2)))
    cache.write_bytes(buffer.read_bytes()[:-30])  # cut short
    with pytest.raises(Spark3rError, match="is unreadable: delete it and rerun"):
        load_clip(tmp_path, "0" * 64, {})


def test_output_locations_are_checked_before_work(tmp_path):
    from spark3r.files import check_output_file, check_output_folder

    (tmp_path / "file").write_text("x")
    assert check_output_file(tmp_path / "new" / "deeper" / "out.yaml", "out") == tmp_path / "new/deeper/out.yaml"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert check_output_folder(tmp_path / "fresh", "out") == tmp_path / "fresh"
    for check, path, fragment in [(check_output_file, tmp_path, "is a folder"),
                                  (check_output_folder, tmp_path / "file", "is a file"),
                                  (check_output_file, tmp_path / "file" / "out.yaml", "which is a file")]:
        with pytest.raises(Spark3rError, match=fragment):
            check(path, "out")


def test_non_finite_outputs_name_the_run_that_broke():
    from spark3r.evaluate.deviation import output_deviation

    good = torch.ones(1, 2, 2, 2)
    broken = good.clone()
    broken[0, 0, 0, 0] = float("nan")
    with pytest.raises(Spark3rError, match="dense 'depth' output holds NaN or Inf values: the model's weights"):
        output_deviation({"depth": broken}, {"depth": good})
    with pytest.raises(Spark3rError, match="reduced 'depth' output .* try a milder schedule"):
        output_deviation({"depth": good}, {"depth": broken})
