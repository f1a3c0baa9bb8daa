"""``leukoscope train``: one entry point for every method, chosen from a registry.

``train(data, out, config)`` writes into ``out``: splits.csv, config.yaml, run.json, the model
(model.pt for a CNN, with last.pt every epoch for resuming; model.joblib for a classical method)
and the evaluation report. The CNN recipe lives here; the loop in ``trainer``, what every method
shares (folder, seeds, split, decoding, temperature) in ``runs``, classical methods in
``train_classical``.
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import ModelCard, Preprocessing, build_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, load_config
from .data import Dataset
from .data.dataset import decode_many
from .data.splits import make_folds, refuse_seen, seen_images
from .distill import distill_from
from .distributed import World, close, init_world, unwrap, weights_digest, wrap
from .errors import LeukoscopeError
from .evaluate import evaluate, headline
from .inference import Predictor
from .models import create_model, training_memory_format
from .ood import fit_ood, supports_ood
from .io import atomic_write
from .images import ImageReadError, View, load_rgb
from .localise import fill_masked_background
from .metrics import wilson_interval
from .progress import note, plural, progress
from .refit import merge_classifier, merged_classes, refit_classifier
from .runs import calibrate, load_split_images, prepare_output_folder, prepare_run, seed_everything, undo_refused_run
from .runtime import keep_freed_memory
from .stain import fit_cast_range, fit_target
from .tracking import log_run, require_mlflow
from .train_classical import train_classical
from .trainer import (Trainer, channel_stats, class_weights, free_memory, load_context, precision_note, refuse_oversized_batch,
                      resolve_precision, step_bytes_per_image)
from .transfer import describe, head_name, init_from_parent, load_parent, parent_stats


def train(data: str | os.PathLike, out: str | os.PathLike, config: TrainConfig, command: str = "", resume: bool = False,
          force: bool = False) -> dict[str, Any]:
    """Run a full training job into ``out`` and return the evaluation metrics.

    A non-empty ``out`` is refused unless ``force`` (which clears the earlier results, keeping
    its splits.csv) or ``resume`` (continue from ``out/last.pt`` exactly where the last completed
    epoch left off). Under torchrun (WORLD_SIZE > 1) every rank trains; only rank 0 writes.
    """
    if resume and config.method != "cnn":
        raise LeukoscopeError(f"--resume applies to CNN training; re-run the {config.method} training instead (features are cached)")
    if config.cv and (resume or config.method != "cnn"):
        raise LeukoscopeError("--cv runs CNN trainings from scratch: give no --resume and no classical --method")
    if config.track:
        require_mlflow()  # before hours of training, not after
    main = int(os.environ.get("RANK", "0")) == 0
    if not resume and main:  # refusals first: --force clears nothing on a bad command
        prepare_output_folder(out, force=force)
    before = {p.name for p in Path(out).iterdir()} if Path(out).is_dir() else None
    try:
        if config.cv:
            metrics = cross_validate(data, Path(out), config, command)
        else:
            metrics = TRAINERS[config.method](data, Path(out), config, command, resume)
    except LeukoscopeError:  # a bad --init, an unreadable data folder, ...: leave out as it was
        if main and not resume:
            undo_refused_run(out, before)
        raise
    if config.track and metrics:  # rank 0 only: other ranks return no metrics
        history = read_history(Path(out) / "history.csv")
        run_id = log_run(config.track, Path(out), data, config.to_dict(), metrics, history)
        note(f"tracked in MLflow store {config.track} (run {run_id})")
    return metrics


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def train_cnn(data: str | os.PathLike, out: Path, config: TrainConfig, command: str = "", resume: bool = False,
              given: tuple | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    keep_freed_memory()
    world, device = init_world(config.device)
    try:
        return _train_cnn(data, out, config, command, resume, world, device, started, given)
    finally:
        close(world)


CV_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "loss")


def cross_validate(data: str | os.PathLike, out: Path, config: TrainConfig, command: str = "") -> dict[str, Any]:
    """k-fold cross-validation over the train and val images of the split; the test split is not touched.

    Folds are stratified by class and grouped exactly like the split (patients, identical bytes).
    Each fold trains a model into ``out/cv/fold_N`` and is scored on its held-out fold; ``cv.json``
    holds every fold's validation metrics and their mean and standard deviation. Choose recipes on
    these numbers, never on a test split.
    """
    out.mkdir(parents=True, exist_ok=True)
    dataset, splits, split_kind = prepare_run(data, out, config, command)
    pool = [i for i, k in enumerate(splits) if k != "test"]
    folds = make_folds(dataset, pool, config.cv, config.split_seed_value, config.split_by)
    subset = Dataset(dataset.root, dataset.layout, [dataset.samples[i] for i in pool], dataset.classes, dataset.notes)
    fold_config = replace(config, cv=None)
    rows = []
    for fold in progress(range(config.cv), desc=f"cross-validation, {config.cv} folds", unit="fold"):
        fold_splits = ["val" if f == fold else "train" for f in folds]
        metrics = train_cnn(data, out / "cv" / f"fold_{fold + 1}", fold_config, command, given=(subset, fold_splits, split_kind))
        rows.append({"fold": fold + 1, "n_train": fold_splits.count("train"), "n_val": metrics["val"]["n"],
                     "correct": round(metrics["val"]["accuracy"] * metrics["val"]["n"]), **{m: metrics["val"][m] for m in CV_METRICS}})
        note(f"fold {fold + 1}/{config.cv}: " + ", ".join(f"{m} {rows[-1][m]:.4f}" for m in CV_METRICS))
    summary = {m: {"mean": float(np.mean([r[m] for r in rows])), "std": float(np.std([r[m] for r in rows], ddof=1))} for m in CV_METRICS}
    correct, scored = sum(r["correct"] for r in rows), sum(r["n_val"] for r in rows)
    pooled = {"correct": correct, "n": scored, "accuracy": correct / scored, "accuracy_ci": list(wilson_interval(correct, scored))}
    result = {"k": config.cv, "split_kind": split_kind, "images": len(pool), "config": config.to_dict(), "command": command,
              "folds": rows, "summary": summary, "pooled": pooled}
    with atomic_write(out / "cv.json") as handle:
        json.dump(result, handle, indent=2)
    print(f"{'fold':>6} " + " ".join(f"{m:>17}" for m in CV_METRICS))
    for r in rows:
        print(f"{r['fold']:>6} " + " ".join(f"{r[m]:>17.4f}" for m in CV_METRICS))
    print(f"{'mean':>6} " + " ".join(f"{summary[m]['mean']:>9.4f} ± {summary[m]['std']:.4f}" for m in CV_METRICS))
    low, high = pooled["accuracy_ci"]
    print(f"pooled: {correct} of {scored} images right, {100 * pooled['accuracy']:.1f}% (95% CI {100 * low:.1f}-{100 * high:.1f}), "
          "each called by the fold's model that did not train on it")
    return {"cv": result}


def _train_cnn(data, out: Path, config: TrainConfig, command: str, resume: bool, world: World, device: torch.device, started: float,
               given: tuple | None = None) -> dict[str, Any]:
    resume_state = load_resume_state(out) if resume else None
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    rngs = seed_everything(config.seed, world.rank, world.size)
    dataset, splits, split_kind = prepare_run(data, out, config, command, write=world.is_main, given=given)
    model = create_model(config.arch, len(dataset.classes), **config.arch_kwargs)
    final_classes, merged_index = merged_classes(dataset.classes, config.merge_classes)
    parent, head = None, None
    if config.init:
        if world.distributed and config.freeze_epochs:
            raise LeukoscopeError("--freeze-epochs cannot run under torchrun (DistributedDataParallel needs every weight trainable)")
        parent, record = load_parent(config.init, config)
        refuse_seen(parent.get("seen_images"), dataset, splits, f"--init {config.init!r}")
        init_from_parent(model, parent)
        head = head_name(model)
        note(describe(record))
    view = training_view(dataset, splits, config, parent)
    recoloured: list[bool] = []  # per sample, in the order of the splits before unreadable images drop out
    split_of = splits
    tensors, labels, dataset, splits = load_split_images(dataset, splits, view, recoloured)
    stats = parent_stats(parent) if parent else channel_stats(tensors["train"])  # a backbone expects its own normalisation
    model = model.to(device, memory_format=training_memory_format(model, device))
    bf16 = resolve_precision(config, device, model)
    if (why := precision_note(config, device, bf16)) is not None:
        note(why)
    refuse_oversized_batch(config, step_bytes_per_image(model, config.image_size, device, bf16), len(tensors["train"]), free_memory(device))
    card = ModelCard(config.arch, final_classes, Preprocessing(config.image_size, config.crop, tuple(stats[0]), tuple(stats[1]),
                                                                 config.cell, view.stain, view.colour, view.reduce, view.cast), config.arch_kwargs)
    meta = {**card.to_meta(), "config": config.to_dict(), "train_command": command, "split_kind": split_kind,
            "seen_images": seen_images(dataset, splits), **({"parent": record} if parent else {}),
            "recoloured_training_images": sum(r for r, k in zip(recoloured, split_of) if k == "train")}  # see Predictor.mark_recoloured
    if resume_state is not None:
        model.load_state_dict(resume_state["weights"])
    model = wrap(model, world, device, config.sync_bn, config.batch_size)
    trainer = Trainer(model, config, stats, rngs, device, world, bf16, class_weights(labels["train"], len(dataset.classes), config.class_balance),
                      steps_per_epoch=max(1, len(tensors["train"]) // config.batch_size), head=head)
    context = load_context(dataset, splits, config, view)
    if config.teacher:
        trainer.targets = distill_from(config.teacher, dataset, splits, labels["train"], config.distill, config.distill_temperature)
    history, best_epoch = trainer.fit(tensors, labels, meta, out, resume_state, context)
    if world.distributed:
        print(f"rank {world.rank}/{world.size}: final weights sha256 {weights_digest(model)}", flush=True)
    if not world.is_main:
        return {}
    model = unwrap(model)
    if config.merge_classes:  # the network learnt the finer classes; the model reports the merged ones
        merge_classifier(model, len(final_classes))
        labels = {split: merged_index[values] for split, values in labels.items()}
        dataset = replace(dataset, samples=[replace(s, label=final_classes[merged_index[dataset.classes.index(s.label)]]) for s in dataset.samples],
                          classes=final_classes)
        note(f"{plural(len(merged_index), 'trained class', 'trained classes')} merged into {plural(len(final_classes), 'class', 'classes')}: "
             + ", ".join(f"{c} -> {config.merge_classes[c]}" for c in sorted(config.merge_classes)))
    if config.refit_head is not None:
        accuracy = refit_classifier(model.cpu(), tensors["train"], labels["train"], *stats, config.refit_head,
                                    config.augment, config.refit_views, config.seed, context)
        note(f"classifier refitted on training features (C={config.refit_head}, clean + {config.refit_views} augmented views): "
             f"train accuracy {accuracy:.4f}")
    train_seconds = time.perf_counter() - started + (resume_state or {}).get("train_seconds", 0.0)
    checkpoint = build_checkpoint(model.cpu(), {**meta, "epoch": best_epoch})
    if supports_ood(model):  # the out-of-distribution alarm: training features, threshold on validation
        alarm = fit_ood(model, tensors["train"], labels["train"], tensors["val"], *stats)
        checkpoint["ood_threshold"] = alarm.pop("threshold")
        checkpoint["ood"] = alarm
    predictor = Predictor(checkpoint, source=str(out / "model.pt"))
    predictor.temperature = checkpoint["temperature"] = calibrate(predictor, tensors["val"], labels["val"])
    info = {"model": str(out / "model.pt"), "arch": config.arch, "data": str(data), "layout": dataset.layout,
            "split_kind": split_kind, "config": config.to_dict(), "train_seconds": round(train_seconds, 1),
            "temperature": round(checkpoint["temperature"], 4), "world_size": world.size, "parent": describe(meta.get("parent"))}
    metrics = evaluate(predictor, dataset, splits, out, info=info, history=history, images=tensors, target_sensitivity=config.target_sensitivity)
    checkpoint["metrics"] = headline(metrics)
    checkpoint["train_seconds"] = round(train_seconds, 1)
    save_checkpoint(out / "model.pt", checkpoint)
    info.pop("gallery", None)
    (out / "run.json").write_text(json.dumps({**info, "command": command, "status": "done", "layout_notes": dataset.notes, "epochs_run": len(history),
                                              "resumed": resume, "precision": "bf16" if bf16 else "fp32", "device": str(device)}, indent=2))
    return metrics


def training_view(dataset: Dataset, splits: list[str], config: TrainConfig, parent: dict[str, Any] | None) -> View:
    """The view the model will see; with reinhard colour normalisation, its target: the parent's (the
    backbone learnt on that colour) or the mean OD statistics of up to 500 training windows; with
    ``colour_cast``, the background colour range of up to 500 training images."""
    view = View(config.image_size, config.crop, config.cell, colour=config.colour_norm, reduce=config.reduce)
    if config.colour_cast:
        view = replace(view, cast=fit_cast(dataset, splits, config.seed, paint=config.cell is not None))
    if config.colour_norm != "reinhard":
        return view
    if parent is not None and (target := ModelCard.from_meta(parent).preprocessing.stain) is not None:
        return replace(view, stain=target)
    sample = training_sample(dataset, splits, config.seed)
    images, errors = decode_many(sample, replace(view, colour="none"), desc="fit the colour target")  # the windows before normalisation
    target = fit_target(image.permute(1, 2, 0).numpy() for image, error in zip(images, errors) if error is None)
    note(f"colour target (optical density mean, std per channel) from {plural(len(sample), 'training image')}: {target}")
    return replace(view, stain=target)


def training_sample(dataset: Dataset, splits: list[str], seed: int, n: int = 500) -> list[Path]:
    """Up to ``n`` training images, drawn with ``seed``: what colour statistics are fitted on."""
    train = [dataset.abspath(s) for s, k in zip(dataset.samples, splits) if k == "train"]
    return random.Random(seed).sample(train, min(n, len(train)))


def fit_cast(dataset: Dataset, splits: list[str], seed: int, paint: bool) -> tuple[float, ...]:
    """The background colour range of up to 500 training images, whole (with any black background
    painted, for cell-centric views), as the view sees them before the cast correction (see
    stain.fit_cast_range)."""
    sample = training_sample(dataset, splits, seed)
    images = []
    for path in progress(sample, total=len(sample), desc="fit the colour cast range", unit="image", leave=False, log=True):
        try:
            image = load_rgb(path)
            images.append(fill_masked_background(image) if paint else image)
        except ImageReadError:
            continue  # reported when the splits are decoded
    cast = fit_cast_range(images)
    note(f"background colour range (chromaticity low R, G, B, high R, G, B) from {plural(len(images), 'training image')}: {cast}")
    return cast


def _train_classical(data, out: Path, config: TrainConfig, command: str = "", resume: bool = False) -> dict[str, Any]:
    return train_classical(data, out, config, command)


# --method NAME -> the function that trains it (config.METHODS lists the same names)
TRAINERS: dict[str, Callable[..., dict[str, Any]]] = {
    "cnn": train_cnn,
    **{method: _train_classical for method in ("svm", "mlp", "cnn-rf", "wbc-two-stage")},
}


def load_resume_state(out: Path) -> dict:
    last = out / "last.pt"
    if not last.is_file():
        raise LeukoscopeError(f"cannot resume: {last} not found (nothing was trained into {out} yet)")
    checkpoint = load_checkpoint(last)
    if "resume" not in checkpoint:
        raise LeukoscopeError(f"cannot resume: {last} has no training state (written by an older leukoscope)")
    state = checkpoint["resume"]
    return {**state, "weights": checkpoint["state_dict"], "train_seconds": sum(h["seconds"] for h in state["history"])}


def read_run_for_resume(run: str | os.PathLike) -> tuple[str, TrainConfig, str]:
    """(data path, config, original command) of a run folder, for ``train --resume RUN``."""
    run = Path(run)
    info_path, config_path = run / "run.json", run / "config.yaml"
    if not info_path.is_file() or not config_path.is_file():
        raise LeukoscopeError(f"cannot resume {str(run)!r}: no run.json/config.yaml there; is it a training run folder?")
    info = json.loads(info_path.read_text())
    return info["data"], load_config(config_path, {}), info.get("command", "")
