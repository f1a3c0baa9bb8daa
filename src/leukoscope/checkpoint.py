"""Self-describing checkpoints: weights plus everything needed to rebuild and use the model.

A checkpoint is a plain dict (loadable with ``weights_only=True``). What predict, export, explain
and serve need is its ``ModelCard``: architecture, classes, ``Preprocessing`` (size, crop,
normalisation), temperature, threshold and test-time augmentation, stored as flat keys that
``ModelCard.from_meta`` reads back typed and validated. Beside it: the resolved training
``config``, ``metrics``, the content hashes of the images it saw, library versions and the
``state_dict``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import UNPICKLING_ERRORS, LeukoscopeError, did_you_mean, first_line
from .io import atomic_write, is_image_file, not_found_hint
from .images import View
from .stain import MODES as COLOUR_MODES
from .models import create_model

FORMAT_VERSION = 1
REQUIRED = ("arch", "class_names", "image_size", "mean", "std", "state_dict")


@dataclass(frozen=True)
class Preprocessing:
    """What happens to an image before the network, on every path: the central ``crop`` of the
    shorter side (or, with ``cell``, a window centred on the located white cell, which fills
    ``cell`` of it), resized to ``image_size``, colour-normalised onto ``stain`` where set,
    scaled to [0, 1] and normalised by ``mean``/``std``. ``colour`` names the colour normalisation
    (see stain: none, white, or reinhard onto the ``stain`` target). ``reduce``: images shrink by 2, 4
    or 8 before the crop is resized where that still covers it (see images.reduction). ``cast``: the
    training images' background colour range, below whose blue share a yellow cast is corrected
    (see stain.correct_cast)."""

    image_size: int
    crop: float = 1.0
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    cell: float | None = None
    stain: tuple[float, ...] | None = None
    colour: str = "none"
    reduce: bool = False
    cast: tuple[float, ...] | None = None

    @property
    def view(self) -> View:
        return View(self.image_size, self.crop, self.cell, self.stain, colour=self.colour, reduce=self.reduce, cast=self.cast)


@dataclass
class ModelCard:
    """The typed metadata a model carries: what every command needs to use it, and nothing more."""

    arch: str
    class_names: list[str]
    preprocessing: Preprocessing
    arch_kwargs: dict = field(default_factory=dict)
    temperature: float = 1.0
    threshold: float | None = None  # binary models: probability of the positive class from which it is called
    positive_index: int | None = None  # the malignant class of a binary model (None: by name, see metrics.positive_index)
    tta: str = "none"  # test-time augmentation used by default: none, flip or dihedral
    ood_threshold: float | None = None  # out-of-domain above this Mahalanobis score (the network outputs it: see ood)

    KEYS = ("arch", "arch_kwargs", "class_names", "image_size", "crop", "mean", "std", "temperature", "threshold", "positive_index", "tta",
            "ood_threshold", "cell", "stain", "colour", "reduce", "cast")

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ModelCard:
        missing = [k for k in ("arch", "class_names", "image_size") if k not in meta]
        if missing:
            raise LeukoscopeError(f"model metadata lacks {', '.join(missing)}")
        cell, stain = meta.get("cell"), meta.get("stain")
        if cell is not None and not 0.1 <= float(cell) <= 1.0:
            raise LeukoscopeError(f"model metadata: cell must be between 0.1 and 1.0, got {cell}")
        if stain is not None and len(stain) != 6:
            raise LeukoscopeError(f"model metadata: stain must hold 6 numbers (OD mean and std per channel), got {len(stain)}")
        cast = meta.get("cast")
        if cast is not None and len(cast) != 6:
            raise LeukoscopeError(f"model metadata: cast must hold 6 numbers (low and high background chromaticity per channel), got {len(cast)}")
        colour = str(meta.get("colour") or "none")
        if colour not in COLOUR_MODES or (colour == "reinhard" and stain is None):
            raise LeukoscopeError(f"model metadata: colour must be one of {', '.join(COLOUR_MODES)} (reinhard with a stain target), got {colour!r}")
        pre = Preprocessing(int(meta["image_size"]), float(meta.get("crop", 1.0)),
                            tuple(float(v) for v in meta.get("mean", (0.5,) * 3)), tuple(float(v) for v in meta.get("std", (0.25,) * 3)),
                            None if cell is None else float(cell), None if stain is None else tuple(float(v) for v in stain), colour,
                            bool(meta.get("reduce", False)), None if cast is None else tuple(float(v) for v in cast))
        index = meta.get("positive_index")
        return cls(str(meta["arch"]), [str(c) for c in meta["class_names"]], pre, dict(meta.get("arch_kwargs") or {}),
                   float(meta.get("temperature", 1.0)), meta.get("threshold"), None if index is None else int(index), meta.get("tta") or "none",
                   meta.get("ood_threshold"))

    def to_meta(self) -> dict[str, Any]:
        """Flat keys, as checkpoints, ONNX metadata and classical runs store them."""
        pre = self.preprocessing
        return {"arch": self.arch, "arch_kwargs": self.arch_kwargs, "class_names": list(self.class_names), "image_size": pre.image_size,
                "crop": pre.crop, "mean": list(pre.mean), "std": list(pre.std), "cell": pre.cell,
                "stain": None if pre.stain is None else list(pre.stain), "colour": pre.colour, "reduce": pre.reduce,
                "cast": None if pre.cast is None else list(pre.cast), "temperature": self.temperature,
                "threshold": self.threshold, "positive_index": self.positive_index, "tta": self.tta, "ood_threshold": self.ood_threshold}


def build_checkpoint(model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {
        "format_version": FORMAT_VERSION,
        "leukoscope_version": __version__,
        "torch_version": str(torch.__version__),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "temperature": 1.0,
        "arch_kwargs": {},
        "config": {},
        "metrics": {},
        **meta,
        "state_dict": state,
    }


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Write atomically, so a crash never leaves a half-written checkpoint behind."""
    with atomic_write(path, "wb") as handle:
        torch.save(checkpoint, handle)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if is_image_file(path):  # `predict IMAGE ...`: the model argument left out
        raise LeukoscopeError(f"{path}: an image, not a model; give the model first (a bundled model: "
                              f"{', '.join(sorted(bundled_models()))}; a run folder or a checkpoint), then the images")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LeukoscopeError(f"checkpoint {str(path)!r} not found") from None
    except UNPICKLING_ERRORS as err:
        raise LeukoscopeError(f"{path}: not a readable leukoscope checkpoint ({first_line(err)})") from None
    missing = [k for k in REQUIRED if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise LeukoscopeError(f"{path}: not a leukoscope checkpoint (missing {', '.join(missing)})")
    return checkpoint


def class_index(checkpoint: dict[str, Any], label: str) -> int:
    """The index among the model's classes of a training split's ``label``: a class folder that the
    model's ``merge_classes`` merged into another counts as that one."""
    merge = (checkpoint.get("config") or {}).get("merge_classes") or {}
    return checkpoint["class_names"].index(merge.get(label, label))


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    model = create_model(checkpoint["arch"], len(checkpoint["class_names"]), **checkpoint.get("arch_kwargs", {}))
    state = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()}
    model.load_state_dict(state)
    return model.eval()


