"""How a lab's framing moves `wbc` and `pbc`: tight crops, small images and the window's size. Validation only.

Labs save white cells framed in many ways: CellaVision tiles (PBC, 360 px, the cell and its
neighbours), whole fields (BCCD), or crops that hold little more than the cell, often resized to
a fixed small size (120x120 px in Zheng et al. 2018's first set, which also has a yellow cast).
This script cuts PBC's validation tiles as such a lab would: a square around the located cell
whose side is a multiple of the nucleus's diameter (2.0 to 1.1: from a margin of background to a
crop that cuts the cytoplasm), kept at full resolution or resized to 120 px, with and without a
yellow cast. The crops are centred by our own localiser, so they test the framing, not the
localiser's search. A synthetic change of framing is not another lab: it tells which shift a
model survives, not how it does on another lab's cells.

A second table shrinks the tiles into a larger field (the cell spanning a tenth of it or less, as a
camera at low magnification shows it), with and without the localiser's fine search. A third asks
whether the window's size at inference matters (a train/test resolution
discrepancy, Touvron et al. 2019): `wbc` trained at 112 px, run at 104 to 128 px.

Writes the FRAMING block of docs/benchmarks.md.

Usage: python benchmarks/framing.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cross_lab import SHARED
from doc import share, write_block
from specialist_gate import split_items

from leukoscope import localise, perturb
from leukoscope.inference import load_model
from leukoscope.localise import find_cell

SIDES = (2.0, 1.6, 1.3, 1.1)  # the crop's side, in nucleus diameters (`wbc`'s window: 1 / 0.6 = 1.67)
CASTS = {"yellow cast (1.1, 1.05, 0.7)": (1.1, 1.05, 0.7), "strong yellow cast (1.15, 1.1, 0.55)": (1.15, 1.1, 0.55)}
SIZES = (104, 112, 120, 128)
SHRINK = (0.5, 0.33, 0.25, 0.2, 0.15)  # the tile's share of the field's side (its cell spans about half the tile)


def tight_crop(rgb: np.ndarray, side: float) -> np.ndarray:
    """The square of ``side`` nucleus diameters around the located cell (clipped to the image); the
    image itself where no cell is found."""
    cell = find_cell(rgb)
    if cell is None:
        return rgb
    h, w = rgb.shape[:2]
    half = cell.diameter * side / 2
    y0, y1 = int(max(0, cell.y - half)), int(min(h, cell.y + half))
    x0, x1 = int(max(0, cell.x - half)), int(min(w, cell.x + half))
    return rgb[y0:y1, x0:x1]


def resized(images: list[np.ndarray], size: int) -> list[np.ndarray]:
    return [np.asarray(Image.fromarray(x).resize((size, size), Image.BILINEAR)) for x in images]


def right(model, images: list, labels: list[str]) -> tuple[int, int, int]:
    """(images called right, images in domain, images whose cell was located)."""
    predictions = model.predict(images)
    return (sum(p.label == y for p, y in zip(predictions, labels)), sum(bool(p.in_domain) for p in predictions),
            sum(bool(p.localised) for p in predictions))


def framing_rows(models: dict, clean: list[np.ndarray], labels: list[str]) -> list[str]:
    variants: dict[str, list[np.ndarray]] = {"the tile as saved (360 px)": clean}
    for side in SIDES:
        crops = [tight_crop(x, side) for x in clean]
        variants[f"crop {side} nucleus diameters, full resolution"] = crops
        variants[f"crop {side} nucleus diameters, resized to 120 px"] = resized(crops, 120)
    for name, gains in CASTS.items():
        variants[f"crop 1.3, 120 px, {name}"] = [perturb.white_balance(x, gains) for x in variants["crop 1.3 nucleus diameters, resized to 120 px"]]
    lines = ["| PBC validation images, framed as | `wbc` right | `wbc` in domain | `pbc` right | `pbc` in domain |", "|---|---|---|---|---|"]
    for name, images in variants.items():
        cells = []
        for model in models.values():
            hits, in_domain, _ = right(model, images, labels)
            cells += [share(hits, len(labels)), str(in_domain)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def small_cell_rows(model, clean: list[np.ndarray], labels: list[str]) -> list[str]:
    """The tiles shrunk into a 1,080 px field (edge-padded), so that the cell spans a smaller share of it,
    with and without the localiser's fine search for nuclei too small for its coarse one."""
    lines = ["| PBC validation tile shrunk into a 1,080 px field, to | `wbc` right | cell located | `wbc` right without the fine search |",
             "|---|---|---|---|"]
    for factor in SHRINK:
        images = resized([perturb.zoom(x, factor) for x in clean], 1080)
        hits, _, located = right(model, images, labels)
        fine_search, localise.small_cell = localise.small_cell, lambda rgb: None
        try:
            coarse = right(model, images, labels)[0]
        finally:
            localise.small_cell = fine_search
        lines.append(f"| {factor:g} | {share(hits, len(labels))} | {located} | {share(coarse, len(labels))} |")
        print(lines[-1], flush=True)
    return lines


def size_rows(paths: list[Path], labels: list[str]) -> list[str]:
    lines = ["| `wbc` window at inference | PBC validation right |", "|---|---|"]
    for size in SIZES:
        model = load_model("wbc", backend="torch")  # fp32: the int8 graph was calibrated at 112 px
        model.view = dataclasses.replace(model.view, size=size)
        model.image_size = size
        hits = right(model, paths, labels)[0]
        lines.append(f"| {size} px{' (as trained)' if size == 112 else ''} | {share(hits, len(labels))} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    if not (SHARED / "pbc").is_dir():
        sys.exit(f"framing: needs {SHARED / 'pbc'}")
    paths, labels = split_items("pbc.splits.csv", SHARED / "pbc", "val")
    clean = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    models = {name: load_model(name) for name in ("wbc", "pbc")}
    lines = [f"PBC's validation split ({len(labels)} images, 8 types, the models' own call), 95% Wilson intervals.", ""]
    lines += framing_rows(models, clean, labels) + [""] + small_cell_rows(models["wbc"], clean, labels)
    lines += [""] + size_rows(paths, labels)
    write_block("FRAMING", "\n".join(lines))


if __name__ == "__main__":
    main()
