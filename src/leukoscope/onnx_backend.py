"""A CNN checkpoint as an ONNX graph (preprocessing included), run by ONNX Runtime.

The graph takes (N, 3, S, S) uint8 images and returns logits; everything a predictor needs
(classes, image size, temperature, threshold, training metrics) travels in its metadata, so an
exported ``model.onnx`` needs nothing else. ``cached_onnx_backend`` is what lets a checkpoint
(bundled models included) predict through ONNX Runtime by default: the graph is exported once
per checkpoint and kept in the cache folder.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint import ModelCard, model_from_checkpoint
from .errors import LeukoscopeError
from .io import atomic_write, cache_root, sha256_file
from .ood import WithOOD

OPSET = 17
GRAPH_FORMAT = 1  # bump when the exported graph changes, so cached graphs are rebuilt
META_KEYS = (*ModelCard.KEYS, "config", "metrics", "train_command", "data_manifest_sha256", "bundled_name")


class WithPreprocessing(nn.Module):
    """uint8 images in, logits out: the normalisation becomes part of the graph."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images.float() - self.mean) / self.std)


def onnx_bytes(checkpoint: dict[str, Any], opset: int = OPSET) -> bytes:
    """The checkpoint's network with its preprocessing, as a serialized ONNX model with metadata."""
    pre = ModelCard.from_meta(checkpoint).preprocessing
    network = model_from_checkpoint(checkpoint).float()
    if checkpoint.get("ood") is not None:
        network = WithOOD(network, checkpoint["ood"])  # the OOD score as one more output column
    wrapped = WithPreprocessing(network, pre.mean, pre.std).eval()
    size = pre.image_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, but needs no onnxscript and traces CellNet exactly
        warnings.simplefilter("ignore", DeprecationWarning)
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

    def __init__(self, model: bytes | str | os.PathLike, precision: str = "fp32", threads: int | None = None):
        self.precision = precision  # of the convolutions: fp32, or int8 for a quantised graph
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = options.inter_op_num_threads = threads
        # Idle ORT threads would otherwise spin and take the cores from the threads decoding the
        # next batch: +5-17% end-to-end images/s on 2 cores (docs/benchmarks.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(self.source, options, providers=["CPUExecutionProvider"])

    def worker_copy(self) -> OnnxBackend:
        """A new single-threaded session on the same graph, for a worker process that runs one batch at a
        time beside others (a forked copy of this session would wait forever on threads it does not have)."""
        return OnnxBackend(self.source, self.precision, threads=1)

    def graph_bytes(self) -> bytes:
        """The serialized graph this session runs."""
        return self.source if isinstance(self.source, bytes) else Path(self.source).read_bytes()

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
    meta = json.loads(props["leukoscope"])
    return meta, OnnxBackend(path, precision=meta.get("precision", "fp32"))


def cached_onnx_backend(checkpoint: dict[str, Any], checkpoint_path: str | os.PathLike) -> OnnxBackend:
    """An ONNX Runtime backend for a checkpoint file, exporting its graph on first use only.

    The graph is cached under ``cache_root()/onnx``, keyed by the checkpoint's sha256 and the
    versions that shape the export; an unwritable cache only costs the export (~1 s) each time.
    """
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf

    key = f"{sha256_file(checkpoint_path)[:32]}-g{GRAPH_FORMAT}-o{OPSET}-v{__version__}-t{torch.__version__.split('+')[0]}"
    cached = cache_root() / "onnx" / f"{key}.onnx"
    if cached.is_file():
        try:
            return OnnxBackend(cached)
        except (Fail, InvalidGraph, InvalidProtobuf):
            pass  # a damaged cache entry is rebuilt below
    data = onnx_bytes(checkpoint)
    try:
        with atomic_write(cached, "wb") as handle:
            handle.write(data)
    except OSError:
        pass  # read-only home or full disk: run from memory
    return OnnxBackend(data)



def quantize_int8(model: bytes, calibration: torch.Tensor, batch_size: int = 32) -> bytes:
    """``model`` (from ``onnx_bytes``) with its convolutions in int8: ONNX Runtime static quantisation,
    QDQ format, per-channel int8 weights and uint8 activations whose ranges are calibrated on
    ``calibration`` ((N, 3, S, S) uint8 images as the model sees them; training images, a few hundred).
    Only convolutions are quantised: the normalisation, pooling, the classifier and the OOD head
    stay fp32, which kept validation accuracy within a tenth of a point on `pbc` (docs/benchmarks.md)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": np.ascontiguousarray(calibration[i : i + batch_size].numpy())}
                                 for i in range(0, len(calibration), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    props = {p.key: p.value for p in onnx.load_from_string(model).metadata_props}
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(model)
        logging.disable(logging.WARNING)  # its advice to run a shape-inference pre-pass, printed on every call, changes nothing here
        try:
            quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])
        finally:
            logging.disable(logging.NOTSET)
        graph = onnx.load(str(target))
    meta = {**json.loads(props.get("leukoscope", "{}")), "precision": "int8", "calibration_images": int(len(calibration))}
    del graph.metadata_props[:]
    entry = graph.metadata_props.add()
    entry.key, entry.value = "leukoscope", json.dumps(meta)
    return graph.SerializeToString()
