"""Self-describing checkpoints: weights plus everything needed to rebuild and use the model.

A checkpoint is a plain dict (loadable with ``weights_only=True``) holding ``arch``,
``arch_kwargs``, ``class_names``, ``image_size``, ``mean``, ``std``, ``temperature``, the
resolved training ``config``, ``metrics``, library versions and the ``state_dict``.
"""

from __future__ import annotations

import os
import pickle
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import LeukoscopeError
from .io import atomic_write
from .models import create_model

FORMAT_VERSION = 1
REQUIRED = ("arch", "class_names", "image_size", "mean", "std", "state_dict")


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
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LeukoscopeError(f"checkpoint {str(path)!r} not found") from None
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise LeukoscopeError(f"{path}: not a readable leukoscope checkpoint ({str(err).splitlines()[0][:120]})") from None
    missing = [k for k in REQUIRED if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise LeukoscopeError(f"{path}: not a leukoscope checkpoint (missing {', '.join(missing)})")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    model = create_model(checkpoint["arch"], len(checkpoint["class_names"]), **checkpoint.get("arch_kwargs", {}))
    state = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()}
    model.load_state_dict(state)
    return model.eval()
