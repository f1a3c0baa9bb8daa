"""Heatmaps, ONNX export and the operating threshold, on a tiny synthetic run and on real cells."""

from __future__ import annotations

import csv
import json

import numpy as np
import torch
import pytest
from conftest import DATA, make_image_folder, require
from PIL import Image

from leukoscope import load_model
from leukoscope.cli import main
from leukoscope.inference import bundled_models

TINY = ["--arch", "cellnet_tiny", "--image-size", "32", "--epochs", "3", "--batch-size", "8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("xrun")
    data = make_image_folder(root / "data", n_per_class=16)
    assert main(["train", str(data), "--out", str(root / "run"), *TINY, "--target-sensitivity", "0.9"]) == 0
    return data, root / "run"


def test_report_has_reliability_gallery_and_operating_point(run):
    data, folder = run
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (folder / "reliability.png").is_file() and list((folder / "gallery").glob("*.png"))
    op = metrics["val"]["operating_point"]
    assert op["positive_class"] == "blast" and op["sensitivity"] >= 0.9
    # recompute, do not trust: the stored calibration errors from the model's own test predictions
    from leukoscope.data import read_splits
    from leukoscope.metrics import expected_calibration_error
    from leukoscope.images import load_rgb

    model = load_model(folder, backend="torch")
    samples, splits = read_splits(folder / "splits.csv")
    test = [s for s, k in zip(samples, splits) if k == "test"]
    batch = torch.from_numpy(np.stack([load_rgb(data / s.path, model.image_size) for s in test])).permute(0, 3, 1, 2).contiguous()
    labels = np.array([model.class_names.index(s.label) for s in test])
    assert metrics["test"]["ece"] == pytest.approx(expected_calibration_error(model.predict_proba(batch), labels), abs=1e-6)
    raw = torch.softmax(model.logits(batch), dim=1).numpy()
    assert metrics["test"]["ece_uncalibrated"] == pytest.approx(expected_calibration_error(raw, labels), abs=1e-6)
    html = (folder / "report.html").read_text()
    assert "reliability" in html and "Heatmaps (Grad-CAM)" in html and "Operating point" in html
    assert load_model(folder).threshold == pytest.approx(op["threshold"])


def test_explain_writes_heatmaps_and_reports_bad_files(run, tmp_path, capsys):
    data, folder = run
    (tmp_path / "broken.png").write_bytes(b"not a png")
    images = sorted((data / "blast").glob("*.png"))[:3]
    code = main(["explain", str(folder), *map(str, images), str(tmp_path / "broken.png"), "--out", str(tmp_path / "cams")])
    assert code == 1
    rows = list(csv.DictReader(open(tmp_path / "cams" / "explanations.csv")))
    assert len(rows) == 4 and rows[-1]["error"].startswith("unreadable image")
    panel = np.asarray(Image.open(tmp_path / "cams" / rows[0]["heatmap"]))
    assert panel.shape[1] == 2 * 2 * 32 and panel.std() > 0
    captured = capsys.readouterr()
    assert "3 heatmaps, 1 failed" in captured.out and f"broken.png: error: {rows[-1]['error']}" in captured.err


def test_explain_rejects_unknown_method_and_class(run, tmp_path, capsys):
    data, folder = run
    image = str(sorted((data / "blast").glob("*.png"))[0])
    assert main(["explain", str(folder), image, "--out", str(tmp_path), "--method", "gradcan"]) == 2
    assert "did you mean 'gradcam'" in capsys.readouterr().err
    assert main(["explain", str(folder), image, "--out", str(tmp_path), "--class", "blsat"]) == 2
    assert "--class: the model has no class 'blsat' (did you mean 'blast'?)" in capsys.readouterr().err
    assert main(["explain", str(folder), image, "--out", str(tmp_path / "cams"), "--class", "Normals"]) == 0  # as --classes reads it
    with open(tmp_path / "cams" / "explanations.csv") as handle:
        assert [row["explained_class"] for row in csv.DictReader(handle)] == ["normal"]


def test_onnx_export_round_trip(run, tmp_path, capsys):
    data, folder = run
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(folder), "--out", str(onnx_path), "--images", str(data)]) == 0
    assert "max |p_onnx - p_torch|" in capsys.readouterr().out
    images = sorted(data.rglob("*.png"))
    torch_preds = load_model(folder, backend="torch").predict(images)
    onnx_model = load_model(onnx_path)
    assert onnx_model.kind == "onnx" and onnx_model.class_names == ["blast", "normal"]
    options = onnx_model.backend.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # decode threads keep the cores
    onnx_preds = onnx_model.predict(images)
    diff = max(abs(a.probabilities[c] - b.probabilities[c]) for a, b in zip(torch_preds, onnx_preds) for c in a.probabilities)
    assert diff < 1e-4 and [a.label for a in torch_preds] == [b.label for b in onnx_preds]
    assert main(["predict", str(onnx_path), str(data), "--out", str(tmp_path / "p.csv")]) == 0


