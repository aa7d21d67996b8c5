"""Checkpoint reading, strict loading, the Hugging Face cache lookup, the registry and load_model."""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import spark3r
from spark3r.errors import Spark3rError
from spark3r.models import registry
from spark3r.models.loading import find_in_hf_cache, load_state_dict
from spark3r.models.registry import ModelEntry, build_model, register, resolve_model_name
from spark3r.models.vggt import VGGT, VGGT_TINY

IMAGES = torch.rand(1, 2, 3, 28, 42, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(5)
    model = build_model("vggt-tiny").eval()
    with torch.no_grad():
        depth = model(IMAGES)["depth"]
    return {k: v.clone() for k, v in model.state_dict().items()}, depth


@pytest.fixture
def hf_repo_entry():
    """A temporary registry entry whose official weights live in a (fake) HF cache repo."""
    entry = register(ModelEntry(name="test-tiny-hf", family="vggt", builder=lambda: VGGT(VGGT_TINY), image_width=112,
                                preprocess="vggt", hf_repo="test-org/Tiny", hf_files=("model.safetensors", "model.pt"),
                                drop_prefixes=("track_head.",)))
    yield entry
    del registry._ENTRIES[entry.name]


def depth_of(model):
    with torch.no_grad():
        return model(IMAGES)["depth"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_through_a_file_and_a_folder(tmp_path, tiny_state, suffix):
    state, depth = tiny_state
    path = tmp_path / f"tiny{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    for weights in (path, tmp_path):
        model = spark3r.load_model("vggt-tiny", weights=weights)
        assert not model.training
        assert torch.equal(depth_of(model), depth)


def test_pt_checkpoint_nested_under_model_key(tmp_path, tiny_state):
    state, depth = tiny_state
    torch.save({"model": state, "epoch": 3}, tmp_path / "checkpoint.pt")
    assert torch.equal(depth_of(spark3r.load_model("vggt-tiny", weights=tmp_path / "checkpoint.pt")), depth)


def test_strict_load_names_missing_unexpected_and_mis_shaped_keys(tmp_path, tiny_state):
    state = dict(tiny_state[0])
    del state["depth_head.norm.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["point_head.norm.weight"] = torch.zeros(7)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(Spark3rError) as error:
        spark3r.load_model("vggt-tiny", weights=tmp_path / "bad.safetensors")
    message = str(error.value)
    assert "1 missing keys ('depth_head.norm.bias')" in message
    assert "1 unexpected keys ('extra.weight')" in message
    assert "1 shape mismatches ('point_head.norm.weight': checkpoint [7], model [256])" in message
    assert "\n" not in message


def test_checkpoint_of_another_model_is_refused(tmp_path, tiny_state):
    save_file(tiny_state[0], tmp_path / "tiny.safetensors")
    with pytest.raises(Spark3rError, match="does not fit vggt-1b: .*missing keys.*shape mismatches"):
        spark3r.load_model("vggt-1b", weights=tmp_path / "tiny.safetensors")


def test_missing_and_unreadable_weights_give_one_sentence(tmp_path):
    with pytest.raises(Spark3rError, match="does not exist"):
        spark3r.load_model("vggt-tiny", weights=tmp_path / "nope.safetensors")
    (tmp_path / "a.pt").write_bytes(b"")
    (tmp_path / "b.pt").write_bytes(b"")
    with pytest.raises(Spark3rError, match="exactly one weights file"):
        load_state_dict(tmp_path)
    with pytest.raises(Spark3rError, match="could not read"):
        load_state_dict(tmp_path / "a.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module, not a state_dict
    with pytest.raises(Spark3rError, match="pickled objects"):
        load_state_dict(tmp_path / "module.pt")


def make_hf_cache(root, repo_id, files, revision="abc123", main=True):
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, state in files.items():
        save_file(state, snapshot / name)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_find_in_hf_cache_reads_the_cache_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    hub = tmp_path / "home" / "hub"
    assert find_in_hf_cache("org/Model", ("model.safetensors",)) is None
    old = make_hf_cache(hub, "org/Model", {"model.pt": {"x": torch.zeros(1)}}, revision="old", main=False)
    new = make_hf_cache(hub, "org/Model", {"model.safetensors": {"x": torch.zeros(1)}}, revision="new")
    assert find_in_hf_cache("org/Model", ("model.safetensors", "model.pt")) == new / "model.safetensors"
    assert find_in_hf_cache("org/Model", ("model.pt",)) == old / "model.pt"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert find_in_hf_cache("org/Model", ("model.safetensors",)) is None


def test_auto_weights_come_from_the_hf_cache_and_drop_reported_keys(tmp_path, monkeypatch, capsys, tiny_state,
                                                                     hf_repo_entry):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    state, depth = tiny_state
    with_track = {**state, "track_head.a": torch.zeros(2), "track_head.b": torch.zeros(3)}
    make_hf_cache(tmp_path, "test-org/Tiny", {"model.safetensors": with_track})
    model = spark3r.load_model("test-tiny-hf")
    assert torch.equal(depth_of(model), depth)
    assert "dropped 2 checkpoint keys under 'track_head.'" in capsys.readouterr().err


def test_auto_weights_missing_says_how_to_pass_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(Spark3rError, match="no weights for vggt-1b found.*--weights PATH.*--weights none"):
        spark3r.load_model("vggt-1b")


def test_random_weights_are_seeded():
    first = spark3r.load_model("vggt-tiny", weights=None, seed=0)
    again = spark3r.load_model("vggt-tiny", weights="none", seed=0)
    other = spark3r.load_model("vggt-tiny", weights=None, seed=1)
    assert torch.equal(depth_of(first), depth_of(again))
    assert not torch.equal(depth_of(first), depth_of(other))
    assert spark3r.load_model("vggt-tiny", weights=None, dtype=torch.bfloat16).compute_dtype == torch.bfloat16
    with pytest.raises(Spark3rError, match="dtype"):
        spark3r.load_model("vggt-tiny", weights=None, dtype=torch.int8)


def test_registry_aliases_unknown_names_and_duplicates(capsys):
    assert resolve_model_name("vggt") == "vggt-1b"
    assert "'vggt' is 'vggt-1b'" in capsys.readouterr().err
    with pytest.raises(Spark3rError, match="unknown model 'vggt-2b': use one of .*vggt-1b.*vggt-tiny"):
        resolve_model_name("vggt-2b")
    with pytest.raises(Spark3rError, match="already registered"):
        register(ModelEntry(name="vggt-tiny", family="vggt", builder=lambda: None, image_width=1, preprocess="x"))
    entry = registry.get_entry("vggt-1b")
    assert (entry.hf_repo, entry.preprocess, entry.image_width) == ("facebook/VGGT-1B", "vggt", 518)


def test_build_on_meta_allocates_nothing():
    model = build_model("vggt-1b", device="meta")
    assert all(p.is_meta for p in model.parameters())


def test_a_description_that_counts_blocks_or_parameters_counts_them_right():
    """The registry's one-line descriptions (shown to users) stay true to the built models: "12 + 12 blocks" is the
    trunk's depth in frame + cross-frame blocks (the config's `depth` each) and "7.7 M parameters" the parameter count
    to one decimal."""
    import re

    from spark3r.models.registry import build_model, get_entry, model_names

    checked = 0
    for name in model_names():
        description = get_entry(name).description
        blocks = re.search(r"(\d+) \+ (\d+) blocks", description)
        parameters = re.search(r"(\d+(?:\.\d+)?) M parameters", description)
        if not (blocks or parameters):
            continue
        model = build_model(name, "meta")
        if blocks:
            assert int(blocks[1]) == int(blocks[2]) == model.config.depth, (name, description)
        if parameters:
            count = sum(p.numel() for p in model.parameters()) / 1e6
            assert float(parameters[1]) == round(count, 1), (name, description, count)
        checked += 1
    assert checked >= 2  # vggt-tiny and vggt-omega-tiny at least
