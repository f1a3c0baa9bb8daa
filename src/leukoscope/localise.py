"""Find the white cell in an image and cut a square window centred on it, scaled to its size.

Models trained on one lab's tiles see the cell at that lab's magnification and framing; another
lab's camera shows it smaller, larger or off-centre. A cell-centric window removes both shifts:
the window is centred on the white cell and scaled so that its nucleus spans a fixed fraction
of it, whatever the magnification or where the cell sits in a field.

The localiser is cheap on purpose (about a millisecond on a 360 px tile, less than the network
costs per image): on a ~100 px subsample it thresholds a nucleus stain score (Romanowsky stains
colour leukocyte nuclei blue-purple, blue well above green, which red cells and the background
are not) at Otsu's threshold, closes small gaps between lobes, and keeps the connected region
that is large and central. Two touching nuclei are split by a watershed on the distance
transform. The size is the nucleus's (the larger of its extent and its equivalent diameter):
the nucleus is what stains reliably in every lab, and a cell and its window scale together.
Bottom layer: numpy, scipy and scikit-image only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .stain import correct_cast

WORK_SIDE = 100  # the shorter side of the subsample the localiser works on
MIN_SCORE = 25  # blue minus green below this is never nucleus, whatever Otsu says (an empty field)
MIN_AREA = 0.003  # smallest nucleus, as a fraction of the subsample: platelets and debris are smaller
BLACK = 20  # a masked-out background: no channel above this (a JPEG's noise included)
BACKGROUND = (229, 216, 202)  # a plain slide: between PBC's (255, 228, 203) and BCCD's (203, 205, 200) background colours
PAINTED_SHARE = 0.05  # a window with this share of painted background shows a painted cell (see cell_window)


@dataclass(frozen=True)
class Cell:
    """A located white cell in image pixels: centre (y, x), estimated diameter and nucleus box."""

    y: float
    x: float
    diameter: float
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the nucleus, exclusive end
    area: int = 0  # nucleus pixels, in image pixels
    edge: bool = False  # the nucleus touches the image border: the cell is cut


def nucleus_mask(rgb: np.ndarray, work_side: int = WORK_SIDE) -> tuple[np.ndarray, int]:
    """The nucleus mask of a subsample of ``rgb`` (shorter side about ``work_side``) and the subsampling step."""
    h, w = rgb.shape[:2]
    step = max(1, min(h, w) // work_side)
    small = rgb[::step, ::step]
    score = small[..., 2].astype(np.int16) - small[..., 1].astype(np.int16)
    mask = score > max(otsu(score), MIN_SCORE)
    return _close(mask) | mask, step


def otsu(values: np.ndarray) -> int:
    """Otsu's threshold of an integer array: ``skimage.filters.threshold_otsu``'s result (one bin per
    value, the same sums in the same order; tested equal), without its checks and conversions,
    which cost more than the sums on the localiser's 100 px subsample. A constant array gives its value."""
    low, high = int(values.min()), int(values.max())
    if low == high:
        return low
    counts = np.bincount((values.ravel().astype(np.int64) - low), minlength=high - low + 1).astype(np.float32)
    centres = np.arange(low, high + 1)
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    mean1 = np.cumsum(counts * centres) / weight1
    mean2 = (np.cumsum((counts * centres)[::-1]) / weight2[::-1])[::-1]
    variance = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return int(centres[np.argmax(variance)])


_DIAMOND = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if abs(dy) + abs(dx) <= 2]


