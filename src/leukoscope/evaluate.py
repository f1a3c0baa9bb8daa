"""Evaluate a classifier on the train/val/test splits of a dataset and write the report.

Outputs in the chosen folder: metrics.json (one object per split), classification_report.txt,
predictions.csv, confusion_matrix.png, roc.png, training_curves.png (when a history is given)
and a self-contained report.html.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .classes import (
    class_map_merges,
    map_classes,
    match_class_names,
    parse_class_map,
    parse_classes,
    restrict_classes,
    subtype_merges,
)
from .data import SPLITS, Dataset, detect_layout, read_splits, run_splits
from .data.layouts import folder_warnings
from .data.splits import splits_from_seen
from .data.dataset import decode_many
from .errors import LeukoscopeError
from .inference import Predictor, load_model, resolve_model_path, tta_mode
from .io import atomic_write
from .metrics import (classification_report, expected_calibration_error, sensitivity_specificity, softmax, summarize,
                      threshold_for_sensitivity, wilson_interval)
from .progress import note, plural, progress
from .report import plot_confusion_matrices, plot_reliability, plot_roc, plot_training_curves, write_html_report
from .runs import prepare_output_folder, warn_unreadable
from .transfer import describe

CLASS_MAP_HINT = ("--class-map MODEL_CLASS=DATA_CLASS,... (e.g. Early=blast,Benign=normal; a model class may take several "
                  "data classes: neutrophil=band,neutrophil=seg)")


def predict_logits(predictor: Predictor, images: torch.Tensor, batch_size: int = 128, tta: bool | str | None = None, desc: str | None = None) -> np.ndarray:
    return predict_logits_and_ood(predictor, images, batch_size, tta, desc)[0]


def predict_logits_and_ood(predictor: Predictor, images: torch.Tensor, batch_size: int = 128, tta: bool | str | None = None,
                           desc: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of (N, 3, S, S) uint8 images and their OOD scores (None for a model without the alarm)."""
    logits, scores = [], []
    for i in progress(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False, log=True, disable=desc is None):
        batch_logits, batch_scores = predictor.logits_and_ood(images[i : i + batch_size], tta)
        logits.append(batch_logits.numpy())
        if batch_scores is not None:
            scores.append(batch_scores.numpy())
    if not logits:
        return np.zeros((0, len(predictor.class_names))), None
    return np.concatenate(logits), (np.concatenate(scores) if scores else None)


def splits_from_file(dataset: Dataset, path: str | os.PathLike) -> tuple[list[str], str]:
    """Each image's split from a run's splits.csv (``evaluate --split``); every image of DATA must be listed."""
    samples, splits = read_splits(path)
    lookup = {s.path: k for s, k in zip(samples, splits)}
    missing = [s.path for s in dataset.samples if s.path not in lookup]
    if missing:
        raise LeukoscopeError(f"--split {str(path)!r} does not list {plural(len(missing), 'image')} of {dataset.root} (e.g. {missing[0]}); "
                              "give the splits.csv of a run on this data")
    return [lookup[s.path] for s in dataset.samples], f"from {path}"


def assign_splits(dataset: Dataset, model: str | os.PathLike, predictor: Predictor, split_file: str | os.PathLike | None = None) -> tuple[list[str], str]:
    """The split of every image of DATA: ``split_file`` when given; the run's splits.csv when DATA is
    the run's dataset; else, from the content hashes the checkpoint carries, the model's own training
    and validation images are scored as such and only the rest as test. In every case an image the
    model trained on is never scored as test."""
    if split_file is not None:
        splits, kind = splits_from_file(dataset, split_file)
        return _never_test_if_seen(dataset, splits, predictor), kind
    recorded = run_splits(resolve_model_path(model).parent, dataset.samples)
    if recorded is not None:
        return recorded
    seen = predictor.checkpoint.get("seen_images")
    if not seen:
        return ["test"] * len(dataset.samples), "none (whole dataset evaluated as test; the model records no training images)"
    splits, n_train, n_val = splits_from_seen(dataset, seen)
    if n_train or n_val:
        note(f"{plural(n_train, 'image')} of this data trained the model and {n_val} validated it: they are scored as "
             f"train and val, and the other {plural(splits.count('test'), 'image')} as test")
    return splits, f"by content: {n_train} training and {n_val} validation images of the model recognised, the rest is test"


