"""Leukoscope: blood-cell image classification with honest, patient-level evaluation."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "count"]


def load_model(model: str, **kwargs: Any):
    """Load a run folder, checkpoint file or bundled model name; returns a Predictor.

    The import is deferred so that ``import leukoscope`` stays cheap and free of side effects.
    """
    from .inference import load_model as _load

    return _load(model, **kwargs)


def count(paths, model: Any = "wbc", **kwargs: Any):
    """Find and classify every white cell of the smear fields in ``paths`` (files and folders);
    returns one ``CountedCell`` record per cell (and per unreadable file, with ``error``)."""
    from .counting import count as _count

    return _count(paths, model=model, **kwargs)