def test_export_fails_loudly_beyond_tolerance(run, tmp_path, capsys, monkeypatch):
    import leukoscope.export

    _, folder = run
    real = leukoscope.export.export_onnx
    monkeypatch.setattr(leukoscope.export, "export_onnx", lambda *a, **k: real(*a, **{**k, "tolerance": -1.0}))  # no graph can pass
    assert main(["export", str(folder), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "not written" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
    assert main(["export", str(folder), "--out", str(tmp_path / "m.onnx"), "--tolerance", "-1"]) == 2  # a usage error, as every number
    assert "argument --tolerance: must be > 0, got -1.0" in capsys.readouterr().err


def test_export_leaves_out_unreadable_check_images_and_refuses_when_none_can_be_read(run, tmp_path, capsys):
    """An empty or broken file among --images ended export with a traceback."""
    data, folder = run
    image = min((data / "blast").glob("*.png"))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a png")
    assert main(["export", str(folder), "--out", str(tmp_path / "m.onnx"), "--images", str(image), str(tmp_path / "empty.png")]) == 0
    captured = capsys.readouterr()
    assert "on 1 real image (tolerance" in captured.out and (tmp_path / "m.onnx").is_file()
    assert f"--images: 1 unreadable image left out of the check (e.g. {tmp_path / 'empty.png'}: empty file)" in captured.err
    bad = [str(tmp_path / "empty.png"), str(tmp_path / "text.png")]
    assert main(["export", str(folder), "--out", str(tmp_path / "n.onnx"), "--images", *bad]) == 2
    assert "--images: none of the 2 images could be read" in capsys.readouterr().err and not (tmp_path / "n.onnx").exists()


def test_onnx_export_of_bundled_model_on_real_cells(tmp_path, capsys):
    if "pbc" not in bundled_models():
        pytest.skip("bundled model pbc not built (make models)")
    cells = require(DATA / "pbc") / "neutrophil"
    assert main(["export", "pbc", "--out", str(tmp_path / "pbc.onnx"), "--images", str(cells)]) == 0
    out = capsys.readouterr().out
    assert "on 64 real images" in out


def test_the_readme_s_code_runs_an_exported_graph_without_leukoscope(tmp_path, monkeypatch, capsys):
    """The README's block for another program (ONNX Runtime and Pillow only) gives leukoscope's call and probability."""
    import contextlib
    import io
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"<!-- ONNX-ELSEWHERE:START -->\n```python\n(.*?)```\n<!-- ONNX-ELSEWHERE:END -->", readme, re.DOTALL).group(1)
    cells = sorted(require(DATA / "pbc").rglob("*.jpg"))[::700][:10]
    monkeypatch.chdir(tmp_path)
    assert main(["export", "pbc", "--format", "onnx", "--out", "pbc.onnx"]) == 0
    expected = load_model("pbc", backend="torch").predict(cells)
    for cell, prediction in zip(cells, expected):
        (tmp_path / "cell.jpg").write_bytes(cell.read_bytes())
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (the README's own block, run as a reader would)
        label, probability, *domain = printed.getvalue().split()
        assert label == prediction.label and abs(float(probability) - prediction.confidence) <= 0.04, (cell, printed.getvalue())
        assert " ".join(domain) == ("in domain" if prediction.in_domain else "out of domain")


def test_explain_bundled_model_on_real_cells(tmp_path):
    if "pbc" not in bundled_models():
        pytest.skip("bundled model pbc not built (make models)")
    image = sorted((require(DATA / "pbc") / "eosinophil").glob("*.jpg"))[0]
    Image.new("RGB", (360, 363)).save(tmp_path / "black.png")  # nothing like a CellaVision tile
    assert main(["explain", "pbc", str(image), str(tmp_path / "black.png"), "--out", str(tmp_path / "cams")]) == 0
    cell, black = csv.DictReader((tmp_path / "cams" / "explanations.csv").read_text().splitlines())
    assert cell["predicted"] == "eosinophil" and (tmp_path / "cams" / cell["heatmap"]).is_file()
    assert cell["in_domain"] == "true" and black["in_domain"] == "false"  # the alarm, as predict writes it
    assert main(["predict", "pbc", str(image), str(tmp_path / "black.png"), "--out", str(tmp_path / "p.csv"), "--backend", "torch"]) == 0
    for explained, predicted in zip((cell, black), csv.DictReader((tmp_path / "p.csv").read_text().splitlines())):
        assert [explained[k] for k in ("predicted", "confidence", "ood_score", "in_domain")] == [
            predicted[k] for k in ("label", "confidence", "ood_score", "in_domain")]


def test_int8_export_refuses_a_graph_off_parity(run, tmp_path, capsys, monkeypatch):
    """The tiny 3-epoch model's calls sit near its threshold: int8 moves too many of them, so nothing is written."""
    from leukoscope import quantize

    data, folder = run
    out = tmp_path / "model.int8.onnx"
    monkeypatch.setattr(quantize, "MAX_ACCURACY_LOSS", -1.0)  # the run's own graph must then gain 100 points: refused
    assert main(["export", str(folder), "--out", str(out), "--precision", "int8"]) == 2
    assert "points of validation accuracy" in capsys.readouterr().err and not out.exists()
    assert not (folder / "model.int8.onnx").exists()
    assert main(["export", str(folder), "--out", str(out), "--precision", "int8", "--calibration", str(data), "--images", str(data)]) == 2
    assert "not written" in capsys.readouterr().err and not out.exists()


def test_int8_export_of_bundled_pbc_keeps_its_calls_on_real_cells(tmp_path, capsys):
    if "pbc" not in bundled_models():
        pytest.skip("bundled model pbc not built (make models)")
    import onnx

    cells = require(DATA / "pbc")
    out = tmp_path / "pbc.int8.onnx"
    assert main(["export", "pbc", "--out", str(out), "--precision", "int8", "--calibration", str(cells),
                 "--images", str(cells / "monocyte")]) == 0
    assert "calibrated on 256 images" in capsys.readouterr().out
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(out)).graph.node)  # really quantised
    model = load_model(out)
    assert model.meta["precision"] == "int8" and model.meta["calibration_images"] == 256
    sample = sorted((cells / "eosinophil").glob("*.jpg"))[::20]  # other cells than the check images
    fp32, int8 = load_model("pbc", backend="torch").predict(sample), model.predict(sample)
    assert np.mean([a.label == b.label for a, b in zip(fp32, int8)]) >= 0.95
