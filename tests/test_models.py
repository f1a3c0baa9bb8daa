import numpy as np
import pytest
import torch

from leukoscope.checkpoint import build_checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint
from leukoscope.errors import LeukoscopeError
from leukoscope.models import create_model, list_models
from leukoscope.transforms import AugmentConfig, eval_transform, train_transform


@pytest.mark.parametrize("name", ["cellnet", "cellnet_tiny", "resnet18", "mobilenet_v3_small"])
def test_models_give_logits_of_the_right_shape(name):
    model = create_model(name, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_timm_models_by_prefix():
    model = create_model("timm/resnet10t", num_classes=3).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_unknown_model_lists_valid_names():
    with pytest.raises(LeukoscopeError) as info:
        create_model("resnet19", 2)
    message = str(info.value)
    assert "did you mean 'resnet18'" in message and "cellnet" in message
    assert "cellnet" in list_models()


def test_cellnet_is_small():
    params = sum(p.numel() for p in create_model("cellnet", 8).parameters())
    assert params < 1.5e6  # ships as a few MB


def test_checkpoint_round_trip_describes_itself(tmp_path):
    model = create_model("cellnet_tiny", 3).eval()
    meta = {"arch": "cellnet_tiny", "class_names": ["a", "b", "c"], "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    save_checkpoint(tmp_path / "m.pt", build_checkpoint(model, meta))
    ckpt = load_checkpoint(tmp_path / "m.pt")
    for key in ("arch", "class_names", "image_size", "mean", "std", "config", "metrics", "leukoscope_version", "torch_version"):
        assert key in ckpt
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model_from_checkpoint(ckpt)(x), model(x))


def test_bad_checkpoint_rejected(tmp_path):
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(LeukoscopeError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")


def test_train_transform_is_seeded_and_bounded():
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    a = train_transform(batch, [0.5] * 3, [0.5] * 3, AugmentConfig(), torch.Generator().manual_seed(0))
    b = train_transform(batch, [0.5] * 3, [0.5] * 3, AugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32)
    assert a.min() >= -1.0001 and a.max() <= 1.0001  # clamped to [0, 1] before normalising
    plain = eval_transform(batch, [0.5] * 3, [0.5] * 3)
    assert not torch.allclose(a, plain)
    assert np.allclose(plain[0, :, 0, 0].numpy(), (batch[0, :, 0, 0].numpy() / 255 - 0.5) / 0.5, atol=1e-6)


def test_train_transform_resamples_to_the_progressive_size():
    batch = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    out = train_transform(batch, [0.5] * 3, [0.5] * 3, AugmentConfig(), torch.Generator().manual_seed(0), size=32)
    assert out.shape == (3, 3, 32, 32) and torch.isfinite(out).all()
    flat = torch.full((1, 3, 48, 48), 128, dtype=torch.uint8)  # a flat image stays flat at any size
    still = AugmentConfig(rotate=False, flip=False, scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0,
                          saturation=0.0, stain=0.0, blur_p=0.0)
    out = train_transform(flat, [0.0] * 3, [1.0] * 3, still, torch.Generator().manual_seed(0), size=24)
    assert torch.allclose(out, torch.full_like(out, 128 / 255), atol=1e-6)
