import math

import numpy as np
import pytest
import torch

from leukoscope.checkpoint import build_checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint
from leukoscope.errors import LeukoscopeError
from leukoscope.models import create_model, list_models
from leukoscope.models.cellnet import InstanceBatchNorm, MixStyle, SqueezeExcite
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


def test_squeeze_excite_gates_each_image_by_its_own_channels():
    torch.manual_seed(0)
    gate = SqueezeExcite(16)
    x = torch.rand(2, 16, 5, 5) + 0.5
    scale = gate(x) / x
    assert torch.allclose(scale, scale[:, :, :1, :1].expand_as(scale))  # one factor per image and channel
    assert ((scale > 0) & (scale < 1)).all()
    assert not torch.allclose(scale[0], scale[1])  # the factors depend on the image
    plain, gated = create_model("cellnet_deep", 8), create_model("cellnet_deep", 8, se=True)
    extra = sum(p.numel() for p in gated.parameters()) - sum(p.numel() for p in plain.parameters())
    assert 0 < extra < 0.1 * sum(p.numel() for p in plain.parameters())
    assert gated.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 8)


def test_mixstyle_mixes_each_images_channel_statistics_in_training_only():
    torch.manual_seed(0)
    content = torch.randn(6, 4, 8, 8)
    style_mean, style_std = torch.randn(6, 4, 1, 1) * 3, torch.rand(6, 4, 1, 1) * 2 + 0.5
    x = content * style_std + style_mean
    mix = MixStyle(p=1.0, alpha=0.3)
    assert mix.eval()(x) is x and MixStyle(p=0.0).train()(x) is x  # identity in eval mode (prediction, export) and at p = 0
    out = mix.train()(x)
    mean, std = x.mean((2, 3)), x.std((2, 3))
    out_mean = out.mean((2, 3))
    assert not torch.allclose(out, x)
    assert (out_mean >= mean.min(0).values - 1e-4).all() and (out_mean <= mean.max(0).values + 1e-4).all()  # convex mixes of the batch's
    normalise = lambda t: (t - t.mean((2, 3), keepdim=True)) / t.std((2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(normalise(out), normalise(x), atol=1e-3)  # the content (what is where) is untouched
    out_std = out.std((2, 3))
    assert (out_std >= std.min(0).values - 1e-3).all() and (out_std <= std.max(0).values + 1e-3).all()


def test_instance_batch_norm_removes_each_images_level_from_half_of_the_channels():
    torch.manual_seed(0)
    norm = InstanceBatchNorm(6)
    x = torch.randn(4, 6, 8, 8)
    gain, offset = torch.rand(4, 6, 1, 1) + 0.5, torch.randn(4, 6, 1, 1)  # another lab: each image and channel rescaled
    for mode in (norm.train, norm.eval):
        mode()
        out, shifted = norm(x), norm(x * gain + offset)
        assert out.shape == x.shape
        assert torch.allclose(out[:, :3], shifted[:, :3], atol=1e-4)  # the instance half does not see the change
        assert not torch.allclose(out[:, 3:], shifted[:, 3:], atol=1e-2)  # the batch half does
    assert torch.allclose(norm.train()(x)[:, :3], norm.eval()(x)[:, :3])  # no running statistics in the instance half
    assert norm(x.to(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    model = create_model("cellnet", 8, ibn=True)
    assert sum(isinstance(m, InstanceBatchNorm) for m in model.modules()) == 3  # the first three stages, not the last
    assert not any(isinstance(m, InstanceBatchNorm) for m in create_model("cellnet", 8).modules())
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 8)


def test_architecture_options_are_checked_with_the_valid_ones_named():
    model = create_model("cellnet", 3, mixstyle=0.5)
    assert sum(isinstance(m, MixStyle) for m in model.modules()) == 3  # after the stem and the first two stages
    assert [k for k in model.state_dict()] != [k for k in create_model("cellnet", 3).state_dict()]  # indices shift only when on
    assert not any(isinstance(m, MixStyle) for m in create_model("cellnet", 3).modules())
    with pytest.raises(LeukoscopeError, match=r"mixstyle is a probability per batch: between 0 and 1, got 2 \(options: .*mixstyle"):
        create_model("cellnet", 3, mixstyle=2)
    with pytest.raises(LeukoscopeError, match="bad architecture options for cellnet .*bogus"):
        create_model("cellnet", 3, bogus=1)


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


def test_train_transform_shows_the_central_view_of_a_context_image():
    batch = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    still = AugmentConfig(rotate=False, flip=False, scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0,
                          saturation=0.0, stain=0.0, blur_p=0.0)
    out = train_transform(batch, [0.0] * 3, [1.0] * 3, still, torch.Generator().manual_seed(0), view=0.5)
    # pixel centres line up: output pixel i samples input pixel i + 16 exactly
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out, batch[:, :, 16:48, 16:48].float() / 255, atol=1e-5)
    zoomed_out = AugmentConfig(rotate=False, flip=False, scale=(0.5, 0.5), translate=0.0, brightness=0.0, contrast=0.0,
                               saturation=0.0, stain=0.0, blur_p=0.0)
    whole = train_transform(batch, [0.0] * 3, [1.0] * 3, zoomed_out, torch.Generator().manual_seed(0), size=64, view=0.5)
    assert torch.allclose(whole, batch.float() / 255, atol=1e-5)  # zooming out by 2 reveals the whole context


def _colour_step_by_step(x, config, g):
    """The colour jitter written as separate steps: the reference for the fused affine map."""
    n = x.shape[0]
    view = (n, 1, 1, 1)
    brightness = torch.rand(n, generator=g) * 2 * config.brightness + 1 - config.brightness
    contrast = torch.rand(n, generator=g) * 2 * config.contrast + 1 - config.contrast
    saturation = torch.rand(n, generator=g) * 2 * config.saturation + 1 - config.saturation
    stain = (torch.rand(3 * n, generator=g) * 2 * config.stain + 1 - config.stain).view(n, 3, 1, 1)
    x = x * brightness.view(view) * stain
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast.view(view) + mean
    gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x = (x - gray) * saturation.view(view) + gray
    angle = (torch.rand(n, generator=g) * 2 * config.hue - config.hue) * 2 * math.pi
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]])
    out = torch.einsum("ij,njhw->nihw", yiq, x)
    i, q = out[:, 1].clone(), out[:, 2].clone()
    cos, sin = torch.cos(angle).view(n, 1, 1), torch.sin(angle).view(n, 1, 1)
    out[:, 1], out[:, 2] = cos * i - sin * q, sin * i + cos * q
    return torch.einsum("ij,njhw->nihw", torch.linalg.inv(yiq), out)


