"""The profile file format (version 1): what profile-layers writes and search-schedule reads.

`<out>/profile.json` holds the per-layer sensitivity tables; `<out>/profile.npz` (optional) the raw per-clip arrays.
Column j of every `kv` table is level `kv_keep[j]`, column j of every `query` table is level `query_merge[j]`;
keep 1.0 and merge 1 are the dense levels.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spark3r.errors import ParameterError, Spark3rError
from spark3r.files import write_atomic
from spark3r.models.base import FrameLayout

PROFILE_VERSION = 1
PROFILE_JSON = "profile.json"
VOLATILE_KEYS = ("timings", "versions", "created")  # what changes when the same measurement is written again
PROFILE_NPZ = "profile.npz"
STATISTICS = ("mean", "std", "ci95")
REQUIRED_KEYS = ("spark3r_profile", "model", "global_layers", "frames", "image_hw", "layout", "clips", "options",
                 "levels", "metrics", "kv", "query")


@dataclass
class MetricTable:
    """One metric's statistics over clips, each [L, n_levels] (L global layers, one column per level)."""

    mean: np.ndarray
    std: np.ndarray
    ci95: np.ndarray

    def to_dict(self) -> dict:
        return {name: getattr(self, name).tolist() for name in STATISTICS}


@dataclass
class Profile:
    """A layer-sensitivity profile: how far each global layer alone, reduced at each level, moves the outputs.

    kv[metric]: statistics at the K/V keep levels `kv_keep`; query[metric]: at the query merge levels `query_merge`.
    by_length, length_model: a profile of several clip lengths (spark3r.profiler.lengths): every length's tables and
    the fitted per-layer length model of each metric; empty for one length (then not written).
    `sha256` is the digest of the profile.json a profile was loaded from ("" for one built in memory).
    """

    model: str
    global_layers: int
    frames: int
    image_hw: tuple[int, int]
    layout: dict
    clips: list[dict]
    options: dict
    kv_keep: list[float]
    query_merge: list[int]
    metrics: list[str]
    kv: dict[str, MetricTable]
    query: dict[str, MetricTable]
    additivity: dict = field(default_factory=dict)
    asymmetry: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    by_length: list[dict] = field(default_factory=list)
    length_model: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: str = ""
    sha256: str = ""

    @property
    def measurement_sha256(self) -> str:
        """Digest of what the profile measured: its document without timings, versions and creation time, so a rerun
        that reads every clip from the cache (a new profile.json, new timings) has the same digest."""
        measured = {key: value for key, value in self.to_dict().items() if key not in VOLATILE_KEYS}
        return hashlib.sha256(json.dumps(measured, sort_keys=True).encode()).hexdigest()

    @property
    def frame_layout(self) -> FrameLayout:
        """The token layout of one calibration clip at the global layers."""
        return FrameLayout(self.frames, self.layout["n_special"], self.layout["grid_h"], self.layout["grid_w"])

    def to_dict(self) -> dict:
        """The JSON document of this profile (format version 1)."""
        doc = {
            "spark3r_profile": PROFILE_VERSION,
            "model": self.model,
            "global_layers": self.global_layers,
            "frames": self.frames,
            "image_hw": list(self.image_hw),
            "layout": dict(self.layout),
            "clips": list(self.clips),
            "options": dict(self.options),
            "levels": {"kv_keep": list(self.kv_keep), "query_merge": list(self.query_merge)},
            "metrics": list(self.metrics),
            "kv": {metric: table.to_dict() for metric, table in self.kv.items()},
            "query": {metric: table.to_dict() for metric, table in self.query.items()},
            "additivity": self.additivity,
            "asymmetry": self.asymmetry,
            "timings": self.timings,
            "versions": self.versions,
            "created": self.created,
        }
        if self.by_length:
            doc.update(by_length=list(self.by_length), length_model=dict(self.length_model))
        return doc

    @classmethod
    def from_dict(cls, doc: dict, source: str = "profile") -> "Profile":
        """Build and validate a profile from its JSON document; `source` names it in error messages."""
        if not isinstance(doc, dict):
            raise Spark3rError(f"{source} is not a spark3r profile (a JSON object is expected): rerun profile-layers")
        version = doc.get("spark3r_profile")
        if version != PROFILE_VERSION:
            raise Spark3rError(f"{source} has profile format version {version!r}, but this spark3r reads version "
                               f"{PROFILE_VERSION}: rerun profile-layers with this spark3r")
        missing = [key for key in REQUIRED_KEYS if key not in doc]
        if missing:
            raise Spark3rError(f"{source} lacks the key(s) {', '.join(missing)}: it is incomplete, rerun "
                               "profile-layers")
        levels = doc["levels"]
        if not isinstance(levels, dict) or "kv_keep" not in levels or "query_merge" not in levels:
            raise Spark3rError(f"{source} needs levels.kv_keep and levels.query_merge: rerun profile-layers")
        try:
            profile = cls(
                model=str(doc["model"]),
                global_layers=int(doc["global_layers"]),
                frames=int(doc["frames"]),
                image_hw=tuple(int(v) for v in doc["image_hw"]),
                layout={key: int(doc["layout"][key]) for key in ("n_special", "grid_h", "grid_w")},
                clips=list(doc["clips"]),
                options=dict(doc["options"]),
                kv_keep=[float(v) for v in levels["kv_keep"]],
                query_merge=[int(v) for v in levels["query_merge"]],
                metrics=[str(m) for m in doc["metrics"]],
                kv={metric: _table(stats, f"{source} kv.{metric}") for metric, stats in doc["kv"].items()},
                query={metric: _table(stats, f"{source} query.{metric}") for metric, stats in doc["query"].items()},
                additivity=dict(doc.get("additivity") or {}),
                asymmetry=dict(doc.get("asymmetry") or {}),
                timings=dict(doc.get("timings") or {}),
                by_length=list(doc.get("by_length") or []),
                length_model=dict(doc.get("length_model") or {}),
                versions=dict(doc.get("versions") or {}),
                created=str(doc.get("created") or ""),
            )
        except Spark3rError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise Spark3rError(f"{source} has a malformed field ({error}): rerun profile-layers") from None
        profile.validate(source)
        return profile

    def validate(self, source: str = "profile") -> None:
        """Check levels, layer count, table shapes and values; one Spark3rError sentence for the first problem."""
        if self.global_layers < 1 or self.frames < 1:
            raise Spark3rError(f"{source} needs global_layers >= 1 and frames >= 1, got {self.global_layers} and "
                               f"{self.frames}: rerun profile-layers")
        if len(self.image_hw) != 2:
            raise Spark3rError(f"{source} image_hw must be [height, width], got {list(self.image_hw)}")
        if any(not 0.0 < keep <= 1.0 for keep in self.kv_keep) or 1.0 not in self.kv_keep \
                or len(set(self.kv_keep)) != len(self.kv_keep):
            raise Spark3rError(f"{source} levels.kv_keep must be distinct values in (0, 1] including the dense level "
                               f"1.0, got {self.kv_keep}")
        if any(merge < 1 for merge in self.query_merge) or 1 not in self.query_merge \
                or len(set(self.query_merge)) != len(self.query_merge):
            raise Spark3rError(f"{source} levels.query_merge must be distinct integers >= 1 including the dense level "
                               f"1, got {self.query_merge}")
        kinds = (("kv", self.kv, len(self.kv_keep)), ("query", self.query, len(self.query_merge)))
        for kind, tables, n_levels in kinds:
            absent = [metric for metric in self.metrics if metric not in tables]
            if absent:
                raise Spark3rError(f"{source} lists metric {absent[0]!r} but has no {kind}.{absent[0]} table: "
                                   "rerun profile-layers")
            for metric, table in tables.items():
                for name in STATISTICS:
                    array = getattr(table, name)
                    if array.shape != (self.global_layers, n_levels):
                        raise Spark3rError(
                            f"{source} {kind}.{metric}.{name} has shape {list(array.shape)} but {self.global_layers} "
                            f"global layers x {n_levels} {kind} levels were expected: the file is inconsistent, "
                            "rerun profile-layers")
                    if not np.isfinite(array).all():
                        raise Spark3rError(f"{source} {kind}.{metric}.{name} contains NaN or infinite values: "
                                           "the profiling run failed, rerun profile-layers")


