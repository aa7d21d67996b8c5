"""The resolved reduction of one global attention layer at one sequence length."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Protocol

from spark3r.errors import Spark3rError

KV_METHODS = ("frame_stride", "grid", "random", "key_norm")
DEFAULT_KV_METHOD = KV_METHODS[0]
SIMILARITIES = ("key", "input")


@dataclass(frozen=True)
class Reduction:
    """What one global layer does at S frames.

    kv_keep: fraction of K/V kept, in (0, 1]; 1 keeps all. `frame_stride` and `grid` use the integer factor
        `kv_factor` = round(1 / kv_keep); `random` and `key_norm` keep round(kv_keep * patches) patches per frame.
    kv_method: one of KV_METHODS.
    keep_reference_frame: keep every token of frame 0 (frame_stride always keeps frame 0).
    query_merge: query reduction factor r_Q >= 1 (about N / r_Q queries remain); 1 merges nothing.
    group_frames: queries merge only inside groups of this many consecutive frames.
    similarity: what the matching compares: "key" (keys averaged over heads) or "input" (the attention input).
    seed: seed of the `random` K/V method.
    """

    kv_keep: float = 1.0
    kv_method: str = DEFAULT_KV_METHOD
    keep_reference_frame: bool = True
    query_merge: int = 1
    group_frames: int = 20
    similarity: str = "key"
    seed: int = 0

    def __post_init__(self):
        keep = self.kv_keep
        if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0 < keep <= 1:
            raise Spark3rError(f"kv_keep must be a number in (0, 1], got {keep!r}")
        object.__setattr__(self, "kv_keep", float(keep))
        if self.kv_method not in KV_METHODS:
            raise Spark3rError(f"kv_method {self.kv_method!r} is unknown: use one of {', '.join(KV_METHODS)}")
        if not isinstance(self.keep_reference_frame, bool):
            raise Spark3rError(f"keep_reference_frame must be true or false, got {self.keep_reference_frame!r}")
        for name, low in (("query_merge", 1), ("group_frames", 1), ("seed", None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
                raise Spark3rError(f"{name} must be an integer{'' if low is None else f' >= {low}'}, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.similarity not in SIMILARITIES:
            raise Spark3rError(f"similarity {self.similarity!r} is unknown: use one of {', '.join(SIMILARITIES)}")

    @property
    def kv_factor(self) -> int:
        """The integer K/V reduction factor of the stride-like methods: round(1 / kv_keep)."""
        return max(1, round(1.0 / self.kv_keep))


class LayerReductions(Protocol):
    """Anything that gives the reduction of every global layer at a clip length (a schedule does)."""

    def reductions(self, frames: int) -> list[Reduction]:
        ...
