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
from .images import ImageReadError, View, load_view
from .inference import Predictor, TorchBackend
from .io import atomic_write
from .onnx_backend import OnnxBackend, onnx_bytes
from .progress import note, plural

TOLERANCE = 1e-3  # max absolute difference of any class probability, ONNX Runtime vs PyTorch
INT8_AGREEMENT = 0.99  # an int8 graph must make the fp32 model's call on at least this share of the check images


def check_images(paths: Sequence[os.PathLike], view: View, limit: int = 64, option: str = "--images") -> torch.Tensor:
    """Real images as the model sees them, to compare the export on; random images when none are given.
    Unreadable ones are left out with a note; none readable is an error naming ``option``.

    The graph starts after framing (cell location, stain normalisation): those stay in Python, as
    ``leukoscope.images.frame``, before the graph."""
    arrays, unreadable = [], []
    size = view.size
    paths = list(paths)
    for path in paths[:: max(1, len(paths) // limit)][:limit]:  # spread over the folder (its classes), not its first files
        try:
            arrays.append(load_view(path, view)[0])
        except (ImageReadError, ValueError) as err:
            unreadable.append(f"{path}: {err}")
    if unreadable and not arrays:
        raise LeukoscopeError(f"{option}: none of the {plural(len(unreadable), 'image')} could be read (e.g. {unreadable[0]})")
    if unreadable:
        note(f"{option}: {plural(len(unreadable), 'unreadable image')} left out of the check (e.g. {unreadable[0]})")
    if not arrays:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=generator)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def export_onnx(predictor: Predictor, out: str | os.PathLike, images: torch.Tensor, tolerance: float = TOLERANCE,
                calibration: torch.Tensor | None = None, int8: bool = False) -> float | tuple[float, float]:
    """Write ``out`` and return the max probability difference to PyTorch on ``images``.

    Raises (and writes nothing) when the difference exceeds ``tolerance``. With ``calibration``
    images the graph is quantised to int8 (``quantize.faithful_int8``, which also picks its input on
    them); with ``int8`` it is the checkpoint's own int8 graph (see quantize). Then the check is the share of ``images`` on which it makes the
    fp32 model's call (at least INT8_AGREEMENT); returns (max probability difference, that share).
    """
    if "state_dict" not in predictor.checkpoint:
        raise LeukoscopeError(f"only PyTorch models can be exported; {predictor.source!r} is a {predictor.kind} model")
    data = onnx_bytes(predictor.checkpoint)
    if int8:
        from .quantize import load_int8

        own = load_int8(predictor.checkpoint, predictor.source, build=True)
        return _export_int8(predictor, out, images, data, own.graph_bytes())
    if calibration is not None:
        from .quantize import faithful_int8

        return _export_int8(predictor, out, images, data, faithful_int8(predictor.checkpoint, calibration, calibration)[0])
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


def _export_int8(predictor: Predictor, out: str | os.PathLike, images: torch.Tensor, data: bytes, quantized: bytes) -> tuple[float, float]:
    fp32 = Predictor(predictor.checkpoint, source=predictor.source, backend=OnnxBackend(data)).predict_proba(images)
    int8 = Predictor(predictor.checkpoint, source=str(out), backend=OnnxBackend(quantized)).predict_proba(images)
    diff = float(np.abs(int8 - fp32).max())
    agreement = float(np.mean([predictor.decide(a) == predictor.decide(b) for a, b in zip(int8, fp32)]))  # its decision rule, threshold included
    if agreement < INT8_AGREEMENT:
        raise LeukoscopeError(f"the int8 graph makes the fp32 call on {agreement:.1%} of the check images (needs {INT8_AGREEMENT:.0%}); "
                              "not written: calibrate on more (or more typical) training images, or export fp32")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as handle:
        handle.write(quantized)
    return diff, agreement
