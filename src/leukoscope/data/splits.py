"""Seeded, class-stratified train/val/test splits that never separate a patient or identical bytes.

Images are grouped with a union-find over (a) the patient id when splitting by patient and
(b) the file's sha256, so byte-identical copies always land in the same split. Groups are then
dealt to splits class by class, each going to the split furthest below its target share.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ..errors import LeukoscopeError
from ..images import MAX_PIXELS, ImageReadError, load_rgb, reduction_factor
from ..io import atomic_write, csv_delimiter, printable, regular_file_stat, sha256_file
from .layouts import Dataset, Sample

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ["path", "label", "patient", "split"]


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def duplicate_groups(paths: list[Path]) -> list[list[int]]:
    """Indices of byte-identical files (only same-size files are hashed)."""
    by_size: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for i, path in enumerate(paths):
        try:
            status = regular_file_stat(path)
            by_size[status.st_size].append((i, status.st_mtime_ns))
        except OSError:  # broken link, vanished file, FIFO or device: reported elsewhere as unreadable
            continue
    groups = []
    for size, same_size in by_size.items():
        if len(same_size) < 2:
            continue
        by_hash: dict[str, list[int]] = defaultdict(list)
        for i, mtime_ns in same_size:
            try:
                by_hash[_content_hash(str(paths[i]), size, mtime_ns)].append(i)
            except OSError:
                continue
        groups.extend(g for g in by_hash.values() if len(g) > 1)
    return groups


@functools.cache
def _content_hash(path: str, size: int, mtime_ns: int) -> str:
    """One file's sha256, kept for the process: a split, its leak check and check-data hash the same files."""
    return sha256_file(path)


NEAR_DUPLICATE_BITS = 10  # 256-bit perceptual hashes at most this many bits apart are the same picture
# Measured: the near-duplicate fields of aria_all differ by 2 bits; distinct real cells by 30 or more
# (ALL-IDB2) and 74 or more (C-NMC); distinct synthetic test cells by 12 or more.


def perceptual_hashes(paths: list[Path]) -> np.ndarray:
    """(N, 32) bytes: the 256-bit DCT pHash (imagehash) of each image; all ones for an unreadable file."""
    out = np.full((len(paths), 32), 255, dtype=np.uint8)
    for k, path in enumerate(paths):
        try:
            status = regular_file_stat(path)
        except OSError:
            continue
        digest = _perceptual_hash(str(path), status.st_size, status.st_mtime_ns)
        if digest is not None:
            out[k] = np.frombuffer(digest, dtype=np.uint8)
    return out


@functools.lru_cache(maxsize=None)
def _perceptual_hash(path: str, size: int, mtime_ns: int) -> bytes | None:
    """One file's pHash, kept for the process: a split, its folds and the checks ask for the same files."""
    import imagehash
    from PIL import Image

    try:
        with Image.open(path) as im:
            if reduction_factor(im.width, im.height, MAX_PIXELS, im.format == "JPEG") is None:
                return None  # refused when images are decoded
            im.draft("RGB", (64, 64))  # pHash looks at 64x64: decode small
            return np.packbits(imagehash.phash(im, hash_size=16).hash.ravel()).tobytes()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        pass
    try:  # what PIL cannot open but load_rgb reads (a float TIFF)
        return np.packbits(imagehash.phash(Image.fromarray(load_rgb(path)), hash_size=16).hash.ravel()).tobytes()
    except ImageReadError:
        return None  # unreadable files are dropped (with a warning) when images are decoded


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


def near_duplicate_pairs(paths: list[Path], max_bits: int = NEAR_DUPLICATE_BITS) -> list[tuple[int, int]]:
    """Index pairs (i < j) of images whose perceptual hashes differ in at most ``max_bits`` of 256 bits:
    the same picture re-encoded, resized or slightly recoloured, which byte hashes miss."""
    if len(paths) < 2:
        return []
    hashes = perceptual_hashes(paths)
    readable = ~(hashes == 255).all(axis=1)
    pairs = []
    for start in range(0, len(hashes), 256):
        block = hashes[start : start + 256]
        distance = _POPCOUNT[block[:, None, :] ^ hashes[None, :, :]].sum(-1)
        for a, b in zip(*np.nonzero(distance <= max_bits)):
            i = start + int(a)
            if i < b and readable[i] and readable[b]:
                pairs.append((i, int(b)))
    return pairs


