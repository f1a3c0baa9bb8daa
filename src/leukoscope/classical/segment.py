"""Nucleus and cytoplasm segmentation by colour clustering (k-means in CIELAB), after the seed method.

Pixels are clustered in L*a*b*; the cluster that fills most of the image border is the
background, and the darkest remaining cluster is the stained nucleus (a black C-NMC background
is the border cluster, so it is never taken for a nucleus). The cell is the foreground blob
around the nucleus, bounded to a few nucleus radii so that touching red cells stay out.
Morphology and labelling come from scikit-image; k-means from scikit-learn.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import color, measure, morphology
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits


@dataclass
class Segmentation:
    nucleus: np.ndarray  # bool (H, W)
    cytoplasm: np.ndarray  # bool (H, W), cell minus nucleus
    cell: np.ndarray  # bool (H, W)
    leukocytes: int  # nucleus blobs found (1 for a single-cell image with a nucleus)

    @property
    def nucleus_ratio(self) -> float:
        return float(self.nucleus.sum() / max(self.cell.sum(), 1))


def cluster_labels(image: np.ndarray, k: int = 3, seed: int = 0, sample: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel k-means labels in L*a*b* and each cluster's mean colour (k, 3)."""
    lab = color.rgb2lab(image).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    fit = lab[rng.choice(len(lab), min(sample, len(lab)), replace=False)]
    with threadpool_limits(1), warnings.catch_warnings():  # tiny problems: threads cost more than they give
        # An image of fewer than k colours (a drawing, a blank field) leaves clusters empty: an empty nucleus, not a
        # warning for the user
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=k, n_init=2, max_iter=100, random_state=seed).fit(fit)
        return km.predict(lab).reshape(image.shape[:2]), km.cluster_centers_


def _size(image: np.ndarray) -> str:
    return f"{image.shape[1]}x{image.shape[0]}" + (f" with {image.shape[2]} channels" if image.ndim == 3 and image.shape[2] != 3 else "")


def _border_share(labels: np.ndarray, k: int) -> np.ndarray:
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return np.bincount(border, minlength=k) / len(border)


