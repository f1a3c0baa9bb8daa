"""Handcrafted cell features (geometry, colour statistics, GLCM and LBP texture, granularity).

``cell_features(image)`` segments one RGB image and returns a fixed-length float vector whose
entries are named by ``FEATURE_NAMES``. ``FeatureCache`` keeps them on disk by image content and
by a hash of the feature code itself, so a re-run on the same images does not recompute them and
a change to the code can never serve stale features.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from scipy import stats
from skimage import color, feature, measure, morphology

from ..io import cache_root
from .segment import Segmentation, segment_cell

GEOMETRY = ["area", "perimeter", "circularity", "eccentricity", "solidity", "convexity"]
GLCM_PROPS = ["contrast", "dissimilarity", "homogeneity", "energy", "correlation"]
LBP_BINS = 10  # uniform LBP, P=8: values 0..9


def _names() -> list[str]:
    names = [f"{region}_{g}" for region in ("cell", "nucleus") for g in GEOMETRY]
    names += ["nucleus_cell_ratio", "nucleus_lobes"]
    names += [f"{region}_{ch}_{s}" for region in ("nucleus", "cytoplasm") for ch in ("r", "g", "b", "L", "a", "b*") for s in ("mean", "std", "skew")]
    names += [f"nucleus_glcm_{p}" for p in GLCM_PROPS] + [f"cell_glcm_{p}" for p in GLCM_PROPS]
    names += [f"nucleus_lbp_{i}" for i in range(LBP_BINS)] + [f"cytoplasm_lbp_{i}" for i in range(LBP_BINS)]
    names += ["granularity_cytoplasm", "granularity_nucleus", "dark_granules_cytoplasm", "red_granules_cytoplasm"]
    return names


FEATURE_NAMES = _names()


def shape_features(mask: np.ndarray) -> list[float]:
    """Area, perimeter, circularity 4*pi*A/P^2, eccentricity, solidity, convexity (hull perimeter / perimeter)."""
    if not mask.any():
        return [0.0] * len(GEOMETRY)
    region = max(measure.regionprops(mask.astype(np.uint8)), key=lambda r: r.area)
    area = float(mask.sum())
    perimeter = float(measure.perimeter(mask)) or 1.0
    hull_perimeter = float(measure.perimeter(region.image_convex)) or perimeter
    return [area, perimeter, min(4 * np.pi * area / perimeter**2, 1.5), float(region.eccentricity), float(region.solidity),
            min(hull_perimeter / perimeter, 1.0)]


def colour_stats(pixels: np.ndarray) -> list[float]:
    """Mean, standard deviation and skewness per channel of (N, C) pixels; zeros when empty."""
    if len(pixels) < 3:
        return [0.0] * (3 * pixels.shape[1])
    out = []
    for ch in pixels.T:
        sd = float(ch.std())
        out += [float(ch.mean()), sd, float(stats.skew(ch)) if sd > 1e-6 else 0.0]
    return out


def glcm_features(gray: np.ndarray, mask: np.ndarray) -> list[float]:
    """GLCM properties of the masked region's bounding box (32 grey levels, 4 directions averaged)."""
    if mask.sum() < 9:
        return [0.0] * len(GLCM_PROPS)
    rows, cols = np.nonzero(mask)
    box = (gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] // 8).astype(np.uint8)
    glcm = feature.graycomatrix(box, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32, symmetric=True, normed=True)
    return [float(np.nan_to_num(feature.graycoprops(glcm, p).mean())) for p in GLCM_PROPS]


def lbp_histogram(lbp: np.ndarray, mask: np.ndarray) -> list[float]:
    if not mask.any():
        return [0.0] * LBP_BINS
    hist = np.bincount(lbp[mask].astype(int), minlength=LBP_BINS)[:LBP_BINS].astype(float)
    return (hist / hist.sum()).tolist()


def granularity(gray: np.ndarray, mask: np.ndarray) -> float:
    """Mean small-scale top-hat response: coarse granules (eosinophils, basophils) score high."""
    if not mask.any():
        return 0.0
    footprint = morphology.disk(2)
    tophat = morphology.white_tophat(gray, footprint).astype(float) + morphology.black_tophat(gray, footprint).astype(float)
    return float(tophat[mask].mean())


