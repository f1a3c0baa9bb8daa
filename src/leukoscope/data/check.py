"""``leukoscope check-data``: what is in a dataset folder and what is wrong with it, before training."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..images import ImageReadError, image_size, load_rgb
from ..stain import colourless
from .layouts import detect_layout, folder_warnings, look_alike_warning
from .splits import FROM_FOLDERS, choose_split, duplicate_groups, near_duplicate_pairs


def _probe(path: Path) -> tuple[tuple[int, int] | None, str | None, bool]:
    """(width, height), None and whether the image is grayscale; or None, the reason the file cannot be used, False."""
    try:
        small = load_rgb(path, size=32)  # a full (draft) decode catches truncated files that a header read misses
        return image_size(path), None, colourless(small)
    except ImageReadError as err:
        return None, str(err), False


def check_data(root: str | os.PathLike) -> dict[str, Any]:
    """Class counts, patients, image sizes, unreadable files and duplicates; ``ok`` is False on errors."""
    dataset = detect_layout(root)
    paths = [dataset.abspath(s) for s in dataset.samples]
    with ThreadPoolExecutor(4) as pool:
        probes = list(pool.map(_probe, paths))
    unreadable = [{"path": s.path, "error": err} for s, (_, err, _) in zip(dataset.samples, probes) if err]
    sizes = np.array([size for size, _, _ in probes if size is not None]) if any(size for size, _, _ in probes) else np.zeros((0, 2))
    grayscale = Counter(s.label for s, (_, _, gray) in zip(dataset.samples, probes) if gray)
    duplicates = []
    for group in duplicate_groups(paths):
        labels = sorted({dataset.samples[i].label for i in group})
        duplicates.append({"paths": [dataset.samples[i].path for i in group], "labels": labels, "conflict": len(labels) > 1})
    near = [{"paths": [dataset.samples[i].path, dataset.samples[j].path],
             "labels": sorted({dataset.samples[i].label, dataset.samples[j].label})} for i, j in near_duplicate_pairs(paths)]
    counts = Counter(s.label for s in dataset.samples)
    patients: dict[str, set] = defaultdict(set)
    for s in dataset.samples:
        if s.patient:
            patients[s.label].add(s.patient)
    conflicts = [d for d in duplicates if d["conflict"]]
    near_conflicts = [d for d in near if len(d["labels"]) > 1]
    errors = [f"{len(unreadable)} unreadable file(s)"] * bool(unreadable) + [f"{len(conflicts)} duplicate(s) with different labels"] * bool(conflicts)
    warnings = [f"{len(duplicates) - len(conflicts)} duplicate group(s) within one class"] * bool(len(duplicates) - len(conflicts))
    warnings += [f"{len(near)} near-duplicate pair(s) (perceptual hash), {len(near_conflicts)} of them across classes; "
                 "splits keep each pair together"] * bool(near)
    if grayscale and sum(grayscale.values()) < len(dataset.samples):
        per_class = ", ".join(f"{c}: {n} of {counts[c]}" for c, n in sorted(grayscale.items()))
        warnings.append(f"{sum(grayscale.values())} grayscale image(s) among colour ones ({per_class}): a class that holds "
                        "more of them than the others lets a model learn the colour mode instead of the cells")
    notes: list[str] = []
    if len(dataset.classes) < 2:
        warnings.append(f"{len(dataset.classes)} class ({', '.join(dataset.classes) or 'none'}): train needs at least 2; "
                        "evaluate can still score a model's calls on it")
    else:
        splits, kind, said = choose_split(dataset)  # the split train would make: the folders' or its own
        notes = [text for level, text in said if level == "note"]
        warnings += [text for level, text in said if level == "warning"]
        warnings += _short_classes(dataset, splits, own=not kind.endswith(FROM_FOLDERS))
    if look_alike := look_alike_warning(dataset.classes):
        warnings.append(look_alike)
    warnings += folder_warnings(dataset)
    return {
        "root": str(dataset.root), "layout": dataset.layout, "notes": dataset.notes + notes, "images": len(dataset.samples),
        "classes": {c: {"images": counts[c], "patients": len(patients[c])} for c in dataset.classes},
        "sizes": _size_stats(sizes), "unreadable": unreadable, "duplicates": duplicates, "near_duplicates": near,
        "grayscale": dict(sorted(grayscale.items())), "errors": errors, "warnings": warnings,
        "ok": not errors,
    }


def _short_classes(dataset, splits: list[str], own: bool) -> list[str]:
    """The classes that train's split (``own``: its default 70/15/15, by patient where known, seed 0; else the
    dataset's own folders') leaves without validation or test images: train refuses a class without test images, so
    say it before. A split without any test (or validation) image is not refused: train reports what it can, and so
    says this."""
    units = "patients" if dataset.has_patients else "images"
    which = "the default split (70/15/15)" if own else "the dataset's own split folders"
    lines = []
    for split in ("val", "test"):
        present = {s.label for s, k in zip(dataset.samples, splits) if k == split}
        missing = [c for c in dataset.classes if c not in present]
        if not present:
            lines.append(f"{which} leave{'s' * own} no {split} images: train "
                         f"{'reports training and validation numbers only' if split == 'test' else 'chooses the epoch on training accuracy'}"
                         f"; add {units}, {'or give train --fractions' if own else f'or put some in a {split}/ folder'}")
        elif missing:
            lines.append(f"{which} leave{'s' * own} {', '.join(missing)} without {split} images: train "
                         f"{'refuses it' if split == 'test' else 'cannot validate them'}; add {units} of those classes"
                         f"{', or give train --fractions' if own else f' to {split}/'}")
    return lines


def _size_stats(sizes: np.ndarray) -> dict[str, Any]:
    if len(sizes) == 0:
        return {}
    stats = {}
    for axis, name in ((0, "width"), (1, "height")):
        v = sizes[:, axis]
        stats[name] = {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())}
    stats["distinct_sizes"] = len({tuple(s) for s in sizes.tolist()})
    return stats


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['root']}: {report['layout']}, {report['images']} images", "", f"{'class':<20}{'images':>8}{'patients':>10}"]
    lines += [f"{c:<20}{v['images']:>8}{v['patients'] or '-':>10}" for c, v in report["classes"].items()]
    sizes = report["sizes"]
    if sizes:
        lines += ["", "image size (min / median / max): " + ", ".join(
            f"{k} {sizes[k]['min']} / {sizes[k]['median']:g} / {sizes[k]['max']}" for k in ("width", "height")) + f"; {sizes['distinct_sizes']} distinct sizes"]
    for item in report["unreadable"][:20]:
        lines.append(f"unreadable: {item['path']}: {item['error']}")
    for dup in report["duplicates"][:20]:
        kind = "CONFLICT (different labels)" if dup["conflict"] else "duplicate"
        lines.append(f"{kind}: {', '.join(dup['paths'][:4])} [{', '.join(dup['labels'])}]")
    for near in sorted(report["near_duplicates"], key=lambda d: len(d["labels"]), reverse=True)[:20]:
        kind = "near-duplicate ACROSS CLASSES" if len(near["labels"]) > 1 else "near-duplicate"
        lines.append(f"{kind}: {', '.join(near['paths'])} [{', '.join(near['labels'])}]")
    lines += [""] + [f"note: {n}" for n in report["notes"]] + [f"warning: {w}" for w in report["warnings"]]
    lines += [f"error: {e}" for e in report["errors"]] + [f"result: {'OK' if report['ok'] else 'PROBLEMS FOUND'}"]
    return "\n".join(lines)
