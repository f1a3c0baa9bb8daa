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
INPUT = "images"  # the graphs' one input: a uint8 (N, 3, H, W) batch
GRAPH_FORMAT = 1  # bump when the exported graph changes, so cached graphs are rebuilt
INT8_RECIPE = 3  # bump when quantize_int8 changes: int8 graphs of an older recipe are rebuilt (3: 7-bit weights on 2x2 pixel blocks, refined)
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


class SpaceToDepth(torch.autograd.Function):
    """ONNX's SpaceToDepth (block 2, DCR order: channel (dy * 2 + dx) * C + c), which PyTorch's exporter
    would otherwise write as a six-dimensional Reshape and Transpose (slower in ONNX Runtime)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(n, 4 * c, h // 2, w // 2)

    @staticmethod
    def symbolic(g: Any, x: Any) -> Any:
        return g.op("SpaceToDepth", x, blocksize_i=2)


class RawPixelStem(nn.Module):
    """CellNet's stem (a 3x3 convolution of stride 2 and padding 1, + batch norm) that takes the uint8
    pixels themselves: the normalisation ``(x - 255 mean) / (255 std)`` and the batch norm are folded
    into its weights and bias.

    Zero padding of normalised images is padding with the mean colour in pixels: each channel is padded
    with its mean pixel value (rounded: within half a grey level). The int8 graph starts here: its first
    convolution reads the pixels as they come (scale 1, zero point 0), with no cast, subtraction,
    division or quantisation of the whole image before it (a fifth of `pbc`'s int8 network time).

    The 3x3 stride-2 convolution is run as a 2x2 stride-1 convolution of the image's 2x2 blocks stacked
    as 12 channels (space to depth; the fourth row and column of each 2x2 kernel are zero): the same
    sums, but ONNX Runtime's int8 convolution handles 12 input channels far better than 3 (`pbc`'s
    int8 network alone 13% faster; docs/benchmarks.md, "int8").
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, mean: Sequence[float], std: Sequence[float], size: int):
        super().__init__()
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        fused = fuse_conv_bn_eval(conv.eval(), bn.eval())  # PyTorch's own batch-norm folding
        mean_px, std_px = torch.tensor(mean) * 255, torch.tensor(std) * 255
        weight = fused.weight / std_px[None, :, None, None]  # then the normalisation: w * (x - m) / s = (w / s) x - sum(w m / s)
        bias = fused.bias - (fused.weight * (mean_px / std_px)[None, :, None, None]).sum((1, 2, 3))
        blocks = torch.zeros(conv.out_channels, 4 * 3, 2, 2)  # weight[o, c, 2 ky + dy, 2 kx + dx] -> blocks[o, (2 dy + dx) 3 + c, ky, kx]
        for dy in range(2):
            for dx in range(2):
                tap = weight[:, :, dy::2, dx::2]
                blocks[:, (2 * dy + dx) * 3 : (2 * dy + dx + 1) * 3, : tap.shape[2], : tap.shape[3]] = tap
        self.conv = nn.Conv2d(12, conv.out_channels, 2, 1, 0, bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(blocks)
            self.conv.bias.copy_(bias)
        out = (size - 1) // 2 + 1
        self.pad = (1, 2 * out + 1 - size, 1, 2 * out + 1 - size)  # left, right, top, bottom: an even square of out + 1 blocks
        fill = torch.tensor([int(round(float(v))) for v in mean_px], dtype=torch.uint8)
        border = fill.view(1, 3, 1, 1).repeat(1, 1, 2 * out + 2, 2 * out + 2)
        border[:, :, 1 : 1 + size, 1 : 1 + size] = 0
        self.register_buffer("border", border)  # the mean colour around the image, zero over it

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        padded = torch.maximum(nn.functional.pad(images, self.pad), self.border)  # zeros around the image, then the mean colour
        return self.conv(SpaceToDepth.apply(padded).float())


def _raw_pixel_network(network: nn.Module, mean: Sequence[float], std: Sequence[float], size: int) -> nn.Module | None:
    """``network`` reading uint8 pixels of ``size`` through a RawPixelStem, or None when its stem is not a
    CellNet's (a 3-channel 3x3 Conv2d of stride 2 and padding 1 + BatchNorm2d first in ``features``)."""
    features = getattr(network, "features", None)
    stem = features[0] if isinstance(features, nn.Sequential) and len(features) else None
    if not (isinstance(stem, nn.Sequential) and len(stem) == 2 and isinstance(stem[0], nn.Conv2d) and isinstance(stem[1], nn.BatchNorm2d)):
        return None
    conv = stem[0]
    if (conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode) != (
            3, (3, 3), (2, 2), (1, 1), (1, 1), 1, "zeros"):
        return None
    network.features[0] = RawPixelStem(conv, stem[1], mean, std, size)
    return network


def onnx_bytes(checkpoint: dict[str, Any], opset: int = OPSET, raw_pixels: bool = False) -> bytes:
    """The checkpoint's network with its preprocessing, as a serialized ONNX model with metadata.

    ``raw_pixels``: the normalisation folded into the first convolution (``RawPixelStem``) where the
    network has a CellNet stem, the source of the int8 graph (``quantize_int8``); the same
    probabilities within rounding of the mean colour at the border (at most 0.003 apart on `pbc`'s validation images)."""
    pre = ModelCard.from_meta(checkpoint).preprocessing
    network = model_from_checkpoint(checkpoint).float().eval()
    folded = _raw_pixel_network(network, pre.mean, pre.std, pre.image_size) if raw_pixels else None
    if checkpoint.get("ood") is not None:
        network = WithOOD(network, checkpoint["ood"])  # the OOD score as one more output column
    wrapped = (network if folded is not None else WithPreprocessing(network, pre.mean, pre.std)).eval()
    size = pre.image_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, but needs no onnxscript and traces CellNet exactly
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # the padding's reversed pad list; harmless
        warnings.filterwarnings("ignore", message=".*'instance_norm' is set to train=True")  # IBN's instance half: right in eval too
        # instance norm's shape checks, traced as constants: its channels are fixed, and its batch stays dynamic
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.nn\.(modules\.instancenorm|functional)$")
        torch.onnx.export(wrapped, (example,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT],
                          output_names=["logits"], dynamic_axes={INPUT: {0: "batch"}, "logits": {0: "batch"}})
    import onnx

    graph = onnx.load_from_string(buffer.getvalue())
    meta = {k: checkpoint[k] for k in META_KEYS if checkpoint.get(k) is not None}
    entry = graph.metadata_props.add()
    entry.key, entry.value = "leukoscope", json.dumps(meta)
    return graph.SerializeToString()


def onnxruntime():
    """ONNX Runtime, imported with its telemetry off. From 1.29 on, on Linux and macOS too, it records usage events
    (a device id, each session it runs) in ~/.cache/Microsoft/DeveloperTools/.onnxruntime and uploads them to
    Microsoft; a tool that reads clinical images sends nothing anywhere. ORT_DISABLE_TELEMETRY is read when the
    module is first imported, so it is set before (a user's own setting of it is kept); where something imported
    ONNX Runtime earlier, its events after this point are turned off."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    ort.disable_telemetry_events()
    return ort


class OnnxBackend:
    """ONNX Runtime session taking uint8 batches, as exported by ``onnx_bytes``."""

    kind = "onnx"

    def __init__(self, model: bytes | str | os.PathLike, precision: str = "fp32", threads: int | None = None):
        self.precision = precision  # of the convolutions: fp32, or int8 for a quantised graph
        ort = onnxruntime()

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
        (logits,) = self.session.run(None, {INPUT: np.ascontiguousarray(batch_uint8.numpy())})
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
    onnxruntime()
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
    point 0), as 2x2 blocks stacked to 12 channels (``RawPixelStem``). CPUs without VNNI (AVX2, AVX-512
    before VNNI) multiply uint8 by int8 in pairs summed into saturating 16-bit integers (vpmaddubsw),
    which bright pixels times full-range int8 weights overflow (`pbc`, simulated: 46% of the stem's
    outputs), so that convolution's int8 weights stay within +-PIXEL_WEIGHT_LIMIT (7 bits), re-rounded
    and bias-corrected on the calibration images (``_refine_stem``); a graph that normalises first
    gives its first convolution uint8 weights (exact 32-bit sums; slower). The later convolutions see
    sparse ReLU outputs (mean 4-9 of 255) and keep 8-bit int8 weights: no pair overflowed on real `pbc`
    images (7-bit weights everywhere would rule it out too, but doubled the OOD score's int8 error)."""
    import tempfile

    import onnx
    onnxruntime()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT: np.ascontiguousarray(calibration[i : i + batch_size].numpy())}
                                 for i in range(0, len(calibration), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    source_graph = onnx.load_from_string(model)
    props = {p.key: p.value for p in source_graph.metadata_props}
    first = next((n for n in source_graph.graph.node if n.op_type == "Conv"), None)
    pixels = _pixel_cast(source_graph.graph, first)
    if pixels:  # the pixels as they come; int8 weights of at most PIXEL_WEIGHT_LIMIT (ONNX Runtime's reduced range), refined below
        overrides = {pixels.output[0]: [{"scale": np.array(1.0, np.float32), "zero_point": np.array(0, np.uint8)}],
                     first.input[1]: [{"axis": 0, "quant_type": QuantType.QInt8, "reduce_range": True}]}
    else:  # a quantised normalised image: uint8 weights, exact everywhere
        overrides = {first.input[1]: [{"axis": 0, "quant_type": QuantType.QUInt8}]} if first is not None else {}
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
        _refine_stem(graph.graph, source_graph, first, calibration)
    meta = {**json.loads(props.get("leukoscope", "{}")), "precision": "int8", "calibration_images": int(len(calibration)),
            "int8_recipe": INT8_RECIPE}
    del graph.metadata_props[:]
    entry = graph.metadata_props.add()
    entry.key, entry.value = "leukoscope", json.dumps(meta)
    return graph.SerializeToString()


PIXEL_WEIGHT_LIMIT = 64  # |int8 weight| on the pixels: 2 x 255 x 64 < 32,768 (vpmaddubsw's pairs cannot saturate)


def _refine_stem(graph, source, first: Any, calibration: torch.Tensor) -> None:
    """Re-round the int8 ``graph``'s first convolution's weights and correct its bias, so that its outputs
    on the ``calibration`` images stay as close as they can to the fp32 ones (``source``: the fp32 model,
    ``first``: its first Conv).

    Its 7-bit weights (PIXEL_WEIGHT_LIMIT) multiply pixels far from zero (a slide's background near 200
    of 255). Each weight is first rounded to nearest; then, channel by channel, a weight moves one step
    up or down wherever that lowers the variance of the output's error over the calibration images'
    input patches (rounding fitted to the data, in the spirit of Nagel et al. 2020's AdaRound), and the
    bias absorbs the error's mean (bias correction, Nagel et al. 2019). On `pbc` validation the mean
    probability difference to fp32 went from 0.00095 (rounded to nearest) to 0.00043, against 0.00061
    for the 8-bit unsigned weights used before (docs/benchmarks.md, "int8")."""
    from onnx import numpy_helper

    constants = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    conv = next(n for n in graph.node if n.op_type == "Conv")
    weight_dq, bias_dq = producers[conv.input[1]], producers[conv.input[2]]
    stored, scale, zero = (numpy_helper.to_array(constants[name]) for name in weight_dq.input)
    target = next(numpy_helper.to_array(i) for i in source.graph.initializer if i.name == first.input[1]).astype(np.float64)
    mean, covariance = _patch_moments(source, first, calibration, target.shape[2:])
    steps = scale.astype(np.float64)
    rounded = stored.astype(np.int64).reshape(len(stored), -1) - zero.astype(np.int64)[:, None]
    for channel in range(len(rounded)):
        _round_to_patches(rounded[channel], target[channel].ravel() / steps[channel], covariance)
    error = rounded * steps[:, None] - target.reshape(len(target), -1)
    weight_name, bias_name = weight_dq.input[0], bias_dq.input[0]
    refined = (rounded + zero.astype(np.int64)[:, None]).reshape(stored.shape).astype(stored.dtype)
    bias_steps = numpy_helper.to_array(constants[bias_dq.input[1]]).astype(np.float64)
    bias = np.round(numpy_helper.to_array(constants[bias_name]) - error @ mean / bias_steps).astype(np.int32)
    constants[weight_name].CopyFrom(numpy_helper.from_array(refined, weight_name))
    constants[bias_name].CopyFrom(numpy_helper.from_array(bias, bias_name))


def _patch_moments(source, first: Any, images: torch.Tensor, kernel: tuple[int, ...], chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance, over every output position of every image, of the patches that the fp32
    model ``source``'s convolution ``first`` reads on ``images`` (one entry per weight, flattened as the
    weights are); summed a few images at a time, so 256 calibration images need tens of MB, not gigabytes."""
    import onnx

    ort = onnxruntime()
    probe = onnx.ModelProto()
    probe.CopyFrom(source)
    probe.graph.output.add(name=first.input[0])
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    (inputs,) = session.run([first.input[0]], {INPUT: np.ascontiguousarray(images.numpy())})
    attrs = {a.name: list(a.ints) for a in first.attribute}
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    total, outer, count = 0.0, 0.0, 0
    for start in range(0, len(inputs), chunk):
        padded = nn.functional.pad(torch.from_numpy(inputs[start : start + chunk]).double(), (left, right, top, bottom))
        columns = nn.functional.unfold(padded, kernel, dilation=attrs.get("dilations", [1, 1]), stride=attrs.get("strides", [1, 1]))
        patches = columns.permute(1, 0, 2).reshape(columns.shape[1], -1)
        total, outer, count = total + patches.sum(1), outer + patches @ patches.T, count + patches.shape[1]
    mean = total / count
    return mean.numpy(), (outer / count - torch.outer(mean, mean)).numpy()


def _round_to_patches(rounded: np.ndarray, target: np.ndarray, covariance: np.ndarray, sweeps: int = 20) -> None:
    """Move integer weights ``rounded`` (in place, within +-PIXEL_WEIGHT_LIMIT; zeros of ``target`` stay
    zero) one step at a time while that lowers (r - t)' C (r - t): the variance of the output's error
    over the patches whose covariance is C, in units of the weights' step."""
    error = rounded - target
    for _ in range(sweeps):
        moved = False
        for k in np.flatnonzero(target):
            for step in (1, -1):
                if abs(rounded[k] + step) <= PIXEL_WEIGHT_LIMIT and 2 * step * (covariance[k] @ error) + covariance[k, k] < 0:
                    rounded[k] += step
                    error[k] += step
                    moved = True
                    break
        if not moved:
            return


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
