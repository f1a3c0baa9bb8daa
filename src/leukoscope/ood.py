"""Out-of-distribution alarm: how unlike the training images an image is (Lee et al. 2018).

The score is the Mahalanobis distance of the network's pooled features to the nearest class mean
of the training images, under their shared covariance (Ledoit-Wolf shrinkage, scikit-learn). The
threshold is the 95th percentile of the validation images' scores, so 95% of in-domain images
fall below it. Measured with the bundled `pbc` model: AUROC 0.988 between its test images and
another lab's (`bccd_wbc`), and 0.999 against ALL-IDB2 cells, where the softmax-energy score gave
0.846 and 0.863 (docs/benchmarks.md, "Another lab").

The distance is computed inside the network (``WithOOD``), as one extra output column, so every
backend (PyTorch, ONNX Runtime) and every test-time view gets it from the same forward pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

IN_DOMAIN_QUANTILE = 95.0


class WithOOD(nn.Module):
    """A CellNet-like network (``forward_features`` + ``classifier``) returning logits and, as one more
    column, the squared Mahalanobis distance of its pooled features to the nearest class mean."""

    def __init__(self, model: nn.Module, ood: dict[str, Any]):
        super().__init__()
        self.model = model
        chol = torch.as_tensor(ood["chol"], dtype=torch.float32)  # precision = chol @ chol.T
        self.register_buffer("chol", chol)
        self.register_buffer("centres", torch.as_tensor(ood["means"], dtype=torch.float32) @ chol)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        logits = self.model.classifier(features)
        whitened = features @ self.chol
        distance = (whitened[:, None, :] - self.centres[None]).pow(2).sum(-1).min(dim=1).values
        return torch.cat([logits, distance[:, None]], dim=1)


def supports_ood(model: nn.Module) -> bool:
    return hasattr(model, "forward_features") and isinstance(getattr(model, "classifier", None), nn.Linear)


@torch.inference_mode()
def pooled_features(model: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 256) -> np.ndarray:
    from .transforms import eval_transform

    model.eval()
    chunks = [model.forward_features(eval_transform(images[i : i + batch_size], mean, std)).float() for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32)


def fit_ood(model: nn.Module, train_images: torch.Tensor, train_labels: np.ndarray, val_images: torch.Tensor, mean, std) -> dict[str, Any]:
    """Class means and the Cholesky factor of the shared precision from the training images; the
    in-domain threshold from the validation images."""
    from sklearn.covariance import LedoitWolf

    features = pooled_features(model, train_images, mean, std).astype(np.float64)
    classes = np.unique(train_labels)
    means = np.zeros((int(train_labels.max()) + 1, features.shape[1]))
    for c in classes:
        means[c] = features[train_labels == c].mean(0)
    fitted = LedoitWolf().fit(features - means[train_labels])
    try:
        chol = np.linalg.cholesky((fitted.precision_ + fitted.precision_.T) / 2)
    except np.linalg.LinAlgError:  # no spread around the class means (one image per class): a ridge makes it invertible
        ridge = 1e-3 * max(float(np.trace(fitted.covariance_)) / features.shape[1], 1.0)
        precision = np.linalg.inv(fitted.covariance_ + ridge * np.eye(features.shape[1]))
        chol = np.linalg.cholesky((precision + precision.T) / 2)
    ood = {"means": torch.tensor(means[classes], dtype=torch.float32), "chol": torch.tensor(chol, dtype=torch.float32)}
    scores = ood_scores(model, val_images if len(val_images) else train_images, mean, std, ood)
    ood["threshold"] = float(np.percentile(scores, IN_DOMAIN_QUANTILE))
    return ood


def ood_scores(model: nn.Module, images: torch.Tensor, mean, std, ood: dict[str, Any]) -> np.ndarray:
    head = WithOOD(model, ood).eval()
    from .transforms import eval_transform

    with torch.inference_mode():
        out = [head(eval_transform(images[i : i + 256], mean, std))[:, -1] for i in range(0, len(images), 256)]
    return torch.cat(out).numpy()
