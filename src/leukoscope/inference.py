"""Load a model (run folder, checkpoint file or bundled name) and predict images.

``Predictor`` is the one classifier interface that evaluate, predict and later export/serve
use: it owns the preprocessing recorded in the checkpoint, so callers never restate it.
"""

from __future__ import annotations

import io
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checkpoint import (  # noqa: F401 (re-exported: where callers look for them)
    CHECKPOINT_NAME,
    CLASSICAL_NAME,
    ModelCard,
    bundled_models,
    load_checkpoint,
    model_from_checkpoint,
    resolve_model_path,
)
from .decoding import Decoder, Infer, worker_processes
from .errors import LeukoscopeError, did_you_mean
from .images import several_pages
from .io import (
    ARCHIVE_EXTENSIONS,
    IMAGE_EXTENSIONS,
    SLIDE_EXTENSIONS,
    EncodedImage,
    expand_lists,
    expand_patterns,
    iter_image_files,
    missing_inputs,
    not_found_hint,
    once_each,
    refuse_empty_paths,
)
from .metrics import positive_index, softmax
from .models import CellNet
from .ood import WithOOD
from .options import BACKENDS, BATCH_LIMIT_WHY, MAX_BATCH, TTA_MODES, TTA_VIEWS  # noqa: F401 (re-exported)
from .progress import note, plural
from .transforms import eval_transform

PREFETCH = 2  # batches decoded ahead of the one the model runs (+5% images/s over one for `wbc`, docs/benchmarks.md)
ONE_IMAGE = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)  # what predict takes as one image, not a list of them
_INPUT_KINDS = "give image paths, folders, bytes, binary file objects, PIL images, arrays or tensors"


@dataclass
class Prediction:
    source: str
    label: str = ""
    confidence: float = float("nan")
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str = ""
    ood_score: float = float("nan")  # higher: less like the training images (see ood); NaN where the model has no alarm
    in_domain: bool | None = None  # ood_score below the threshold fitted on validation
    localised: bool | None = None  # cell-centric models: whether the white cell was found (else the whole image was used)


def alarm_cells(prediction: Prediction) -> list[str]:
    """The ``ood_score``, ``in_domain`` and ``localised`` cells of a CSV row (empty where not known)."""
    flag = lambda value: "" if value is None else str(value).lower()
    ood = "" if prediction.in_domain is None else f"{prediction.ood_score:.3f}"
    return [ood, flag(prediction.in_domain), flag(prediction.localised)]


