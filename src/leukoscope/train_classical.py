"""Train a classical method (``--method svm|mlp|cnn-rf|wbc-two-stage``) into a run folder.

Same split file, reports and metrics as the CNN trainer; the fitted model is saved as
``model.joblib`` and loads through ``leukoscope.load_model`` like any other run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .checkpoint import ModelCard, Preprocessing, load_checkpoint
from .classical import NEEDS_BACKBONE
from .classical.model import ClassicalModel, save_classical
from .config import TrainConfig
from .data import run_splits
from .data.splits import seen_images
from .errors import LeukoscopeError
from .evaluate import evaluate, headline, predict_logits
from .inference import CLASSICAL_NAME, Predictor, resolve_model_path
from .io import sha256_file
from .runs import calibrate, load_split_images, prepare_run, seed_everything


def load_backbone(name: str, dataset, splits: list[str], out: Path) -> dict[str, Any]:
    """The CNN checkpoint whose features a method uses, refused if it saw our val/test images in training."""
    path = resolve_model_path(name)
    if path.suffix != ".pt":
        raise LeukoscopeError(f"--backbone must be a CNN run or bundled model, not {path.name}")
    checkpoint = load_checkpoint(path)
    recorded = run_splits(path.parent, dataset.samples)
    if recorded is not None:
        leaked = [s.path for s, ours, theirs in zip(dataset.samples, splits, recorded[0]) if ours != "train" and theirs == "train"]
        if leaked:
            raise LeukoscopeError(f"backbone {name!r} was trained on {len(leaked)} of this run's val/test images (e.g. {leaked[0]}); "
                                  "train the backbone on this split first")
    elif checkpoint.get("splits_sha256") and checkpoint["splits_sha256"] != sha256_file(out / "splits.csv"):
        raise LeukoscopeError(f"backbone {name!r} was trained on a different split of the data (splits.csv differs); "
                              "train a CNN on this split and pass its run folder as --backbone")
    elif not checkpoint.get("splits_sha256"):
        raise LeukoscopeError(f"cannot tell which images backbone {name!r} was trained on; pass a run folder with splits.csv")
    return checkpoint


def train_classical(data: str | os.PathLike, out: str | os.PathLike, config: TrainConfig, command: str = "") -> dict[str, Any]:
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    dataset, splits, split_kind = prepare_run(data, out, config, command)
    backbone = load_backbone(config.backbone, dataset, splits, out) if config.method in NEEDS_BACKBONE else None
    backbone_pre = ModelCard.from_meta(backbone).preprocessing if backbone else None  # the backbone's own view of each image
    # the backbone's framing, every field of it (its normalisation stays the backbone's own business)
    pre = Preprocessing(config.image_size, config.crop, cell=config.cell, reduce=config.reduce) if backbone_pre is None else \
        replace(backbone_pre, mean=Preprocessing.mean, std=Preprocessing.std)
    tensors, labels, dataset, splits = load_split_images(dataset, splits, pre.view)
    model = ClassicalModel(config.method, dataset.classes, pre.image_size, backbone, config.seed)
    model.cache_writes = True  # this run's features are worth keeping; the saved model only reads the cache
    model.fit(tensors["train"], labels["train"])
    train_seconds = time.perf_counter() - started
    card = ModelCard(config.method, dataset.classes, pre)
    meta = {**card.to_meta(), "config": config.to_dict(), "train_command": command, "split_kind": split_kind,
            "backbone_name": config.backbone, "seen_images": seen_images(dataset, splits)}
    predictor = Predictor(meta, source=str(out / CLASSICAL_NAME), backend=model)
    predictor.temperature = meta["temperature"] = calibrate(predictor, tensors["val"], labels["val"])
    t0 = time.perf_counter()
    predict_logits(predictor, tensors["test"])
    predict_ms = 1000 * (time.perf_counter() - t0) / max(len(tensors["test"]), 1)
    info = {"model": str(out / CLASSICAL_NAME), "arch": config.method, "data": str(data), "layout": dataset.layout, "split_kind": split_kind,
            "config": config.to_dict(), "train_seconds": round(train_seconds, 1), "temperature": round(predictor.temperature, 4)}
    metrics = evaluate(predictor, dataset, splits, out, info=info, images=tensors, target_sensitivity=config.target_sensitivity)
    meta["metrics"] = headline(metrics)
    meta.update(train_seconds=round(train_seconds, 1), predict_ms_per_image=round(predict_ms, 3), threshold=predictor.threshold)
    model.cache_writes = False
    save_classical(out / CLASSICAL_NAME, model, meta)
    info.pop("gallery", None)
    (out / "run.json").write_text(json.dumps({**info, "command": command, "status": "done", "method": config.method,
                                              "predict_ms_per_image": round(predict_ms, 3)}, indent=2))
    return metrics
