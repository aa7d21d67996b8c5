"""Named model configs: what to build, how to preprocess for it, and where its official weights live.

A model family registers its configs when its module is imported:

    register(ModelEntry(name="pi3", family="pi3", builder=lambda: Pi3(), image_width=518, preprocess="pi3",
                        hf_repo="yyfz233/Pi3", hf_files=("model.safetensors",)))

A lookup imports the family modules in `FAMILY_MODULES` (the one named in the model name first) until the name is
registered, so nothing else needs to import them first.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from spark3r.errors import ParameterError, Spark3rError
from spark3r.models.blocks import init_weights

FAMILY_MODULES = {
    "vggt": "spark3r.models.vggt",
    "pi3": "spark3r.models.pi3",
    "da3": "spark3r.models.da3",
    "omega": "spark3r.models.omega",
}


@dataclass(frozen=True)
class ModelEntry:
    """One named config.

    builder:       () -> model with this config (called under a `torch.device` context; weights are then set by
                   `init_weights` or a checkpoint).
    image_width:   default preprocessing width in pixels.
    preprocess:    name of the preprocessing recipe in spark3r.data (e.g. "vggt": VGGT's crop mode at image_width).
    hf_repo, hf_files: Hugging Face repo id and candidate weight files, in order of preference, for the cache lookup.
    key_prefix:    prefix the checkpoint puts in front of our state_dict keys (stripped on load).
    convert_state_dict: optional state_dict -> state_dict applied after stripping the prefix (e.g. key renames of
                   older checkpoints); it must return the official key names.
    drop_prefixes: checkpoint key prefixes this model does not build (e.g. VGGT's "track_head."), dropped and reported.
    aliases:       other names that resolve to this entry (printed when used).
    """

    name: str
    family: str
    builder: Callable[[], nn.Module]
    image_width: int
    preprocess: str
    hf_repo: str | None = None
    hf_files: tuple[str, ...] = ()
    key_prefix: str = ""
    convert_state_dict: Callable[[dict], dict] | None = None
    drop_prefixes: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    description: str = ""

    def recipe(self, size: int | None = None) -> str:
        """The preprocessing recipe of this model ("NAME:SIDE", spark3r.data.preprocess) at `size`, the side of a
        square image (default: image_width)."""
        if size is not None and size < 1:
            raise ParameterError(f"`size` is {size}: give the preprocessing size in pixels (e.g. {self.image_width})",
                                 "size")
        return f"{self.preprocess}:{size or self.image_width}"


_ENTRIES: dict[str, ModelEntry] = {}
_ALIASES: dict[str, str] = {}


def register(entry: ModelEntry) -> ModelEntry:
    """Add a named config; its name and aliases must be new."""
    for name in (entry.name, *entry.aliases):
        if name in _ENTRIES or name in _ALIASES:
            raise Spark3rError(f"model name {name!r} is already registered: pick another name or alias")
    _ENTRIES[entry.name] = entry
    _ALIASES.update({alias: entry.name for alias in entry.aliases})
    return entry


def _import_family(module: str) -> None:
    """Import a family module (it registers its configs); a family not written yet is skipped."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise


def _import_families(name: str | None = None) -> None:
    """Import family modules, those named in `name` first, until `name` is registered (all of them for None)."""
    ordered = sorted(FAMILY_MODULES.items(), key=lambda item: name is None or item[0] not in name)
    for _, module in ordered:
        if name is not None and (name in _ENTRIES or name in _ALIASES):
            return
        _import_family(module)


def model_names() -> list[str]:
    """Every registered model name, sorted."""
    _import_families()
    return sorted(_ENTRIES)


def resolve_model_name(name: str) -> str:
    """The registered name for `name` or one of its aliases; an alias's resolution is printed to stderr."""
    _import_families(name)
    if name in _ENTRIES:
        return name
    if name in _ALIASES:
        print(f"model {name!r} is {_ALIASES[name]!r}", file=sys.stderr)
        return _ALIASES[name]
    aliases = ", ".join(f"{alias} -> {target}" for alias, target in sorted(_ALIASES.items()))
    alias_note = f" (aliases: {aliases})" if aliases else ""
    raise Spark3rError(f"unknown model {name!r}: use one of {', '.join(sorted(_ENTRIES))}{alias_note}")


def get_entry(name: str) -> ModelEntry:
    """The entry of a model name or alias."""
    return _ENTRIES[resolve_model_name(name)]


def build_model(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """A model with random weights (`init_weights`; seed the RNG first), or uninitialised tensors on device "meta"."""
    entry = get_entry(name)
    with torch.device("meta"):
        model = entry.builder()
    if torch.device(device).type == "meta":
        return model
    return init_weights(model.to_empty(device=device))
