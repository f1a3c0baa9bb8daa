"""Out-of-distribution alarm: how unlike the training images an image is (Lee et al. 2018).

The score adds two Mahalanobis distances to the training images, each under a covariance with
Ledoit-Wolf shrinkage (scikit-learn) and divided by its median over the validation images:

- **content**: the network's pooled features to the nearest class mean (shared covariance), as in
  Lee et al. It notices cells unlike any class, but a network trained with strong colour jitter
  has learnt to ignore a lab's colour there: `wbc`'s content score told ALL-IDB2's normal cells
  from PBC's validation images at AUROC 0.925 only.
- **style**: the channel means and standard deviations of the early feature maps (the ends of
  the first two stages of a CellNet, ``style_taps``; the statistics AdaIN and MixStyle treat as an
  image's style) to their training mean. They carry the stain and the camera, and told every
  other lab here from PBC at AUROC 1.000 (docs/benchmarks.md, "Another lab"). The stem's map was
  left out: it flagged more of PBC's own tiles under small colour changes and cost a third of the
  int8 network's time. Models without taps (other architectures, alarms fitted before) have the
  content score alone, undivided.

The threshold is the 95th percentile of the validation images' scores, so 95% of in-domain
images fall below it. The score is computed inside the network (``WithOOD``), as one extra output
column, so every backend (PyTorch, ONNX Runtime) and every test-time view gets it from the same
forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

IN_DOMAIN_QUANTILE = 95.0


def style_vector(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each map's channel means and standard deviations over space, concatenated: (N, 2 x channels)."""
    parts = []
    for h in maps:
        mean = h.mean((2, 3))
        centred = h - mean[:, :, None, None]
        parts += [mean, (centred * centred).mean((2, 3)).sqrt()]  # a product, not a power: ONNX Runtime's Pow is slow
    return torch.cat(parts, 1)


def features_and_style(model: nn.Module, x: torch.Tensor, taps: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pooled features and, where ``taps`` names layers of ``model.features``, their style vector."""
    if not taps:
        return model.forward_features(x), None
    maps = []
    for i, layer in enumerate(model.features):
        x = layer(x)
        if i in taps:
            maps.append(x)
    return model.pool(x).flatten(1), style_vector(maps)


class WithOOD(nn.Module):
    """A CellNet-like network (``forward_features`` + ``classifier``) returning logits and, as one more
    column, its OOD score: the squared Mahalanobis distance of its pooled features to the nearest class
    mean, plus that of its style vector to the training images' (each scaled, see the module's doc)."""

    def __init__(self, model: nn.Module, ood: dict[str, Any]):
        super().__init__()
        self.model = model
        chol = torch.as_tensor(ood["chol"], dtype=torch.float32)  # precision = chol @ chol.T
        self.register_buffer("chol", chol)
        self.register_buffer("centres", torch.as_tensor(ood["means"], dtype=torch.float32) @ chol)
        style = ood.get("style")
        self.taps: tuple[int, ...] = tuple(style["taps"]) if style else ()
        if style:
            style_chol = torch.as_tensor(style["chol"], dtype=torch.float32)
            self.register_buffer("style_chol", style_chol)
            self.register_buffer("style_centre", torch.as_tensor(style["mean"], dtype=torch.float32) @ style_chol)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, style = features_and_style(self.model, x, self.taps)
        logits = self.model.classifier(features)
        whitened = features @ self.chol
        distance = (whitened[:, None, :] - self.centres[None]).pow(2).sum(-1).min(dim=1).values
        if style is not None:  # summed by a reduction, not an addition, which the int8 graph would quantise
            style_distance = (style @ self.style_chol - self.style_centre).pow(2).sum(-1)
            distance = torch.stack([distance, style_distance], 1).sum(1)
        return torch.cat([logits, distance[:, None]], dim=1)


def supports_ood(model: nn.Module) -> bool:
    return hasattr(model, "forward_features") and isinstance(getattr(model, "classifier", None), nn.Linear)


@torch.inference_mode()
def features_of(model: nn.Module, images: torch.Tensor, mean, std, taps: Sequence[int] = (), batch_size: int = 256
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """The pooled features of uint8 ``images`` and, with ``taps``, their style vectors (float64)."""
    from .transforms import eval_transform

    model.eval()
    chunks = [features_and_style(model, eval_transform(images[i : i + batch_size], mean, std), taps) for i in range(0, len(images), batch_size)]
    if not chunks:
        return np.zeros((0, 0)), None
    features = torch.cat([f for f, _ in chunks]).double().numpy()
    return features, torch.cat([s for _, s in chunks]).double().numpy() if taps else None


def _precision_factor(residuals: np.ndarray) -> np.ndarray:
    """The Cholesky factor of the Ledoit-Wolf precision of ``residuals`` (rows: samples)."""
    from sklearn.covariance import LedoitWolf

    fitted = LedoitWolf().fit(residuals)
    try:
        return np.linalg.cholesky((fitted.precision_ + fitted.precision_.T) / 2)
    except np.linalg.LinAlgError:  # no spread (one image per class): a ridge makes the covariance invertible
        ridge = 1e-3 * max(float(np.trace(fitted.covariance_)) / residuals.shape[1], 1.0)
        precision = np.linalg.inv(fitted.covariance_ + ridge * np.eye(residuals.shape[1]))
        return np.linalg.cholesky((precision + precision.T) / 2)


def _squared_distances(x: np.ndarray, centres: np.ndarray, chol: np.ndarray) -> np.ndarray:
    """Each row's squared Mahalanobis distance (precision = chol @ chol.T) to the nearest of ``centres``."""
    whitened, centres = x @ chol, centres @ chol
    return ((whitened[:, None, :] - centres[None]) ** 2).sum(-1).min(1)