def _close(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_closing(mask, iterations=2, border_value=0)``: dilation then erosion by the cross,
    twice each, i.e. by the radius-2 diamond, with nothing outside the image. Written as shifted ORs
    and ANDs, 3x faster than scipy's iterated passes on the localiser's subsample (identical, tested)."""
    h, w = mask.shape
    grown = np.zeros((h + 4, w + 4), bool)
    for dy, dx in _DIAMOND:
        grown[2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w] |= mask
    grown = grown[2 : 2 + h, 2 : 2 + w]
    padded = np.zeros((h + 4, w + 4), bool)  # outside the image counts as background: the border erodes
    padded[2 : 2 + h, 2 : 2 + w] = grown
    closed = np.ones((h, w), bool)
    for dy, dx in _DIAMOND:
        closed &= padded[2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]
    return closed


def split_touching(region: np.ndarray, min_peak: float | None = None) -> np.ndarray:
    """Labels of ``region`` (bool) split into cells by a watershed on its distance transform.

    Seeds are distance peaks at least one peak radius apart and at least ``min_peak`` high
    (default: 0.55 of the radius of a disk of the region's area). Two touching round nuclei of
    radius r make a region of equivalent radius 1.41r with two peaks of height r (0.71): split. A
    neutrophil's lobes, a third as thick as the nucleus is wide, peak near 0.4: kept whole.
    One cell: all ones.
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    distance = ndimage.distance_transform_edt(region)
    top = float(distance.max())
    if top < 2:
        return region.astype(np.int32)
    min_peak = 0.55 * np.sqrt(region.sum() / np.pi) if min_peak is None else min_peak
    peaks = peak_local_max(distance, min_distance=max(2, int(top)), threshold_abs=min_peak, labels=region.astype(np.int32),
                           exclude_border=False)
    if len(peaks) < 2:
        return region.astype(np.int32)
    markers = np.zeros(region.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=region)


def find_cell(rgb: np.ndarray) -> Cell | None:
    """The white cell of ``rgb`` (H, W, 3 uint8): the nucleus region that is large and central, or None.

    A nucleus too small for the coarse subsample (a field whose white cell spans under about a tenth
    of its side: a camera at low magnification) is looked for as ``count`` finds cells (``small_cell``)."""
    mask, step = nucleus_mask(rgb)
    labels, count = ndimage.label(mask)
    if count == 0:
        return small_cell(rgb)
    best, area = _most_central(labels, (0, 0), mask.shape, whole=True)
    if area < MIN_AREA * mask.size:
        return small_cell(rgb)
    sl = ndimage.find_objects(labels, max_label=best)[best - 1]
    region = labels[sl] == best
    if _elongated(region):  # two touching nuclei: keep the larger, more central one
        parts = split_touching(region)
        if parts.max() > 1:
            region = parts == _most_central(parts, (sl[0].start, sl[1].start), mask.shape)[0]
    return _describe(region, sl, step, mask.shape)


CUT_WEIGHT = 0.2  # a nucleus cut by the image border and far (FAR) from its centre counts this much ...
FAR = 0.2  # ... (distances from the centre as a share of the image's sides: ~0.7 in a corner) ...
CENTRAL = 0.15  # ... when a whole nucleus lies this near the centre: a tile's subject, not its cut-off neighbour


def _most_central(labels: np.ndarray, offset: tuple[int, int], shape: tuple[int, int], whole: bool = False) -> tuple[int, int]:
    """(label, area) of the region of ``labels`` (1..n) that is large and central in an image of
    ``shape`` (``labels`` sits at ``offset`` in it): area x (1 - 0.6 x distance from the centre,
    0 at the centre and ~0.7 in a corner). Over a ``whole`` image, a nucleus cut by the border far from
    the centre counts a fifth when a whole one lies at the centre: in a tile centred on its cell a
    larger neighbour cut by the edge otherwise won (4 of PBC's 1,030 validation tiles), while in a
    field whose only white cell sits at the edge nothing lies whole at the centre to prefer."""
    flat = labels.ravel()
    inside = np.flatnonzero(flat)  # the labelled pixels, in order: the same sums as over every pixel, on a fraction of them
    flat = flat[inside]
    count = int(flat.max())
    areas = np.bincount(flat, minlength=count + 1)[1:]
    ys, xs = _coordinates(labels.shape)
    sums = np.stack([np.bincount(flat, weights=ys[inside], minlength=count + 1)[1:],
                     np.bincount(flat, weights=xs[inside], minlength=count + 1)[1:]], axis=1)
    centres = sums / np.maximum(areas, 1)[:, None] + offset
    side = np.array(shape, dtype=float)
    distance = np.linalg.norm((centres - side / 2) / side, axis=1)
    score = areas * (1.0 - 0.6 * distance)
    if whole:  # the regions of the whole image, not the parts of one region
        rim = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        cut = np.zeros(count, bool)
        cut[np.unique(rim[rim > 0]) - 1] = True
        if np.any(~cut & (distance < CENTRAL) & (areas >= MIN_AREA * labels.size)):
            score[cut & (distance > FAR)] *= CUT_WEIGHT
    best = int(np.argmax(score))
    return best + 1, int(areas[best])


@functools.lru_cache(maxsize=64)
def _coordinates(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of every pixel, flattened, as weights for np.bincount (kept: the shapes repeat)."""
    ys, xs = np.indices(shape)
    ys, xs = ys.ravel().astype(float), xs.ravel().astype(float)
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


def _describe(region: np.ndarray, sl: tuple[slice, slice], step: int, shape: tuple[int, int]) -> Cell:
    """A Cell in image pixels from a region of the subsample (``sl`` places it)."""
    ys, xs = np.nonzero(region)
    ys, xs = ys + sl[0].start, xs + sl[1].start
    extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    diameter = max(extent, 2 * np.sqrt(len(ys) / np.pi)) * step
    box = (int(xs.min() * step), int(ys.min() * step), int((xs.max() + 1) * step), int((ys.max() + 1) * step))
    edge = bool(ys.min() == 0 or xs.min() == 0 or ys.max() == shape[0] - 1 or xs.max() == shape[1] - 1)
    return Cell(float((ys.mean() + 0.5) * step), float((xs.mean() + 0.5) * step), float(diameter), box, int(len(ys) * step * step), edge)


FIELD_SIDE = 200  # counting works on a finer subsample than one cell needs: a field holds many, smaller cells
MIN_FIELD_AREA = 0.0005  # a white-cell nucleus covers at least this fraction of a field (platelets: less)
MIN_RELATIVE_AREA = 0.15  # ... and at least this fraction of the field's largest nucleus


def find_cells(rgb: np.ndarray) -> list[Cell]:
    """Every white cell of a smear field, touching nuclei split into cells, in reading order.

    Each nucleus region (small gaps closed, holes filled) is split where it holds two or more
    round nuclei (``split_touching``).
    """
    mask, step = nucleus_mask(rgb, FIELD_SIDE)
    labels, count = ndimage.label(mask)
    if count == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = np.flatnonzero((areas >= MIN_FIELD_AREA * mask.size) & (areas >= MIN_RELATIVE_AREA * areas.max()))
    regions = [(sl, ndimage.binary_fill_holes(labels[sl] == index + 1)) for index, sl in enumerate(ndimage.find_objects(labels))
               if index in keep]
    if not regions:  # only specks: no nucleus large enough
        return []
    typical = float(np.median([np.sqrt(region.sum() / np.pi) for _, region in regions]))  # a typical nucleus radius
    cells = []
    for sl, region in regions:
        oversized = np.sqrt(region.sum() / np.pi) > 1.6 * typical  # a clump of touching nuclei: seeds a typical radius high
        parts = split_touching(region, 0.6 * typical if oversized else None)
        for part in range(1, int(parts.max()) + 1):
            cells.append(_describe(parts == part, sl, step, mask.shape))
    return sorted(cells, key=lambda c: (round(c.y / max(c.diameter, 1)), c.x))


def small_cell(rgb: np.ndarray) -> Cell | None:
    """The largest of the white cells ``find_cells`` sees on its finer subsample, preferring one not cut
    by the border; None if it sees none. Only for images where the coarse search found no nucleus:
    none of the 9,971 images of PBC, BCCD, ALL-IDB2, C-NMC and Aria is one, so no bundled model's view changes."""
    cells = find_cells(rgb)
    if not cells:
        return None
    return max(cells, key=lambda c: (not c.edge, c.area))


def _elongated(region: np.ndarray) -> bool:
    """Much longer than its area implies: two round nuclei side by side give 1.41, one gives ~1.1."""
    h, w = region.shape
    return max(h, w) > 1.35 * 2 * np.sqrt(region.sum() / np.pi)


def cell_window(rgb: np.ndarray, size: int, fill: float, context: float = 1.0, cast: tuple[float, ...] | None = None
                ) -> tuple[np.ndarray, bool, bool]:
    """A ``size`` x ``size`` window centred on the cell, whose nucleus spans ``fill`` of the window,
    whether a cell was found (if not: the whole image's central square), and whether the window was
    recoloured: painted background makes up PAINTED_SHARE or more of it (black, painted over: see
    below; a black vignette far from the cell does not count), or a colour cast was corrected.

    ``context`` > 1 widens the window by that factor around the same centre (training decodes the
    surroundings, which augmentation may rotate or shift into view). Outside the image the window
    is filled with the image's median border colour. A cell segmented onto black (as in C-NMC) is
    first put on a plain background (``fill_masked_background``); then a colour cast well outside
    the training range ``cast`` is corrected (``stain.correct_cast``), before the cell is located.
    """
    rgb, mask, recoloured = as_slide(rgb, cast)
    cell = find_cell(rgb)
    h, w = rgb.shape[:2]
    if cell is None:
        side, cy, cx = min(h, w) * context, h / 2, w / 2
    else:
        side, cy, cx = cell.diameter / fill * context, cell.y, cell.x
    if mask is not None and not recoloured:  # the window's share of painted pixels, within the image (padding is not painted)
        half = side / context / 2
        inside = mask[max(0, int(cy - half)) : max(0, int(np.ceil(cy + half))), max(0, int(cx - half)) : max(0, int(np.ceil(cx + half)))]
        recoloured = inside.sum() >= PAINTED_SHARE * (2 * half) ** 2
    return crop_square(rgb, cy, cx, side, size), cell is not None, bool(recoloured)


def as_slide(rgb: np.ndarray, cast: tuple[float, ...] | None) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """``rgb`` as a cell-centric model looks for cells in it: a black background painted
    (``fill_masked_background``), then a yellow cast outside the training range ``cast`` corrected
    (``stain.correct_cast``). Returns that image, the painted mask (None: nothing painted) and
    whether the cast was corrected. Shared by ``cell_window`` and ``counting.count_image``."""
    mask = masked_background(rgb)
    painted = _paint(rgb, mask)
    corrected = correct_cast(painted, cast)
    return corrected, mask, corrected is not painted


def fill_masked_background(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` with a black background painted over in a plain slide colour (BACKGROUND), or ``rgb``
    itself when at least half of its border is not black (no smear image of PBC, BCCD, ALL-IDB2 or Aria).

    Segmented cells are often saved on black. No lab's slide is black, so a cell-centric model reads
    a cell on black as nothing it knows: `wbc` called all 15 of C-NMC's B-lymphoid cells
    `erythroblast`, and 13 of them `lymphocyte` on this background (docs/benchmarks.md). Only the
    black regions that touch the border are painted: dark pixels inside the cell stay as they are.
    """
    return _paint(rgb, masked_background(rgb))


def _paint(rgb: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return rgb if mask is None else np.where(mask[..., None], np.array(BACKGROUND, np.uint8), rgb)


def masked_background(rgb: np.ndarray) -> np.ndarray | None:
    """The (H, W) mask of the black regions touching the border that ``fill_masked_background``
    paints, or None when at least half of the border is not black."""
    step = max(1, min(rgb.shape[:2]) // 64)  # 256+ border pixels decide; every image pays this check
    border = np.concatenate([rgb[0, ::step], rgb[-1, ::step], rgb[::step, 0], rgb[::step, -1]])
    if (border.max(1) <= BLACK).mean() < 0.5:
        return None
    labels, count = ndimage.label(np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) <= BLACK)
    outside = np.zeros(count + 1, bool)
    outside[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    outside[0] = False
    return outside[labels]


def crop_square(rgb: np.ndarray, cy: float, cx: float, side: float, size: int) -> np.ndarray:
    """The square of ``side`` pixels centred at (cy, cx), resized to ``size`` (bilinear, antialiased).
    Outside the image the square is filled with the median colour of the image's border."""
    h, w = rgb.shape[:2]
    side = max(2.0, side)
    x0, y0 = cx - side / 2, cy - side / 2
    ix0, iy0, ix1, iy1 = int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x0 + side)), int(np.ceil(y0 + side))
    pad = max(-ix0, -iy0, ix1 - w, iy1 - h, 0)
    if not pad:
        return resize_box(rgb, (x0, y0, x0 + side, y0 + side), size)
    # the image padded by ``pad`` on every side, built only where the filter reads it
    x0, y0 = x0 + pad, y0 + pad
    box = _float32((x0, y0, x0 + side, y0 + side))  # in the padded image's frame, as resize_box rounds it
    left, top, right, bottom = _reach(box, size, (h + 2 * pad, w + 2 * pad))
    part = np.empty((bottom - top, right - left, 3), np.uint8)
    part[:] = np.median(np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]), axis=0).astype(np.uint8)
    (sy0, sy1), (sx0, sx1) = (max(top, pad), min(bottom, pad + h)), (max(left, pad), min(right, pad + w))  # the image's share
    if sy1 > sy0 and sx1 > sx0:
        part[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = rgb[sy0 - pad : sy1 - pad, sx0 - pad : sx1 - pad]
    return resize_box(part, (box[0] - left, box[1] - top, box[2] - left, box[3] - top), size)


def resize_box(rgb: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The ``box`` (x0, y0, x1, y1, inside ``rgb``) of ``rgb`` resized to ``size`` x ``size`` with PIL's
    antialiased bilinear filter: the one resampling step of every view (central crops and cell windows).

    Only the pixels the filter reads go to PIL: converting a whole 640x480 field to PIL's layout
    cost more than resizing the window. The box is rounded to float32 first, as PIL does, so that
    moving its origin by whole pixels keeps its coefficients (tested against resizing the whole
    image: equal but for +-1 levels where PIL's rounding ties break the other way, in ~0.3% of windows).
    """
    from PIL import Image

    box32 = _float32(box)
    left, top, right, bottom = _reach(box32, size, rgb.shape[:2])
    local = (box32[0] - left, box32[1] - top, box32[2] - left, box32[3] - top)
    return np.asarray(Image.fromarray(rgb[top:bottom, left:right]).resize((size, size), Image.BILINEAR, box=local, reducing_gap=None))


def _float32(box: tuple[float, ...]) -> list[float]:
    return [float(np.float32(v)) for v in box]


def _reach(box: tuple[float, ...] | list[float], size: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The pixels (left, top, right, bottom) that bilinear resampling of ``box`` to ``size`` reads, with a
    margin: the filter's support is the box-to-output scale (at least 1) on each side."""
    reach = max(1.0, (box[2] - box[0]) / size, (box[3] - box[1]) / size) + 2
    return (max(0, int(box[0] - reach)), max(0, int(box[1] - reach)),
            min(shape[1], int(box[2] + reach) + 1), min(shape[0], int(box[3] + reach) + 1))
