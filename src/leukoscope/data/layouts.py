"""Recognise dataset layouts on disk and list their labelled images.

Two layouts are detected automatically:
- an image folder: ``DATA/.../<class>/<image>``, the class being the image's parent folder,
  with an optional ``DATA/manifest.csv`` that may give labels and patient ids;
- C-NMC 2019 as distributed on Kaggle (``C-NMC_Leukemia/training_data/fold_k/{all,hem}``,
  ``validation_data/C-NMC_test_prelim_phase_data`` + labels CSV, ``testing_data/...``) or by TCIA
  (``C-NMC_training_data/fold_k/...``). Patient ids come from the ``UID_<P>_...`` file names.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LeukoscopeError
from ..images import archive_kind, several_pages
from ..io import (
    ARCHIVE_EXTENSIONS,
    csv_delimiter,
    is_image_file,
    not_found_hint,
    printable,
    walk,
)
from ..progress import plural

UID_PATTERN = re.compile(r"^UID_(H?\d+)_\d+_\d+_(all|hem)\.bmp$", re.IGNORECASE)
CNMC_PRELIM_DIR = "C-NMC_test_prelim_phase_data"
CNMC_PRELIM_LABELS = "C-NMC_test_prelim_phase_data_labels.csv"
CNMC_FINAL_DIR = "C-NMC_test_final_phase_data"
CNMC_CLASSES = ("all", "hem")
EXPECTED = (
    "an image folder (DATA/<class>/<image>.{bmp,jpg,jpeg,png,tif,tiff}, at any depth) or the "
    "C-NMC 2019 layout (C-NMC_Leukemia/training_data/fold_0/all/UID_*.bmp, or TCIA's C-NMC_training_data/...)"
)


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the dataset root, POSIX separators
    label: str
    patient: str = ""


@dataclass
class Dataset:
    root: Path
    layout: str
    samples: list[Sample]
    classes: list[str]
    notes: list[str] = field(default_factory=list)
    archives: list[str] = field(default_factory=list)  # zip, tar.gz, ... files under root: images not read
    loose: list[str] = field(default_factory=list)  # images directly in root, in no class folder and unlabelled: not read

    def abspath(self, sample: Sample) -> Path:
        return self.root / sample.path

    @property
    def has_patients(self) -> bool:
        return bool(self.samples) and all(s.patient for s in self.samples)


def parse_uid(name: str) -> tuple[str, str] | None:
    """``UID_H12_3_1_hem.bmp`` -> ("H12", "hem"); None if the name is not a C-NMC cell name."""
    match = UID_PATTERN.match(name)
    if not match:
        return None
    return match.group(1).upper(), match.group(2).lower()


def singular(key: str) -> str:
    """A lower-case class name without a plural's final s ("neutrophils" -> "neutrophil"); names of three
    letters or fewer are kept ("igs", "all"): too short to tell a plural from a name."""
    return key[:-1] if key.endswith("s") and len(key) > 3 else key


def archives_warning(archives: list[str]) -> str:
    """What to say of archives found among a dataset's images ("" for none): their images are not read."""
    if not archives:
        return ""
    return f"{plural(len(archives), 'archive')} not read (e.g. {archives[0]!r}): unpack them where their images belong"


def nested_classes(dataset: Dataset) -> list[tuple[str, str]]:
    """(top folder, class) where a class folder sits inside a top folder of ``root`` as its only class and is found
    nowhere else ("Lymphocyte/batch 2/"): most often a lab's batch or date folder inside its class folder, which the
    image-folder layout, whose class is each image's own folder, takes for the class. A patient or lab folder above
    the class folders ("P1/blast/", "P1/normal/", "P2/blast/") holds several classes or shares them: not listed."""
    if dataset.layout != "image-folder":
        return []
    inside: dict[str, set[str]] = {}
    tops_of: dict[str, set[str]] = {}
    for sample in dataset.samples:
        parts = sample.path.split("/")
        if sample.label != printable(parts[-2]):  # labelled by manifest.csv
            continue
        tops_of.setdefault(_key(sample.label), set()).add(parts[0] if len(parts) > 2 else "")  # "Blasts" is "blast" here
        if len(parts) > 2:
            inside.setdefault(parts[0], set()).add(sample.label)
    return sorted((top, label) for top, (label, *more) in inside.items()
                  if not more and tops_of[_key(label)] == {top} and _key(label) != _key(top))


