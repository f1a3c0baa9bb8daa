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
INT8_RECIPE = 2  # bump when quantize_int8 changes: int8 graphs of an older recipe are rebuilt (2: uint8 weights on the pixels)
META_KEYS = (*ModelCard.KEYS, "config", "metrics", "train_command", "data_manifest_sha256", "bundled_name",
             "recoloured_training_images")


class WithPreprocessing(nn.Module):
    """uint8 images in, logits out: the normalisation becomes part of the graph."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images.float() - self.mean) / self.std)


class RawPixelStem(nn.Module):
    """A stem convolution (+ batch norm) that takes the uint8 pixels themselves: the normalisation
    ``(x - 255 mean) / (255 std)`` and the batch norm are folded into its weights and bias.

    Zero padding of normalised images is padding with the mean colour in pixels, so each channel is
    padded with its mean pixel value (rounded: within half a grey level) and the convolution pads no
    more. The int8 graph starts here: its first convolution reads the pixels as they come (scale 1,
    zero point 0), with no cast, subtraction, division or quantisation of the whole image before it,
    which took a fifth of the int8 network's time on `pbc`.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        fused = fuse_conv_bn_eval(conv.eval(), bn.eval())  # PyTorch's own batch-norm folding
        mean_px, std_px = torch.tensor(mean) * 255, torch.tensor(std) * 255
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, bias=True)
        with torch.no_grad():  # then the normalisation: w * (x - m) / s = (w / s) x - sum(w m / s)
            self.conv.weight.copy_(fused.weight / std_px[None, :, None, None])
            self.conv.bias.copy_(fused.bias - (fused.weight * (mean_px / std_px)[None, :, None, None]).sum((1, 2, 3)))
        self.pad = conv.padding
        self.fill = [int(round(float(v))) for v in mean_px]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (ph, pw) = self.pad
        channels = images.split(1, dim=1)
        padded = torch.cat([nn.functional.pad(x, (pw, pw, ph, ph), value=v) for x, v in zip(channels, self.fill, strict=True)], 1)
        return self.conv(padded.float())


