"""int8 inference: a checkpoint's int8 graph, built from its own training images and checked on its validation images.

ONNX Runtime's static quantisation (``onnx_backend.quantize_int8``) needs calibration images, which
the users of a bundled model do not have. So the int8 graph is built once, where the training
images are, and kept beside the checkpoint: ``NAME.pt`` -> ``NAME.int8.onnx`` (bundled models:
``tools/bundle_model.py``; a run folder: on its first ``--precision int8``, from the training images
its ``splits.csv`` lists under the data folder of its ``run.json``). Building it checks parity on
the validation images: at most MAX_ACCURACY_LOSS of accuracy lost, else nothing is written.

``--precision auto`` (``AutoPrecision``) runs int8 only where that graph exists and, on the first
batch of at least AUTO_MIN_BATCH images, it is measurably faster than fp32 on this machine (it
depends on VNNI/AMX) and makes the fp32 call on at least AUTO_MIN_AGREEMENT of them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import read_splits
from .data.dataset import decode_many
from .errors import LeukoscopeError
from .images import View
from .io import atomic_write, sha256_file
from .onnx_backend import (
    INT8_RECIPE,
    OnnxBackend,
    onnx_bytes,
    onnxruntime,
    quantize_int8,
)
from .options import PRECISIONS  # noqa: F401 (re-exported)
from .progress import note

CALIBRATION_IMAGES = 256  # calibrating on 256 training images kept `pbc` at parity on validation (docs/benchmarks.md, "int8")
CHECK_IMAGES = 2048  # validation images the parity is measured on (all of them, up to this many)
MAX_ACCURACY_LOSS = 0.002  # int8 may lose at most 0.2 points of validation accuracy
AUTO_MIN_BATCH = 32  # auto decides on the first batch at least this large (smaller batches run fp32)
AUTO_SPEEDUP = 1.15  # ... and picks int8 only if it runs that batch this much faster
AUTO_MIN_AGREEMENT = 0.98  # ... and makes the fp32 call on this share of it
RAW_PIXELS_MAX_ERROR_RATIO = 2.0  # see faithful_int8


def int8_path(checkpoint_path: str | os.PathLike) -> Path:
    """Where a checkpoint's int8 graph lives: beside it, ``model.pt`` -> ``model.int8.onnx``."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}.int8.onnx")


def faithful_int8(checkpoint: dict[str, Any], calibration: torch.Tensor, images: torch.Tensor) -> tuple[bytes, np.ndarray, np.ndarray, dict[str, Any]]:
    """The int8 graph of ``checkpoint`` calibrated on ``calibration``, the int8 and fp32 probabilities
    on ``images``, and which input it quantises (``input``, with both graphs' mean probability
    difference to fp32 on ``images``).

    Two graphs are built where the network allows: one whose first convolution reads the pixels
    (``onnx_bytes(raw_pixels=True)``: no normalisation pass, the faster) and one that normalises first.
    Folding the normalisation scales each input channel's weights by 1 / std, and where the channels'
    stds differ a lot the weaker channels' weights lose bits: the pixel graph is kept unless its mean
    probability difference to fp32 on ``images`` is more than RAW_PIXELS_MAX_ERROR_RATIO times the
    other's (`pbc` validation: 0.0006 vs 0.0004, kept; `aria-all`, blue std 0.055 vs 0.145: 0.0014 vs
    0.0003, not)."""
    from .metrics import softmax

    temperature = float(checkpoint.get("temperature", 1.0))
    columns = len(checkpoint["class_names"])

    def probabilities(graph: bytes) -> np.ndarray:
        backend = OnnxBackend(graph)
        logits = torch.cat([backend(images[i : i + 256]) for i in range(0, len(images), 256)])[:, :columns]
        return softmax(logits.numpy(), temperature)

    fp32_graph = onnx_bytes(checkpoint)
    reference = probabilities(fp32_graph)
    candidates = {}
    for name, source in (("pixels", onnx_bytes(checkpoint, raw_pixels=True)), ("normalised", fp32_graph)):
        if name == "normalised" or source != fp32_graph:
            graph = quantize_int8(source, calibration)
            candidates[name] = graph, probabilities(graph)
    error = {name: float(np.abs(p - reference).mean()) for name, (_, p) in candidates.items()}
    use = "pixels" if "pixels" in error and error["pixels"] <= RAW_PIXELS_MAX_ERROR_RATIO * error["normalised"] else "normalised"
    graph, probs = candidates[use]
    return graph, probs, reference, {"input": use, "mean_prob_diff_by_input": error}