def folder_warnings(dataset: Dataset) -> list[str]:
    """What to say of how a dataset's folders are laid out: archives and images outside any class folder not read,
    class folders nested in one folder each, TIFF files of several pages read by their first."""
    warnings = [archives_warning(dataset.archives)] if dataset.archives else []
    if dataset.loose:
        one = len(dataset.loose) == 1
        it, its, verb = ("it", "its", "is") if one else ("them", "their", "are")
        warnings.append(f"{plural(len(dataset.loose), 'image')} directly in {dataset.root.name}/, in no class folder, {verb} left out "
                        f"(e.g. {dataset.loose[0]!r}): move {it} into {its} class's folder, or label {it} in manifest.csv")
    if pages := several_pages([dataset.abspath(s) for s in dataset.samples]):
        warnings.append(pages)
    if nested := nested_classes(dataset):
        named = ", ".join(f"{label!r} (in {top}/)" for top, label in nested[:3]) + (f" and {len(nested) - 3} more" if len(nested) > 3 else "")
        top, label = nested[0]
        warnings.append(f"classes are the folders that hold the images: {plural(len(nested), 'class')} {named} "
                        f"{'is' if len(nested) == 1 else 'are'} the only class inside a folder above it; if {top!r} is the class, move "
                        f"the images of {top}/{label}/ up into {top}/, or label them in manifest.csv")
    return warnings


def _key(name: str) -> str:
    return singular("".join(ch for ch in name.lower() if ch.isalnum()))


def look_alike_classes(classes: list[str]) -> list[list[str]]:
    """Groups of class names that differ only in case, spaces, punctuation or a plural ("Neutrophil",
    "neutrophils ", "NEUTROPHIL"): most often one class spelt two ways by two labs or two people."""
    groups: dict[str, list[str]] = {}
    for name in classes:
        groups.setdefault(_key(name), []).append(name)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def look_alike_warning(classes: list[str]) -> str | None:
    """One line naming the look-alike class names, with the fix; None when there are none."""
    groups = look_alike_classes(classes)
    if not groups:
        return None
    named = "; ".join(" / ".join(repr(c) for c in g) for g in groups)
    return (f"class names that differ only in case, spaces or a plural are separate classes: {named}; "
            "if each group is one class, give its folders one name or its images one label in manifest.csv")


def detect_layout(root: str | os.PathLike) -> Dataset:
    """Return the labelled samples under ``root``; a one-line LeukoscopeError if none match."""
    given, root = os.fspath(root), Path(root)
    if not root.exists():
        raise LeukoscopeError(f"data path {given!r} does not exist" + (not_found_hint(given) or f"; expected {EXPECTED}"))
    if not root.is_dir():
        if (packed := archive_kind(root)) is not None:
            raise LeukoscopeError(f"data path {str(root)!r} is {packed}, not a folder: unpack it and give the folder it holds")
        raise LeukoscopeError(f"data path {str(root)!r} is not a folder; expected {EXPECTED}")
    files = _walk(root)
    dataset = _detect_cnmc(root, files) or _detect_image_folder(root, files)
    archives = [printable(f.as_posix()) for f in files if f.suffix.lower() in ARCHIVE_EXTENSIONS]
    if dataset is None:
        flat = [f for f in files if is_image_file(f) and len(f.parts) == 1]
        if flat:
            raise LeukoscopeError(
                f"{str(root)!r} holds {len(flat)} image{'s' if len(flat) != 1 else ''} but no class subfolders: put each class "
                f"in its own folder ({root.name}/<class>/<image>), or add {root.name}/manifest.csv with path,label columns; "
                "to classify unlabelled images use `leukoscope predict`")
        raise LeukoscopeError(f"no dataset layout recognised in {str(root)!r}: " + (archives_warning(archives) or f"expected {EXPECTED}"))
    dataset.archives = archives
    used = {s.path for s in dataset.samples}
    dataset.loose = [printable(f.as_posix()) for f in files if len(f.parts) == 1 and is_image_file(f) and f.as_posix() not in used]
    return dataset


def _walk(root: Path) -> list[Path]:
    """All non-hidden files under root, relative to it, in sorted order."""
    out = []
    for current, _, names in walk(root, skip_hidden=True):
        base = Path(current).relative_to(root)
        out.extend(base / n for n in sorted(names) if not n.startswith("."))
    return out