def _raw_pixel_network(network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module | None:
    """``network`` reading uint8 pixels through a RawPixelStem, or None when its stem is not a CellNet's
    (a 3-channel Conv2d + BatchNorm2d first in ``features``, zero padding, no dilation or groups)."""
    features = getattr(network, "features", None)
    stem = features[0] if isinstance(features, nn.Sequential) and len(features) else None
    if not (isinstance(stem, nn.Sequential) and len(stem) == 2 and isinstance(stem[0], nn.Conv2d) and isinstance(stem[1], nn.BatchNorm2d)):
        return None
    conv = stem[0]
    if conv.in_channels != 3 or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    network.features[0] = RawPixelStem(conv, stem[1], mean, std)
    return network


def onnx_bytes(checkpoint: dict[str, Any], opset: int = OPSET, raw_pixels: bool = False) -> bytes:
    """The checkpoint's network with its preprocessing, as a serialized ONNX model with metadata.

    ``raw_pixels``: the normalisation folded into the first convolution (``RawPixelStem``) where the
    network has a CellNet stem, the source of the int8 graph (``quantize_int8``); the same
    probabilities within rounding of the mean colour at the border (at most 0.003 apart on `pbc`'s validation images)."""
    pre = ModelCard.from_meta(checkpoint).preprocessing
    network = model_from_checkpoint(checkpoint).float().eval()
    folded = _raw_pixel_network(network, pre.mean, pre.std) if raw_pixels else None
    if checkpoint.get("ood") is not None:
        network = WithOOD(network, checkpoint["ood"])  # the OOD score as one more output column
    wrapped = (network if folded is not None else WithPreprocessing(network, pre.mean, pre.std)).eval()
    size = pre.image_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, but needs no onnxscript and traces CellNet exactly
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # the padding's reversed pad list; harmless
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
    """``model`` (from ``onnx_bytes``, best with ``raw_pixels``) in int8: ONNX Runtime static
    quantisation, QDQ format, per-channel weights and uint8 activations whose ranges are calibrated on
    ``calibration`` ((N, 3, S, S) uint8 images as the model sees them; training images, a few hundred).

    Convolutions, ReLUs and residual additions are quantised, so activations stay uint8 from one
    convolution to the next (quantising the convolutions alone left a dequantise-ReLU-quantise round
    trip after each: a quarter of the int8 time on `pbc`); pooling, the classifier and the OOD head
    stay fp32. A raw-pixel graph's first convolution reads the uint8 images directly (scale 1, zero
    point 0). That convolution gets uint8 weights: CPUs without VNNI (AVX2, AVX-512 before VNNI)
    multiply uint8 by int8 in pairs summed into saturating 16-bit integers (vpmaddubsw), which bright
    pixels times full-range int8 weights overflow (`pbc`, simulated: 46% of the stem's outputs), and
    uint8 x uint8 goes through exact 32-bit sums. The later convolutions see sparse ReLU outputs
    (mean 4-9 of 255) and keep int8 weights: no pair overflowed on real `pbc` images (7-bit weights
    everywhere would rule it out too, but doubled the OOD score's int8 error)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": np.ascontiguousarray(calibration[i : i + batch_size].numpy())}
                                 for i in range(0, len(calibration), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    source_graph = onnx.load_from_string(model)
    props = {p.key: p.value for p in source_graph.metadata_props}
    first = next((n for n in source_graph.graph.node if n.op_type == "Conv"), None)
    pixels = _pixel_cast(source_graph.graph, first)
    overrides = {first.input[1]: [{"axis": 0, "quant_type": QuantType.QUInt8}]} if first is not None else {}
    if pixels:
        overrides[pixels.output[0]] = [{"scale": np.array(1.0, np.float32), "zero_point": np.array(0, np.uint8)}]
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(model)
        logging.disable(logging.WARNING)  # its advice to run a shape-inference pre-pass, printed on every call, changes nothing here
        try:
            quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "Relu", "Add"],
                            extra_options={"TensorQuantOverrides": overrides})
        finally:
            logging.disable(logging.NOTSET)
        graph = onnx.load(str(target))
    if pixels:
        _read_pixels_directly(graph.graph, pixels)
    meta = {**json.loads(props.get("leukoscope", "{}")), "precision": "int8", "calibration_images": int(len(calibration)),
            "int8_recipe": INT8_RECIPE}
    del graph.metadata_props[:]
    entry = graph.metadata_props.add()
    entry.key, entry.value = "leukoscope", json.dumps(meta)
    return graph.SerializeToString()


def _pixel_cast(graph, first: Any) -> Any:
    """The Cast of uint8 pixels to float that feeds the ``first`` convolution directly (a raw-pixel graph), or None."""
    import onnx

    producers = {out: node for node in graph.node for out in node.output}
    cast = producers.get(first.input[0]) if first is not None else None
    if cast is None or cast.op_type != "Cast":
        return None
    to = next((a.i for a in cast.attribute if a.name == "to"), None)
    return cast if to == onnx.TensorProto.FLOAT else None


def _read_pixels_directly(graph, cast) -> None:
    """Drop ``cast`` and the QuantizeLinear after it (scale 1, zero point 0: the identity on 0-255), so
    the first convolution's DequantizeLinear, fused into a QLinearConv by ONNX Runtime, reads the pixels."""
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == cast.output[0]]
    users = [n for n in graph.node if cast.output[0] in n.input and n not in quantize]
    if len(quantize) != 1 or users:
        raise LeukoscopeError("unexpected int8 graph: the pixels' cast feeds more than one quantisation")
    from onnx import numpy_helper

    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    scale, zero = (constants.get(name) for name in quantize[0].input[1:3])
    if scale is None or zero is None or float(scale) != 1.0 or int(zero) != 0:
        raise LeukoscopeError(f"unexpected int8 graph: the pixels are quantised with scale {scale} and zero point {zero}, not 1 and 0")
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == quantize[0].output[0]:
                node.input[k] = cast.input[0]
    graph.node.remove(quantize[0])
    graph.node.remove(cast)
