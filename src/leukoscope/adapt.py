"""Test-time adaptation by re-estimating BatchNorm statistics on the images to predict (AdaBN).

Li Y. et al., Revisiting Batch Normalization for Practical Domain Adaptation (2016): a network's
BatchNorm layers keep the mean and variance of the training lab's features; another lab's stain
and camera shift them. Recomputing them on a folder of the new lab's images, without labels,
undoes part of that shift. Nothing else in the network changes.
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import model_from_checkpoint
from .errors import LeukoscopeError
from .inference import Predictor
from .transforms import eval_transform

MIN_IMAGES = 32  # fewer images give noisier statistics than the training lab's


def adapt_batchnorm(predictor: Predictor, images: torch.Tensor, batch_size: int = 64) -> Predictor:
    """A predictor whose BatchNorm statistics are those of ``images`` ((N, 3, S, S) uint8, as the model sees them)."""
    if "state_dict" not in predictor.checkpoint:
        raise LeukoscopeError(f"--adapt needs a PyTorch model (run folder, checkpoint or bundled name); {predictor.source!r} "
                              f"is a {predictor.kind} model")
    if len(images) < MIN_IMAGES:
        raise LeukoscopeError(f"--adapt needs at least {MIN_IMAGES} images of the new lab to re-estimate normalisation "
                              f"statistics; got {len(images)}: predict without it, or give a larger folder")
    model = model_from_checkpoint(predictor.checkpoint)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise LeukoscopeError(f"--adapt: {predictor.checkpoint['arch']} has no BatchNorm layers to adapt")
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over every batch, not a moving one
        norm.train()
    pre = predictor.card.preprocessing
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(eval_transform(images[start : start + batch_size], pre.mean, pre.std))
    checkpoint = {**predictor.checkpoint, "state_dict": model.eval().state_dict(), "adapted_on_images": len(images)}
    adapted = Predictor(checkpoint, source=f"{predictor.source} (BatchNorm adapted on {len(images)} images)")
    adapted.temperature, adapted.threshold = predictor.temperature, predictor.threshold
    return adapted