def build_int8(checkpoint: dict[str, Any], calibration: torch.Tensor, images: torch.Tensor, labels: np.ndarray) -> tuple[bytes, dict[str, Any]]:
    """The int8 graph of ``checkpoint`` calibrated on ``calibration`` (``faithful_int8``) and its parity on
    (``images``, ``labels``): fp32 and int8 accuracy, the share of identical calls, the mean and largest
    probability difference, and which input the graph quantises.

    Raises when int8 loses more than MAX_ACCURACY_LOSS of accuracy (nothing to keep)."""
    graph, probs, reference, chosen = faithful_int8(checkpoint, calibration, images)
    calls, fp32_calls = probs.argmax(1), reference.argmax(1)
    parity = {"fp32_accuracy": float((fp32_calls == labels).mean()), "int8_accuracy": float((calls == labels).mean()),
              "agreement": float((fp32_calls == calls).mean()), "max_prob_diff": float(np.abs(probs - reference).max()),
              "mean_prob_diff": chosen["mean_prob_diff_by_input"][chosen["input"]], **chosen,
              "images": len(labels), "calibration_images": len(calibration)}
    if parity["int8_accuracy"] < parity["fp32_accuracy"] - MAX_ACCURACY_LOSS:
        raise LeukoscopeError(f"int8 loses {100 * (parity['fp32_accuracy'] - parity['int8_accuracy']):.2f} points of validation accuracy "
                              f"({100 * parity['int8_accuracy']:.2f}% vs {100 * parity['fp32_accuracy']:.2f}% fp32, more than "
                              f"{100 * MAX_ACCURACY_LOSS:.1f}); use --precision fp32")
    return graph, parity


