"""Leukoscope: blood-cell image classification with honest, patient-level evaluation."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "adapt_model", "count"]


def load_model(model: str, **kwargs: Any):
    """Load a run folder, checkpoint file or bundled model name; returns a Predictor.

    The import is deferred so that ``import leukoscope`` stays cheap and free of side effects.
    """
    from .inference import load_model as _load

    return _load(model, **kwargs)


def adapt_model(model: Any, inputs, steps: int | None = None):
    """``--adapt`` from Python: ``model`` (a name or path for load_model, or a loaded model) adapted,
    without labels, to the image files and folders ``inputs`` of one lab (32 images or more); returns
    the adapted model. ``steps``: entropy steps after the BatchNorm statistics (default:
    ``leukoscope.adapt.default_steps``, 40 for multi-class cell-window models, else 0)."""
    import os

    from .adapt import adapt_to_files
    from .inference import iter_inputs
    from .progress import note

    predictor = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return adapt_to_files(predictor, iter_inputs(inputs), steps, note)


def count(paths, model: Any = "wbc", **kwargs: Any):
    """Find and classify every white cell of the smear fields in ``paths`` (files and folders);
    returns one ``CountedCell`` record per cell (and per unreadable file, with ``error``)."""
    from .counting import count as _count

    return _count(paths, model=model, **kwargs)
