"""Colour normalisation in optical density (Beer-Lambert space), on the window the model sees.

By Beer-Lambert, a lamp or camera with another colour balance shifts each channel's optical
density ``-log(I)`` by a constant, and a heavier or lighter stain scales it. Two normalisations:

- ``white``: subtract the OD of the window's brightest pixels (the smear background) per
  channel, so that the background is white whatever the lamp and camera: a lab's colour cast is
  removed while stained structures keep their colours relative to the background. Windows
  without a bright background (C-NMC's segmented cells on black) are left as they are.
- ``reinhard``: map each window's per-channel OD mean and standard deviation onto fixed targets
  (the training images' average; Reinhard et al. 2001 in OD space). Its statistics depend on the
  window's content (an eosinophil's red granules move the mean), so it also removes some of
  what tells cell types apart.

Both work as uint8 in and out, so previews show exactly what the model saw. Bottom layer: numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_LEVELS = np.arange(256, dtype=np.float32)
_OD = -np.log((_LEVELS + 1.0) / 256.0)  # uint8 -> optical density, 0 for white, ~5.5 for black
_OD64 = _OD.astype(np.float64)
MIN_STD = 0.02  # an almost flat image is not stretched into noise
MODES = ("none", "white", "reinhard")


def apply(rgb: np.ndarray, mode: str, target: tuple[float, ...] | None = None) -> np.ndarray:
    """``rgb`` normalised by ``mode`` (see the module docstring); ``reinhard`` needs its ``target``."""
    if mode == "none":
        return rgb
    if mode == "white":
        return white_balance(rgb)
    if mode == "reinhard":
        if target is None:
            raise ValueError("reinhard colour normalisation needs a target (6 OD statistics)")
        return normalise(rgb, target)
    raise ValueError(f"unknown colour normalisation {mode!r}; choose from {', '.join(MODES)}")


def od_stats(rgb: np.ndarray) -> np.ndarray:
    """Per-channel OD mean and standard deviation of an (H, W, 3) uint8 image: 6 values. From each
    channel's histogram: 10x faster than looking up every pixel's optical density."""
    flat = rgb.reshape(-1, 3)
    counts = np.stack([np.bincount(flat[:, c], minlength=256) for c in range(3)]) / max(len(flat), 1)  # (3, 256)
    mean = counts @ _OD64
    return np.concatenate([mean, np.sqrt(np.maximum(counts @ _OD64**2 - mean**2, 0.0))])


def fit_target(images: Iterable[np.ndarray]) -> tuple[float, ...]:
    """The target OD statistics: the mean of the images' own statistics."""
    stats = np.array([od_stats(image) for image in images])
    if len(stats) == 0:
        raise ValueError("no images to fit the colour target on")
    return tuple(round(float(v), 5) for v in stats.mean(0))