CHECKPOINT_NAME = "model.pt"
CLASSICAL_NAME = "model.joblib"


def bundled_models() -> dict[str, Path]:
    """Models shipped inside the package, by name (file stem under leukoscope/weights)."""
    folder = resources.files("leukoscope") / "weights"
    if not folder.is_dir():
        return {}
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".pt")}


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A run folder (its model.pt), a checkpoint file, or a bundled model name."""
    if isinstance(model, str) and not model.strip():  # Path("") is the current folder
        raise LeukoscopeError(f"no model given (an empty name); give a run folder, a checkpoint or one of: {', '.join(bundled_models())}")
    path = Path(model)
    if path.is_dir():
        for name in (CHECKPOINT_NAME, CLASSICAL_NAME):
            if (path / name).is_file():
                return path / name
        raise LeukoscopeError(f"run folder {str(path)!r} has no {CHECKPOINT_NAME} or {CLASSICAL_NAME}; train into it first")
    if path.is_file():
        return path
    bundled = bundled_models()
    by_lower = {name.lower(): path for name, path in bundled.items()}
    if str(model).lower() in by_lower:  # "PBC" is "pbc"
        return by_lower[str(model).lower()]
    names = ", ".join(sorted(bundled)) or "none installed"
    raise LeukoscopeError(
        f"model {str(model)!r} is neither a run folder, a checkpoint file nor a bundled model"
        f"{did_you_mean(str(model).lower(), by_lower) or not_found_hint(str(model))}; bundled models: {names}"
    )