def test_fused_colour_jitter_matches_the_step_by_step_chain():
    from leukoscope.transforms import _random_colour, hue_matrix

    config = AugmentConfig(brightness=0.2, contrast=0.3, saturation=0.4, stain=0.1, hue=0.05)
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fused = _random_colour(x, config, torch.Generator().manual_seed(7))
    reference = _colour_step_by_step(x, config, torch.Generator().manual_seed(7))
    assert torch.allclose(fused, reference, atol=1e-5)
    gray = torch.full((1, 3, 1, 1), 0.4)
    assert torch.allclose(hue_matrix(torch.tensor([1.0])) @ gray.view(1, 3, 1), gray.view(1, 3, 1), atol=1e-5)


def test_fused_hed_jitter_matches_the_conversion_through_stain_densities():
    """One map in log space equals RGB -> optical density -> HED, scale and shift, -> RGB, per image."""
    from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

    from leukoscope.transforms import _random_hed

    config = AugmentConfig(hed=0.2, hed_shift=0.03)
    x = torch.rand(4, 3, 9, 7, generator=torch.Generator().manual_seed(2)) * 0.95 + 0.02
    fused = _random_hed(x, config, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same draws, in the same order: scales, then shifts
    scale = (torch.rand(12, generator=g) * 0.4 + 0.8).view(4, 3).double().numpy()
    shift = (torch.rand(12, generator=g) * 0.06 - 0.03).view(4, 3).double().numpy()
    for i in range(4):
        rgb = x[i].permute(1, 2, 0).double().numpy()
        density = np.log(rgb) / np.log(1e-6)
        stains = (density @ hed_from_rgb) * scale[i] + shift[i]
        expected = np.clip(np.exp((stains * np.log(1e-6)) @ rgb_from_hed), 0, 1)
        np.testing.assert_allclose(fused[i].permute(1, 2, 0).numpy(), expected, atol=2e-5)
    assert not torch.allclose(fused, x, atol=1e-3)  # it did change the colours


def test_model_card_round_trip_and_bundled_checkpoints():
    from leukoscope.checkpoint import ModelCard, Preprocessing, load_checkpoint
    from leukoscope.errors import LeukoscopeError
    from leukoscope.inference import bundled_models

    card = ModelCard("cellnet", ["blast", "normal"], Preprocessing(96, 0.8, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), reduce=True), {"se": True}, 1.3, 0.2, 0, "flip")
    assert ModelCard.from_meta(card.to_meta()) == card
    assert card.preprocessing.view.reduce and not ModelCard.from_meta({**card.to_meta(), "reduce": None}).preprocessing.reduce
    for name, path in bundled_models().items():
        read = ModelCard.from_meta(load_checkpoint(path))
        assert read.preprocessing.image_size == {"pbc": 126}.get(name, 112) and len(read.preprocessing.mean) == 3 and read.tta == "none", name
    with pytest.raises(LeukoscopeError, match="lacks class_names"):
        ModelCard.from_meta({"arch": "cellnet", "image_size": 64})


