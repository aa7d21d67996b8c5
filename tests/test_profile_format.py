"""The profile file format: round trip and one clear error per kind of bad file."""
import json
import re

import numpy as np
import pytest

from spark3r.errors import Spark3rError
from spark3r.profiler.format import MetricTable, Profile, load_profile, save_profile

LAYERS = 3
KV_KEEP = [1.0, 0.5, 0.25]
QUERY_MERGE = [1, 2, 4]


def make_profile() -> Profile:
    rng = np.random.default_rng(0)

    def tables(n_levels):
        out = {}
        for metric in ("depth", "score"):
            mean = np.sort(rng.random((LAYERS, n_levels)), axis=1)
            mean[:, 0] = 0.0
            out[metric] = MetricTable(mean=mean, std=mean / 2, ci95=mean / 3)
        return out

    return Profile(model="vggt-tiny", global_layers=LAYERS, frames=8, image_hw=(112, 112),
                   layout={"n_special": 5, "grid_h": 8, "grid_w": 8},
                   clips=[{"name": "synthetic-0", "sha256": "ab" * 32, "frames": 8}],
                   options={"kv_method": "frame_stride"}, kv_keep=KV_KEEP, query_merge=QUERY_MERGE,
                   metrics=["depth", "score"], kv=tables(len(KV_KEEP)), query=tables(len(QUERY_MERGE)))


def test_round_trip(tmp_path):
    profile = make_profile()
    path = save_profile(profile, tmp_path / "p", raw={"kv_depth": np.ones((2, LAYERS, 3))})
    loaded = load_profile(path)
    assert loaded.model == "vggt-tiny" and loaded.kv_keep == KV_KEEP and loaded.query_merge == QUERY_MERGE
    np.testing.assert_array_equal(loaded.kv["score"].mean, profile.kv["score"].mean)
    np.testing.assert_array_equal(loaded.query["depth"].ci95, profile.query["depth"].ci95)
    assert loaded.frame_layout.tokens_per_frame == 69
    assert len(loaded.sha256) == 64 and loaded.sha256 == profile.sha256
    assert loaded.versions["spark3r"] and loaded.created
    assert load_profile(tmp_path / "p").sha256 == loaded.sha256  # folder works too
    assert np.load(tmp_path / "p" / "profile.npz")["kv_depth"].shape == (2, LAYERS, 3)
    assert not [p for p in (tmp_path / "p").iterdir() if p.name.startswith(".")]  # no temp files left


def _write(tmp_path, doc):
    path = tmp_path / "profile.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _doc():
    return make_profile().to_dict()


def _set(doc, dotted, value):
    *parents, last = dotted.split(".")
    for key in parents:
        doc = doc[key]
    if value is KeyError:
        del doc[last]
    else:
        doc[last] = value


@pytest.mark.parametrize("edit, message", [
    (("spark3r_profile", 2), "version 2"),
    (("kv", KeyError), "lacks the key(s) kv"),
    (("levels.kv_keep", KeyError), "levels.kv_keep"),
    (("kv.score.mean", [[0.0, 0.1]] * LAYERS), "shape [3, 2]"),
    (("query.depth.std", [[0.0, 0.1, 0.2]] * (LAYERS + 1)), "shape [4, 3]"),
    (("global_layers", 4), "4 global layers"),
    (("levels.kv_keep", [0.9, 0.5, 0.25]), "dense level 1.0"),
    (("levels.query_merge", [1, 2, 2]), "distinct integers"),
    (("kv.depth.mean", [[0.0, "x", 0.1]] * LAYERS), "numeric"),
    (("metrics", ["depth", "score", "points"]), "no kv.points table"),
])
def test_bad_profiles_raise_one_sentence(tmp_path, edit, message):
    doc = _doc()
    _set(doc, *edit)
    with pytest.raises(Spark3rError, match="profile.*" + re.escape(message)):
        load_profile(_write(tmp_path, doc))


def test_nan_is_rejected(tmp_path):
    text = json.dumps(_doc()).replace("0.0", "NaN", 1)
    with pytest.raises(Spark3rError, match="holds NaN where numbers belong"):  # not "not valid JSON"
        load_profile(_write(tmp_path, text))
    profile = make_profile()
    profile.kv["score"].std[1, 1] = np.nan
    with pytest.raises(Spark3rError, match="NaN"):
        save_profile(profile, tmp_path / "nan")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(Spark3rError, match="does not exist"):
        load_profile(tmp_path / "none.json")
    with pytest.raises(Spark3rError, match="not valid JSON"):
        load_profile(_write(tmp_path, '{"spark3r_profile": 1, "model": "vg'))
    with pytest.raises(Spark3rError, match="JSON object"):
        load_profile(_write(tmp_path, "[1, 2]"))


def test_measurement_digest_ignores_timings_and_creation_time():
    profile = make_profile()
    again = make_profile()
    again.timings, again.created, again.versions = {"wall": 93.0}, "2026-12-01T00:00:00+00:00", {"torch": "x"}
    assert again.measurement_sha256 == profile.measurement_sha256
    again.kv["score"].mean[0, 1] += 1e-9
    assert again.measurement_sha256 != profile.measurement_sha256