def _median_scaled(chol: np.ndarray, distances: np.ndarray) -> tuple[torch.Tensor, float]:
    """``chol`` scaled so that the median of ``distances`` (squared, under ``chol``) becomes 1, and that median."""
    median = max(float(np.median(distances)), 1e-12)
    return torch.tensor(chol / np.sqrt(median), dtype=torch.float32), median


def fit_ood(model: nn.Module, train_images: torch.Tensor, train_labels: np.ndarray, val_images: torch.Tensor, mean, std) -> dict[str, Any]:
    """Class means and the Cholesky factor of the shared precision of the pooled features, and (for a
    model with ``style_taps``) the mean and precision factor of the style vectors, from the training
    images; each part's scale and the in-domain threshold from the validation images (the scores
    ``WithOOD`` gives, computed here from the same features, in float64)."""
    taps = tuple(getattr(model, "style_taps", ()))
    features, style = features_of(model, train_images, mean, std, taps)
    classes = np.unique(train_labels)
    means = np.zeros((int(train_labels.max()) + 1, features.shape[1]))
    for c in classes:
        means[c] = features[train_labels == c].mean(0)
    chol = _precision_factor(features - means[train_labels])
    reference = val_images if len(val_images) else train_images
    ref_features, ref_style = features_of(model, reference, mean, std, taps)
    scores = _squared_distances(ref_features, means[classes], chol)
    ood: dict[str, Any] = {"means": torch.tensor(means[classes], dtype=torch.float32), "chol": torch.tensor(chol, dtype=torch.float32)}
    if style is not None:
        style_mean = style.mean(0)
        style_chol = _precision_factor(style - style_mean)
        style_scores = _squared_distances(ref_style, style_mean[None], style_chol)
        ood["chol"], content_median = _median_scaled(chol, scores)
        scaled_style_chol, style_median = _median_scaled(style_chol, style_scores)
        ood["style"] = {"taps": list(taps), "mean": torch.tensor(style_mean, dtype=torch.float32), "chol": scaled_style_chol}
        scores = scores / content_median + style_scores / style_median
    ood["threshold"] = float(np.percentile(scores, IN_DOMAIN_QUANTILE))
    return ood
