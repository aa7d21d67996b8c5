"""What every benchmarks/results/*.json records about its run: the command, the commit and the device.

`record(script, argv, device)` gives {"command", "commit", "device_name", "torch", "created"}; the commit says
" + uncommitted changes" when tracked files differed from it, so a result of a clean tree is recognisable.
`weights_digest(model, weights)` names the weights a run loaded and their sha256, so a result says which weights it
measured even after the shipped ones change (`--weights auto` alone does not).
`write_result(out, result, text)` writes a result's JSON and its markdown beside it.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from spark3r.files import write_atomic, write_json
from spark3r.models.loading import find_weights, find_weights_file
from spark3r.models.registry import get_entry

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """The checkout's commit, with " + uncommitted changes" when tracked files differ from it; None outside git.

    $SPARK3R_COMMIT, when set, is taken as it is: for a copy of the tree whose .git is not that tree's (the lent GPU
    machine keeps the .git of its first call)."""
    if os.environ.get("SPARK3R_COMMIT"):
        return os.environ["SPARK3R_COMMIT"]
    def git(*command: str) -> str:
        return subprocess.run(["git", *command], capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one) with the thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.machine() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        name = names[0] if names else name
    return f"{name} ({torch.get_num_threads()} torch threads)"


def command_line(script: str, argv: list[str] | None) -> str:
    """`python <script relative to the repository> <arguments>`: the command that remakes the result."""
    path = Path(script).resolve()
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return shlex.join(["python", str(shown), *(sys.argv[1:] if argv is None else argv)])


def record(script: str, argv: list[str] | None, device: torch.device | str) -> dict:
    """The provenance fields of a result written by `script` run with `argv` (None: this process's arguments)."""
    return {"command": command_line(script, argv), "commit": git_commit(), "device_name": device_name(device),
            "torch": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def weights_digest(model: str, weights: str) -> tuple[str | None, str]:
    """(weights file, its sha256) of a run of `model` with `--weights weights`; (None, "random") for random weights."""
    if weights == "none":
        return None, "random"
    path = (find_weights(get_entry(model)) if weights == "auto" else find_weights_file(weights)).resolve()
    shown = path.relative_to(Path.cwd().resolve()) if path.is_relative_to(Path.cwd().resolve()) else path
    return str(shown), hashlib.sha256(path.read_bytes()).hexdigest()


def weights_identity(model: str, weights: str) -> dict:
    """{"weights_sha256": ...} of a run's weights, the field every result of trained weights carries; {} if random."""
    _, sha = weights_digest(model, weights)
    return {} if sha == "random" else {"weights_sha256": sha}


def write_result(out: Path, result: dict, text: str) -> None:
    """`result` as JSON at `out` and `text` at `out` with suffix .md, each atomically (parent folders made)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    write_atomic(out.with_suffix(".md"), text.encode())


def publish(out: str | Path | None, default: Path, result: dict, text: str) -> None:
    """`write_result` at `out` (None: `default`), then `text` on stdout."""
    write_result(Path(out) if out else default, result, text)
    print(text)