def _detect_cnmc(root: Path, files: list[Path]) -> Dataset | None:
    samples: list[Sample] = []
    for rel in files:
        parts = rel.parts
        if len(parts) >= 3 and parts[-3].lower().startswith("fold_") and parts[-2].lower() in CNMC_CLASSES:
            parsed = parse_uid(parts[-1])
            if parsed and is_image_file(rel):
                samples.append(Sample(rel.as_posix(), parts[-2].lower(), parsed[0]))
    if not samples:
        return None
    notes = [f"C-NMC training folds: {len(samples)} cells"]
    samples += _cnmc_prelim(root, files, notes)
    final = [f for f in files if len(f.parts) >= 2 and f.parts[-2] == CNMC_FINAL_DIR and is_image_file(f)]
    if final:
        notes.append(f"C-NMC final-phase test: {len(final)} unlabelled cells, not used")
    return Dataset(root, "cnmc2019", samples, list(CNMC_CLASSES), notes)


def _cnmc_prelim(root: Path, files: list[Path], notes: list[str]) -> list[Sample]:
    prelim = {f.name: f for f in files if len(f.parts) >= 2 and f.parts[-2] == CNMC_PRELIM_DIR and is_image_file(f)}
    if not prelim:
        return []
    label_files = [f for f in files if f.name == CNMC_PRELIM_LABELS]
    if not label_files:
        notes.append(f"C-NMC preliminary test: {len(prelim)} cells skipped, {CNMC_PRELIM_LABELS} not found")
        return []
    samples = []
    with open(root / label_files[0], newline="") as handle:
        for row in csv.DictReader(handle):
            rel = prelim.get(row["new_names"].strip())
            parsed = parse_uid(row["Patient_ID"].strip())
            if rel is None or parsed is None:
                continue
            label = "all" if row["labels"].strip() == "1" else "hem"
            samples.append(Sample(rel.as_posix(), label, parsed[0]))
    notes.append(f"C-NMC preliminary test: {len(samples)} cells labelled from {label_files[0].as_posix()}")
    return samples


def _detect_image_folder(root: Path, files: list[Path]) -> Dataset | None:
    manifest = _read_manifest(root / "manifest.csv")
    labelled = {key for key, (label, _) in manifest.items() if label}
    images = [f for f in files if is_image_file(f) and (len(f.parts) >= 2 or printable(f.as_posix()) in labelled)]
    if not images:
        return None
    samples, matched = [], set()
    for rel in images:
        key = rel.as_posix()
        text = printable(key)  # matched as text: composed, undecodable bytes escaped
        matched.add(text)
        label, patient = manifest.get(text, (None, ""))
        label = label or printable(rel.parts[-2])
        if not patient and (parsed := parse_uid(rel.name)):
            patient = parsed[0]
        samples.append(Sample(key, label, patient))
    classes = sorted({s.label for s in samples})
    notes = [f"image folder: {len(samples)} images in {len(classes)} classes"]
    if manifest:
        notes.append("labels and patient ids read from manifest.csv where given")
        unmatched = sorted(set(manifest) - matched)
        if unmatched:  # a typo, a moved file or a path from another machine: say so rather than fall back unsaid
            notes.append(f"{len(unmatched)} of manifest.csv's {len(manifest)} rows name no image under {root} and were not used "
                         f"(first: {unmatched[0]!r}); its paths are relative to the folder that holds it")
    return Dataset(root, "image-folder", samples, classes, notes)


def _read_manifest(path: Path) -> dict[str, tuple[str | None, str]]:
    """Map relative path -> (label or None, patient or '') from an optional manifest.csv."""
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:  # Excel's "CSV (Comma delimited)" on Windows writes cp1252
        text = path.read_bytes().decode("cp1252", errors="replace")
    try:
        return _manifest_rows(path, text)
    except csv.Error as err:  # a field over the csv module's limit (a file that is not a table), a NUL byte
        raise LeukoscopeError(f"{path}: not a readable table ({err}); save it from a spreadsheet as CSV") from None


def _manifest_rows(path: Path, text: str) -> dict[str, tuple[str | None, str]]:
    with io.StringIO(text, newline="") as handle:
        reader = csv.DictReader(handle, delimiter=csv_delimiter(text))
        fields = {name.lower(): name for name in reader.fieldnames or []}
        path_col = next((fields[c] for c in ("path", "file", "filename") if c in fields), None)
        if path_col is None:
            raise LeukoscopeError(f"{path}: manifest.csv needs a 'path' or 'file' column, found {list(fields.values())}")
        label_col = next((fields[c] for c in ("label", "cls", "class") if c in fields), None)
        patient_col = next((fields[c] for c in ("patient", "patient_id") if c in fields), None)
        out = {}
        for row in reader:
            label = printable(row[label_col].strip()) if label_col and row.get(label_col) else None
            patient = row[patient_col].strip() if patient_col and row.get(patient_col) else ""
            out[printable(Path(row[path_col].strip().replace("\\", "/")).as_posix())] = (label, patient)  # a Windows path too
    return out
