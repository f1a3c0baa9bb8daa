"""Shared fixtures: the real data beside the project, and synthetic cell images in tmp_path."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA = Path(os.environ.get("LEUKOSCOPE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CNMC = DATA / "cnmc2019"
ARIA = DATA / "aria_all"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (expected ../shared/data beside the project)")
    return path


def synthetic_cell(rng: np.random.Generator, size: int, nucleus_fraction: float, hue: int) -> np.ndarray:
    """A pale background with a round cell and a dark nucleus covering ``nucleus_fraction`` of the cell."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-2, 2, 2)
    radius = size * 0.35
    image = np.full((size, size, 3), (235, 225, 230), float)
    cell = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    nucleus = (yy - cy) ** 2 + (xx - cx) ** 2 <= (radius * np.sqrt(nucleus_fraction)) ** 2
    image[cell] = (200, 170, 210)
    image[nucleus] = (90 + hue, 40, 140 - hue)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, n_per_class: int = 24, size: int = 40, seed: int = 0, ext: str = ".png") -> Path:
    """Two separable classes: 'blast' (large nucleus) and 'normal' (small nucleus)."""
    rng = np.random.default_rng(seed)
    for label, fraction, hue in (("blast", 0.7, 40), ("normal", 0.15, 0)):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(synthetic_cell(rng, size, fraction, hue)).save(folder / f"{label}_{i:03d}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "cells")


def link_real_cnmc_tree(root: Path) -> Path:
    """Lay the 15 real C-NMC cells out as the Kaggle distribution has them (symlinks)."""
    require(CNMC)
    with open(CNMC / "manifest.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            target = root / row["official_kaggle_path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to((CNMC / row["file"]).resolve())
    labels = root / "C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data_labels.csv"
    labels.write_bytes((CNMC / "C-NMC_test_prelim_phase_data_labels.csv").read_bytes())
    return root
