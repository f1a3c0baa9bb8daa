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

from .data import Dataset
from .data.dataset import decode_many
from .data.splits import refuse_seen
from .errors import LeukoscopeError
from .evaluate import predict_logits
from .inference import Predictor, load_model
from .progress import note


def load_teacher(teacher: str | os.PathLike) -> Predictor:
    """A CNN teacher (run folder, checkpoint or bundled name) on PyTorch, in fp32."""
    predictor = load_model(teacher, backend="torch", device="cpu", purpose="--teacher")
    if predictor.kind != "cnn":
        raise LeukoscopeError(f"teacher {str(teacher)!r} is a {predictor.kind} model; distillation needs a CNN (a run folder, checkpoint or bundled name)")
    return predictor


def teacher_probabilities(teacher: Predictor, paths: Sequence[str | os.PathLike], class_names: Sequence[str],
                          temperature: float = 2.0, batch_size: int = 256) -> np.ndarray:
    """The teacher's probabilities over ``class_names`` (N, C) for each path, softened by ``temperature``.

    Classes are matched by name; a student class the teacher lacks gets probability 0, a teacher
    class the student lacks is dropped (the rest renormalised).
    """
    columns = [teacher.class_names.index(name) if name in teacher.class_names else -1 for name in class_names]
    if all(c < 0 for c in columns):
        raise LeukoscopeError(f"the teacher shares no class with the training data (teacher: {', '.join(teacher.class_names)}; "
                              f"data: {', '.join(class_names)})")
    images, errors = decode_many(list(paths), teacher.view, desc="teacher: decode the training images")
    if any(e is not None for e in errors):
        raise LeukoscopeError(f"teacher: {sum(e is not None for e in errors)} training images could not be decoded")
    logits = torch.from_numpy(predict_logits(teacher, images, batch_size, tta="none", desc="teacher: predict")).double()
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


def distill_from(teacher: str, dataset: Dataset, splits: list[str], labels: np.ndarray, weight: float, temperature: float) -> torch.Tensor:
    """Targets for the training images of ``dataset`` (see distillation_targets), with a note of how
    many the teacher taught; a teacher that saw this run's validation or test images is refused."""
    model = load_teacher(teacher)
    refuse_seen(model.checkpoint.get("seen_images"), dataset, splits, f"the teacher {teacher!r}")
    paths = [dataset.abspath(s) for s, k in zip(dataset.samples, splits) if k == "train"]
    probs = teacher_probabilities(model, paths, dataset.classes, temperature)
    targets, taught = distillation_targets(labels, probs, weight)
    note(f"distillation from {teacher}: its probabilities (temperature {temperature:g}) make up {weight:g} of the targets of the "
         f"{taught} of {len(labels)} training images it calls right; the others keep their labels")
    return targets
