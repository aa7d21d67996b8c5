"""Files are written atomically: into a temporary file in the target's folder, then renamed onto the target."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


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


def write_png(path: str | os.PathLike, figure, dpi: int = 110) -> Path:
    """Write a matplotlib `figure` as a PNG to `path` atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return write_atomic(path, buffer.getvalue())
