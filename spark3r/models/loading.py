"""Checkpoint loading: read a state_dict safely, find official weights in the local Hugging Face cache, load strictly.

No network and no unpickling of code: .safetensors files are read with safetensors, .pt/.pth/.bin files with
torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from spark3r.errors import ParameterError, Spark3rError
from spark3r.models.base import check_head_dtype
from spark3r.models.blocks import compile_model, init_weights
from spark3r.models.registry import ModelEntry, get_entry

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PACKAGED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def find_weights_file(path: str | os.PathLike) -> Path:
    """A weights file, or the one weights file (or safetensors shard index) inside a folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise Spark3rError(
            f"weights path {str(path)!r} does not exist: pass an existing .safetensors/.pt file or a folder holding one"
        )
    if path.is_file():
        return path
    if (path / SAFETENSORS_INDEX).is_file():
        return path / SAFETENSORS_INDEX
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    safetensors_files = [p for p in files if p.suffix == ".safetensors"]
    candidates = safetensors_files or files
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise Spark3rError(
            f"folder {str(path)!r} must hold exactly one weights file ({', '.join(WEIGHT_SUFFIXES)}), found {found}: "
            f"pass the file itself"
        )
    return candidates[0]


def _read_torch_file(path: Path) -> dict[str, Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise Spark3rError(
            f"{str(path)!r} holds pickled objects, not a plain state_dict: re-save it with "
            f"torch.save(model.state_dict(), path) or as .safetensors"
        ) from None
    except Exception as error:  # a truncated or foreign file: say which file, not a traceback
        raise Spark3rError(f"could not read weights file {str(path)!r} ({type(error).__name__}): check the file") \
            from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise Spark3rError(f"{str(path)!r} does not hold a state_dict of tensors: pass a model checkpoint")
    return loaded


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path, device="cpu")
    except Exception as error:
        raise Spark3rError(f"could not read weights file {str(path)!r} ({type(error).__name__}): check the file") \
            from None


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state_dict (CPU tensors) in a .safetensors / .pt / .pth / .bin file, a shard index, or a folder of one."""
    path = find_weights_file(path)
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state_dict = {}
        for shard in shards:
            state_dict.update(_read_safetensors(path.parent / shard))
        return state_dict
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in WEIGHT_SUFFIXES:
        return _read_torch_file(path)
    raise Spark3rError(f"{str(path)!r} is not a weights file: pass a {', '.join(WEIGHT_SUFFIXES)} file")


def adapt_state_dict(state_dict: dict[str, Tensor], key_prefix: str = "", drop_prefixes: tuple[str, ...] = (),
                     convert: Callable[[dict], dict] | None = None) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Strip `key_prefix` from the keys that carry it, apply `convert`, then drop keys under `drop_prefixes`.

    Returns the new state_dict and the number of keys dropped per prefix.
    """
    if key_prefix:
        state_dict = {k.removeprefix(key_prefix): v for k, v in state_dict.items()}
    if convert is not None:
        state_dict = convert(state_dict)
    dropped = {prefix: sum(k.startswith(prefix) for k in state_dict) for prefix in drop_prefixes}
    kept = {k: v for k, v in state_dict.items() if not k.startswith(tuple(drop_prefixes))}
    return kept, {prefix: count for prefix, count in dropped.items() if count}


def _first(keys: list[str], limit: int = 3) -> str:
    return ", ".join(repr(k) for k in keys[:limit]) + (", ..." if len(keys) > limit else "")


def check_state_dict(model: nn.Module, state_dict: dict[str, Tensor], model_name: str) -> None:
    """A Spark3rError naming the first missing / unexpected keys and shape mismatches (with counts), if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if mismatched:
        first = mismatched[0]
        problems.append(
            f"{len(mismatched)} shape mismatches ({first!r}: checkpoint {list(state_dict[first].shape)}, "
            f"model {list(expected[first].shape)})"
        )
    if problems:
        raise Spark3rError(
            f"the checkpoint does not fit {model_name}: {'; '.join(problems)}; pass the weights of {model_name} "
            f"or choose the model they belong to"
        )


def check_finite(state_dict: dict[str, Tensor], source: str) -> None:
    """A Spark3rError naming the first floating tensor of `state_dict` that holds NaN or Inf, if any."""
    broken = [key for key, value in state_dict.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise Spark3rError(f"{source} holds NaN or Inf values ({len(broken)} tensors, first {broken[0]!r}): the "
                           "checkpoint is corrupt; pass intact weights")


def checked_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device, with a sentence for a name that is no device or a CUDA device this machine lacks."""
    if not isinstance(device, (torch.device, str)):
        raise ParameterError(f"`device` must be a torch.device or a name such as cpu or cuda, got "
                             f"{type(device).__name__}", "device")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ParameterError(f"`device` {device!r} is not a device: use cpu, cuda, cuda:N or auto", "device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"`device` {str(device)} asks for CUDA but none is available here: use `device` cpu",
                             "device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ParameterError(f"`device` {str(device)} does not exist: this machine has {torch.cuda.device_count()} "
                             "CUDA devices (cuda:0 ...)", "device")
    return device


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], entry: ModelEntry) -> nn.Module:
    """Strict load of a checkpoint into `model` (which may be on the meta device: tensors are then assigned).

    The entry's key prefix is stripped, its conversion applied and its dropped prefixes removed, with a line on stderr saying how many keys
    were dropped. Floating tensors are converted to the model's parameter dtype.
    """
    state_dict, dropped = adapt_state_dict(state_dict, entry.key_prefix, entry.drop_prefixes,
                                           entry.convert_state_dict)
    for prefix, count in dropped.items():
        print(f"{entry.name}: dropped {count} checkpoint keys under {prefix!r} (not built by this model)",
              file=sys.stderr)
    check_state_dict(model, state_dict, entry.name)
    expected = model.state_dict()
    state_dict = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    on_meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(state_dict, strict=True, assign=on_meta)
    return model


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def find_in_hf_cache(repo_id: str, filenames: tuple[str, ...] | list[str]) -> Path | None:
    """The first of `filenames` present in a cached snapshot of model repo `repo_id` (refs/main's snapshot first,
    then the newest); None if the cache has none. Reads the cache layout models--org--name/snapshots/<rev>/ directly."""
    repo_dir = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ordered = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    main_ref = repo_dir / "refs" / "main"
    if main_ref.is_file():
        main = snapshots / main_ref.read_text().strip()
        ordered = [main] + [p for p in ordered if p != main] if main.is_dir() else ordered
    for snapshot in ordered:
        for name in filenames:
            if (snapshot / name).is_file():
                return snapshot / name
    return None