def test_bundled_models_have_cards_that_match_the_docs(capsys):
    from pathlib import Path

    from leukoscope.card import model_card
    from leukoscope.checkpoint import load_checkpoint
    from leukoscope.cli import main
    from leukoscope.inference import bundled_models

    docs = Path(__file__).resolve().parents[1] / "docs" / "models"
    for name, path in bundled_models().items():
        card = model_card(name, load_checkpoint(path))
        assert (docs / f"{name}.md").read_text() == card, f"docs/models/{name}.md is stale: rerun tools/bundle_model.py"
        assert main(["models", name.upper()]) == 0
        shown = capsys.readouterr().out
        assert shown == card.replace(f"`{name}`", f"`{name.upper()}`")
        for needed in ("not for diagnosis", "95% CI", "Known failure modes", "Another lab", "By image"):
            assert needed in card, (name, needed)


def test_instance_batch_norm_keeps_the_memory_format_training_chose():
    from leukoscope.models import training_memory_format

    model = create_model("cellnet_tiny", 3, ibn=True)  # a strided 1x1 convolution on 8 channels: NCHW on CPU
    assert training_memory_format(model, torch.device("cpu")) == torch.contiguous_format
    seen = []
    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].is_contiguous()))
    model.train()(torch.randn(3, 3, 64, 64))
    assert len(seen) > 10 and all(seen)  # no convolution was handed a channels_last tensor


@pytest.mark.filterwarnings("error")  # a user exporting an IBN model sees no tracer warnings
def test_instance_batch_norm_exports_to_onnx_with_the_same_probabilities(tmp_path):
    from leukoscope.inference import load_model

    torch.manual_seed(0)
    model = create_model("cellnet", 3, ibn=True)
    with torch.no_grad():  # batch statistics unlike the fresh defaults, so a dropped or misplaced half would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    meta = {"arch": "cellnet", "arch_kwargs": {"ibn": True}, "class_names": ["a", "b", "c"], "image_size": 48,
            "mean": [0.5] * 3, "std": [0.25] * 3}
    save_checkpoint(tmp_path / "m.pt", build_checkpoint(model.eval(), meta))
    images = torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    on_torch = load_model(tmp_path / "m.pt", backend="torch").predict_proba(images)
    on_onnx = load_model(tmp_path / "m.pt", backend="onnx").predict_proba(images)
    assert np.abs(on_torch - on_onnx).max() < 1e-4 and on_torch.std(0).max() > 1e-3  # the images are told apart
