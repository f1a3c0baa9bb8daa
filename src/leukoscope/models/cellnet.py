"""CellNet: a small residual CNN designed to train from scratch on 2 CPU cores in minutes.

Pure model code (no I/O). Plain 3x3 convolutions run well on oneDNN with channels_last and
bf16, unlike depthwise convolutions, so the net uses few, dense layers with early
down-sampling; most compute happens at 1/4 to 1/16 of the input resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class CellNetConfig:
    num_classes: int = 2
    widths: tuple[int, ...] = (32, 64, 128, 256)
    depths: tuple[int, ...] = (1, 1, 1, 1)
    stem_width: int = 24
    dropout: float = 0.2
    se: bool = False  # squeeze-and-excitation gate in each block
    mixstyle: float = 0.0  # training only: probability per batch of mixing feature statistics between images (MixStyle)
    ibn: bool = False  # instance-batch normalisation (IBN-a) in the first norm of the first three stages' blocks

    def __post_init__(self) -> None:
        if not 0 <= self.mixstyle <= 1:
            raise ValueError(f"mixstyle is a probability per batch: between 0 and 1, got {self.mixstyle}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def conv_bn(c_in: int, c_out: int, stride: int = 1, kernel: int = 3, ibn: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
        InstanceBatchNorm(c_out) if ibn else nn.BatchNorm2d(c_out),
    )


class InstanceBatchNorm(nn.Module):
    """IBN-a of Pan et al. (2018): half of the channels instance-normalised, half batch-normalised.

    Instance normalisation removes each image's own contrast and colour level from those channels,
    which is what another lab's stain and camera change; the batch-normalised half keeps the
    features that tell cells apart. Pan et al. put it in the first norm of the early and middle
    blocks, where appearance lives, not in the last stage. The instance half has no running
    statistics, so it works the same in training, prediction and adaptation.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.split = channels // 2
        self.instance = nn.InstanceNorm2d(self.split, affine=True)
        self.batch = nn.BatchNorm2d(channels - self.split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, : self.split], x[:, self.split :]
        return in_format_of(torch.cat([self.instance(a), self.batch(b)], 1), x)


@torch.fx.wrap  # kept whole when BatchNorm folding traces the network: its branch reads a real tensor's layout
def in_format_of(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` in ``x``'s memory format. A cat of channel slices comes out NCHW whatever its input; the
    next convolutions must see the format training chose (``models.training_memory_format``: NCHW where
    a channels_last kernel is unsafe on this CPU, channels_last, the faster, elsewhere)."""
    return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(memory_format=torch.channels_last) else out


class SqueezeExcite(nn.Module):
    """Channel gate of Hu et al. (2018): each image reweights its own channels.

    It adds capacity for under 1% more multiply-adds, because it works on pooled features.
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class MixStyle(nn.Module):
    """Feature-statistics mixing of Zhou et al. (2021), for models that must work on other labs' images.

    In training, with probability ``p`` per batch, each image's channel means and standard
    deviations (over space) are replaced by a random mix (weight ~ Beta(alpha, alpha)) of its own
    and another image's of the batch: early-layer statistics carry much of an image's stain and
    camera "style", so the network learns to classify under styles between those it sees. In eval
    mode (prediction, export, adaptation) it is the identity and has no weights.
    """

    def __init__(self, p: float, alpha: float = 0.1, eps: float = 1e-6):
        super().__init__()
        self.p, self.alpha, self.eps = p, alpha, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.size(0) < 2 or torch.rand(()).item() >= self.p:
            return x
        mean = x.mean((2, 3), keepdim=True).detach()
        std = (x.var((2, 3), keepdim=True) + self.eps).sqrt().detach()
        weight = torch.distributions.Beta(self.alpha, self.alpha).sample((x.size(0), 1, 1, 1)).to(x.dtype)
        other = torch.randperm(x.size(0))
        mixed_mean = weight * mean + (1 - weight) * mean[other]
        mixed_std = weight * std + (1 - weight) * std[other]
        return (x - mean) / std * mixed_std + mixed_mean


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, se: bool = False, ibn: bool = False):
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, stride, ibn=ibn)
        self.conv2 = conv_bn(c_out, c_out)
        self.gate = SqueezeExcite(c_out) if se else nn.Identity()
        nn.init.zeros_(self.conv2[1].weight)  # each block starts as identity: stabler from scratch
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else conv_bn(c_in, c_out, stride, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.gate(self.conv2(self.act(self.conv1(x)))) + self.shortcut(x))


class CellNet(nn.Module):
    def __init__(self, config: CellNetConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [conv_bn(3, config.stem_width, stride=2), nn.ReLU(inplace=True)]
        taps = []
        c_in = config.stem_width
        for stage, (width, depth) in enumerate(zip(config.widths, config.depths, strict=True)):
            if config.mixstyle and stage < 3:  # after the stem and the first two stages, where style lives (none: same layers as before)
                layers.append(MixStyle(config.mixstyle))
            for i in range(depth):
                layers.append(BasicBlock(c_in, width, stride=2 if i == 0 else 1, se=config.se, ibn=config.ibn and stage < 3))
                c_in = width
            if stage < 2:
                taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        # Indices of ``features`` whose outputs' channel statistics describe an image's stain and camera
        # (the ends of the first two stages): the out-of-distribution alarm reads them (see ood).
        self.style_taps: tuple[int, ...] = tuple(taps)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(c_in, config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.forward_features(x)))