def find_weights(entry: ModelEntry) -> Path:
    """The packaged weights (spark3r/weights/<name>.safetensors) or the official file in the local HF cache."""
    packaged = PACKAGED_WEIGHTS / f"{entry.name}.safetensors"
    if packaged.is_file():
        return packaged
    cached = find_in_hf_cache(entry.hf_repo, entry.hf_files) if entry.hf_repo else None
    if cached is not None:
        return cached
    where = f"the package or the Hugging Face cache ({entry.hf_repo} in {hf_cache_dir()})" if entry.hf_repo \
        else "the package"
    raise Spark3rError(
        f"no weights for {entry.name} found in {where}: pass --weights PATH (weights=PATH) with a .safetensors or "
        f".pt file, or --weights none (weights=None) for random weights"
    )


def weights_identity(weights: str, entry: ModelEntry | None) -> str:
    """Which weights a run used: "none", or the resolved file with its size and modification time (so "auto" finding
    a new file, or a file replaced in place, is a change of options and cached results are not reused). `entry` is
    needed for "auto" only."""
    if weights == "none":
        return "none"
    path = (find_weights(entry) if weights == "auto" else find_weights_file(weights)).resolve()
    stat = path.stat()
    return f"{path} ({stat.st_size} bytes, mtime_ns {stat.st_mtime_ns})"


def identified_weights(identity: str) -> str:
    """The weights a `weights_identity` names: "none" or the file's path; one sentence if the file has since gone or
    changed."""
    if " (" not in identity:
        return identity
    path = identity.rsplit(" (", 1)[0]
    if not Path(path).is_file() or weights_identity(path, None) != identity:
        raise ParameterError(f"the profile was made with weights {identity}, which is gone or has changed since: pass "
                             "`weights` for the weights to verify with, or profile again", "weights")
    return path


def load_model(name: str, weights: str | os.PathLike | None = "auto", device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0, compiled: bool = False,
               head_dtype: str = "fp32") -> nn.Module:
    """A model by registered name or alias, in eval mode, with fp32 parameters on `device`.

    weights:  "auto" -> the weights shipped in the package, else the local Hugging Face cache, else a Spark3rError;
              None or "none" -> random weights from `seed`; a path -> strict load of that file or folder.
    dtype:    the compute dtype (the trunk runs under autocast to it; parameters and residual stream stay fp32).
    compiled: run the blocks' token-wise parts and the DPT heads through torch.compile (`compile_model`, inductor):
              faster on a GPU (benchmarks/results/speed-all.md), but the first forward at each new input shape
              compiles. Outputs equal eager ones within bf16 rounding. `compile_model(model, backend=None)` turns it
              off again.
    head_dtype: the dense heads run in fp32 as upstream, or with "compute" under autocast to `dtype` (opt-in: faster
              on a GPU, but the outputs move beyond the bf16 trunk's own noise; benchmarks/block_profile.py measures
              by how much). The camera heads run fp32 either way.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise Spark3rError(f"dtype {dtype} is not supported: use torch.float32, torch.bfloat16 or torch.float16")
    check_head_dtype(head_dtype)
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise Spark3rError(f"weights must be 'auto', None (random weights) or the path of a weights file, got "
                           f"{type(weights).__name__}")
    entry = get_entry(name)
    device = checked_device(device)
    with torch.device("meta"):
        model = entry.builder()
    if weights is None or weights == "none":
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            init_weights(model.to_empty(device=device))
    else:
        path = find_weights(entry) if weights == "auto" else weights
        state_dict = load_state_dict(path)
        check_finite(state_dict, f"weights file {str(path)!r}")
        load_weights(model, state_dict, entry)
        model = model.to(device)
    model.compute_dtype, model.head_dtype = dtype, head_dtype
    if compiled:
        compile_model(model)
    return model.eval()
