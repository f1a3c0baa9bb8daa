"""Export a trained CNN to an ONNX file, checked against PyTorch before it is written.

The graph and its runtime live in ``onnx_backend``; this module adds the check and the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import LeukoscopeError
from .inference import Predictor, TorchBackend
from .io import View, atomic_write, load_view
from .onnx_backend import OnnxBackend, onnx_bytes

TOLERANCE = 1e-3  # max absolute difference of any class probability, ONNX Runtime vs PyTorch


def check_images(paths: Sequence[os.PathLike], view: View, limit: int = 64) -> torch.Tensor:
    """Real images as the model sees them, to compare the export on; random images when none are given.

    The graph starts after framing (cell location, stain normalisation): those stay in Python, as
    ``leukoscope.io.frame``, before the graph."""
    arrays = []
    size = view.size
    for path in list(paths)[:limit]:
        arrays.append(load_view(path, view)[0])
    if not arrays:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=generator)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def export_onnx(predictor: Predictor, out: str | os.PathLike, images: torch.Tensor, tolerance: float = TOLERANCE) -> float:
    """Write ``out`` and return the max probability difference to PyTorch on ``images``.

    Raises (and writes nothing) when the difference exceeds ``tolerance``.
    """
    if "state_dict" not in predictor.checkpoint:
        raise LeukoscopeError(f"only PyTorch models can be exported; {predictor.source!r} is a {predictor.kind} model")
    data = onnx_bytes(predictor.checkpoint)
    exported = Predictor(predictor.checkpoint, source=str(out), backend=OnnxBackend(data))
    torch_backed = isinstance(predictor.backend, TorchBackend)
    reference = predictor if torch_backed else Predictor(predictor.checkpoint, source=predictor.source)  # always PyTorch
    diff = float(np.abs(exported.predict_proba(images) - reference.predict_proba(images)).max())
    if not diff <= tolerance:
        raise LeukoscopeError(f"ONNX export differs from PyTorch by {diff:.3g} in probability (tolerance {tolerance}); not written")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as handle:
        handle.write(data)
    return diff
