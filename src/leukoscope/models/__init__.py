"""Model registry: one factory, ``create_model(name, num_classes, **kwargs)``.

Our own CellNet variants are listed in ``MODELS``; standard architectures come from
torchvision by name (always randomly initialised: no weights are downloaded), and any timm
model as ``timm/<name>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch
from torch import nn

from ..errors import LeukoscopeError, did_you_mean
from .cellnet import CellNet, CellNetConfig

__all__ = ["create_model", "check_model_name", "list_models", "channels_last_safe", "training_memory_format", "cpu_bf16_safe",
           "CellNet", "CellNetConfig"]


def _cellnet(**overrides) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs) -> nn.Module:
        params = {**overrides, **kwargs}
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
        return CellNet(CellNetConfig(num_classes=num_classes, **params))

    return build


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cellnet": _cellnet(),
    "cellnet_tiny": _cellnet(widths=(8, 16, 32, 64), stem_width=8, dropout=0.0),
    "cellnet_wide": _cellnet(widths=(48, 96, 192, 384), stem_width=32),
    "cellnet_deep": _cellnet(depths=(1, 2, 2, 1)),
    **{
        name: _torchvision(name)
        for name in (
            "resnet18",
            "resnet34",
            "resnet50",
            "efficientnet_b0",
            "mobilenet_v3_small",
            "mobilenet_v3_large",
            "convnext_tiny",
            "densenet121",
        )
    },
}


def list_models() -> list[str]:
    return sorted(MODELS) + ["timm/<any timm model name>"]


def check_model_name(name: str) -> None:
    """Raise a LeukoscopeError naming the valid choices when ``name`` is not a known model."""
    if name.startswith("timm/"):
        import timm

        timm_name = name.removeprefix("timm/")
        if not timm.is_model(timm_name):
            raise LeukoscopeError(f"unknown timm model {timm_name!r}{did_you_mean(timm_name, timm.list_models())}")
    elif name not in MODELS:
        raise LeukoscopeError(
            f"unknown model {name!r}{did_you_mean(name, MODELS)}; choose one of: {', '.join(list_models())}"
        )


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build an untrained model by registry name; unknown names list the valid ones."""
    check_model_name(name)
    if name.startswith("timm/"):
        import timm

        return timm.create_model(name.removeprefix("timm/"), pretrained=False, num_classes=num_classes, **kwargs)
    try:
        return MODELS[name](num_classes, **kwargs)
    except (TypeError, ValueError) as err:  # an unknown or out-of-range architecture option (arch_kwargs)
        valid = ", ".join(f.name for f in fields(CellNetConfig) if f.name != "num_classes") if name.startswith("cellnet") else ""
        raise LeukoscopeError(f"bad architecture options for {name} {kwargs}: {err}" + (f" (options: {valid})" if valid else "")) from None


def channels_last_safe(model: nn.Module) -> bool:
    """False when the model has a strided 1x1 convolution with fewer than 16 input channels.

    On CPUs with AVX-512, oneDNN's backward-weights kernel for such a convolution in channels_last
    (``jit_1x1:avx512_core``, torch 2.14.1) writes past its buffers for batches of more than one
    image whose size is odd (any last partial batch): the process dies with a segmentation fault
    or heap corruption, or gets wrong gradients. Measured here over input channels 1-88, strides
    2-3, 1x1 and 3x3 kernels: only 1x1 convolutions with stride > 1 and 1-15 input channels reach
    it; NCHW never does (docs/benchmarks.md, "CPU kernels").
    """
    return not any(
        isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and m.in_channels < 16
        for m in model.modules()
    )


def training_memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last (faster on oneDNN) unless, on a CPU, the model could reach the kernel above."""
    if device.type == "cpu" and not channels_last_safe(model):
        return torch.contiguous_format
    return torch.channels_last


def cpu_bf16_safe(model: nn.Module, image_size: int) -> bool:
    """False when, at this input size, a strided convolution would see a 1x1 feature map.

    Under bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX), oneDNN's backward-weights
    kernel of a stride-2 3x3 convolution on a 1x1 input returns NaN or run-to-run different
    gradients (torch 2.14.1; 2x2 and larger inputs, and fp32, are exact). Small images through a
    deep net reach it (cellnet_tiny at 16 px), and training then diverges. One dry forward pass
    with hooks finds such a layer.
    """
    seen: list[bool] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen.append(module.stride != (1, 1) and min(inputs[0].shape[-2:]) == 1)

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_pre_hook(hook) for m in convs]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return not any(seen)
