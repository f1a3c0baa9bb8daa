"""Temperature scaling (Guo et al. 2017), fitted on validation logits after training.

The temperature is bounded: on a small or perfectly separated validation split the likelihood
keeps improving as T shrinks, and an unbounded fit sharpened every probability 20-fold on 24
images. Below ``MIN_IMAGES`` validation images the fit is not trusted at all (T = 1).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

T_MIN, T_MAX = 0.25, 10.0
MIN_IMAGES = 20  # fewer validation images: keep T = 1
FEW_IMAGES = 50  # fewer: fit, but warn that the temperature is uncertain


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, min_images: int = MIN_IMAGES) -> float:
    """The temperature in [T_MIN, T_MAX] minimising the NLL of softmax(logits / T); 1.0 on too little data.

    The NLL is convex in 1/T, so a bounded scalar search finds the global optimum.
    """
    if len(logits) < min_images:
        return 1.0
    logits, labels = logits.double(), labels.long()

    def nll(inverse_t: float) -> float:
        return F.cross_entropy(logits * inverse_t, labels).item()

    result = minimize_scalar(nll, bounds=(1 / T_MAX, 1 / T_MIN), method="bounded", options={"xatol": 1e-5})
    temperature = float(np.clip(1 / result.x, T_MIN, T_MAX))
    # At the lower bound the likelihood still wanted sharper probabilities: validation is (nearly)
    # perfectly separated and says nothing about calibration, so no sharpening is applied.
    return 1.0 if np.isclose(temperature, T_MIN, rtol=1e-3) else temperature


def temperature_warning(n_images: int, temperature: float, separated: bool = False) -> str | None:
    """A warning to show beside a fitted temperature, or None when it can be trusted.

    ``separated``: the fit wanted to sharpen beyond T_MIN and fell back to T = 1.
    """
    if n_images < MIN_IMAGES:
        return f"only {n_images} validation image{'s' if n_images != 1 else ''}: temperature not fitted (T = 1, probabilities uncalibrated)"
    if separated:
        return (f"the validation split ({n_images} images) is separated perfectly, so it cannot calibrate the model: T = 1 "
                "(probabilities as trained, uncalibrated)")
    if np.isclose(temperature, T_MAX, rtol=1e-3):
        return (f"temperature T = {temperature:.2f} stopped at its bound {T_MAX}: the validation split ({n_images} images) "
                "cannot calibrate this model well")
    if n_images < FEW_IMAGES:
        return f"temperature T = {temperature:.2f} fitted on only {n_images} validation images: calibration is uncertain"
    return None
