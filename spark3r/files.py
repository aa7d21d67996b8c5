"""Files are written atomically: into a temporary file in the target's folder, then renamed onto the target.

Commands check their output locations before any long work (`check_output_file`, `check_output_folder`), so a bad
`--out` costs a sentence, not the run.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from spark3r.errors import ParameterError


def atomic_save(path: str | os.PathLike, save: Callable[[str], None]) -> Path:
    """Call save(temporary path) in `path`'s folder (created if missing), then rename the result onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save(temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes the file private (0600)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically, flushed to disk before the rename."""

    def save(temporary: str) -> None:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    return atomic_save(path, save)


def write_json(path: str | os.PathLike, payload) -> Path:
    """Write `payload` as indented JSON to `path` atomically."""
    return write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(folder: Path, parameter: str, path: Path) -> None:
    """A sentence unless a file can be created in the existing folder `folder` (tried, so root and read-only mounts
    are judged right)."""
    if not folder.is_dir():
        raise ParameterError(f"`{parameter}` {path} lies under {folder}, which is a file, not a folder: choose "
                             "another path", parameter)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ParameterError(f"`{parameter}` {path} cannot be written ({folder} is not writable: {error.strerror}): "
                             "choose a writable location", parameter) from None


def check_output_file(path: str | os.PathLike, parameter: str = "out") -> Path:
    """`path` as a Path once it can be written as a file: not a folder, in a folder that exists or can be made and
    takes new files. `parameter` is the argument that gave it (named in the sentence; a command shows its flag)."""
    path = Path(path)
    if path.is_dir():
        raise ParameterError(f"`{parameter}` {path} is a folder: give the path of a file", parameter)
    _check_writable(_nearest_existing(path.parent), parameter, path)
    return path


def check_output_folder(path: str | os.PathLike, parameter: str = "out") -> Path:
    """`path` as a Path once it can be used as an output folder: a folder or nothing yet, under a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ParameterError(f"`{parameter}` {path} is a file: give a folder path (a new or an existing folder)",
                             parameter)
    _check_writable(_nearest_existing(path), parameter, path)
    return path


def write_png(path: str | os.PathLike, figure, dpi: int = 110) -> Path:
    """Write a matplotlib `figure` as a PNG to `path` atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return write_atomic(path, buffer.getvalue())