def cell_features(image: np.ndarray, seg: Segmentation | None = None) -> np.ndarray:
    """The feature vector of one RGB uint8 image (segmenting it unless ``seg`` is given)."""
    seg = seg if seg is not None else segment_cell(image)
    gray = (color.rgb2gray(image) * 255).astype(np.uint8)
    lab = color.rgb2lab(image)
    pixels = np.concatenate([image.astype(float), lab], axis=2)
    lbp = feature.local_binary_pattern(gray, P=8, R=1, method="uniform")
    values = shape_features(seg.cell) + shape_features(seg.nucleus)
    values += [seg.nucleus_ratio, float(measure.label(seg.nucleus).max())]
    values += colour_stats(pixels[seg.nucleus]) + colour_stats(pixels[seg.cytoplasm])
    values += glcm_features(gray, seg.nucleus) + glcm_features(gray, seg.cell)
    values += lbp_histogram(lbp, seg.nucleus) + lbp_histogram(lbp, seg.cytoplasm)
    cyto = seg.cytoplasm
    values += [granularity(gray, cyto), granularity(gray, seg.nucleus),
               float((lab[..., 0][cyto] < 45).mean()) if cyto.any() else 0.0,
               float((lab[..., 1][cyto] > 25).mean()) if cyto.any() else 0.0]
    out = np.asarray(values, dtype=np.float32)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _features_of(image: np.ndarray) -> np.ndarray:
    try:
        return cell_features(image)
    except (ValueError, IndexError):  # degenerate images (uniform colour, 1 pixel wide): all zeros
        return np.zeros(len(FEATURE_NAMES), np.float32)


def features_batch(images: np.ndarray, workers: int | None = None) -> np.ndarray:
    """Features of (N, H, W, 3) uint8 images, in a process pool for large batches."""
    if len(images) < 64 or (workers or os.cpu_count() or 1) < 2:
        return np.stack([_features_of(im) for im in images]) if len(images) else np.zeros((0, len(FEATURE_NAMES)), np.float32)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers or os.cpu_count(), mp_context=mp.get_context("spawn")) as pool:
        return np.stack(list(pool.map(_features_of, images, chunksize=32)))


@functools.cache
def code_version() -> str:
    """A hash of the source of the feature and segmentation code: cached features belong to one version."""
    from . import segment

    digest = hashlib.sha1()
    for module_file in (__file__, segment.__file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()[:12]


class FeatureCache:
    """Handcrafted features on disk, keyed by image content, under a folder per feature-code version.

    Features are written in shards; ``index.json`` maps each key to its shard, so a lookup opens
    only the shards that hold wanted keys.
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        root = Path(folder) if folder is not None else cache_root() / "features"
        self.folder = root / code_version()

    def _index(self) -> dict[str, str]:
        try:
            return json.loads((self.folder / "index.json").read_text())
        except (OSError, ValueError):
            return {}

    def load(self, keys: list[str]) -> dict[str, np.ndarray]:
        index, by_shard = self._index(), {}
        for key in keys:
            if key in index:
                by_shard.setdefault(index[key], set()).add(key)
        found = {}
        for shard, wanted in by_shard.items():
            try:
                with np.load(self.folder / shard) as data:
                    for k, v in zip(data["keys"], data["features"]):
                        if str(k) in wanted and v.shape == (len(FEATURE_NAMES),):
                            found[str(k)] = v
            except (OSError, ValueError, KeyError):
                continue  # a damaged or vanished shard: its features are recomputed
        return found

    def save(self, features: dict[str, np.ndarray]) -> None:
        if not features:
            return
        from ..io import atomic_write

        self.folder.mkdir(parents=True, exist_ok=True)
        keys = sorted(features)
        name = hashlib.sha1("".join(keys).encode()).hexdigest()[:16] + ".npz"
        with atomic_write(self.folder / name, "wb") as handle:
            np.savez(handle, keys=np.array(keys), features=np.stack([features[k] for k in keys]))
        index = self._index()  # read again just before writing: another process may have added shards
        index.update({k: name for k in keys})
        with atomic_write(self.folder / "index.json") as handle:
            json.dump(index, handle)
