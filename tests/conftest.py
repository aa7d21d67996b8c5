"""Fixtures the test modules share.

A module names its tiny model in TINY_MODEL (a registry name; default vggt-tiny) and its input in an `images`
fixture: `tiny` is that model with seeded random weights and `dense` its outputs on `images`, each made once per
module. `one_thread` runs a module on one intra-op thread.

Triton kernels run in Triton's interpreter on CPU (TRITON_INTERPRET=1, read when Triton is first imported, so it is
set before anything imports it): tests/test_fused.py checks the CUDA kernels so.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import spark3r  # noqa: E402


@pytest.fixture(scope="module")
def tiny(request):
    """The module's TINY_MODEL with random weights from seed 0, in eval mode."""
    return spark3r.load_model(getattr(request.module, "TINY_MODEL", "vggt-tiny"), weights="none", seed=0)


@pytest.fixture(scope="module")
def dense(tiny, images):
    """The dense outputs of `tiny` on the module's `images`."""
    with torch.no_grad():
        return tiny(images)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine more threads spin against each other (several times slower),
    and a 2-rank run uses one thread per rank, so runs in and out of process round the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