def make_splits(
    dataset: Dataset,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    by: str = "patient",
) -> tuple[list[str], str]:
    """Assign each sample of ``dataset`` to train/val/test; returns (splits, split kind).

    ``by='patient'`` groups by patient when every sample has a patient id, else falls back to
    image-level splitting and says so in the returned kind.
    """
    if by not in ("patient", "image"):
        raise LeukoscopeError(f"--split-by must be 'patient' or 'image', got {by!r}")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise LeukoscopeError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    groups, use_patients = split_groups(dataset, by)
    assignment = _deal_groups(groups, dataset.samples, fractions, np.random.default_rng(seed))
    kind = "patient" if use_patients else ("image" if by == "image" else "image (no patient ids known)")
    return assignment, kind


FROM_FOLDERS = ", from the dataset's own folders"  # the end of the split kind of split_from_folders
SPLIT_FOLDER_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                      "test": "test", "testing": "test"}


def folder_split_names(dataset: Dataset) -> list[str | None] | None:
    """Each sample's split as the dataset's own folders give it (``train/``, ``val/`` or ``valid/``, ``test/``, in any
    case, anywhere above the image; None for an image in none of them), or None when the dataset is not one shared
    already split (Kaggle's usual layout): no ``train/``, or no other split folder beside it."""
    named = [_split_folder(sample) for sample in dataset.samples]
    return named if "train" in named and len(set(named) - {None}) > 1 else None


def _split_folder(sample: Sample) -> str | None:
    found = [SPLIT_FOLDER_NAMES[part.lower()] for part in sample.path.split("/")[:-1] if part.lower() in SPLIT_FOLDER_NAMES]
    return found[0] if len(found) == 1 else None


def split_from_folders(dataset: Dataset, named: list[str | None], fractions: tuple[float, float, float], seed: int = 0,
                       by: str = "patient") -> tuple[list[str] | None, str]:
    """The folders' split (``folder_split_names``) checked for leaks: (splits, kind), or (None, why not) when a patient,
    byte-identical or near-identical images sit in two of the folders, which an honest split never allows. Without
    a ``val/`` folder, validation images are dealt from ``train/``'s groups in the ratio of ``fractions``' first two."""
    groups, use_patients = split_groups(dataset, by)
    for group in groups:
        if len(where := [k for k in SPLITS if k in {named[i] for i in group}]) > 1:
            one_patient = use_patients and len({dataset.samples[i].patient for i in group}) == 1
            shared = "a patient" if one_patient else "identical or near-identical images"
            example = ", ".join(dataset.samples[i].path for i in group[:2])
            return None, f"the dataset's {' and '.join(where)} folders share {shared} (e.g. {example})"
    splits = list(named)
    if "val" not in named and fractions[1] > 0:
        pool = [g for g in groups if named[g[0]] == "train"]
        share = fractions[1] / (fractions[0] + fractions[1])
        dealt = _deal_groups(pool, dataset.samples, (1 - share, share, 0.0), np.random.default_rng(seed))
        for group in pool:
            for i in group:
                splits[i] = dealt[i]
    kind = "patient" if use_patients else ("image" if by == "image" else "image (no patient ids known)")
    return splits, kind + FROM_FOLDERS


Said = list[tuple[str, str]]  # ("note" or "warning", text): what to tell the user of a split