def segment_cell(image: np.ndarray, k: int = 3, seed: int = 0, single_cell: bool = True) -> Segmentation:
    """Segment an RGB uint8 image; ``single_cell=False`` keeps every leukocyte of a smear field."""
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
        raise ValueError(f"expected an RGB image of at least 8x8 pixels, got {_size(image)}")
    labels, centers = cluster_labels(image, k, seed)
    background = int(np.argmax(_border_share(labels, k)))
    candidates = [c for c in range(k) if c != background]
    nucleus_cluster = min(candidates, key=lambda c: centers[c][0])  # darkest stain
    side = min(image.shape[:2])
    min_area = max(4, int(0.002 * side * side))
    nucleus = morphology.remove_small_objects(labels == nucleus_cluster, max_size=min_area)
    nucleus = morphology.remove_small_holes(morphology.closing(nucleus, morphology.disk(max(1, side // 64))), max_size=side * side // 50)
    blobs = measure.label(within(nucleus, max(1, side // 32)))
    if single_cell and blobs.max() > 1:
        keep = _central_blob(blobs)
        nucleus &= blobs == keep
        blobs = (blobs == keep).astype(int)
    foreground = labels != background
    cell = _cell_region(foreground, nucleus, side)
    count = int(blobs.max()) if nucleus.any() else 0
    return Segmentation(nucleus=nucleus, cytoplasm=cell & ~nucleus, cell=cell, leukocytes=count)


def within(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels at most ``radius`` from ``mask``: a disk dilation in O(pixels) via the distance transform."""
    return ndimage.distance_transform_edt(~mask) <= radius


def _central_blob(blobs: np.ndarray) -> int:
    """The blob that is large and close to the image centre (single-cell images are centred)."""
    centre = np.array(blobs.shape) / 2
    best, best_score = 1, -np.inf
    for region in measure.regionprops(blobs):
        distance = np.linalg.norm(np.array(region.centroid) - centre) / max(blobs.shape)
        score = np.sqrt(region.area) / max(blobs.shape) - distance
        if score > best_score:
            best, best_score = region.label, score
    return best


def _cell_region(foreground: np.ndarray, nucleus: np.ndarray, side: int) -> np.ndarray:
    """Foreground connected to the nucleus, within 2.5 nucleus radii of its centre."""
    if not nucleus.any():
        return morphology.opening(foreground, morphology.disk(max(1, side // 64)))
    radius = max(2, int(1.5 * np.sqrt(nucleus.sum() / np.pi)))
    reach = within(nucleus, radius)
    opened = morphology.opening(foreground, morphology.disk(max(1, side // 64))) | nucleus
    parts = measure.label(opened & reach)
    touching = np.unique(parts[nucleus & (parts > 0)])
    cell = np.isin(parts, touching[touching > 0]) | nucleus
    return morphology.remove_small_holes(cell, max_size=side * side // 20)


def overlay(image: np.ndarray, seg: Segmentation) -> np.ndarray:
    """Nucleus outlined in blue-green, cell outline in yellow, over the image."""
    from skimage.segmentation import find_boundaries

    out = image.copy()
    out[find_boundaries(seg.cell, mode="outer")] = (255, 215, 0)
    out[find_boundaries(seg.nucleus, mode="outer")] = (0, 200, 255)
    return out


def looks_like_field(image: np.ndarray, seg: Segmentation) -> bool:
    """A smear field rather than a single-cell image, from a field-mode segmentation.

    A single-cell image (CellaVision tile, C-NMC, ALL-IDB2 crop) centres its cell: a nucleus of at
    least 0.5% of the image lies within 10% of the image size from the centre. A field holds
    several leukocytes, or its leukocyte anywhere, or it is a camera frame (not square) with a
    small nucleus (BCCD's 640x480). Read off 40 images per set, then checked on another 60 per set:
    single cells 131 of 135 (PBC 58/60, C-NMC 15/15, ALL-IDB2 58/60), fields 119 of 120 (BCCD
    60/60, Aria 59/60).
    """
    if seg.leukocytes >= 3:
        return True
    h, w = seg.nucleus.shape
    props = measure.regionprops(measure.label(seg.nucleus))
    big = [p for p in props if p.area >= 0.005 * h * w]
    centre = np.array([h, w]) / 2
    central = any(np.linalg.norm(np.array(p.centroid) - centre) <= 0.1 * max(h, w) for p in big)
    largest = max((p.area for p in props), default=0) / (h * w)
    return not central or (max(h, w) / min(h, w) >= 1.2 and largest < 0.10)


def segment_image(image: np.ndarray, mode: str = "auto") -> tuple[Segmentation, str]:
    """Segment with ``mode`` single, field or auto (``looks_like_field`` decides)."""
    if mode not in ("auto", "single", "field"):
        raise ValueError(f"mode must be auto, single or field, got {mode!r}")
    if mode == "auto":
        field = segment_cell(image, single_cell=False)
        return (field, "field") if looks_like_field(image, field) else (segment_cell(image), "single")
    return segment_cell(image, single_cell=mode == "single"), mode


def segment_files(paths, out_dir, mode: str = "auto", max_side: int = 512) -> list[dict]:
    """``leukoscope segment``: masks and overlay PNGs per image plus segmentation.csv; one row per file."""
    import csv
    from pathlib import Path

    from PIL import Image

    from ..images import ImageReadError, load_rgb
    from ..io import atomic_write, make_output_folder, output_name

    out_dir = make_output_folder(out_dir, "masks and overlays")
    rows, used = [], set()
    for path in paths:
        row = {"path": str(path), "mode": "", "leukocytes": "", "nucleus_area": "", "cell_area": "", "nucleus_ratio": "", "error": ""}
        try:
            image = load_rgb(path)
            if min(image.shape[:2]) < 8:  # said before any shrinking, in the file's own pixels
                raise ValueError(f"an image of {_size(image)} pixels: segmenting needs at least 8x8")
            if max(image.shape[:2]) > max_side:
                pil = Image.fromarray(image)
                pil.thumbnail((max_side, max_side))
                image = np.asarray(pil)
            seg, used_mode = segment_image(image, mode)
        except (ImageReadError, ValueError) as err:
            row["error"] = str(err)
            rows.append(row)
            continue
        stem = output_name(Path(path).stem, used)
        for suffix, array in (("nucleus", seg.nucleus.astype(np.uint8) * 255), ("cytoplasm", seg.cytoplasm.astype(np.uint8) * 255),
                              ("overlay", overlay(image, seg))):
            with atomic_write(out_dir / f"{stem}_{suffix}.png", "wb") as handle:
                Image.fromarray(array).save(handle, format="PNG")
        row.update(mode=used_mode, leukocytes=seg.leukocytes, nucleus_area=int(seg.nucleus.sum()), cell_area=int(seg.cell.sum()),
                   nucleus_ratio=round(seg.nucleus_ratio, 4))
        rows.append(row)
    with atomic_write(out_dir / "segmentation.csv", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