class TorchBackend:
    """Runs a checkpoint's network on uint8 batches: BatchNorm folded, channels_last; fp32 on CPU,
    bf16 autocast on CUDA. Outputs come back to the CPU as fp32."""

    kind = "cnn"

    def __init__(self, checkpoint: dict[str, Any], device: torch.device | str = "cpu"):
        pre = ModelCard.from_meta(checkpoint).preprocessing
        self.mean, self.std = list(pre.mean), list(pre.std)
        self.device = torch.device(device)
        model = model_from_checkpoint(checkpoint)
        if checkpoint.get("ood") is not None:
            model = WithOOD(model, checkpoint["ood"]).eval()  # one more output column: the OOD score
        self.model = fold_batchnorm(model).to(self.device, memory_format=torch.channels_last)
        self.precision = "bf16" if self.device.type == "cuda" else "fp32"

    def __call__(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        x = eval_transform(batch_uint8.to(self.device, non_blocking=True), self.mean, self.std)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.model(x).float().cpu()


class Predictor:
    """A trained classifier with its preprocessing; ``predict`` takes paths, arrays or PIL images.

    The ``backend`` turns a (N, 3, S, S) uint8 batch into logits: a PyTorch network, an ONNX
    Runtime session or a classical feature pipeline. Everything else (decoding, test-time
    augmentation, temperature, threshold, output rows) is shared, so callers never branch.
    """

    def __init__(self, checkpoint: dict[str, Any], source: str = "", backend: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 whole: Predictor | None = None):
        self.checkpoint = checkpoint
        self.source = source
        self.whole = whole  # the model this one chooses among some classes of (restrict_classes), whose network draws heatmaps
        self.card = card = ModelCard.from_meta(checkpoint)
        self.class_names: list[str] = card.class_names
        self.view = card.preprocessing.view  # the square of each image the model sees: see images.frame
        self.image_size: int = self.view.size
        self.temperature = card.temperature
        self.threshold: float | None = card.threshold
        self.default_tta = tta_mode(card.tta)
        self.positive_index = card.positive_index if card.positive_index is not None else positive_index(self.class_names)
        self.backend = backend if backend is not None else TorchBackend(checkpoint)
        self.ood_threshold = card.ood_threshold  # set: the backend's last output column is the OOD score
        self.recoloured_seen = checkpoint.get("recoloured_training_images", 0) > 0  # see mark_recoloured

    @property
    def kind(self) -> str:
        return getattr(self.backend, "kind", "cnn")

    def __repr__(self) -> str:
        """What a notebook shows: which model, its classes, what it sees and what runs it."""
        names = ", ".join(self.class_names[:8]) + (f", ... ({len(self.class_names)})" if len(self.class_names) > 8 else "")
        sees = (f"{self.view.size} px windows centred on the white cell" if self.view.cell is not None
                else f"the central {self.view.crop:.0%} of each image at {self.view.size} px")
        runs = {"cnn": "PyTorch", "onnx": "ONNX Runtime"}.get(self.kind)
        runs = f"{runs}, {getattr(self.backend, 'precision', 'fp32')}" if runs else f"scikit-learn ({self.kind})"
        return f"Predictor({self.source!r}: {self.card.arch}, classes [{names}], sees {sees}, runs on {runs})"

    @property
    def meta(self) -> dict[str, Any]:
        return {k: v for k, v in self.checkpoint.items() if k != "state_dict"}

    @torch.inference_mode()
    def logits(self, batch_uint8: torch.Tensor, tta: bool | str | None = None) -> torch.Tensor:
        """Raw logits for (N, 3, S, S) uint8 images, averaged over the test-time views of ``tta``.

        ``tta`` is a mode of ``TTA_MODES`` (True = dihedral, False = none); ``None`` follows the
        model's own setting (``checkpoint["tta"]``, none unless a model was validated with it).
        """
        return self.logits_and_ood(batch_uint8, tta)[0]

    @torch.inference_mode()
    def logits_and_ood(self, batch_uint8: torch.Tensor, tta: bool | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and, where the model has an OOD alarm, the OOD score of each image (views averaged)."""
        mode = self.default_tta if tta is None else tta_mode(tta)
        if mode == "none":
            out = self.backend(batch_uint8)
        else:
            mirrors = (batch_uint8, batch_uint8.flip(3))
            views = mirrors if mode == "flip" else [torch.rot90(v, k, dims=(2, 3)) for v in mirrors for k in range(4)]
            out = torch.stack([self.backend(v.contiguous()) for v in views]).mean(0)
        if self.ood_threshold is None:
            return out, None
        return out[:, :-1], out[:, -1]

    def predict_proba(self, batch_uint8: torch.Tensor, tta: bool | str | None = None) -> np.ndarray:
        return softmax(self.logits(batch_uint8, tta).numpy(), self.temperature).astype(np.float32)

    def predict(self, images: Any, batch_size: int = 64, tta: bool | str | None = None) -> list[Prediction]:
        """Predict one or many images given as paths, folders (searched recursively, as the CLI does),
        encoded files in memory (bytes, or a file object opened in binary mode), PIL images, or image
        arrays and tensors: HxWx3 or 3xHxW, uint8, other integers, or floats in 0-1 (see
        decoding.array_to_rgb); a 4-d array or tensor is a batch."""
        if isinstance(images, (np.ndarray, torch.Tensor)):
            images = list(images) if images.ndim == 4 else [images]  # a batch (N images) or one image
        elif isinstance(images, ONE_IMAGE) or hasattr(images, "read"):
            images = [images]
        elif not isinstance(images, Iterable) or isinstance(images, Mapping):  # a dict's keys are not images
            raise TypeError(f"cannot predict {type(images).__name__!r}: {_INPUT_KINDS}, or a list of them")
        items: list[Any] = []
        for item in refuse_empty_paths(images):
            if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
                items.extend(iter_image_files([item]))
            elif isinstance(item, torch.Tensor):
                items.append(item.detach().cpu().numpy())
            elif hasattr(item, "read"):
                items.append(_read_binary(item))
            elif isinstance(item, (*ONE_IMAGE, np.ndarray)):
                items.append(bytes(item) if isinstance(item, (bytearray, memoryview)) else item)
            else:
                raise TypeError(f"cannot predict an item of type {type(item).__name__!r}: {_INPUT_KINDS}")
        return list(self.predict_iter(items, batch_size=batch_size, tta=tta))

    def predict_iter(self, items: Sequence[Any], batch_size: int = 64, tta: bool | str | None = None,
                     workers: int | None = None) -> Iterator[Prediction]:
        """Yield one Prediction per item, in order; the next PREFETCH batches decode while this one runs.

        Long runs of files decode in worker processes (``workers``, default one per core; 0: threads
        here; see decoding), which also run the network where the backend can be copied into them
        (ONNX Runtime); the first batch then runs here, so that ``--precision auto`` chooses once,
        before the copies are made.
        """
        tta = self.default_tta if tta is None else tta_mode(tta)  # a bad mode or batch size fails before any decoding
        batch_size = check_batch_size(batch_size)
        files = all(isinstance(item, (str, os.PathLike)) for item in items)
        start, processes = 0, None  # None: the Decoder decides (decoding only in its workers)
        if files and hasattr(self.backend, "worker_copy") and (processes := worker_processes(len(items), self.view, True, workers)):
            with Decoder(self.view, 0) as decoder:
                yield from self._predict_decoded(items[:batch_size], 0, decoder.results(decoder.submit(items[:batch_size])), tta)
            start = batch_size
        infer = self._worker_infer(tta) if start else None
        with Decoder(self.view, len(items) - start if files else 0, processes or None, infer, workers) as decoder:
            ahead = PREFETCH * batch_size
            pending = deque(decoder.submit(items[i : i + batch_size]) for i in range(start, start + ahead, batch_size))
            for first in range(start, len(items), batch_size):
                done = decoder.results(pending.popleft())
                pending.append(decoder.submit(items[first + ahead : first + ahead + batch_size]))  # empty past the end
                chunk = items[first : first + batch_size]
                yield from (self._predict_inferred(chunk, first, done) if decoder.infers else self._predict_decoded(chunk, first, done, tta))

    def _worker_infer(self, tta: str) -> Callable[[], Infer]:
        """What a forked decoding worker calls once to run this model itself: its own copy of the
        backend, one thread (the worker is one of one per core), the same test-time views."""

        def start() -> Infer:
            torch.set_num_threads(1)
            # This process's copy of the predictor gets its own session. The forked copy of the parent's
            # stays referenced: its destructor would wait for the parent's threads, absent here, forever.
            self._forked_backend, self.backend = self.backend, self.backend.worker_copy()

            def infer(images: np.ndarray) -> tuple[np.ndarray, ...]:
                logits, scores = self.logits_and_ood(_nchw(images), tta)
                return (logits.numpy(),) if scores is None else (logits.numpy(), scores.numpy())

            return infer

        return start

    def predict_arrays(self, images: Sequence[np.ndarray], sources: Sequence[str], tta: bool | str | None = None) -> list[Prediction]:
        """Predictions for images already as the model sees them (S x S x 3 uint8): one batch, one decision rule."""
        logits, scores = self.logits_and_ood(_nchw(np.stack(images)), tta)
        return self._from_outputs(sources, logits.numpy(), None if scores is None else scores.numpy())

    def _from_outputs(self, sources: Sequence[str], logits: np.ndarray, scores: np.ndarray | None) -> list[Prediction]:
        probs = softmax(logits, self.temperature).astype(np.float32)
        ood = [None] * len(sources) if scores is None else scores.tolist()
        return [self._prediction(source, p, score) for source, p, score in zip(sources, probs, ood)]

    def _predict_decoded(self, chunk: Sequence[Any], start: int, decoded: list, tta: bool | str | None) -> Iterator[Prediction]:
        sources = _sources(chunk, start)
        good = [i for i, (arr, *_) in enumerate(decoded) if arr is not None]
        done = dict(zip(good, self.predict_arrays([decoded[i][0] for i in good], [sources[i] for i in good], tta))) if good else {}
        return self._in_order(sources, decoded, done)

    def _predict_inferred(self, chunk: Sequence[Any], start: int, pieces: list) -> Iterator[Prediction]:
        """Predictions from the outputs the decoding workers computed (see ``decoding.load_and_infer``)."""
        sources = _sources(chunk, start)
        decoded = [item for piece, _ in pieces for item in piece]
        outputs = [out for _, out in pieces if out is not None]
        good = [i for i, (_, error, *_) in enumerate(decoded) if not error]
        if not good:
            return self._in_order(sources, decoded, {})
        logits = np.concatenate([out[0] for out in outputs])
        scores = np.concatenate([out[1] for out in outputs]) if self.ood_threshold is not None else None  # see logits_and_ood
        return self._in_order(sources, decoded, dict(zip(good, self._from_outputs([sources[i] for i in good], logits, scores))))

    def _in_order(self, sources: list[str], decoded: list, done: dict[int, Prediction]) -> Iterator[Prediction]:
        """One Prediction per source: the one made, with its ``localised`` flag, or an error row."""
        for i, source in enumerate(sources):
            if i in done:
                done[i].localised = decoded[i][2]
                self.mark_recoloured(done[i], decoded[i][3])
            yield done.get(i) or Prediction(source, error=decoded[i][1] or "unreadable image")

    def mark_recoloured(self, prediction: Prediction, recoloured: bool) -> None:
        """An image recoloured to look like a slide (a black background painted where its window shows
        it, or a colour cast corrected) or without colour (grayscale; see images.frame) is out of domain for a model none of whose
        training images was: recolouring makes the cell readable, not familiar (`blast` called
        C-NMC's painted cells blast with an ood_score below its threshold)."""
        if self.unfamiliar(recoloured) and prediction.in_domain is not None:
            prediction.in_domain = False

    def unfamiliar(self, recoloured: bool) -> bool:
        """Whether a recoloured input is out of domain for this model whatever its score (see mark_recoloured)."""
        return recoloured and not self.recoloured_seen

    def decide(self, probs: np.ndarray) -> int:
        """The predicted class index: argmax, or the stored operating threshold for binary models."""
        if self.threshold is not None and len(self.class_names) == 2:
            return self.positive_index if probs[self.positive_index] >= self.threshold else 1 - self.positive_index
        return int(np.argmax(probs))

    def _prediction(self, source: str, probs: np.ndarray, ood: float | None = None) -> Prediction:
        top = self.decide(probs)
        return Prediction(
            source,
            label=self.class_names[top],
            confidence=float(probs[top]),
            probabilities={c: float(p) for c, p in zip(self.class_names, probs)},
            ood_score=float("nan") if ood is None else float(ood),
            in_domain=None if ood is None else bool(ood <= self.ood_threshold),
        )


def _nchw(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S), copied by numpy: torch's copy would wake its OpenMP threads,
    which then spin on the cores the decoding workers need (-8% images/s end to end for `wbc`)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _read_binary(file: Any) -> bytes:
    """An open file's contents, for a file object given to predict (an upload, ``open(path, "rb")``), under the file's
    name where it has one (its predictions' ``source``)."""
    data = None if isinstance(file, io.TextIOBase) else file.read()
    if not isinstance(data, (bytes, bytearray)):
        name = getattr(file, "name", "a file object")
        raise TypeError(f"{name} is open in text mode: open images in binary mode, open(path, 'rb')")
    name = getattr(file, "name", None)
    return EncodedImage(data, os.fsdecode(name)) if isinstance(name, (str, bytes)) else bytes(data)


def _sources(chunk: Sequence[Any], start: int) -> list[str]:
    return [str(item) if isinstance(item, (str, os.PathLike)) else getattr(item, "name", None) or f"<image {start + i}>"
            for i, item in enumerate(chunk)]


def check_batch_size(value: Any) -> int:
    """``value`` as a batch size, or a LeukoscopeError saying what it must be (three batches are in flight at once)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_BATCH:
        why = f": {BATCH_LIMIT_WHY}" if isinstance(value, int) and value > 1 else ""
        raise LeukoscopeError(f"batch_size must be a whole number from 1 to {MAX_BATCH}, got {value!r}{why}")
    return int(value)


def tta_mode(value: bool | str | None) -> str:
    """A TTA mode from a checkpoint or caller: True/False (older checkpoints, the API) or a mode name."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "dihedral"
    if value not in TTA_MODES:
        raise LeukoscopeError(f"unknown TTA mode {value!r}{did_you_mean(str(value), TTA_MODES)}; choose from {', '.join(TTA_MODES)}")
    return str(value)


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Fold each BatchNorm into the convolution before it (exact for inference, ~fewer passes).

    Applied to our CellNet only, whose graph is known to trace; other architectures run as built.
    """
    if isinstance(model, CellNet) or (isinstance(model, WithOOD) and isinstance(model.model, CellNet)):
        from torch.fx.experimental.optimization import fuse

        return fuse(model.eval())
    return model


def load_model(model: str | os.PathLike, backend: str = "auto", device: str = "auto", precision: str = "fp32",
               purpose: str | None = None) -> Predictor:
    """Load a run folder, a checkpoint, an exported ``.onnx``, a classical ``.joblib`` or a bundled name.

    ``backend`` picks what runs a CNN checkpoint: ``torch``, ``onnx`` (ONNX Runtime on a graph
    exported once and cached) or ``auto``: ONNX Runtime for CellNet checkpoints, which it runs
    ~1.5x faster on CPU with the same probabilities (within 1e-3), PyTorch for other architectures.
    Heatmaps and export always rebuild the PyTorch network from the checkpoint. ``device``:
    ``auto`` (CUDA when available), ``cpu`` or ``cuda``; on CUDA a checkpoint runs on PyTorch
    (bf16 autocast), ``auto`` backend included. ``precision``: ``fp32``, ``int8`` (ONNX Runtime on the
    checkpoint's int8 graph, see quantize; built from a run folder's own images if missing) or
    ``auto``: int8 where that graph exists and is faster and at parity on this machine. ``purpose``: what
    needs the PyTorch network, named in the error when the model is an exported graph or a classical one.
    """
    from .runtime import resolve_device

    target = resolve_device(device)
    if backend not in BACKENDS:
        raise LeukoscopeError(f"unknown backend {backend!r}{did_you_mean(backend, BACKENDS)}; choose from {', '.join(BACKENDS)}")
    from .quantize import PRECISIONS

    if precision not in PRECISIONS:
        raise LeukoscopeError(f"unknown precision {precision!r}{did_you_mean(precision, PRECISIONS)}; choose from {', '.join(PRECISIONS)}")
    path = resolve_model_path(model)
    suffix = path.suffix.lower()
    if precision == "int8" and (suffix in (".onnx", ".joblib") or backend == "torch" or target.type == "cuda"):
        raise LeukoscopeError("--precision int8 runs a checkpoint's int8 graph on ONNX Runtime (CPU): give a run folder, checkpoint or "
                              "bundled name, without --backend torch, --device cuda or --adapt (an exported .onnx runs as exported)")
    if backend not in {".onnx": ("auto", "onnx"), ".joblib": ("auto",)}.get(suffix, BACKENDS):
        kind = "an exported ONNX graph" if suffix == ".onnx" else "a classical model"
        raise LeukoscopeError(f"{path} is {kind}; {purpose or f'--backend {backend}'} needs a PyTorch checkpoint "
                              "(a run folder, model.pt or a bundled name)")
    if suffix == ".onnx":
        from .onnx_backend import load_onnx

        meta, onnx_model = load_onnx(path)
        return Predictor(meta, source=str(path), backend=onnx_model)
    if suffix == ".joblib":
        from .classical.model import load_classical

        meta, classical = load_classical(path)
        return Predictor(meta, source=str(path), backend=classical)
    checkpoint = load_checkpoint(path)
    if target.type == "cuda":
        if backend == "onnx":
            raise LeukoscopeError("--backend onnx runs on the CPU; with --device cuda use --backend auto or torch")
        return Predictor(checkpoint, source=str(path), backend=TorchBackend(checkpoint, target))
    if backend == "onnx" or precision == "int8" or (backend == "auto" and str(checkpoint["arch"]).startswith("cellnet")):
        from .onnx_backend import cached_onnx_backend
        from .quantize import AutoPrecision, load_int8

        int8 = load_int8(checkpoint, path, build=precision == "int8") if precision != "fp32" else None
        if precision == "int8":
            return Predictor(checkpoint, source=str(path), backend=int8)
        fp32 = cached_onnx_backend(checkpoint, path)
        chosen = fp32 if int8 is None else AutoPrecision(fp32, int8, len(checkpoint["class_names"]))
        return Predictor(checkpoint, source=str(path), backend=chosen)
    return Predictor(checkpoint, source=str(path))


def note_skipped(skipped: Counter[str]) -> None:
    """Say which files a folder search passed over for their extension (``iter_image_files``'s count), and what to do."""
    if not skipped:
        return
    kinds = ", ".join(f"{suffix}: {count}" for suffix, count in skipped.most_common())
    slides = sorted(set(skipped) & set(SLIDE_EXTENSIONS))
    hint = (f"; {', '.join(slides)}: whole-slide scans, too large to read whole: export fields or tiles from them "
            "first (QuPath, or the scanner's viewer)") if slides else ""
    if archives := sorted(set(skipped) & set(ARCHIVE_EXTENSIONS)):
        hint += f"; {', '.join(archives)}: archives: unpack them and give their folders"
    note(f"note: {plural(sum(skipped.values()), 'file')} not read, their extensions not an image format leukoscope reads "
         f"({kinds}); convert them to PNG or JPEG (it reads {', '.join(IMAGE_EXTENSIONS)}){hint}")


def given_inputs(inputs: Iterable[str | os.PathLike]) -> list[str | os.PathLike]:
    """The inputs as given, lists (``@LIST``) and patterns that a shell left as they are expanded (``io.expand_lists``,
    ``io.expand_patterns``); a one-line error for one that names nothing (a typo in a path is not a file that could not
    be read)."""
    inputs = expand_patterns(expand_lists(refuse_empty_paths(inputs)))
    if missing := missing_inputs(inputs):
        raise LeukoscopeError(f"input {missing[0]!r} does not exist{not_found_hint(missing[0])}")
    return inputs


def note_inputs(paths: Sequence[Path], repeated: int, skipped: Counter[str], verb: str = "read") -> None:
    """Say what listing the inputs merged or passed over: files given more than once (a folder and a file in it),
    files of formats not read (``note_skipped``), TIFF files of several pages."""
    if repeated:
        note(f"note: {plural(repeated, 'image')} given more than once: {verb} once")
    note_skipped(skipped)
    if pages := several_pages(paths):
        note(f"note: {pages}")


def iter_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into a list of paths, each file once, failing on missing inputs."""
    skipped: Counter[str] = Counter()
    paths, repeated = once_each(iter_image_files(given_inputs(inputs), skipped), lambda path: path)
    note_inputs(paths, repeated, skipped)
    return paths