def choose_split(dataset: Dataset, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0,
                 by: str = "patient", folders: bool = True) -> tuple[list[str], str, Said]:
    """The split a new run makes: the dataset's own folders' (``folders``, when they hold every image and are an honest
    split), else ``make_splits``'. Returns (splits, kind, what to tell the user of the folders)."""
    named = folder_split_names(dataset) if folders else None
    if named is None:
        return (*make_splits(dataset, fractions, seed, by), [])
    if None in named:  # Kaggle's blood-cell set keeps TEST_SIMPLE/ beside TRAIN/ and TEST/
        outside = next(s.path for s, k in zip(dataset.samples, named) if k is None)
        return (*make_splits(dataset, fractions, seed, by), [("note", (
            f"the dataset has train/ and test/ (or val/) folders, but also images in none of them (e.g. {outside}): train "
            "pools them all and splits anew; to keep the folders' split, move those images into one of them or out of the "
            "dataset"))])
    splits, kind_or_why = split_from_folders(dataset, named, fractions, seed, by)
    if splits is None:
        return (*make_splits(dataset, fractions, seed, by), [("warning", (
            f"{kind_or_why}: that split would not be honest, so train pools the images and splits them anew (fix the "
            "folders to keep yours)"))])
    counts = ", ".join(f"{k} {splits.count(k)}" for k in SPLITS if k in splits)
    dealt = "" if "val" in named or "val" not in splits else " (validation dealt from train/)"
    said = f"split as the dataset's own folders give it: {counts} images{dealt}; train --no-split-folders pools them and splits anew"
    return splits, kind_or_why, [("note", said)]


def split_groups(dataset: Dataset, by: str = "patient") -> tuple[list[list[int]], bool]:
    """Indices that must stay together in any split: one patient's images (when splitting by patient
    and ids are known), byte-identical files and near-identical pictures (``near_duplicate_pairs``).
    Returns (groups, grouped by patient)."""
    samples = dataset.samples
    uf = _UnionFind(len(samples))
    use_patients = by == "patient" and dataset.has_patients
    if use_patients:
        first: dict[str, int] = {}
        for i, s in enumerate(samples):
            uf.union(i, first.setdefault(s.patient, i))
    paths = [dataset.abspath(s) for s in samples]
    for group in duplicate_groups(paths):
        for i in group[1:]:
            uf.union(i, group[0])
    for i, j in near_duplicate_pairs(paths):
        uf.union(i, j)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(len(samples)):
        members[uf.find(i)].append(i)
    return list(members.values()), use_patients


def make_folds(dataset: Dataset, pool: list[int], k: int, seed: int = 0, by: str = "patient") -> list[int]:
    """The fold (0..k-1) of each index in ``pool``: stratified by class and grouped as the split is
    (a patient or identical bytes never in two folds), with scikit-learn's StratifiedGroupKFold."""
    from sklearn.model_selection import StratifiedGroupKFold

    group_of = {}
    for g, members in enumerate(split_groups(dataset, by)[0]):
        for i in members:
            group_of[i] = g
    labels = [dataset.samples[i].label for i in pool]
    smallest = min(Counter(labels).values())
    groups = len({group_of[i] for i in pool})
    if smallest < k or groups < k:
        most = min(smallest, groups)
        raise LeukoscopeError(f"--cv {k}: train+val holds {groups} groups (patients or images) and its smallest class {smallest} "
                              f"images; use at most {most} folds")
    folds = [0] * len(pool)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, held) in enumerate(splitter.split(pool, labels, [group_of[i] for i in pool])):
        for j in held:
            folds[j] = fold
    return folds


def _deal_groups(groups, samples: list[Sample], fractions, rng) -> list[str]:
    by_class: dict[str, list[list[int]]] = defaultdict(list)
    for group in groups:
        label = Counter(samples[i].label for i in group).most_common(1)[0][0]
        by_class[label].append(group)
    out = [""] * len(samples)
    active = [k for k in range(3) if fractions[k] > 0]
    for label in sorted(by_class):
        class_groups = [by_class[label][i] for i in rng.permutation(len(by_class[label]))]
        total = sum(len(g) for g in class_groups)
        counts = np.zeros(3)
        # Smallest groups first seed the smaller splits, so each split sees every class if it can.
        seeding = sorted(range(len(class_groups)), key=lambda i: len(class_groups[i]))
        seed_order = sorted(active, key=lambda k: fractions[k])
        chosen = {}
        if len(class_groups) >= len(active):
            chosen = {gi: k for gi, k in zip(seeding, seed_order)}
        for gi, group in enumerate(class_groups):
            if gi in chosen:
                k = chosen[gi]
            else:
                deficit = [(fractions[k] * total - counts[k]) / fractions[k] for k in active]
                k = active[int(np.argmax(deficit))]
            counts[k] += len(group)
            for i in group:
                out[i] = SPLITS[k]
    return out