def evaluate(
    predictor: Predictor,
    dataset: Dataset,
    splits: list[str],
    out_dir: str | os.PathLike,
    info: dict[str, Any] | None = None,
    history: list[dict] | None = None,
    images: dict[str, torch.Tensor] | None = None,
    tta: bool | str | None = None,
    target_sensitivity: float | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Predict every split, compute metrics and write all report files; returns the metrics.

    With ``target_sensitivity`` (binary tasks), the operating threshold is chosen on the
    validation split and stored on the predictor; every split then reports its sensitivity
    and specificity at that threshold. ``workers``: decoding processes (see ``decoding.worker_processes``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = dict(info or {})
    unknown = sorted({s.label for s in dataset.samples} - set(predictor.class_names))
    if unknown:
        raise LeukoscopeError(f"data has classes {unknown} that the model does not know; model classes: {predictor.class_names}; "
                              f"map them with {CLASS_MAP_HINT}")
    results = {split: _predict_split(predictor, dataset, splits, split, images, tta, workers) for split in SPLITS}
    results = {k: v for k, v in results.items() if v is not None}
    if getattr(predictor.backend, "precision", None):  # what ran, once --precision auto has chosen
        info["precision"] = predictor.backend.precision
    if target_sensitivity is not None:
        choose_threshold(predictor, results, target_sensitivity)
    metrics: dict[str, Any] = {}
    rows: list[list] = []
    for split, r in results.items():
        calls = np.array([predictor.decide(p) for p in r["probs"]], dtype=int)  # the threshold, where the model has one
        metrics[split] = summarize(r["y"], r["probs"], predictor.class_names, [s.patient for s in r["members"]], y_pred=calls)
        metrics[split]["ece_uncalibrated"] = expected_calibration_error(r["raw"], r["y"])
        metrics[split]["unreadable"] = r["unreadable"]
        alarm = [("", "")] * len(calls)  # ood_score, in_domain: empty for a model without the alarm
        if r["ood"] is not None and len(r["ood"]):
            outside = (r["ood"] > predictor.ood_threshold) | r["unfamiliar"]  # as predict's in_domain
            flagged = int(outside.sum())
            metrics[split]["out_of_domain"] = flagged / len(r["ood"])
            metrics[split]["out_of_domain_ci"] = list(wilson_interval(flagged, len(r["ood"])))
            alarm = [(f"{score:.3f}", "false" if out else "true") for score, out in zip(r["ood"], outside)]
        if predictor.threshold is not None and len(predictor.class_names) == 2:
            metrics[split]["operating_point"] = operating_point(predictor, r["y"], r["probs"])
        rows += [[s.path, split, s.label, predictor.class_names[c], float(p[c]), *a] for s, p, c, a in zip(r["members"], r["probs"], calls, alarm)]
    warn_small_test(metrics.get("test"))
    write_outputs(out_dir, metrics, predictor.class_names, rows, info, history)
    test = results.get("test")
    if test is not None and len(test["y"]):
        plot_roc(test["y"], test["probs"], predictor.class_names, out_dir / "roc.png")
        plot_reliability(test["y"], test["raw"], test["probs"], out_dir / "reliability.png")
        info["gallery"] = gallery(predictor, test, out_dir / "gallery")
    info["temperature"] = round(predictor.temperature, 4)
    write_html_report(out_dir, metrics, predictor.class_names, info)
    return metrics


def _predict_split(predictor: Predictor, dataset: Dataset, splits: list[str], split: str, images: dict | None, tta: bool | str | None,
                   workers: int | None = None) -> dict | None:
    members = [s for s, k in zip(dataset.samples, splits) if k == split]
    if not members:
        return None
    recoloured: list[bool] = []  # stays empty for the training run's own images: none recoloured unless the model saw some
    if images is not None and split in images:
        tensor, errors = images[split], [None] * len(members)
    else:
        paths = [dataset.abspath(s) for s in members]
        tensor, errors = decode_many(paths, predictor.view, desc=f"decode {split}", workers=workers, recoloured=recoloured)
        warn_unreadable(paths, errors)
    ok = [i for i, e in enumerate(errors) if e is None]
    unfamiliar = np.array([predictor.unfamiliar(recoloured[i]) for i in ok] if recoloured else [False] * len(ok), dtype=bool)
    index = {c: i for i, c in enumerate(predictor.class_names)}
    logits, ood = predict_logits_and_ood(predictor, tensor[ok], tta=tta, desc=f"predict {split}")
    return {"members": [members[i] for i in ok], "images": tensor[ok], "y": np.array([index[members[i].label] for i in ok], dtype=int),
            "raw": softmax(logits), "probs": softmax(logits, predictor.temperature), "unreadable": len(members) - len(ok), "ood": ood,
            "unfamiliar": unfamiliar}


def choose_threshold(predictor: Predictor, results: dict, target: float) -> None:
    if len(predictor.class_names) != 2:
        raise LeukoscopeError(f"--target-sensitivity needs a binary model; this one has {len(predictor.class_names)} classes")
    if "val" not in results:
        raise LeukoscopeError("--target-sensitivity needs a validation split to choose the threshold on")
    val, pos = results["val"], predictor.positive_index
    # Never above 0.5 (the argmax rule): a sensitivity target may only lower the bar. On a small,
    # well-separated validation split the highest threshold that keeps the target is just below the
    # least confident blast, which would miss any new blast a little below it.
    predictor.threshold = min(0.5, threshold_for_sensitivity(val["y"] == pos, val["probs"][:, pos], target))
    predictor.checkpoint["threshold"], predictor.checkpoint["positive_index"] = predictor.threshold, pos


def operating_point(predictor: Predictor, y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    pos = predictor.positive_index
    positive, called = y == pos, probs[:, pos] >= predictor.threshold
    sens, spec = sensitivity_specificity(positive, probs[:, pos], predictor.threshold)
    return {"positive_class": predictor.class_names[pos], "threshold": predictor.threshold,
            "sensitivity": sens, "sensitivity_ci": list(wilson_interval(int((called & positive).sum()), int(positive.sum()))),
            "specificity": spec, "specificity_ci": list(wilson_interval(int((~called & ~positive).sum()), int((~positive).sum())))}


SMALL_TEST = 50  # fewer test images: warn that the numbers are uncertain


def warn_small_test(test: dict | None) -> None:
    if test is not None and 0 < test["n"] < SMALL_TEST:
        low, high = test["accuracy_ci"]
        note(f"warning: the test split has only {plural(test['n'], 'image')}: accuracy {test['accuracy']:.1%} "
             f"(95% CI {low:.1%}-{high:.1%}) is a rough estimate")


def gallery(predictor: Predictor, test: dict, folder: Path, errors: int = 6, per_class: int = 2) -> list[dict[str, str]]:
    """Heatmap panels of the most confident test errors and the most confident correct cells per class."""
    if "state_dict" not in predictor.checkpoint:
        return []
    from .explain import Explainer, panel, png_bytes

    pred = np.array([predictor.decide(p) for p in test["probs"]], dtype=int)
    conf = test["probs"][np.arange(len(pred)), pred]
    wrong = [int(i) for i in np.argsort(-conf) if pred[i] != test["y"][i]][:errors]
    picks = [(i, "error") for i in wrong]
    for c in range(len(predictor.class_names)):
        right = [int(i) for i in np.argsort(-conf) if pred[i] == c and test["y"][i] == c][:per_class]
        picks += [(i, "correct") for i in right]
    folder.mkdir(parents=True, exist_ok=True)
    explainer, names, items = Explainer(predictor), predictor.class_names, []
    scale = max(1, -(-224 // predictor.image_size))  # each cell at least 224 px wide
    for n, (i, kind) in enumerate(picks):
        image = test["images"][i].permute(1, 2, 0).numpy()
        overlay = explainer.overlay(image, int(pred[i]))
        caption = f"true {names[test['y'][i]]}, called {names[pred[i]]} {conf[i]:.3f}"
        name = f"{n:02d}_{kind}.png"
        (folder / name).write_bytes(png_bytes(panel(image, overlay, scale=scale)))  # the caption goes under it in the report
        items.append({"file": f"gallery/{name}", "kind": kind, "caption": caption, "source": test["members"][i].path})
    return items


def write_outputs(out_dir: Path, metrics: dict, class_names: list[str], rows: list[list], info: dict, history: list[dict] | None) -> None:
    with atomic_write(out_dir / "metrics.json") as handle:
        json.dump(metrics, handle, indent=2)
    text = "".join(f"== {split} ==\n{classification_report(m, class_names)}\n" for split, m in metrics.items())
    with atomic_write(out_dir / "classification_report.txt", encoding="utf-8") as handle:
        handle.write(text)
    with atomic_write(out_dir / "predictions.csv", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "split", "label", "predicted", "confidence", "ood_score", "in_domain"])
        writer.writerows(rows)
    plot_confusion_matrices(metrics, class_names, out_dir / "confusion_matrix.png")
    if history:
        plot_training_curves(history, out_dir / "training_curves.png")


HEADLINE = ("accuracy", "accuracy_ci", "balanced_accuracy", "balanced_accuracy_ci", "macro_f1", "macro_f1_ci", "weighted_f1", "roc_auc",
            "roc_auc_ci", "ece", "n")


def headline(metrics: dict[str, Any]) -> dict[str, dict]:
    """The per-split numbers a checkpoint carries in its metadata."""
    return {split: {k: m[k] for k in HEADLINE if k in m} for split, m in metrics.items()}


def _never_test_if_seen(dataset: Dataset, splits: list[str], predictor: Predictor) -> list[str]:
    """A split given by hand still cannot score the model's own training images as test."""
    seen = predictor.checkpoint.get("seen_images")
    if not seen or "test" not in splits:
        return splits
    by_content, _, _ = splits_from_seen(dataset, seen)
    moved = {i for i, (given, own) in enumerate(zip(splits, by_content)) if given == "test" and own != "test"}
    if moved:
        note(f"warning: {plural(len(moved), 'test image')} of the given split trained or validated this model: scored as "
             f"{by_content[min(moved)]}, not test")
    return [by_content[i] if i in moved else k for i, k in enumerate(splits)]


def evaluate_command(model: str, data: str, out: str, tta: bool | str | None = None, target_sensitivity: float | None = None,
                     backend: str = "auto", force: bool = False, class_map: str | None = None,
                     split_file: str | None = None, adapt: bool = False, device: str = "auto", precision: str = "fp32",
                     adapt_steps: int | None = None, workers: int | None = None, skip_unknown: bool = False,
                     classes: str | None = None) -> dict[str, Any]:
    """``leukoscope evaluate MODEL DATA --out DIR``; a DIR with earlier results needs ``force``.

    ``class_map`` ('Early=blast,Pre=blast,Pro=blast,Benign=normal') scores the model on data whose
    classes differ: each model class counts as the data class it maps to. ``skip_unknown``: images
    of data classes that the model (mapped) has none for are left out, and counted, not refused.
    ``classes`` ('basophil,eosinophil,...'): the model chooses among those of its classes only.
    """
    prepare_output_folder(out, force=force, keep_splits=False, command="evaluate")
    from .adapt import PURPOSE as ADAPT_PURPOSE

    predictor = load_model(model, backend="torch" if adapt else backend, device=device, precision=precision,
                           purpose=ADAPT_PURPOSE if adapt else None)
    names = parse_classes(classes, predictor.class_names) if classes else predictor.class_names
    found = detect_layout(data)
    for warning in folder_warnings(found):
        note(f"warning: {warning}")
    dataset, merged = merge_data_classes(found, names, class_map)
    mapping = class_mapping({s.label for s in dataset.samples}, names, class_map, skip_unknown)
    skipped = ""
    if skip_unknown:
        dataset, skipped = known_classes_only(dataset, set(mapping.values()) if mapping else set(names))
    splits, kind = assign_splits(dataset, model, predictor, split_file)
    if adapt:  # transductive: the test images' own statistics, never their labels
        from .adapt import adapt_to_files

        test = [dataset.abspath(s) for s, k in zip(dataset.samples, splits) if k == "test"]
        predictor = adapt_to_files(predictor, test, adapt_steps, note)
    info = {"model": predictor.source, "arch": predictor.checkpoint["arch"], "data": str(data), "layout": dataset.layout,
            "split_kind": kind, "config": predictor.checkpoint.get("config", {}),
            "tta": predictor.default_tta if tta is None else tta_mode(tta), "parent": describe(predictor.checkpoint.get("parent"))}
    if adapt:
        from .adapt import adapt_note

        done = adapt_note(predictor.checkpoint["adapted_on_images"], predictor.checkpoint["adapted_steps"])
        info["adapt_note"] = (f"Adapted to the test images before scoring (--adapt, no labels used): {done}; the "
                              "out-of-distribution alarm is off for an adapted model.")
    notes = [merged]
    if classes:
        predictor, tta = restrict_classes(predictor, names, tta), None
        notes.append(f"The model chose among {', '.join(names)} only (--classes).")
    if mapping:
        predictor, tta = map_classes(predictor, mapping, tta), None
        pairs = "; ".join(f"{', '.join(c for c in mapping if mapping[c] == t)} -> {t}" for t in predictor.class_names)
        notes.append(f"The model's classes were mapped onto the data's ({pairs}): each metric scores the mapped "
                     "labels, with the probabilities of merged classes summed.")
        note(f"class map: {pairs}")
    if any([*notes, skipped]):
        info["class_map_note"] = " ".join(filter(None, [*notes, skipped]))
    return evaluate(predictor, dataset, splits, out, info=info, tta=tta, target_sensitivity=target_sensitivity, workers=workers)


def class_mapping(labels: set[str], class_names: list[str], class_map: str | None, skip_unknown: bool) -> dict[str, str] | None:
    """{model class: data class} from ``class_map``, or from matching the data's class names (``skip_unknown``:
    those that match none are left out); None where the names need no mapping. Data classes that stay
    unknown are refused here, before any image is read, unless ``skip_unknown``."""
    matched = None if class_map else match_class_names(labels, class_names, partial=skip_unknown)
    if matched:
        note("class names matched by name: " + ", ".join(f"{d} = {m}" for m, d in matched.items())
             + " (--class-map MODEL_CLASS=DATA_CLASS to pair them otherwise)")
    mapping = parse_class_map(class_map, class_names) if class_map else ({**{c: c for c in class_names}, **matched} if matched else None)
    unknown = sorted(labels - set(mapping.values() if mapping else class_names))
    if unknown and not skip_unknown:
        matchable = {} if class_map else (match_class_names(labels, class_names, partial=True) or {})
        hint = f" ({', '.join(f'{d} = {m}' for m, d in sorted(matchable.items()))} would match by name)" if matchable else ""
        raise LeukoscopeError(f"data has classes {[c for c in unknown if c not in matchable.values()]} that the model does not "
                              f"know{hint}; model classes: {class_names}; leave their images out with --skip-unknown, or map them "
                              f"with {CLASS_MAP_HINT}")
    return mapping


def merge_data_classes(dataset: Dataset, class_names: list[str], class_map: str | None) -> tuple[Dataset, str]:
    """``dataset`` with the data classes that stand for one model class merged into one label, and a
    sentence saying so ("" if none): those ``class_map`` gives one model class together
    ('neutrophil=band,neutrophil=seg'), or without a class map the known subtypes of a model class
    (classes.SUBTYPES: Munich AML's "NGB" and "NGS" become the model's "neutrophil")."""
    labels = {s.label for s in dataset.samples}
    merges = class_map_merges(class_map, class_names) if class_map else subtype_merges(labels, class_names)
    merges = {d: m for d, m in merges.items() if d in labels}
    if not merges:
        return dataset, ""
    samples = [dataclasses.replace(s, label=merges.get(s.label, s.label)) for s in dataset.samples]
    groups = {m: sorted(d for d in merges if merges[d] == m) for m in merges.values()}
    text = "; ".join(f"{', '.join(members)} -> {label}" for label, members in groups.items())
    note(f"data classes merged, as one class of the model: {text}" + ("" if class_map else " (--class-map to pair them otherwise)"))
    return _with_samples(dataset, samples), f"Data classes were merged as one class of the model ({text})."


def known_classes_only(dataset: Dataset, known: set[str]) -> tuple[Dataset, str]:
    """``dataset`` without the images of classes not in ``known`` (``--skip-unknown``), and a sentence
    saying how many were left out of which classes ("" if none)."""
    left_out = Counter(s.label for s in dataset.samples if s.label not in known)
    if not left_out:
        return dataset, ""
    samples = [s for s in dataset.samples if s.label in known]
    if not samples:
        raise LeukoscopeError(f"--skip-unknown: no image of {dataset.root} is of a class the model knows ({', '.join(sorted(known))}); "
                              "pair the data's classes with --class-map MODEL_CLASS=DATA_CLASS,...")
    text = ", ".join(f"{label} ({n})" for label, n in sorted(left_out.items()))
    note(f"--skip-unknown: left out {plural(sum(left_out.values()), 'image')} of classes the model does not know: {text}")
    return _with_samples(dataset, samples), f"Left out, of classes the model does not know: {text}."


def _with_samples(dataset: Dataset, samples: list) -> Dataset:
    return dataclasses.replace(dataset, samples=samples, classes=sorted({s.label for s in samples}))
