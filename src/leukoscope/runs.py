"""What every training run shares, whatever its method: the output folder, seeds, the split, the
decoded images and the temperature.

Output folders are never overwritten silently: one that already holds results is refused unless
the user says ``--force``; then only a folder that leukoscope itself wrote is cleared (a typo such
as ``--out ~`` must never delete a home directory). A folder holding nothing but a ``splits.csv``
is a split given to reuse.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .calibration import MIN_IMAGES, fit_temperature, temperature_warning
from .config import TrainConfig, save_config
from .data import SPLITS, Dataset, detect_layout, read_splits, run_splits, write_splits
from .data.dataset import decode_many
from .data.layouts import folder_warnings, look_alike_warning
from .data.splits import check_split_leaks, choose_split, label_conflicts, split_groups
from .errors import LeukoscopeError
from .io import refuse_file_as_folder, refuse_stream_folder
from .images import ImageReadError, View, load_rgb
from .progress import note, plural
from .refit import merged_classes

if TYPE_CHECKING:
    from .inference import Predictor

SPLITS_FILE = "splits.csv"
MAX_PROBED = 200  # files of a class without training images read to tell why (a class that large is not all unreadable)
# Files that only leukoscope writes at the top of a run, evaluation, count, explain or segment folder:
# their presence marks a folder as ours, safe to clear with --force.
MARKERS = ("run.json", "model.pt", "last.pt", "model.joblib", "metrics.json", "report.html", "cells.csv", "explanations.csv",
           "segmentation.csv")
MODELS = ("model.pt", "last.pt", "model.joblib")


def _entries(folder: Path, names: list[str]) -> str:
    """'3 files (e.g. a.png)', '2 folders (e.g. blast/)' or '4 files and folders (e.g. ...)': what ``names`` in ``folder`` are."""
    folders = [(folder / name).is_dir() for name in names]
    noun = "folder" if all(folders) else "file" if not any(folders) else "file and folder"
    return f"{plural(len(names), noun, noun.replace('file and', 'files and') + 's')} (e.g. {names[0]}{'/' if folders[0] else ''})"


def prepare_output_folder(out: str | os.PathLike, force: bool = False, keep_splits: bool = True, command: str = "train",
                          what: str | None = None) -> None:
    """Refuse a non-empty ``out`` (nothing touched); with ``force`` clear it first. ``what``: the outputs, as an
    error names them (default: the command's outputs).

    With ``keep_splits`` a ``splits.csv`` already there stays (train reuses it, so a forced
    re-train is evaluated on the same split); delete it to split again.
    """
    refuse_stream_folder(out, command)
    refuse_file_as_folder(out, what or f"{command} outputs")
    out = Path(out)
    kept = {SPLITS_FILE} if keep_splits else set()
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    others = [name for name in present if name not in kept]
    if not others:
        return
    if not force:
        resume = " or `leukoscope train --resume RUN` to continue it" if command == "train" and (out / "last.pt").is_file() else ""
        raise LeukoscopeError(f"--out {str(out)!r} already holds {_entries(out, others)}; "
                              f"choose a new folder, or add --force to replace them{resume}")
    if command != "train" and any((out / name).is_file() for name in MODELS):
        raise LeukoscopeError(f"--out {str(out)!r} is a training run (it holds a model); write the {command} outputs to another folder")
    if not any((out / marker).is_file() for marker in MARKERS):
        raise LeukoscopeError(f"--out {str(out)!r} holds {_entries(out, others)} that leukoscope did not write; "
                              "--force only clears a folder of leukoscope results: choose a new folder")
    for name in others:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    kept_note = f"; kept {SPLITS_FILE} (same split: delete it to split again)" if SPLITS_FILE in present and keep_splits else ""
    note(f"--force: cleared {plural(len(others), 'file')} of the earlier results in {out}{kept_note}")


def undo_refused_run(out: str | os.PathLike, before: set[str] | None) -> None:
    """Remove what a training refused during its set-up wrote into ``out`` (config.yaml, run.json, a new
    splits.csv, a cross-validation's cv folder without a model; the folder, if it made it), so that the
    corrected command needs no --force. ``before``: the names ``out`` held when the run started (None: no
    folder). A run with a saved epoch or model is left whole, for --resume."""
    out = Path(out)
    if not out.is_dir() or any((out / name).exists() for name in MODELS):
        return
    for name in ("config.yaml", "run.json", SPLITS_FILE):
        if before is None or name not in before:
            (out / name).unlink(missing_ok=True)
    folds = out / "cv"
    if (before is None or "cv" not in before) and folds.is_dir() and not folds.is_symlink() \
            and not any(p.name in MODELS for p in folds.rglob("*")):
        shutil.rmtree(folds)
    if before is None and not any(out.iterdir()):
        out.rmdir()


def seed_everything(seed: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Generator]:
    """Seed the global RNGs; returns the batch-order and augmentation generators.

    Under torchrun the order generator is the same on every rank and the augmentation one
    differs per rank (ranks must not augment alike). A single process uses one stream for
    both, the way the bundled models were trained.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    if world_size == 1:
        return {"order": order, "augment": order}
    return {"order": order, "augment": torch.Generator().manual_seed(seed + 1000 * rank)}


def prepare_splits(dataset: Dataset, out: Path, config: TrainConfig) -> tuple[list[str], str, bool]:
    """Reuse ``out/splits.csv`` when present (same images required), else make a new split.

    The flag says the split is new: the caller records it once it has passed the checks.
    """
    path = out / SPLITS_FILE
    if path.is_file():
        listed = [r.path for r in read_splits(path)[0]]
        found = [s.path for s in dataset.samples]
        if sorted(listed) != sorted(found):
            added, gone = sorted(set(found) - set(listed)), sorted(set(listed) - set(found))
            example = (f"{added[0]!r} is not in it" if added else f"it lists {gone[0]!r}, which is not there" if gone
                       else "it lists an image twice")
            raise LeukoscopeError(f"{path} lists other images than {dataset.root} ({plural(len(listed), 'image')} listed, "
                                  f"{len(found)} found; {example}): delete it to split again, or use a new --out folder")
        return (*run_splits(out, dataset.samples), False)
    splits, kind, said = choose_split(dataset, config.fractions, config.split_seed_value, config.split_by, config.split_folders)
    for level, text in said:
        note(f"{level}: {text}")
    if config.split_by == "patient" and not dataset.has_patients:  # said, not only recorded: a patient can span the splits
        note(f"note: split by image: {dataset.root} gives no patient ids, so one patient's cells may fall in train and test "
             "alike; give a patient column in manifest.csv to split by patient")
    return splits, kind, True


def check_classes(dataset: Dataset, splits: list[str]) -> None:
    if len(dataset.classes) < 2:
        raise LeukoscopeError(f"{dataset.root}: need at least 2 classes to train, found {dataset.classes}")
    train_classes = {s.label for s, k in zip(dataset.samples, splits) if k == "train"}
    test_classes = {s.label for s, k in zip(dataset.samples, splits) if k == "test"}
    missing = [c for c in dataset.classes if c not in train_classes]
    for label in [c for c in dataset.classes if c not in train_classes or (test_classes and c not in test_classes)]:
        if why := _unusable_class(dataset, label):
            raise LeukoscopeError(f"class {label!r} cannot be trained: {why} (`leukoscope check-data {dataset.root}` lists them)")
    if missing:
        raise LeukoscopeError(f"classes {missing} have no training images after splitting; add data or change --fractions")


def _unusable_class(dataset: Dataset, label: str) -> str | None:
    """Why a class that the split left without training or test images has none to give: every file unreadable (a
    failed copy or sync leaves empty files), or every file one picture, which a split keeps together; None otherwise."""
    paths = [dataset.abspath(s) for s in dataset.samples if s.label == label]
    errors = []
    for path in paths[:MAX_PROBED]:
        try:
            load_rgb(path, size=32)
        except ImageReadError as err:
            errors.append(f"{path.name}: {err}")
    if len(paths) <= MAX_PROBED and len(errors) == len(paths):
        if len(paths) == 1:
            return f"its only file is unreadable ({errors[0]})"
        return f"all {len(paths)} of its files are unreadable (e.g. {errors[0]})"
    alone = replace(dataset, samples=[s for s in dataset.samples if s.label == label], classes=[label])
    if len(paths) > 1 and len(split_groups(alone)[0]) == 1:
        return f"its {len(paths)} images are copies of one picture (identical or near-identical), which a split keeps together"
    return None


def prepare_run(data, out: Path, config: TrainConfig, command: str, write: bool = True,
                given: tuple[Dataset, list[str], str] | None = None) -> tuple[Dataset, list[str], str]:
    """Detect the layout, make or reuse the split, refuse leaks, and record config.yaml and run.json.

    ``given`` (dataset, splits, kind) is a split made by the caller (a cross-validation fold): it is
    checked and recorded in ``out/splits.csv`` like any other.
    """
    if given is not None:
        dataset, splits, split_kind = given
        new = True
    else:
        dataset = detect_layout(data)
        splits, split_kind, new = prepare_splits(dataset, out, config)
    check_classes(dataset, splits)
    merged_classes(dataset.classes, config.merge_classes)  # a class name it does not know, refused before anything is written
    check_split_leaks(dataset, splits, by_patient=config.split_by == "patient", kind=split_kind)
    if new and write:  # a refused split is not recorded, so that the same command works once the data is fixed
        write_splits(out / SPLITS_FILE, dataset.samples, splits)
    if given is None and write:  # once per run, not per cross-validation fold or process
        warn_label_problems(dataset)
    fractions = ",".join(f"{f:g}" for f in config.fractions)
    if "val" not in splits:
        note(f"warning: no validation images ({plural(len(splits), 'image')}, {splits.count('test')} for testing): the epoch is chosen "
             f"on training accuracy and the in-domain threshold set on the training images; add images or raise the validation fraction "
             f"(--fractions, now {fractions})")
    if "test" not in splits and given is None:
        note(f"note: no test images (--fractions {fractions}): the run reports training and validation numbers only; score it on "
             "images it never saw with `leukoscope evaluate`")
    if write:
        save_config(config, out / "config.yaml")
        (out / "run.json").write_text(json.dumps({"data": str(data), "command": command, "split_kind": split_kind, "status": "training"}, indent=2))
    return dataset, splits, split_kind


def warn_label_problems(dataset: Dataset) -> None:
    """Warn of labels that are likely mistakes (one class spelt two ways, one image filed under two classes, a batch
    folder inside a class folder taken for the class) and of images still packed in archives."""
    if look_alike := look_alike_warning(dataset.classes):
        note(f"warning: {look_alike}")
    for warning in folder_warnings(dataset):
        note(f"warning: {warning}")
    if conflicts := label_conflicts(dataset):
        labels = {s.path: s.label for s in dataset.samples}
        example = ", ".join(f"{path} ({labels[path]})" for path in conflicts[0][:3])
        note(f"warning: {plural(len(conflicts), 'image')} filed under two or more classes as byte-identical copies (e.g. {example}): "
             "training learns each copy's label; keep one copy under the right class (`leukoscope check-data` lists them)")


def warn_unreadable(paths: list, errors: list[str | None], limit: int = 10) -> None:
    """A warning per unreadable image (the first ``limit``, then how many more): they are left out, not scored."""
    bad = [(path, error) for path, error in zip(paths, errors) if error is not None]
    for path, error in bad[:limit]:
        note(f"warning: skipping {path}: {error}")
    if len(bad) > limit:
        note(f"warning: skipping {plural(len(bad) - limit, 'more unreadable image')} (`leukoscope check-data DATA` lists them all)")


def load_split_images(dataset: Dataset, splits: list[str], view: View, recoloured: list[bool] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray], Dataset, list[str]]:
    """Decode every split; unreadable images are dropped from the dataset with a warning. ``recoloured``,
    if given, gets whether each sample was recoloured to look like a slide (see ``decode_many``)."""
    index = {c: i for i, c in enumerate(dataset.classes)}
    paths = [dataset.abspath(s) for s in dataset.samples]
    images, errors = decode_many(paths, view, desc="decode images", recoloured=recoloured)
    bad = [i for i, e in enumerate(errors) if e is not None]
    warn_unreadable(paths, errors)
    keep = [i for i, e in enumerate(errors) if e is None]
    if not any(splits[i] == "train" for i in keep):
        first = f" (first: {paths[bad[0]]}: {errors[bad[0]]})" if bad else ""
        raise LeukoscopeError(f"no readable training images: {plural(len(bad), 'image')} of {len(paths)} could not be decoded{first}")
    kept = Dataset(dataset.root, dataset.layout, [dataset.samples[i] for i in keep], dataset.classes, dataset.notes)
    kept_splits = [splits[i] for i in keep]
    images = images[keep]
    tensors, labels = {}, {}
    for split in SPLITS:
        mask = [i for i, k in enumerate(kept_splits) if k == split]
        tensors[split] = images[mask]
        labels[split] = np.array([index[kept.samples[i].label] for i in mask], dtype=int)
    return tensors, labels, kept, kept_splits


def calibrate(predictor: Predictor, images: torch.Tensor, labels: np.ndarray, batch_size: int = 256) -> float:
    """Temperature fitted on the validation split (1.0 when it has too few images), with a warning when uncertain."""
    if len(images) == 0:
        return 1.0
    logits = torch.cat([predictor.logits(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    temperature = fit_temperature(logits, torch.from_numpy(labels))
    separated = temperature == 1.0 and len(images) >= MIN_IMAGES and bool((logits.argmax(1).numpy() == labels).all())
    if (warning := temperature_warning(len(images), temperature, separated)) is not None:
        note(f"warning: {warning}")
    return temperature
