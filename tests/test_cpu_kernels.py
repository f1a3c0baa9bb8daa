"""No shipped architecture reaches oneDNN's crashing AVX-512 kernel (1x1 strided conv, < 16 channels).

On CPUs with AVX-512 the training step below died with a segmentation fault or heap corruption
before the guard (odd batch sizes, cellnet_tiny's 8-channel shortcut in channels_last). It runs in
a subprocess so that a crash is a failed test, not a dead test run. On AVX2-only CPUs the kernel
does not exist and the subprocess passes either way; the guard's own tests below run everywhere.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from leukoscope.models import MODELS, channels_last_safe, create_model, training_memory_format

TRAIN_ODD_BATCHES = textwrap.dedent(
    """
    import numpy as np, torch
    from leukoscope.config import TrainConfig
    from leukoscope.models import create_model, training_memory_format
    from leukoscope.runs import seed_everything
    from leukoscope.trainer import Trainer

    for arch in {archs!r}:
        for batch_size in (3, 5, 7, 9):
            config = TrainConfig(arch=arch, batch_size=batch_size, image_size=64, epochs=3)
            model = create_model(arch, 2)
            model = model.to(memory_format=training_memory_format(model, torch.device("cpu")))
            trainer = Trainer(model, config, ([0.5] * 3, [0.25] * 3), seed_everything(0), steps_per_epoch=5)
            images = torch.randint(0, 256, (4 * batch_size + 3, 3, 64, 64), dtype=torch.uint8)
            labels = np.arange(len(images)) % 2
            for _ in range(3):
                trainer.train_epoch(images, labels)
    print("trained")
    """
)

CELLNETS = sorted(name for name in MODELS if name.startswith("cellnet"))


def test_training_odd_batches_does_not_crash_in_a_subprocess():
    script = TRAIN_ODD_BATCHES.format(archs=CELLNETS)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"training crashed (exit {result.returncode}): {result.stderr[-2000:]}"
    assert "trained" in result.stdout


def test_guard_flags_small_strided_pointwise_convs_only():
    assert not channels_last_safe(create_model("cellnet_tiny", 2))  # 8 -> 16 channel strided shortcut
    assert not channels_last_safe(create_model("cellnet", 2, stem_width=12))
    for name in ("cellnet", "cellnet_wide", "cellnet_deep", "resnet18", "mobilenet_v3_small", "efficientnet_b0"):
        assert channels_last_safe(create_model(name, 2)), name
    assert channels_last_safe(nn.Conv2d(8, 16, 1, 1))  # stride 1: a different kernel
    assert channels_last_safe(nn.Conv2d(8, 16, 3, 2, 1))  # 3x3: a different kernel
    assert not channels_last_safe(nn.Conv2d(15, 16, 1, 2))
    assert channels_last_safe(nn.Conv2d(16, 16, 1, 2))


@pytest.mark.parametrize("device, expected", [("cpu", torch.contiguous_format), ("cuda", torch.channels_last)])
def test_memory_format_falls_back_to_nchw_on_cpu_only(device, expected):
    assert training_memory_format(create_model("cellnet_tiny", 2), torch.device(device)) == expected
    assert training_memory_format(create_model("cellnet", 2), torch.device(device)) == torch.channels_last


def test_bf16_guard_finds_strided_convs_on_one_pixel_maps():
    from leukoscope.models import cpu_bf16_safe

    tiny = create_model("cellnet_tiny", 2)
    assert not cpu_bf16_safe(tiny, 16)  # 16 -> 8 -> 4 -> 2 -> 1, then a stride-2 conv on 1x1
    assert cpu_bf16_safe(tiny, 32) and cpu_bf16_safe(create_model("cellnet", 8), 112)
    assert tiny.training  # the dry pass leaves the mode as it was


def test_explicit_bf16_is_refused_where_its_gradients_are_wrong():
    from leukoscope.config import TrainConfig
    from leukoscope.errors import LeukoscopeError
    from leukoscope.trainer import resolve_precision

    model = create_model("cellnet_tiny", 2)
    config = TrainConfig(arch="cellnet_tiny", image_size=32, min_image_size=16, precision="bf16")
    with pytest.raises(LeukoscopeError, match="wrong gradients for cellnet_tiny at 16 px"):
        resolve_precision(config, model=model, device=torch.device("cpu"))
    config.precision = "auto"
    assert resolve_precision(config, model=model, device=torch.device("cpu")) is False
    config.precision, config.min_image_size = "fp32", None
    assert resolve_precision(config, model=model, device=torch.device("cpu")) is False


def test_auto_precision_says_when_a_cpu_without_native_bf16_makes_training_slower(monkeypatch):
    from leukoscope import trainer
    from leukoscope.config import TrainConfig

    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    assert "no native bf16" in trainer.precision_note(TrainConfig(), cpu, bf16=False)
    assert trainer.precision_note(TrainConfig(precision="fp32"), cpu, bf16=False) is None  # asked for: nothing to explain
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    assert trainer.precision_note(TrainConfig(), cpu, bf16=False) is None  # fp32 there is cpu_bf16_safe's choice, not the CPU's
    assert trainer.precision_note(TrainConfig(), cpu, bf16=True) is None
