"""What a forward keeps alive: the prepared tokens go once the first trunk step has run (every family), and a DPT tap
is written without a whole transformed or reordered copy of its halves (DA3's taps)."""
import weakref

import pytest
import torch
from torch import nn

from spark3r.data import open_clips
from spark3r.models.base import pair_tap
from spark3r.models.registry import build_model, get_entry
from support import PeakBytes, load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["vggt-tiny", "pi3-tiny", "da3-tiny", "vggt-omega-tiny"])
def test_forward_lets_the_prepared_tokens_go_after_the_first_step(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    images = clip_images(name)
    prepared, alive_at_last_layer = [], []
    prepare = model.prepare

    def remembered(images):
        state = prepare(images)
        prepared.append(weakref.ref(state.tokens))
        return state

    model.prepare = remembered
    last = model.adapter.modules(model)[-1]
    last.register_forward_pre_hook(lambda module, args: alive_at_last_layer.append(prepared[0]() is not None))
    with torch.no_grad():
        model(images)
    assert alive_at_last_layer == [False]


def test_pair_tap_is_the_concatenation_of_the_halves_in_order():
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randn(2, 10, 6, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    order = torch.stack([torch.randperm(10, generator=generator) for _ in range(2)])
    norm = nn.LayerNorm(8).double()
    rows = torch.arange(2)[:, None]
    with torch.no_grad():
        expected = torch.cat([first[rows, order], norm(second[rows, order])], dim=-1).float()
        for chunk in (None, 1, 3, 10):
            assert torch.equal(pair_tap(first, second, torch.float32, norm, order, chunk), expected)
    assert torch.equal(pair_tap(first, second, torch.bfloat16), torch.cat([first, second], dim=-1).bfloat16())


def test_a_chunked_tap_holds_no_whole_copy_of_its_halves():
    """Reordering and normalising one half whole would hold two more tap-sized float64 copies; in chunks of 2 frames
    the tap and a few chunks' copies are all that is ever alive."""
    generator = torch.Generator().manual_seed(1)
    first, second = (torch.randn(1, 40, 6, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    order = torch.randperm(40, generator=generator)[None]
    norm = nn.LayerNorm(8).double()
    with torch.no_grad(), PeakBytes() as memory:
        tap = pair_tap(first, second, torch.float32, norm, order, chunk=2)
    half_bytes = first.numel() * first.element_size()
    chunk_bytes = half_bytes // 20  # 2 of 40 frames of one float64 half
    assert tap.numel() * tap.element_size() == half_bytes  # 2C float32 = C float64
    assert half_bytes <= memory.peak <= half_bytes + 4 * chunk_bytes


def watch_finished_tokens(model) -> list[bool]:
    """Patch `model` so that each decode call appends whether the tokens of the last finished trunk state are alive."""
    finished, alive_in_heads = [], []
    run_steps, decode = model.run_steps, model.decode

    def remembered(state, stop=None):
        state = run_steps(state, stop)
        if state.step == model.num_steps:
            finished.append(weakref.ref(state.tokens))
        return state

    def watched(state, *args):
        alive_in_heads.append(finished[-1]() is not None)
        return decode(state, *args)

    model.run_steps, model.decode = remembered, watched
    return alive_in_heads


def clip_images(name: str):
    return open_clips("synthetic:1:7", preprocess=get_entry(name).recipe(), frames=3)[0].images[None]


@pytest.mark.parametrize("name", ["vggt-tiny", "pi3-tiny", "da3-tiny", "vggt-omega-tiny"])
def test_forward_lets_the_residual_stream_go_before_the_heads(name):
    """The heads read the taps and extras only: the finished tokens are not alive while they run, and the outputs
    equal those of a decode given the whole finished state."""
    torch.manual_seed(0)
    model = build_model(name).eval()
    images = clip_images(name)
    with torch.no_grad():
        whole = model.decode(model.run_steps(model.prepare(images)), images)
        alive_in_heads = watch_finished_tokens(model)
        out = model(images)
    assert alive_in_heads == [False]
    assert out.keys() == whole.keys() and all(torch.equal(out[key], whole[key]) for key in out)


def test_the_speed_benchmark_times_the_heads_without_the_residual_stream():
    """benchmarks/speed.py's timed_run measures the forward's memory: the finished tokens are gone in the heads too."""
    speed = load_benchmark("speed")
    model = build_model("vggt-tiny").eval()
    alive_in_heads = watch_finished_tokens(model)
    with torch.no_grad():
        speed.timed_run(model, clip_images("vggt-tiny"), torch.device("cpu"), assembled=False, attention=None)
    assert alive_in_heads == [False]
