"""Train and eval transform presets on batches of uint8 images already resized to a square.

Augmentation runs on whole batches as tensor ops (one affine grid sample per batch), which is
several times faster on 2 CPU cores than per-image PIL transforms. The train preset draws,
per image: a rotation by any angle, horizontal/vertical flips, a scale and shift jitter, mild
brightness/contrast/saturation/stain (per-channel gain) jitter, an optional hue rotation, and
occasional Gaussian blur, and optionally a stain jitter in HED space (Tellez et al. 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .options import AugmentConfig  # also where callers look for it


def to_float(batch_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return batch_uint8.float().div_(255.0)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def eval_transform(batch_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """The eval preset: scale to [0, 1] and normalise; geometry was fixed at decode time."""
    return normalize(to_float(batch_uint8), mean, std).contiguous(memory_format=torch.channels_last)


def train_transform(
    batch_uint8: torch.Tensor, mean, std, config: AugmentConfig, generator: torch.Generator, size: int | None = None,
    view: float = 1.0,
) -> torch.Tensor:
    """The train preset: random geometry and colour per image, then normalise.

    ``size`` resamples the output to ``size`` x ``size`` within the same affine warp (free
    progressive resizing); None keeps the input size. ``view`` < 1 means the input holds
    context around the image to show: the output covers the input's central ``view``, so
    rotations, shifts and zoom-outs reveal real pixels instead of reflections at the edge.
    """
    x = to_float(batch_uint8)
    size = size if size is not None or view == 1.0 else round(x.shape[-1] * view)
    x = _random_affine(x, config, generator, size, view)
    x = _keep_some_colours(x, config, generator, lambda y: _random_hed(_random_colour(y, config, generator), config, generator))
    x = _random_blur(x, config, generator)
    return normalize(x.clamp_(0, 1), mean, std).contiguous(memory_format=torch.channels_last)


def mix_batch(x: torch.Tensor, config: AugmentConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Mixup or CutMix on a training batch (one of them at random per batch when both are on).

    Returns the mixed batch, each image's partner (indices into the batch; None when nothing was
    mixed) and the share ``lam`` of its own label: the loss is ``lam * CE(y) + (1 - lam) * CE(y[partner])``.
    Not torchvision's MixUp/CutMix or timm's Mixup: they draw from the global random state (torch's,
    numpy's), where every augmentation here draws from the training's own seeded stream ``g``, so a
    run's augmentation does not depend on what else consumed random numbers.
    """
    modes = [mode for mode in ("mixup", "cutmix") if getattr(config, mode) > 0]
    n = x.shape[0]
    if not modes or n < 2:
        return x, None, 1.0
    mode = modes[int(torch.randint(len(modes), (1,), generator=g))]
    alpha = getattr(config, mode)
    lam = float(np.random.default_rng(int(torch.randint(2**62, (1,), generator=g))).beta(alpha, alpha))
    partner = torch.randperm(n, generator=g)
    if mode == "mixup":
        return x * lam + x[partner] * (1 - lam), partner, lam
    h, w = x.shape[-2:]
    side = math.sqrt(1 - lam)
    cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
    y0, y1 = max(cy - round(h * side / 2), 0), min(cy + round(h * side / 2), h)
    x0, x1 = max(cx - round(w * side / 2), 0), min(cx + round(w * side / 2), w)
    mixed = x.clone()
    mixed[..., y0:y1, x0:x1] = x[partner, :, y0:y1, x0:x1]
    return mixed, partner, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def _random_affine(x: torch.Tensor, config: AugmentConfig, g: torch.Generator, size: int | None = None, view: float = 1.0) -> torch.Tensor:
    n = x.shape[0]
    angle = _uniform(n, 0, 2 * math.pi, g) if config.rotate else torch.zeros(n)
    scale = _uniform(n, *config.scale, g)
    flip_x = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if config.flip else torch.ones(n)
    flip_y = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if config.flip else torch.ones(n)
    shift = _uniform(2 * n, -config.translate, config.translate, g).view(n, 2) * 2
    cos, sin = torch.cos(angle) * view / scale, torch.sin(angle) * view / scale
    shift = shift * view
    theta = torch.stack(
        [
            torch.stack([cos * flip_x, -sin * flip_y, shift[:, 0]], dim=1),
            torch.stack([sin * flip_x, cos * flip_y, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    out_shape = list(x.shape) if size is None else [n, x.shape[1], size, size]
    grid = F.affine_grid(theta, out_shape, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _keep_some_colours(x: torch.Tensor, config: AugmentConfig, g: torch.Generator,
                       jitter: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``jitter(x)`` for a random ``colour_p`` share of the images; the others keep their colours.

    Meant as a middle way between strong colour jitter (robust to other labs' stains) and the
    training lab's own colours; on `wbc` half and half kept neither's gain (docs/benchmarks.md,
    "A third lab"). The share is drawn before the jitter's own numbers, and at ``colour_p`` 1 not
    at all, so the random stream (and a trained model) is the same as without the option.
    """
    if config.colour_p >= 1:
        return jitter(x)
    keep = torch.rand(x.shape[0], generator=g) >= config.colour_p
    jittered = jitter(x)
    return torch.where(keep.view(-1, 1, 1, 1), x, jittered)


def _random_colour(x: torch.Tensor, config: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Brightness x stain gain, contrast, saturation and hue as one affine colour map per image.

    Each step is linear in RGB (contrast adds a multiple of the image mean), so the chain
    collapses into ``x -> M x + b`` with a 3x3 ``M`` per image: one batched matmul instead of a
    pass over the batch per step. tests/test_models.py checks it against the step-by-step chain.
    """
    n = x.shape[0]
    brightness = _uniform(n, 1 - config.brightness, 1 + config.brightness, g)
    contrast = _uniform(n, 1 - config.contrast, 1 + config.contrast, g)
    saturation = _uniform(n, 1 - config.saturation, 1 + config.saturation, g)
    gain = brightness[:, None] * _uniform(3 * n, 1 - config.stain, 1 + config.stain, g).view(n, 3)
    s = saturation.view(n, 1, 1)
    towards_gray = s * torch.eye(3) + (1 - s) * torch.ones(3, 1) @ _LUMA[None]
    matrix = contrast.view(n, 1, 1) * towards_gray @ torch.diag_embed(gain)
    if config.hue > 0:
        matrix = hue_matrix(_uniform(n, -config.hue, config.hue, g) * 2 * math.pi) @ matrix
    mean = (x.mean(dim=(2, 3)) * gain).mean(1)  # image mean after the gains, which contrast pivots on
    out = torch.bmm(matrix.to(x.dtype), x.reshape(n, 3, -1)).view(x.shape)
    return out + ((1 - contrast) * mean).view(n, 1, 1, 1).to(x.dtype)


_LUMA = torch.tensor([0.299, 0.587, 0.114])
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]])


def hue_matrix(angle: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) RGB maps rotating the chroma by ``angle`` radians in YIQ space (luma and grays kept)."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    rotation = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                            torch.stack([zero, sin, cos], 1)], 1)
    return torch.linalg.inv(_RGB_TO_YIQ) @ rotation @ _RGB_TO_YIQ


def _hed_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    from skimage.color.colorconv import hed_from_rgb, rgb_from_hed  # Ruifrok & Johnston's stain vectors

    return torch.from_numpy(hed_from_rgb).float(), torch.from_numpy(rgb_from_hed).float()


def _random_hed(x: torch.Tensor, config: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Per image, scale and shift the haematoxylin, eosin and DAB densities (scikit-image's
    ``rgb2hed``/``hed2rgb`` convention, stains left unclamped so that scale 1 and shift 0 give the
    image back).

    Optical density, the stain change and the way back are linear in ``log(x)``, so they fold into
    one 3x3 map and offset per image: ``exp(A log(x) + b)``, a single batched matmul. Measured 3.4x
    faster than the two conversions through an (N, HW, 3) tensor, which were half of the training
    augmentation's time; tests/test_models.py checks it against the step-by-step conversion.
    """
    if config.hed <= 0 and config.hed_shift <= 0:
        return x
    n = x.shape[0]
    to_hed, to_rgb = _hed_matrices()
    scale = _uniform(3 * n, 1 - config.hed, 1 + config.hed, g).view(n, 3)
    shift = _uniform(3 * n, -config.hed_shift, config.hed_shift, g).view(n, 3)
    log_adjust = math.log(1e-6)  # optical density is log(x) / log_adjust
    matrix = (to_hed @ torch.diag_embed(scale) @ to_rgb).transpose(1, 2)  # acts on column vectors of log(x)
    offset = (log_adjust * shift @ to_rgb).view(n, 3, 1)
    log_x = torch.log(x.clamp_min(1e-6)).reshape(n, 3, -1)
    out = torch.baddbmm(offset.to(x.dtype), matrix.to(x.dtype), log_x)
    return out.exp_().clamp_(0, 1).reshape(x.shape)


def _random_blur(x: torch.Tensor, config: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    if config.blur_p <= 0:
        return x
    chosen = torch.nonzero(torch.rand(x.shape[0], generator=g) < config.blur_p).flatten()
    if len(chosen) == 0:
        return x
    sigma = float(_uniform(1, *config.blur_sigma, g))
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    sub = x[chosen]
    sub = F.pad(sub, (radius, radius, radius, radius), mode="reflect")
    sub = F.conv2d(sub, kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    sub = F.conv2d(sub, kernel.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    x = x.clone()
    x[chosen] = sub
    return x
