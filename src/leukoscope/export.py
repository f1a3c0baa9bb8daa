"""Export a trained CNN to ONNX (preprocessing included) and run it back with ONNX Runtime.

The exported graph takes (N, 3, S, S) uint8 images and returns logits; everything a predictor
needs (classes, image size, temperature, threshold, training metrics) travels in the file's
metadata, so ``leukoscope predict model.onnx ...`` needs nothing else.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import model_from_checkpoint
from .errors import LeukoscopeError
from .inference import Predictor
from .io import atomic_write, load_rgb

TOLERANCE = 1e-3  # max absolute difference of any class probability, ONNX Runtime vs PyTorch
META_KEYS = ("arch", "arch_kwargs", "class_names", "image_size", "mean", "std", "crop", "temperature", "threshold", "tta",
             "positive_index", "config", "metrics", "train_command", "data_manifest_sha256", "bundled_name")


class WithPreprocessing(nn.Module):
    """uint8 images in, logits out: the normalisation becomes part of the graph."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images.float() - self.mean) / self.std)


def onnx_bytes(checkpoint: dict[str, Any], opset: int = 17) -> bytes:
    wrapped = WithPreprocessing(model_from_checkpoint(checkpoint).float(), checkpoint["mean"], checkpoint["std"]).eval()
    size = int(checkpoint["image_size"])
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    buffer = io.BytesIO()
    torch.onnx.export(wrapped, (example,), buffer, dynamo=False, opset_version=opset, input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    import onnx

    graph = onnx.load_from_string(buffer.getvalue())
    meta = {k: checkpoint[k] for k in META_KEYS if checkpoint.get(k) is not None}
    entry = graph.metadata_props.add()
    entry.key, entry.value = "leukoscope", json.dumps(meta)
    return graph.SerializeToString()


class OnnxBackend:
    """ONNX Runtime session taking uint8 batches, as exported by ``onnx_bytes``."""

    kind = "onnx"

    def __init__(self, model: bytes | str | os.PathLike):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads would otherwise spin and take the cores from the threads decoding the
        # next batch: +5-17% end-to-end images/s on 2 cores (docs/benchmarks.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    def __call__(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {"images": np.ascontiguousarray(batch_uint8.numpy())})
        return torch.from_numpy(logits).float()


def load_onnx(path: str | os.PathLike) -> tuple[dict[str, Any], OnnxBackend]:
    """(metadata, backend) of an exported model, for ``Predictor``."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, DecodeError) as err:
        raise LeukoscopeError(f"{path}: not a readable ONNX file ({err})") from None
    props = {p.key: p.value for p in graph.metadata_props}
    if "leukoscope" not in props:
        raise LeukoscopeError(f"{path}: an ONNX file without leukoscope metadata; export it with `leukoscope export`")
    return json.loads(props["leukoscope"]), OnnxBackend(path)


def check_images(paths: Sequence[os.PathLike], size: int, limit: int = 64, crop: float = 1.0) -> torch.Tensor:
    """Decoded real images to compare the export on; random images when none are given."""
    arrays = []
    for path in list(paths)[:limit]:
        arrays.append(load_rgb(path, size, crop=crop))
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
    diff = float(np.abs(exported.predict_proba(images) - predictor.predict_proba(images)).max())
    if not diff <= tolerance:
        raise LeukoscopeError(f"ONNX export differs from PyTorch by {diff:.3g} in probability (tolerance {tolerance}); not written")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as handle:
        handle.write(data)
    return diff