def build_for_run(checkpoint: dict[str, Any], checkpoint_path: str | os.PathLike, data: str | os.PathLike, splits: str | os.PathLike,
                  view: View) -> tuple[dict[str, float], bytes]:
    """The int8 graph of the checkpoint at ``checkpoint_path``, built from the training and validation
    images of ``splits`` (paths under ``data``), and its parity; see ``write_int8``."""
    samples, kinds = read_splits(splits)
    train = [s for s, k in zip(samples, kinds) if k == "train"]
    val = [s for s, k in zip(samples, kinds) if k == "val"]
    if not train or not val:
        raise LeukoscopeError(f"{splits}: int8 needs training images to calibrate on and validation images to check parity on")
    calibration, errors = decode_many([Path(data) / s.path for s in train[:: max(1, len(train) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES]],
                                      view, desc="int8: decode calibration images")
    val = val[:: max(1, -(-len(val) // CHECK_IMAGES))]
    images, val_errors = decode_many([Path(data) / s.path for s in val], view, desc="int8: decode validation images")
    unreadable = [e for e in errors + val_errors if e]
    if unreadable:
        raise LeukoscopeError(f"int8 needs the model's training images under {data}: {len(unreadable)} unreadable ({unreadable[0]})")
    from .checkpoint import class_index

    labels = np.array([class_index(checkpoint, s.label) for s in val])
    graph, parity = build_int8(checkpoint, calibration, images, labels)
    return parity, _with_meta(graph, {"checkpoint_sha256": sha256_file(checkpoint_path), "parity": parity})


def write_int8(checkpoint: dict[str, Any], checkpoint_path: str | os.PathLike, data: str | os.PathLike, splits: str | os.PathLike,
               view: View) -> dict[str, float]:
    """Build the int8 graph of the checkpoint at ``checkpoint_path`` from the training and validation
    images of ``splits`` (paths under ``data``) and write it beside the checkpoint; returns its parity."""
    parity, graph = build_for_run(checkpoint, checkpoint_path, data, splits, view)
    with atomic_write(int8_path(checkpoint_path), "wb") as handle:
        handle.write(graph)
    return parity


def _with_meta(graph: bytes, extra: dict[str, Any]) -> bytes:
    import onnx

    model = onnx.load_from_string(graph)
    entry = next(p for p in model.metadata_props if p.key == "leukoscope")
    entry.value = json.dumps({**json.loads(entry.value), **extra})
    return model.SerializeToString()


def graph_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The leukoscope metadata of an ONNX file; empty for a damaged or foreign file."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props.get("leukoscope", "{}"))
    except (OSError, ValueError, DecodeError):
        return {}


def load_int8(checkpoint: dict[str, Any], checkpoint_path: str | os.PathLike, build: bool) -> OnnxBackend | None:
    """The int8 backend of a checkpoint: its graph beside it (if made from this very checkpoint by the
    current recipe, INT8_RECIPE), else, with ``build``, one built now from a run folder's own images;
    None when there is none and not ``build``."""
    path = int8_path(checkpoint_path)
    if path.is_file():  # its metadata read from the session that runs it: importing onnx to read them took 0.8 s
        onnxruntime()  # telemetry off before anything of ONNX Runtime is imported
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidProtobuf

        try:
            backend = _runnable(path, build)
        except InvalidProtobuf:  # a damaged file: not this checkpoint's graph
            backend = False
        if backend is None:  # this ONNX Runtime cannot run it (said so): a rebuilt graph would not run either
            return None
        meta = json.loads(backend.session.get_modelmeta().custom_metadata_map.get("leukoscope", "{}")) if backend else {}
        if meta.get("checkpoint_sha256") == sha256_file(checkpoint_path) and meta.get("int8_recipe") == INT8_RECIPE:
            return backend
    if not build:
        return None
    run = Path(checkpoint_path).parent
    if not (run / "run.json").is_file() or not (run / "splits.csv").is_file():
        raise LeukoscopeError(f"no int8 graph for {checkpoint_path} and no run folder (run.json, splits.csv) to build one from; "
                              "build one with `leukoscope export MODEL --precision int8 --calibration TRAINING_IMAGES --out model.int8.onnx` "
                              "and predict with that file, or use --precision fp32")
    from .checkpoint import ModelCard

    data = json.loads((run / "run.json").read_text())["data"]
    parity, graph = build_for_run(checkpoint, checkpoint_path, data, run / "splits.csv", ModelCard.from_meta(checkpoint).preprocessing.view)
    try:
        with atomic_write(path, "wb") as handle:
            handle.write(graph)
        where = f"written to {path}"
    except OSError as err:  # a read-only run folder: use it from memory this time
        where = f"not saved ({err.strerror or err})"
    note(f"int8 graph {where}: validation accuracy {100 * parity['int8_accuracy']:.2f}% vs {100 * parity['fp32_accuracy']:.2f}% fp32, "
         f"same call on {100 * parity['agreement']:.1f}% of {parity['images']} images")
    return OnnxBackend(graph, precision="int8")


def _runnable(path: Path, required: bool) -> OnnxBackend | None:
    """The int8 graph at ``path`` on this ONNX Runtime; one too old for its operators (SpaceToDepth on
    uint8 needs 1.28) is a one-line error when int8 was asked for, else a note and None (fp32 runs)."""
    ort = onnxruntime()
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph
    from onnxruntime.capi.onnxruntime_pybind11_state import (
        NotImplemented as Unsupported,
    )

    try:
        return OnnxBackend(path, precision="int8")
    except (Unsupported, Fail, InvalidGraph) as err:
        why = f"ONNX Runtime {ort.__version__} cannot run {path} ({str(err).splitlines()[0][:160]}); install onnxruntime>=1.28"
    if required:
        raise LeukoscopeError(f"{why}, or use --precision fp32")
    note(f"{why}; running fp32")
    return None


class AutoPrecision:
    """fp32 until the first batch of at least AUTO_MIN_BATCH images, on which both graphs are timed and
    compared; from then on the one chosen (``choice``, with ``reason``)."""

    kind = "onnx"

    def __init__(self, fp32: Callable[[torch.Tensor], torch.Tensor], int8: Callable[[torch.Tensor], torch.Tensor], classes: int):
        self.fp32, self.int8, self.classes = fp32, int8, classes
        self.choice: str | None = None
        self.reason = ""

    @property
    def precision(self) -> str:
        return self.choice or "fp32"

    def __call__(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        if self.choice is None and len(batch_uint8) >= AUTO_MIN_BATCH:
            self.choice, self.reason = self._choose(batch_uint8)
        return (self.int8 if self.choice == "int8" else self.fp32)(batch_uint8)

    def worker_copy(self) -> OnnxBackend:
        """The ``worker_copy`` of the graph that runs now: the chosen one, or fp32 before any choice (no
        batch of AUTO_MIN_BATCH yet, and a worker's share of one would be smaller: fp32, as here)."""
        return (self.int8 if self.choice == "int8" else self.fp32).worker_copy()

    def _choose(self, batch: torch.Tensor) -> tuple[str, str]:
        seconds, calls = {}, {}
        for name, backend in (("fp32", self.fp32), ("int8", self.int8)):
            backend(batch[:8])  # warm-up
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                out = backend(batch)
                best = min(best, time.perf_counter() - start)
            seconds[name], calls[name] = best, out[:, : self.classes].argmax(1)
        speedup = seconds["fp32"] / seconds["int8"]
        same = float((calls["fp32"] == calls["int8"]).float().mean())
        ok = speedup >= AUTO_SPEEDUP and same >= AUTO_MIN_AGREEMENT
        reason = f"int8 {speedup:.2f}x the speed of fp32 here, the same call on {100 * same:.0f}% of {len(batch)} images"
        return ("int8" if ok else "fp32"), reason
