"""Evaluate a classifier on the train/val/test splits of a dataset and write the report.

Outputs in the chosen folder: metrics.json (one object per split), classification_report.txt,
predictions.csv, confusion_matrix.png, roc.png, training_curves.png (when a history is given)
and a self-contained report.html.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import SPLITS, Dataset, detect_layout, run_splits
from .data.dataset import decode_many
from .errors import LeukoscopeError
from .inference import Predictor, load_model, resolve_model_path
from .io import atomic_write
from .metrics import classification_report, summarize
from .report import plot_confusion_matrices, plot_roc, plot_training_curves, write_html_report


def predict_tensor(predictor: Predictor, images: torch.Tensor, batch_size: int = 128, tta: bool = False, desc: str | None = None) -> np.ndarray:
    chunks = range(0, len(images), batch_size)
    probs = [predictor.predict_proba(images[i : i + batch_size], tta) for i in tqdm(chunks, desc=desc, leave=False, disable=desc is None)]
    return np.concatenate(probs) if probs else np.zeros((0, len(predictor.class_names)))


def assign_splits(dataset: Dataset, model: str | os.PathLike) -> tuple[list[str], str]:
    """Use the run's splits.csv when DATA is the run's dataset, else evaluate everything as test."""
    recorded = run_splits(resolve_model_path(model).parent, dataset.samples)
    return recorded or (["test"] * len(dataset.samples), "none (whole dataset evaluated as test)")


def evaluate(
    predictor: Predictor,
    dataset: Dataset,
    splits: list[str],
    out_dir: str | os.PathLike,
    info: dict[str, Any] | None = None,
    history: list[dict] | None = None,
    images: dict[str, torch.Tensor] | None = None,
    tta: bool = False,
) -> dict[str, Any]:
    """Predict every split, compute metrics and write all report files; returns the metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = sorted({s.label for s in dataset.samples} - set(predictor.class_names))
    if unknown:
        raise LeukoscopeError(f"data has classes {unknown} that the model does not know; model classes: {predictor.class_names}")
    index = {c: i for i, c in enumerate(predictor.class_names)}
    metrics: dict[str, Any] = {}
    rows: list[list] = []
    test_probs = test_true = None
    for split in SPLITS:
        members = [s for s, k in zip(dataset.samples, splits) if k == split]
        if not members:
            continue
        if images is not None and split in images:
            tensor, errors = images[split], [None] * len(members)
        else:
            tensor, errors = decode_many([dataset.abspath(s) for s in members], predictor.image_size, desc=f"decode {split}")
        ok = [i for i, e in enumerate(errors) if e is None]
        members = [members[i] for i in ok]
        probs = predict_tensor(predictor, tensor[ok], tta=tta, desc=f"predict {split}")
        y_true = np.array([index[s.label] for s in members], dtype=int)
        metrics[split] = summarize(y_true, probs, predictor.class_names, [s.patient for s in members])
        metrics[split]["unreadable"] = sum(e is not None for e in errors)
        rows += [[s.path, split, s.label, predictor.class_names[int(p.argmax())], float(p.max())] for s, p in zip(members, probs)]
        test_probs, test_true = probs, y_true
    write_outputs(out_dir, metrics, predictor.class_names, rows, info or {}, history)
    if test_probs is not None and len(test_probs):
        plot_roc(test_true, test_probs, predictor.class_names, out_dir / "roc.png")
    write_html_report(out_dir, metrics, predictor.class_names, info or {})
    return metrics


def write_outputs(out_dir: Path, metrics: dict, class_names: list[str], rows: list[list], info: dict, history: list[dict] | None) -> None:
    with atomic_write(out_dir / "metrics.json") as handle:
        json.dump(metrics, handle, indent=2)
    text = "".join(f"== {split} ==\n{classification_report(m, class_names)}\n" for split, m in metrics.items())
    (out_dir / "classification_report.txt").write_text(text)
    with atomic_write(out_dir / "predictions.csv", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "split", "label", "predicted", "confidence"])
        writer.writerows(rows)
    plot_confusion_matrices(metrics, class_names, out_dir / "confusion_matrix.png")
    if history:
        plot_training_curves(history, out_dir / "training_curves.png")


def evaluate_command(model: str, data: str, out: str, tta: bool = False) -> dict[str, Any]:
    """``leukoscope evaluate MODEL DATA --out DIR``."""
    predictor = load_model(model)
    dataset = detect_layout(data)
    splits, kind = assign_splits(dataset, model)
    info = {"model": predictor.source, "arch": predictor.checkpoint["arch"], "data": str(data), "layout": dataset.layout,
            "split_kind": kind, "config": predictor.checkpoint.get("config", {}), "tta": tta}
    return evaluate(predictor, dataset, splits, out, info=info, tta=tta)

