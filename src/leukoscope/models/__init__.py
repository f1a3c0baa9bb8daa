"""Model registry: one factory, ``create_model(name, num_classes, **kwargs)``.

Our own CellNet variants are listed in ``MODELS``; standard architectures come from
torchvision by name (always randomly initialised: no weights are downloaded), and any timm
model as ``timm/<name>``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import LeukoscopeError, did_you_mean
from .cellnet import CellNet, CellNetConfig

__all__ = ["create_model", "check_model_name", "list_models", "CellNet", "CellNetConfig"]


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
    return MODELS[name](num_classes, **kwargs)