def _table(stats: dict, source: str) -> MetricTable:
    if not isinstance(stats, dict) or any(name not in stats for name in STATISTICS):
        raise Spark3rError(f"{source} needs the statistics {', '.join(STATISTICS)}: rerun profile-layers")
    arrays = {}
    for name in STATISTICS:
        try:
            array = np.asarray(stats[name], dtype=np.float64)
        except (TypeError, ValueError):
            raise Spark3rError(f"{source}.{name} is not a numeric [layers x levels] array: rerun "
                               "profile-layers") from None
        arrays[name] = array
    return MetricTable(**arrays)


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile from `path` (profile.json, or the folder that holds it)."""
    path = Path(path)
    if path.is_dir():
        path = path / PROFILE_JSON
    if not path.is_file():
        raise ParameterError(f"profile {path} does not exist: run profile-layers first or pass `path` PATH", "path")
    data = path.read_bytes()
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except _NonFinite as constant:
        raise Spark3rError(f"profile {path} holds {constant} where numbers belong: the profile is broken (non-finite "
                           "deviations); rerun profile-layers") from None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError):
        raise Spark3rError(f"profile {path} is not valid JSON (corrupt or truncated): rerun profile-layers") from None
    profile = Profile.from_dict(doc, source=f"profile {path}")
    profile.sha256 = hashlib.sha256(data).hexdigest()
    return profile


class _NonFinite(Exception):
    """A NaN or Infinity in a profile's JSON (json.loads accepts them; a profile must not hold them)."""


def _reject_constant(name: str):
    raise _NonFinite(name)


def save_profile(profile: Profile, out_dir: str | os.PathLike, raw: dict[str, np.ndarray] | None = None) -> Path:
    """Validate `profile` and write `<out_dir>/profile.json` (and `profile.npz` from `raw`) atomically.

    Fills `versions` and `created` when empty and sets `profile.sha256` to the written file's digest.
    Returns the path of profile.json.
    """
    profile.validate("profile")
    if not profile.versions:
        profile.versions = _versions()
    if not profile.created:
        profile.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **raw)
        write_atomic(out_dir / PROFILE_NPZ, buffer.getvalue())
    data = (json.dumps(profile.to_dict(), indent=1, allow_nan=False) + "\n").encode("utf-8")
    path = out_dir / PROFILE_JSON
    write_atomic(path, data)
    profile.sha256 = hashlib.sha256(data).hexdigest()
    return path



def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch
    try:
        spark3r_version = version("spark3r")
    except PackageNotFoundError:
        spark3r_version = "unknown"
    return {"spark3r": spark3r_version, "torch": torch.__version__, "numpy": np.__version__}
