"""Helpers the model tests share: the vendored state_dict manifests and the patch/restore check."""
from pathlib import Path

import torch

MANIFESTS = Path(__file__).parent / "manifests"


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