def normalise(rgb: np.ndarray, target: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """``rgb`` (H, W, 3 uint8) with each channel's OD mean and std mapped onto ``target``.

    A lookup table per channel (256 entries) keeps it at about a pixel pass; returns uint8.
    """
    target = np.asarray(target, dtype=np.float32)
    stats = od_stats(rgb)
    mean, std = stats[:3], np.maximum(stats[3:], MIN_STD)
    od = (_OD[:, None] - mean) / std * target[3:] + target[:3]  # (256, 3): each level's new OD per channel
    return _apply_tables(rgb, _levels(od))


def _levels(od: np.ndarray) -> np.ndarray:
    """Optical densities back to uint8 levels (the inverse of ``_OD``, rounded and clipped)."""
    return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def _apply_tables(rgb: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``rgb`` (H, W, 3 uint8) with each channel's levels looked up in its column of ``table`` (256, 3 uint8)."""
    out = np.empty_like(rgb)
    for c in range(3):
        np.take(table[:, c], rgb[..., c], out=out[..., c])
    return out


COLOURLESS_CHROMA = 16  # see colourless: every stained image in ../shared/data reaches 45 or more


def colourless(rgb: np.ndarray) -> bool:
    """Whether ``rgb`` has no colour to read: fewer than 1% of its pixels (on a grid of about 48 across
    the shorter side) reach a chroma (max - min of R, G, B) of COLOURLESS_CHROMA levels. A grayscale image
    (a monochrome camera, a converted file) has 0 to a few levels of JPEG noise; in stained images the 99th
    percentile of chroma is 45 to 130 (PBC, BCCD, ALL-IDB2, Aria, C-NMC, on black too). The colour of a
    stain is what the models read, so such an image is out of domain for a model that never trained on
    one (see images.frame). 0.015 ms for a 360 px tile."""
    step = max(1, round(min(rgb.shape[:2]) / 48))
    sample = rgb[::step, ::step]
    r, g, b = sample[..., 0], sample[..., 1], sample[..., 2]
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)  # in uint8: max >= min, nothing wraps
    return bool(np.count_nonzero(chroma >= COLOURLESS_CHROMA) < 0.01 * chroma.size)


BACKGROUND_SHARE = 0.1  # the brightest tenth of a window's pixels: smear background (or plasma) in any stained field
MAX_BACKGROUND_OD = 1.2  # brighter than this (summed over channels) or there is no background to balance on


def white_balance(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` with the lamp's colour cast removed: the optical density of the brightest pixels
    (the background) is subtracted per channel, so the background becomes white whatever the lamp,
    camera white balance or slide thickness; stained structures keep their colour relative to it."""
    od = _OD[rgb.reshape(-1, 3)]
    total = od.sum(1)
    background = od[total <= np.quantile(total, BACKGROUND_SHARE)].mean(0)
    if background.sum() > MAX_BACKGROUND_OD:
        return rgb
    shifted = _OD[:, None] - background  # (256, 3): each level's OD after the shift, per channel
    return _apply_tables(rgb, _levels(np.maximum(shifted, 0)))


CAST_MARGIN = 0.06  # how far below the training range a background's blue share must lie to be corrected
CAST_QUANTILES = (0.5, 99.5)  # the range: these percentiles of the training images' background chromaticity


def background_chroma(rgb: np.ndarray) -> np.ndarray:
    """The colour of the slide's background (the mean of the brightest tenth of a sample of about
    1,000 pixels) as its channels' shares of their mean: (1, 1, 1) is grey, whatever the brightness."""
    step = max(1, min(rgb.shape[:2]) // 32)
    sample = rgb[::step, ::step].reshape(-1, 3).astype(np.int32)
    total = sample.sum(1)
    k = int(len(total) * (1 - BACKGROUND_SHARE))
    bright = sample[total >= np.partition(total, k)[k]]
    background = bright.mean(0) + 1.0
    return background / background.mean()


def fit_cast_range(images: Iterable[np.ndarray]) -> tuple[float, ...]:
    """(low R, G, B, high R, G, B): the CAST_QUANTILES of the images' background chromaticities."""
    chroma = np.array([background_chroma(image) for image in images])
    low, high = np.percentile(chroma, CAST_QUANTILES, axis=0)
    return tuple(round(float(v), 4) for v in (*low, *high))


def correct_cast(rgb: np.ndarray, cast_range: tuple[float, ...] | None) -> np.ndarray:
    """``rgb`` with a yellow cast corrected where its background's blue share lies more than
    CAST_MARGIN below ``cast_range`` (see ``fit_cast_range``); else ``rgb`` itself.

    Why: a lamp's colour temperature or a camera's white balance scales each channel, and a warm
    (yellow) cast is the shift `wbc`'s colour jitter covers least: on PBC's validation images under
    synthetic casts it kept 79-92% under yellow ones and 92-97% under blue and magenta ones, which
    correcting as well made worse (docs/benchmarks.md, "Colour casts"). Per-channel gains
    (a white-balance error is a gain, not an optical-density shift) move the background to the
    nearest colour inside the training range, keeping its brightness. The margin leaves every image
    of the labs in ../shared/data as it is.
    """
    if cast_range is None:
        return rgb
    chroma = background_chroma(rgb)
    if chroma[2] >= cast_range[2] - CAST_MARGIN:
        return rgb
    target = np.clip(chroma, cast_range[:3], cast_range[3:])
    gains = target / chroma
    gains *= chroma.sum() / (gains * chroma).sum()  # the background keeps its brightness
    return _apply_tables(rgb, np.clip(np.rint(_LEVELS[:, None] * gains), 0, 255).astype(np.uint8))
