"""The out-of-distribution score: the Mahalanobis distance it claims, the same on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import CNMC, DATA, TINY_TRAIN, make_image_folder, require
from PIL import Image

from leukoscope import load_model
from leukoscope.localise import fill_masked_background
from leukoscope.models import create_model
from leukoscope.ood import WithOOD, features_of, fit_ood


def _tiny_alarm(classes: int = 3):
    torch.manual_seed(0)
    model = create_model("cellnet_tiny", classes).eval()
    images = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8)
    stats = ([0.5] * 3, [0.25] * 3)
    return model, images, stats, fit_ood(model, images[:45], np.arange(45) % classes, images[45:], *stats)


def test_score_adds_the_content_and_style_distances_each_with_a_median_of_one_on_validation():
    from leukoscope.transforms import eval_transform

    model, images, stats, alarm = _tiny_alarm()
    maps: list[np.ndarray] = []  # the tapped feature maps, read by hooks: statistics computed here in numpy
    hooks = [model.features[i].register_forward_hook(lambda _m, _i, out: maps.append(out.detach().numpy().copy())) for i in model.style_taps]
    with torch.no_grad():
        x = eval_transform(images[45:], *stats)
        features = model.forward_features(x).double().numpy()
    for hook in hooks:
        hook.remove()
    style = np.concatenate([np.concatenate([m.mean((2, 3)), m.std((2, 3))], 1) for m in maps], 1).astype(np.float64)
    precision = (alarm["chol"] @ alarm["chol"].T).double().numpy()
    content = np.array([min((f - m) @ precision @ (f - m) for m in alarm["means"].double().numpy()) for f in features])
    style_precision = (alarm["style"]["chol"] @ alarm["style"]["chol"].T).double().numpy()
    centred = style - alarm["style"]["mean"].double().numpy()
    style_distance = np.einsum("ij,jk,ik->i", centred, style_precision, centred)
    assert alarm["style"]["taps"] == list(model.style_taps) and len(maps) == 2
    assert np.median(content) == pytest.approx(1, rel=1e-3) and np.median(style_distance) == pytest.approx(1, rel=1e-3)
    with torch.no_grad():
        out = WithOOD(model, alarm).eval()(x)
    assert out.shape == (15, 4)
    assert np.allclose(out[:, -1].numpy(), content + style_distance, rtol=1e-3)
    assert np.allclose(out[:, :3].numpy(), model(x).detach().numpy(), atol=1e-5)
    assert alarm["threshold"] == pytest.approx(np.percentile(content + style_distance, 95), rel=1e-2)  # 95% of validation below


def test_an_alarm_without_a_style_part_is_the_plain_distance_to_the_nearest_class():
    """Alarms fitted before the style part (and models without style taps): the squared Mahalanobis distance alone."""
    from leukoscope.transforms import eval_transform

    model, images, stats, alarm = _tiny_alarm()
    content_only = {"means": alarm["means"], "chol": alarm["chol"] * 3}
    features, _ = features_of(model, images[45:], *stats)
    precision = (content_only["chol"] @ content_only["chol"].T).double().numpy()
    expected = np.array([min((f - m) @ precision @ (f - m) for m in content_only["means"].double().numpy()) for f in features])
    with torch.no_grad():
        out = WithOOD(model, content_only).eval()(eval_transform(images[45:], *stats))
    assert np.allclose(out[:, -1].numpy(), expected, rtol=1e-3)


def test_the_style_part_catches_a_colour_shift_that_the_content_part_barely_sees():
    """A strong tint over the validation images: every one is out of domain, mostly through the style part."""
    from leukoscope.transforms import eval_transform

    model, images, stats, alarm = _tiny_alarm()
    tinted = eval_transform((images[45:].float() * torch.tensor([1.0, 0.6, 0.3])[:, None, None]).to(torch.uint8), *stats)
    content_only = WithOOD(model, {"means": alarm["means"], "chol": alarm["chol"]}).eval()
    with torch.no_grad():
        score = WithOOD(model, alarm).eval()(tinted)[:, -1]
        content = content_only(tinted)[:, -1]
    assert (score > alarm["threshold"]).all()
    assert (score - content).median() > 5 * content.median()  # each part's median is 1 on the untinted images


def test_one_training_image_per_class_still_gives_a_finite_score():
    torch.manual_seed(0)
    model = create_model("cellnet_tiny", 2).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    alarm = fit_ood(model, images[:2], np.array([0, 1]), images[2:], [0.5] * 3, [0.25] * 3)  # no spread around either mean
    assert torch.isfinite(alarm["chol"]).all() and np.isfinite(alarm["threshold"])


def test_torch_and_onnx_backends_agree_on_the_score(tiny_run):
    data, run = tiny_run
    paths = sorted(data.rglob("*.png"))[:10]
    torch_scores = np.array([p.ood_score for p in load_model(run, backend="torch").predict(paths)])
    onnx_scores = np.array([p.ood_score for p in load_model(run, backend="onnx").predict(paths)])
    assert np.isfinite(torch_scores).all() and np.allclose(torch_scores, onnx_scores, rtol=1e-3, atol=1e-3)


def test_the_report_shows_how_much_is_out_of_domain(tiny_run):
    import json

    _, run = tiny_run
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        assert 0 <= metrics[split]["out_of_domain"] <= 1 and len(metrics[split]["out_of_domain_ci"]) == 2
    assert metrics["val"]["out_of_domain"] <= 0.25  # the threshold keeps 95% of validation below it
    assert "out of domain" in (run / "report.html").read_text()


def _on_black(image: np.ndarray) -> np.ndarray:
    """``image`` with its pale background (the conftest cells') masked to black, as segmented cells are saved."""
    out = image.copy()
    out[image.min(2) > 215] = 0
    return out


def test_a_painted_cell_is_out_of_domain_for_a_model_that_never_saw_one(tiny_run):
    from dataclasses import replace

    data, run = tiny_run
    model = load_model(run)
    assert model.checkpoint["recoloured_training_images"] == 0
    model.view = replace(model.view, cell=0.6)  # frame cells as the cell-centric models do
    model.ood_threshold = float("inf")  # every score in domain: what remains is the painting rule
    on_black = _on_black(np.asarray(Image.open(sorted(data.rglob("*.png"))[0])))
    plain = fill_masked_background(on_black)
    assert plain is not on_black
    painted, unpainted = model.predict([on_black, plain])
    assert painted.ood_score == unpainted.ood_score and painted.probabilities == unpainted.probabilities  # the same window
    assert painted.in_domain is False and unpainted.in_domain is True
    model.recoloured_seen = True
    assert model.predict(on_black)[0].in_domain is True


def test_a_grayscale_image_is_out_of_domain_for_a_model_trained_on_colour(tiny_run):
    data, run = tiny_run
    model = load_model(run)
    model.ood_threshold = float("inf")  # every score in domain: what remains is the colour rule
    cell = np.asarray(Image.open(min(data.rglob("*.png"))).convert("RGB"))
    gray = np.repeat(np.asarray(Image.fromarray(cell).convert("L"))[:, :, None], 3, axis=2)
    faint = np.clip(gray.astype(int) + np.random.default_rng(0).integers(-3, 4, gray.shape), 0, 255).astype(np.uint8)  # JPEG-like chroma noise
    colour, grey, noisy = model.predict([cell, gray, faint])
    assert colour.in_domain is True and grey.in_domain is False and noisy.in_domain is False
    assert grey.label in model.class_names  # still predicted: flagged, not refused
    model.recoloured_seen = True  # a model trained on grayscale images (see the next test) keeps them
    assert model.predict(gray)[0].in_domain is True


def test_an_image_too_small_to_hold_a_cell_is_out_of_domain(tiny_run):
    data, run = tiny_run
    model = load_model(run)
    model.ood_threshold = float("inf")  # every score in domain: what remains is the size rule
    cell = Image.open(min(data.rglob("*.png"))).convert("RGB")
    side = model.view.size  # a quarter of it is the least a model reads a cell from
    thumbnail, small, whole = (np.asarray(cell.resize((s, s))) for s in (side // 4 - 2, side // 2, side))
    assert [p.in_domain for p in model.predict([thumbnail, small, whole])] == [False, True, True]


def test_training_on_painted_cells_records_them_and_keeps_such_cells_in_domain_and_a_colour_range(tmp_path):
    from leukoscope.cli import main

    data = make_image_folder(tmp_path / "data", n_per_class=12)
    for path in data.rglob("*.png"):
        Image.fromarray(_on_black(np.asarray(Image.open(path)))).save(path)
    (tmp_path / "cell.yaml").write_text("cell: 0.6\ncolour_cast: true\n")
    assert main(["train", str(data), "--out", str(tmp_path / "run"), *TINY_TRAIN, "--config", str(tmp_path / "cell.yaml")]) == 0
    model = load_model(tmp_path / "run")
    assert model.recoloured_seen and model.checkpoint["recoloured_training_images"] > 0
    paths = sorted(data.rglob("*.png"))
    assert all(p.in_domain == (p.ood_score <= model.ood_threshold) for p in model.predict(paths))
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx")]) == 0
    exported = load_model(tmp_path / "m.onnx")
    assert exported.recoloured_seen  # the record travels with the exported graph, and so does the colour range
    assert model.view.cast is not None and len(model.view.cast) == 6 and exported.view.cast == model.view.cast


def test_the_blast_model_flags_real_cells_segmented_onto_black():
    cells = sorted(require(CNMC).rglob("*.bmp"))
    predictions = load_model("blast").predict(cells)
    assert len(cells) == 15 and all(p.localised and p.in_domain is False for p in predictions)


def _predict_warning(capsys, model: str, folder, out) -> str:
    from leukoscope.cli import main

    assert main(["predict", model, str(folder), "--out", str(out)]) == 0
    return capsys.readouterr().err


def test_predict_warns_when_most_images_are_out_of_domain_and_points_a_central_crop_white_cell_model_to_wbc(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(4):  # noise: no model's training images
        Image.fromarray(rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)).save(tmp_path / f"noise{i}.png")
    err = _predict_warning(capsys, "pbc", tmp_path, tmp_path / "pbc.csv")
    assert "warning: 4 of 4 images look unlike this model's training images" in err
    assert "try the bundled `wbc` model" in err  # pbc takes a fixed central crop
    err = _predict_warning(capsys, "wbc", tmp_path, tmp_path / "wbc.csv")
    assert "warning: 4 of 4 images look unlike" in err and "`wbc` model" not in err  # wbc frames the cell itself
    err = _predict_warning(capsys, "aria-all", tmp_path, tmp_path / "aria.csv")
    assert "look unlike" in err and "`wbc` model" not in err  # not a white-cell model


def test_out_of_domain_warning_starts_above_a_quarter_of_the_images():
    from leukoscope.predict import out_of_domain_warning

    pbc = load_model("pbc")
    assert out_of_domain_warning(pbc, 1, 4) is None
    assert out_of_domain_warning(pbc, 0, 0) is None
    assert out_of_domain_warning(pbc, 2, 4).startswith("warning: 2 of 4 images look unlike")


def test_predict_does_not_warn_on_tiles_like_the_training_ones(tmp_path, capsys):
    pbc = require(DATA / "pbc")
    tiles = sorted(pbc.rglob("*.jpg"))[::400][:6]
    for tile in tiles:
        (tmp_path / tile.name).symlink_to(tile)
    assert "look unlike" not in _predict_warning(capsys, "pbc", tmp_path, tmp_path / "pbc.csv")


def test_the_out_of_domain_warning_agrees_with_its_count():
    from types import SimpleNamespace

    from leukoscope.predict import out_of_domain_warning

    model = SimpleNamespace(view=SimpleNamespace(cell=0.6), class_names=["a", "b"])
    assert out_of_domain_warning(model, 1, 4) is None  # a quarter or less: no warning
    assert out_of_domain_warning(model, 1, 1).startswith("warning: 1 of 1 image looks unlike this model's training images")
    assert out_of_domain_warning(model, 2, 3).startswith("warning: 2 of 3 images look unlike")
