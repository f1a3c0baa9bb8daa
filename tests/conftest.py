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


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Tests never write cached features, ONNX graphs or ONNX Runtime's telemetry into the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LEUKOSCOPE_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setenv("ORT_DISABLE_TELEMETRY", os.environ.get("ORT_DISABLE_TELEMETRY", "1"))  # nor ONNX Runtime's usage events
        yield


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


def _png_with_claimed_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb without the memory."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


FIXTURES = Path(__file__).parent / "fixtures"


def make_hostile_corpus(root: Path, seed: int = 0) -> dict[str, bool]:
    """Files a lab might throw at the tool; returns {relative path: should it be predicted?}.

    Good images in odd formats must be handled; broken ones must become per-file errors.
    """
    import io

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    cell = Image.fromarray(synthetic_cell(rng, 64, 0.5, 20))
    expected: dict[str, bool] = {}

    def save(name: str, image: Image.Image, ok: bool = True, **kwargs) -> None:
        image.save(root / name, **kwargs)
        expected[name] = ok

    def encoded(fmt: str) -> bytes:
        buffer = io.BytesIO()
        cell.save(buffer, format=fmt)
        return buffer.getvalue()

    (root / "zero.png").write_bytes(b"")
    for ext, fmt in (("jpg", "JPEG"), ("bmp", "BMP"), ("png", "PNG")):
        data = encoded(fmt)
        (root / f"truncated.{ext}").write_bytes(data[: len(data) // 2])
        expected[f"truncated.{ext}"] = False
    (root / "text.png").write_text("this is a text file, not an image\n")
    (root / "page.jpg").write_text("<!doctype html><html><body>404 Not Found</body></html>")
    (root / "bomb.png").write_bytes(_png_with_claimed_size(50_000, 50_000))
    expected.update({"zero.png": False, "text.png": False, "page.jpg": False, "bomb.png": False})
    save("sixteen_bit.png", Image.fromarray((np.asarray(cell.convert("L"), np.uint16) * 257)))
    save("gray.png", cell.convert("L"))
    import tifffile

    tifffile.imwrite(root / "twelve_bit_rgb.tif", np.asarray(cell, np.uint16) * 16, photometric="rgb")  # a scientific camera's 12 bits
    tifffile.imwrite(root / "float.tif", np.asarray(cell, np.float32) / 255, photometric="rgb")
    (root / "tiff_header_only.tif").write_bytes(b"II*\x00" + bytes(12))
    expected.update({"twelve_bit_rgb.tif": True, "float.tif": True, "tiff_header_only.tif": False})
    save("palette.png", cell.convert("P"))
    save("rgba.png", cell.convert("RGBA"))
    save("cmyk.jpg", cell.convert("CMYK"))
    save("multipage.tif", cell, save_all=True, append_images=[cell.rotate(90)])
    save("animated.gif", cell.convert("P"), save_all=True, append_images=[cell.rotate(90).convert("P")], duration=100, loop=0)
    save("one_pixel.png", Image.new("RGB", (1, 1), (200, 100, 150)))
    save("strip_2000x3.png", Image.fromarray(rng.integers(0, 255, (3, 2000, 3), dtype=np.uint8)))
    save("cell with spaces é ß 細胞.png", cell)
    save("phone.avif", cell)
    (root / "phone.heic").write_bytes((FIXTURES / "cell.heic").read_bytes())  # a phone's HEVC photo
    (root / "damaged.heic").write_bytes((FIXTURES / "cell.heic").read_bytes()[:400])
    expected.update({"phone.heic": True, "damaged.heic": False})
    (root / "folder.jpg").mkdir()
    (root / "broken_link.png").symlink_to(root / "does_not_exist.png")
    expected["broken_link.png"] = False
    os.mkfifo(root / "pipe.jpg")  # reading it would wait for a writer forever
    (root / "device.jpg").symlink_to("/dev/zero")  # reading it would never end
    expected.update({"pipe.jpg": False, "device.jpg": False})
    return expected


TINY_TRAIN = ["--arch", "cellnet_tiny", "--image-size", "32", "--epochs", "1", "--batch-size", "8"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run folder): a one-epoch cellnet_tiny run on 2 x 12 synthetic cells, once per test module."""
    from leukoscope.cli import main

    root = tmp_path_factory.mktemp("tiny")
    data = make_image_folder(root / "data", n_per_class=12)
    assert main(["train", str(data), "--out", str(root / "run"), *TINY_TRAIN]) == 0
    return data, root / "run"
