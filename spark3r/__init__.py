"""spark3r: training-free asymmetric token reduction for feed-forward 3D reconstruction transformers.

Public API: `load_model`, `load_schedule`, `apply_schedule`, `reduced`, `Schedule`.
"""
from __future__ import annotations

from spark3r.models.loading import load_model

__version__ = "0.1.0"
__all__ = ["load_model", "load_schedule", "apply_schedule", "reduced", "Schedule"]

_LAZY = {
    "load_schedule": "spark3r.schedule",
    "Schedule": "spark3r.schedule",
    "apply_schedule": "spark3r.schedule",
    "reduced": "spark3r.schedule",
}


def __getattr__(name: str):
    """The schedule and reduction API, imported on first use (they pull in more than loading a model needs)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'spark3r' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
