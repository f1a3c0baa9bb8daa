"""Fine-tuning from one of our own models (``train --init MODEL``): its backbone, a new head.

No ImageNet weights are downloaded: the parent is a run folder, a checkpoint or a bundled model
(``pbc``, ``aria-all``) trained on blood cells. Its architecture and normalisation are taken over
(the backbone was trained on inputs normalised that way); only the classifier is new.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .checkpoint import ModelCard, load_checkpoint, resolve_model_path
from .config import TrainConfig
from .errors import LeukoscopeError
from .io import sha256_file


def head_name(model: nn.Module) -> str:
    """The qualified name of the classifier that maps pooled features to classes.

    timm models say it (``get_classifier``); CellNet and torchvision models end in one Linear layer
    (``classifier``, ``fc``, ``classifier.1`` ...), the last Linear in registration order.
    """
    if hasattr(model, "get_classifier"):
        target = model.get_classifier()
        return next(name for name, m in model.named_modules() if m is target)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise LeukoscopeError(f"cannot find the classifier of {type(model).__name__} to replace")
    return linears[-1]


def is_head(parameter_name: str, head: str) -> bool:
    return parameter_name == head or parameter_name.startswith(head + ".")


def load_parent(init: str | os.PathLike, config: TrainConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """(parent checkpoint, record for the child's checkpoint); refuses a parent it cannot honour."""
    path = resolve_model_path(init)
    if path.suffix.lower() in (".onnx", ".joblib"):
        raise LeukoscopeError(f"--init {str(init)!r} is a {path.suffix[1:]} model without PyTorch weights; give a run folder, "
                              "a model.pt or a bundled name")
    parent = load_checkpoint(path)
    card = ModelCard.from_meta(parent)
    if config.arch != card.arch or dict(config.arch_kwargs or {}) != dict(card.arch_kwargs or {}):
        raise LeukoscopeError(f"--init {str(init)!r} is a {card.arch} {card.arch_kwargs or ''}; it cannot initialise --arch "
                              f"{config.arch} {config.arch_kwargs or ''}: leave --arch out (the parent's is used) or pick another parent")
    return parent, {"name": str(init), "path": str(path), "sha256": sha256_file(path), "arch": card.arch,
                    "classes": ", ".join(card.class_names)}


def init_from_parent(model: nn.Module, parent: dict[str, Any]) -> list[str]:
    """Copy every backbone tensor of ``parent`` into ``model``; the head stays newly initialised.

    Returns the names of the tensors copied. Shapes must match everywhere outside the head.
    """
    head = head_name(model)
    own = model.state_dict()
    copied, mismatched = [], []
    for name, tensor in parent["state_dict"].items():
        if is_head(name, head) or name not in own:
            continue
        if own[name].shape != tensor.shape:
            mismatched.append(name)
            continue
        own[name] = tensor.to(own[name].dtype)
        copied.append(name)
    if mismatched:
        raise LeukoscopeError(f"the parent's weights do not fit this network ({mismatched[0]} has another shape)")
    missing = [n for n in own if not is_head(n, head) and n not in copied and not n.endswith("num_batches_tracked")]
    if missing:
        raise LeukoscopeError(f"the parent lacks weights of this network (e.g. {missing[0]})")
    model.load_state_dict(own)
    return copied


def parent_stats(parent: dict[str, Any]) -> tuple[list[float], list[float]]:
    pre = ModelCard.from_meta(parent).preprocessing
    return list(pre.mean), list(pre.std)


def describe(record: dict[str, str] | None) -> str:
    if not record:
        return ""
    return f"fine-tuned from {record['name']} ({record['arch']}; classes {record['classes']}; sha256 {record['sha256'][:16]}...)"


