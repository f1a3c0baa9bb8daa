"""Test-time adaptation to a new lab's images, without labels: BatchNorm statistics, then scale and shift.

Li Y. et al., Revisiting Batch Normalization for Practical Domain Adaptation (2016): a network's
BatchNorm layers keep the mean and variance of the training lab's features; another lab's stain
and camera shift them. Recomputing them on a folder of the new lab's images (AdaBN) undoes part
of that shift. Wang D. et al., Tent: Fully Test-Time Adaptation by Entropy Minimization (2021):
then a few gradient steps on the BatchNorm layers' scale and shift alone make the network's
predictions on those images confident. Measured on a lab a model never saw (PBC-only models on
BCCD's 351 fields, docs/benchmarks.md): statistics alone took cell-window models from 4-58% to
45-52%, the 40 entropy steps on top to 60-78%; PBC validation moved by under a point either way.
For central-crop and binary models the steps were unstable or harmful, so those stop at the statistics.
Nothing outside the BatchNorm layers changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .checkpoint import model_from_checkpoint
from .errors import LeukoscopeError
from .inference import Predictor, TorchBackend
from .options import ENTROPY_STEPS  # also where callers look for it
from .progress import progress
from .transforms import eval_transform

MIN_IMAGES = 32  # fewer images give noisier statistics than the training lab's
PURPOSE = "--adapt (it re-estimates the network's normalisation layers)"  # named when the model has no PyTorch network
ENTROPY_LR = 1e-3  # Adam; 3e-3 collapsed one of four models onto a few classes (docs/benchmarks.md)
ENTROPY_BATCH = 64
IN_DOMAIN_WARN = 0.5  # above this share of in-domain images, --adapt warns that it may hurt


def default_steps(predictor: Predictor) -> int:
    """ENTROPY_STEPS for cell-window models of more than two classes, else 0 (the statistics only).
    On BCCD the steps lifted every 8-class cell-window model (+10 to +26 points over the statistics
    alone, seven models) but moved the central-crop ones by -15 to +13 points with the sampling seed;
    for the binary `blast` on Aria's cells they lowered balanced accuracy (51.0% -> 43.5%), and a
    binary model's operating threshold, fitted on validation probabilities, no longer means the same
    once the steps have sharpened them (docs/benchmarks.md)."""
    return ENTROPY_STEPS if predictor.view.cell is not None and len(predictor.class_names) > 2 else 0


def adapt_batchnorm(predictor: Predictor, images: torch.Tensor, batch_size: int = 64, steps: int | None = None,
                    seed: int = 0) -> Predictor:
    """A predictor adapted to ``images`` ((N, 3, S, S) uint8, as the model sees them): its BatchNorm
    statistics re-estimated on them, then (``steps`` > 0; default: ``default_steps``) its BatchNorm
    scales and shifts tuned by ``steps`` Adam steps that lower the entropy of its predictions on
    random batches of them (seeded)."""
    steps = default_steps(predictor) if steps is None else steps
    if "state_dict" not in predictor.checkpoint:
        raise LeukoscopeError(f"--adapt needs a PyTorch model (run folder, checkpoint or bundled name); {predictor.source!r} "
                              f"is a {predictor.kind} model")
    if len(images) < MIN_IMAGES:
        raise LeukoscopeError(f"--adapt needs at least {MIN_IMAGES} images of the new lab to re-estimate normalisation "
                              f"statistics; got {len(images)}: predict without it, or give a larger folder")
    if steps < 0:
        raise LeukoscopeError(f"--adapt-steps must be 0 or more, got {steps}")
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
    model.eval()
    if steps:
        _minimise_entropy(model, norms, images, pre, len(predictor.class_names), steps, seed)
    how = "BatchNorm adapted" if steps else "BatchNorm statistics re-estimated"
    # the out-of-distribution alarm measures distance to the training images' features in the
    # unadapted network: after adapting it would flag nearly every image (measured: 69-72 of 72
    # BCCD fields), so an adapted model has none (ood_score NaN, in_domain empty)
    checkpoint = {**predictor.checkpoint, "state_dict": model.state_dict(), "adapted_on_images": len(images),
                  "adapted_steps": steps, "ood": None, "ood_threshold": None}
    adapted = Predictor(checkpoint, source=f"{predictor.source} ({how} on {len(images)} images)",
                        backend=TorchBackend(checkpoint, getattr(predictor.backend, "device", "cpu")))  # on the GPU it was loaded on
    adapted.temperature, adapted.threshold = predictor.temperature, predictor.threshold
    return adapted


def _minimise_entropy(model: nn.Module, norms: list[nn.Module], images: torch.Tensor, pre, classes: int, steps: int,
                      seed: int) -> None:
    """Tune the BatchNorm scales and shifts (with the new statistics fixed: eval mode) to lower the mean
    entropy of the class probabilities (the first ``classes`` outputs; an OOD head is left out)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for norm in norms for p in (norm.weight, norm.bias) if p is not None]
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=ENTROPY_LR)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in progress(range(steps), desc="adapt: entropy steps", unit="step", leave=False):
            batch = images[torch.randint(len(images), (ENTROPY_BATCH,), generator=generator)]
            logits = model(eval_transform(batch, pre.mean, pre.std).contiguous())[:, :classes]  # NCHW: see models.channels_last_safe
            loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    for p in model.parameters():
        p.requires_grad_(False)


def adapt_note(images: int, steps: int) -> str:
    """What --adapt did, for the terminal and the report."""
    done = f"normalisation statistics re-estimated on {images} image{'s' if images != 1 else ''}"
    return done + (f", then {steps} steps of entropy minimisation on the BatchNorm scales and shifts" if steps else " (AdaBN)")


def in_domain_warning(predictor: Predictor, images: torch.Tensor, sample: int = 512) -> str | None:
    """A warning when most of ``images`` (up to ``sample`` of them, seeded) already look like the
    model's training images: adapting to a lab a model was trained on can lower its accuracy (an
    earlier `wbc` on BCCD's held-out fields: 83.3% -> 70.8%), while on a lab it never saw nearly
    every image is out of domain. None when the model has no out-of-distribution alarm or the images look foreign."""
    if predictor.ood_threshold is None or not len(images):
        return None
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:sample]
    _, scores = predictor.logits_and_ood(images[chosen], tta="none")
    share = float((scores <= predictor.ood_threshold).float().mean())
    if share <= IN_DOMAIN_WARN:
        return None
    return (f"warning: {share:.0%} of these images look like this model's training images (in_domain): --adapt helps on a lab "
            "the model never saw and can lower accuracy on one it was trained on (an earlier wbc on BCCD's held-out fields: "
            "83.3% -> 70.8%); "
            "if they come from such a lab, predict without --adapt")


def adapt_to_files(predictor: Predictor, paths: list, steps: int | None, say: Callable[[str], object]) -> Predictor:
    """``--adapt`` on a list of image files (predict's inputs, evaluate's test split): decode them as
    the model sees them, warn (through ``say``) if most look like its training images, adapt, say how."""
    from .data.dataset import decode_many

    images, errors = decode_many(paths, predictor.view, desc="decode for --adapt")
    images = images[[i for i, e in enumerate(errors) if e is None]]
    if len(images) >= MIN_IMAGES and (warning := in_domain_warning(predictor, images)):  # too few: refused below, unwarned
        say(warning)
    adapted = adapt_batchnorm(predictor, images, steps=steps)
    say(adapt_note(adapted.checkpoint["adapted_on_images"], adapted.checkpoint["adapted_steps"]))
    return adapted
