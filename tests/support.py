"""Helpers the tests share: the vendored state_dict manifests, the patch/restore check, a peak-memory counter and the
loader of benchmarks/ scripts."""
import importlib.util
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MANIFESTS = Path(__file__).parent / "manifests"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a fresh module (benchmarks/ is not a package; its scripts import their siblings from
    it, so it goes on sys.path)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_manifest(name: str) -> list[tuple[str, list[int]]]:
    """(key, shape) of every tensor of tests/manifests/<name>.tsv, in state_dict order."""
    rows = [line.split("\t") for line in (MANIFESTS / f"{name}.tsv").read_text().splitlines() if line.strip()]
    return [(key, [int(n) for n in shape.strip("[]").split(",") if n.strip()]) for key, shape, *_ in rows]


def check_patch_and_restore(model, images, dense, handle) -> None:
    """Outputs under `handle`'s patch differ from `dense`; after handle.remove() they equal it bit for bit."""
    with torch.no_grad():
        reduced = model(images)
    handle.remove()
    with torch.no_grad():
        restored = model(images)
    assert not torch.equal(reduced["depth"], dense["depth"])
    for name in dense:
        assert torch.equal(restored[name], dense[name]), name


class PeakBytes(TorchDispatchMode):
    """Bytes of the storages that tensors made inside the mode keep alive, and their peak after any op: a CPU stand-in
    for a GPU's peak allocated memory (storages made outside the mode, such as weights and inputs, are not counted).

        with PeakBytes() as memory:
            model(x)
        memory.peak
    """

    def __init__(self):
        super().__init__()
        self.peak = 0
        self._refs: dict[int, list[weakref.ref]] = {}
        self._bytes: dict[int, int] = {}

    def live(self) -> int:
        """Bytes alive now (storages none of whose tensors survives are dropped first)."""
        for key in [key for key, refs in self._refs.items() if all(ref() is None for ref in refs)]:
            del self._refs[key], self._bytes[key]
        return sum(self._bytes.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        self.live()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key in self._refs:
                    self._refs[key].append(weakref.ref(t))
                elif key not in inputs:
                    self._refs[key], self._bytes[key] = [weakref.ref(t)], t.untyped_storage().nbytes()
        self.peak = max(self.peak, self.live())
        return out
