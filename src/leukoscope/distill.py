"""Knowledge distillation: a teacher model's probabilities blended into the training targets.

A model trained for several labs (``wbc``: a cell-centric window, strong colour jitter) is less
accurate on one lab's tiles than a model made for them (``pbc``: a central crop), and a few points
of that can be taught (Hinton et al. 2015). The teacher sees each training image through its own
preprocessing (its checkpoint's view), so it may frame the image differently from the student.
Its probabilities only enter where it calls the image right: on images from a lab the teacher
does not know (BCCD's fields for ``pbc``) it is mostly wrong, and those keep their labels alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from .data.dataset import decode_many
from .errors import LeukoscopeError
from .inference import load_model
from .progress import note


def teacher_probabilities(teacher: str | os.PathLike, paths: Sequence[str | os.PathLike], class_names: Sequence[str],
                          temperature: float = 2.0, batch_size: int = 256) -> np.ndarray:
    """The teacher's probabilities over ``class_names`` (N, C) for each path, softened by ``temperature``.

    Classes are matched by name; a student class the teacher lacks gets probability 0, a teacher
    class the student lacks is dropped (the rest renormalised). Needs a CNN teacher (its logits).
    """
    predictor = load_model(teacher, backend="torch", device="cpu")
    if predictor.kind != "cnn":
        raise LeukoscopeError(f"teacher {str(teacher)!r} is a {predictor.kind} model; distillation needs a CNN (a run folder, checkpoint or bundled name)")
    shared = [name for name in class_names if name in predictor.class_names]
    if not shared:
        raise LeukoscopeError(f"teacher {str(teacher)!r} shares no class with the training data (teacher: {', '.join(predictor.class_names)}; "
                              f"data: {', '.join(class_names)})")
    images, errors = decode_many(list(paths), predictor.view, desc="teacher: decode the training images")
    if any(e is not None for e in errors):
        raise LeukoscopeError(f"teacher: {sum(e is not None for e in errors)} training images could not be decoded")
    logits = torch.cat([predictor.logits(images[i : i + batch_size], tta="none") for i in range(0, len(images), batch_size)]).double()
    columns = [predictor.class_names.index(name) if name in predictor.class_names else -1 for name in class_names]
    known = torch.tensor([c for c in columns if c >= 0])
    probs = torch.softmax(logits[:, known] / temperature, dim=1).numpy()
    out = np.zeros((len(paths), len(class_names)))
    out[:, [i for i, c in enumerate(columns) if c >= 0]] = probs
    return out


def distillation_targets(labels: np.ndarray, teacher: np.ndarray, weight: float) -> tuple[torch.Tensor, int]:
    """Target distributions (N, C): one-hot labels, blended as ``(1 - weight) * one_hot + weight * teacher``
    where the teacher's call (its argmax) is the label; returns them and how many were blended."""
    if not 0 <= weight <= 1:
        raise LeukoscopeError(f"distill must be between 0 and 1 (the teacher's share of each target), got {weight}")
    one_hot = np.eye(teacher.shape[1])[labels]
    right = teacher.argmax(1) == labels
    targets = np.where(right[:, None], (1 - weight) * one_hot + weight * teacher, one_hot)
    return torch.from_numpy(targets.astype(np.float32)), int(right.sum())


def distill_from(teacher: str, paths: Sequence[str | os.PathLike], labels: np.ndarray, class_names: Sequence[str], weight: float,
                 temperature: float) -> torch.Tensor:
    """Targets for training images ``paths`` (see distillation_targets), with a note of how many the teacher taught."""
    probs = teacher_probabilities(teacher, paths, class_names, temperature)
    targets, taught = distillation_targets(labels, probs, weight)
    note(f"distillation from {teacher}: its probabilities (temperature {temperature:g}) make up {weight:g} of the targets of the "
         f"{taught} of {len(labels)} training images it calls right; the others keep their labels")
    return targets
