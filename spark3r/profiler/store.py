"""Per-clip result files, so an interrupted profile-layers run resumes with the same command and loses nothing.

Each profiled clip becomes `<out>/clips/<sha256>.npz` (written atomically): its measurement arrays plus a JSON `meta`
entry holding the clip's name, digest, frame count, timings and the options it was measured with. A file measured with
other options is never mixed in: the run stops with a sentence instead.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spark3r.errors import ParameterError, Spark3rError
from spark3r.files import write_atomic

CLIPS_DIR = "clips"


@dataclass
class ClipResult:
    """One clip's measurements.

    arrays: "kv_<metric>" [L, n_kv_levels], "query_<metric>" [L, n_query_levels], "additivity_<metric>" [n_schedules].
    timings: seconds per phase (dense, caching, local, resume, decode, additivity).
    """

    name: str
    sha256: str
    frames: int
    arrays: dict[str, np.ndarray]
    timings: dict[str, float] = field(default_factory=dict)

    def clip_entry(self) -> dict:
        """The clip's line in profile.json."""
        return {"name": self.name, "sha256": self.sha256, "frames": self.frames}


def normalize_options(options: dict) -> dict:
    """Options as they read back from JSON (tuples become lists), so saved and current options compare equal."""
    return json.loads(json.dumps(options, sort_keys=True))


def clip_path(out_dir: str | Path, sha256: str) -> Path:
    return Path(out_dir) / CLIPS_DIR / f"{sha256}.npz"


def save_clip(result: ClipResult, out_dir: str | Path, options: dict) -> Path:
    """Write `result` to `<out_dir>/clips/<sha256>.npz` atomically, tagged with `options`."""
    path = clip_path(out_dir, result.sha256)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"name": result.name, "sha256": result.sha256, "frames": result.frames, "timings": result.timings,
            "options": normalize_options(options)}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta, sort_keys=True)), **result.arrays)
    write_atomic(path, buffer.getvalue())
    return path


def load_clip(out_dir: str | Path, sha256: str, options: dict) -> ClipResult | None:
    """The stored result of clip `sha256`, or None when it was not measured yet.

    A file measured with other options, or an unreadable one, raises a Spark3rError sentence.
    """
    path = clip_path(out_dir, sha256)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {key: data[key] for key in data.files if key != "meta"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        raise Spark3rError(f"the cached clip result {path} is unreadable: delete it and rerun the same command") \
            from None
    if meta.get("options") != normalize_options(options):
        changed = sorted(key for key in set(meta.get("options", {})) | set(options)
                         if meta.get("options", {}).get(key) != normalize_options(options).get(key))
        raise ParameterError(f"{Path(out_dir)} holds results measured with other options ({', '.join(changed)} "
                             "differ): use a new `out_dir` or the options of the earlier run", "out_dir")
    return ClipResult(meta["name"], meta["sha256"], int(meta["frames"]), arrays, dict(meta.get("timings", {})))