def write_splits(path: str | os.PathLike, samples: list[Sample], splits: list[str]) -> None:
    with atomic_write(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:  # names kept byte for byte: read back
        writer = csv.writer(handle)
        writer.writerow(SPLIT_COLUMNS)
        for s, split in zip(samples, splits, strict=True):
            writer.writerow([s.path, s.label, s.patient, split])


def read_splits(path: str | os.PathLike) -> tuple[list[Sample], list[str]]:
    path = Path(path)
    if path.is_dir() and (path / "splits.csv").is_file():
        raise LeukoscopeError(f"split file {str(path)!r} is a folder: give the split file in it, {str(path / 'splits.csv')!r}")
    if not path.is_file():
        raise LeukoscopeError(f"split file {str(path)!r} not found")
    expected = ",".join(SPLIT_COLUMNS)
    data = path.read_bytes()
    if b"\x00" in data[:4096]:
        raise LeukoscopeError(f"{path} is not a split file (binary data, not CSV text): give the splits.csv of a run, "
                              f"or a CSV with the columns {expected}")
    text = data.decode("utf-8-sig", errors="surrogateescape")  # -sig: a byte-order mark, as Excel writes one
    with io.StringIO(text, newline="") as handle:
        reader = csv.DictReader(handle, delimiter=csv_delimiter(text))
        if reader.fieldnames != SPLIT_COLUMNS:
            found = printable(",".join(reader.fieldnames or []))
            raise LeukoscopeError(f"{path}: expected columns {expected}, found {found[:80] + ('...' if len(found) > 80 else '')!r}")
        rows = list(reader)
    bad = sorted({r["split"] for r in rows} - set(SPLITS))
    if bad:
        raise LeukoscopeError(f"{path}: unknown split names {bad}; expected {list(SPLITS)}")
    return [Sample(r["path"], r["label"], r["patient"]) for r in rows], [r["split"] for r in rows]


def run_splits(run_dir: str | os.PathLike, samples: list[Sample]) -> tuple[list[str], str] | None:
    """The splits a run folder recorded for ``samples`` and their kind (from run.json).

    None when the run has no splits.csv or it does not list every one of ``samples``.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "splits.csv").is_file():
        return None
    recorded, splits = read_splits(run_dir / "splits.csv")
    lookup = {s.path: k for s, k in zip(recorded, splits)}
    if not all(s.path in lookup for s in samples):
        return None
    run_json = run_dir / "run.json"
    kind = json.loads(run_json.read_text()).get("split_kind", "") if run_json.is_file() else ""
    return [lookup[s.path] for s in samples], kind or "from splits.csv"


def label_conflicts(dataset: Dataset) -> list[list[str]]:
    """Paths of byte-identical files that carry different labels, one list per group: the same cell
    filed under two classes, which a split keeps together but training learns both ways."""
    groups = duplicate_groups([dataset.abspath(s) for s in dataset.samples])
    return [[dataset.samples[i].path for i in g] for g in groups if len({dataset.samples[i].label for i in g}) > 1]


def check_split_leaks(dataset: Dataset, splits: list[str], by_patient: bool = True, kind: str = "") -> None:
    """Refuse a split where a patient or byte-identical images sit in two splits, or test lacks a class (``kind``: the
    split's, to name the fix)."""
    if by_patient and dataset.has_patients:
        seen: dict[str, str] = {}
        for s, k in zip(dataset.samples, splits):
            other = seen.setdefault(s.patient, k)
            if other != k:
                raise LeukoscopeError(f"patient {s.patient!r} appears in both {other} and {k} (e.g. {s.path}); "
                                      "a patient's cells must stay in one split: delete splits.csv to re-split")
    for group in duplicate_groups([dataset.abspath(s) for s in dataset.samples]):
        where = {splits[i] for i in group}
        if len(where) > 1:
            names = ", ".join(dataset.samples[i].path for i in group[:3])
            raise LeukoscopeError(f"byte-identical images are in different splits ({', '.join(sorted(where))}): {names}; "
                                  "delete splits.csv to re-split, or remove the copies (see `leukoscope check-data`)")
    if "test" in splits:
        in_test = {s.label for s, k in zip(dataset.samples, splits) if k == "test"}
        missing = [c for c in dataset.classes if c not in in_test]
        if missing:
            fix = ("to the dataset's test/ folder, or give train --no-split-folders" if kind.endswith(FROM_FOLDERS)
                   else "or change --fractions")
            raise LeukoscopeError(f"classes {missing} have no test images, so they could not be evaluated; add images "
                                  f"of those classes (patients) {fix}")


FINGERPRINT_CHARS = 16  # a 64-bit prefix of the sha256: collisions are negligible for any cell archive


def fingerprint(path: str | os.PathLike) -> str | None:
    """The content hash an image is recognised by (None for an unreadable file)."""
    try:
        return sha256_file(path)[:FINGERPRINT_CHARS]
    except OSError:
        return None


def seen_images(dataset: Dataset, splits: list[str]) -> dict[str, list[str]]:
    """Content hashes of the training and validation images, for the checkpoint to carry.

    With them a model recognises its own images in any folder, renamed or not, so an evaluation
    never counts them as test images.
    """
    out: dict[str, set[str]] = {"train": set(), "val": set()}
    for sample, split in zip(dataset.samples, splits):
        if split in out and (digest := fingerprint(dataset.abspath(sample))) is not None:
            out[split].add(digest)
    return {k: sorted(v) for k, v in out.items()}


def refuse_seen(seen: dict[str, list[str]] | None, dataset: Dataset, splits: list[str], role: str) -> None:
    """Refuse a model (``role``: the --init parent, the teacher) that trained on this run's validation
    or test images (by content; see ``seen_images``): what it learnt of them would pass to the new
    model and flatter the validation numbers that choose a recipe and the test score. (Its own
    validation images may be this run's: continuing on the same split is allowed.)"""
    known = set((seen or {}).get("train", ()))
    if not known:
        return
    hits = [s for s, k in zip(dataset.samples, splits) if k in ("val", "test") and fingerprint(dataset.abspath(s)) in known]
    if hits:
        raise LeukoscopeError(f"{role} trained on {len(hits)} of this run's validation and test images (e.g. {hits[0].path}), so "
                              "their scores would be flattered; use the split it was trained with (copy its splits.csv into --out) "
                              "or another model")


def unseen_samples(dataset: Dataset, seen: dict[str, list[str]] | None) -> list[Sample]:
    """The samples of ``dataset`` a model neither trained nor validated on (by content; see ``seen_images``)."""
    splits, _, _ = splits_from_seen(dataset, seen or {})
    return [s for s, k in zip(dataset.samples, splits) if k == "test"]


def splits_from_seen(dataset: Dataset, seen: dict[str, list[str]]) -> tuple[list[str], int, int]:
    """Each image's split by the model's record: 'train' or 'val' if it saw the image, else 'test'.

    Returns (splits, images recognised from training, from validation).
    """
    train, val = set(seen.get("train", ())), set(seen.get("val", ()))
    splits = []
    for sample in dataset.samples:
        digest = fingerprint(dataset.abspath(sample))
        splits.append("train" if digest in train else "val" if digest in val else "test")
    return splits, splits.count("train"), splits.count("val")
