"""Every model family goes through the whole pipeline: profile-layers -> search-schedule -> apply_schedule.

Small random-weight configs of pi3, Depth-Anything-3 and VGGT-Omega (vggt-tiny is covered by test_profiler and
test_search) on one generated clip of 4 frames.
"""
import pytest
import torch

import spark3r
from spark3r.commands import profile_layers as profile_cli
from spark3r.commands import search_schedule as search_cli
from spark3r.data import open_clips
from spark3r.models.registry import get_entry
from spark3r.profiler.format import load_profile

FRAMES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["pi3-tiny", "da3-tiny", "vggt-omega-tiny"])
def test_profile_search_apply(name, tmp_path):
    profile_dir, schedule_path = tmp_path / "profile", tmp_path / "schedule.yaml"
    assert profile_cli.main(["--model", name, "--weights", "none", "--calib", "synthetic:1", "--frames", str(FRAMES),
                             "--kv-keep", "0.5", "--query-merge", "2", "--additivity", "2", "--device", "cpu",
                             "--dtype", "fp32", "--out", str(profile_dir)]) == 0
    profile = load_profile(profile_dir)
    model = spark3r.load_model(name, weights=None).eval()
    assert profile.model == name and profile.global_layers == model.adapter.num_global_layers
    assert (profile.kv["score"].mean[:, 1] > 0).any()

    assert search_cli.main(["--profile", str(profile_dir / "profile.json"), "--budget", "0.75", "--trials", "40",
                            "--out", str(schedule_path)]) == 0
    schedule = spark3r.load_schedule(schedule_path)
    assert schedule.model == name and schedule.global_layers == profile.global_layers

    entry = get_entry(name)
    images = open_clips("synthetic:1:7", preprocess=f"{entry.preprocess}:{entry.image_width}",
                        frames=FRAMES)[0].images
    with torch.no_grad():
        dense = model(images)
        with spark3r.reduced(model, schedule):
            reduced = model(images)
        restored = model(images)
    assert not torch.equal(dense["depth"], reduced["depth"])
    for key in dense:
        assert torch.equal(dense[key].nan_to_num(), restored[key].nan_to_num()), key
