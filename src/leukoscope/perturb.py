"""Image perturbations that imitate another lab: stain, colour balance, scale, focus, compression.

Used to test that a model is robust to acquisition differences rather than fitted to one
dataset's look (``benchmarks/robustness.py``, ``tests/test_robustness.py``). Each function maps
an RGB uint8 array (H, W, 3) to another of the same shape.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter
from skimage.color import hed2rgb, rgb2hed


def stain(image: np.ndarray, h: float = 1.0, e: float = 1.0) -> np.ndarray:
    """Scale the haematoxylin and eosin optical densities (colour deconvolution, Ruifrok-Johnston)."""
    hed = rgb2hed(image)
    hed[..., 0] *= h
    hed[..., 1] *= e
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)


def white_balance(image: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    return np.clip(image.astype(np.float32) * np.asarray(gains, np.float32), 0, 255).round().astype(np.uint8)


def hue_shift(image: np.ndarray, shift: float) -> np.ndarray:
    hsv = np.asarray(Image.fromarray(image).convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(int) + int(round(shift * 255))) % 256
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def gamma(image: np.ndarray, value: float) -> np.ndarray:
    return (255 * (image / 255.0) ** value).round().astype(np.uint8)


def zoom(image: np.ndarray, factor: float) -> np.ndarray:
    """Magnify (factor > 1, centre crop) or shrink (factor < 1, edge padding) around the centre."""
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    if factor >= 1:
        cw, ch = round(w / factor), round(h / factor)
        left, top = (w - cw) // 2, (h - ch) // 2
        return np.asarray(pil.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch)))
    small = np.asarray(pil.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BILINEAR))
    pad_y, pad_x = h - small.shape[0], w - small.shape[1]
    return np.pad(small, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)), mode="edge")


def blur(image: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: x,
    "stain: haematoxylin x1.3": lambda x: stain(x, h=1.3),
    "stain: eosin x0.6, haematoxylin x0.8": lambda x: stain(x, h=0.8, e=0.6),
    "white balance (1.1, 1.0, 0.85)": lambda x: white_balance(x, (1.1, 1.0, 0.85)),
    "white balance (0.9, 1.0, 1.1)": lambda x: white_balance(x, (0.9, 1.0, 1.1)),
    "hue +0.04": lambda x: hue_shift(x, 0.04),
    "gamma 0.8 (brighter)": lambda x: gamma(x, 0.8),
    "gamma 1.25 (darker)": lambda x: gamma(x, 1.25),
    "zoom x1.25": lambda x: zoom(x, 1.25),
    "zoom x0.8": lambda x: zoom(x, 0.8),
    "defocus blur r=1.5": lambda x: blur(x, 1.5),
    "JPEG quality 30": lambda x: jpeg(x, 30),
}
