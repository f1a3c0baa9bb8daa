"""The classical pipeline: segmentation, handcrafted features and every --method end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import DATA, require, synthetic_cell
from PIL import Image

from leukoscope import load_model
from leukoscope.classical.features import FEATURE_NAMES, FeatureCache, cell_features, shape_features
from leukoscope.classical.segment import Segmentation, segment_cell
from leukoscope.cli import main


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEUKOSCOPE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("fraction", [0.2, 0.45, 0.7])
def test_segmentation_finds_the_known_nucleus_area(fraction):
    size = 128
    image = synthetic_cell(np.random.default_rng(1), size, fraction, hue=20)
    radius = size * 0.35 * np.sqrt(fraction)
    seg = segment_cell(image)
    assert abs(seg.nucleus.sum() - np.pi * radius**2) / (np.pi * radius**2) < 0.10
    assert abs(seg.cell.sum() - np.pi * (size * 0.35) ** 2) / (np.pi * (size * 0.35) ** 2) < 0.10
    assert seg.leukocytes == 1 and not (seg.nucleus & seg.cytoplasm).any()


def test_black_background_is_not_taken_for_the_nucleus():
    image = synthetic_cell(np.random.default_rng(2), 96, 0.4, hue=20)
    cell = np.linalg.norm(np.mgrid[:96, :96] - 48, axis=0) <= 96 * 0.35
    image[~cell] = 0  # C-NMC style: segmented cell on black
    seg = segment_cell(image)
    assert seg.nucleus.sum() < 0.6 * cell.sum() and seg.nucleus[48, 48]


def test_shape_features_of_hand_built_shapes():
    yy, xx = np.mgrid[:101, :101]
    disc = (yy - 50) ** 2 + (xx - 50) ** 2 <= 40**2
    area, perimeter, circularity, eccentricity, solidity, convexity = shape_features(disc)
    assert circularity == pytest.approx(1.0, abs=0.1) and eccentricity < 0.05 and solidity > 0.98 and convexity > 0.95
    square = np.zeros((101, 101), bool)
    square[20:80, 20:80] = True
    assert shape_features(square)[2] == pytest.approx(np.pi / 4, abs=0.05)
    nucleus = np.zeros((100, 100), bool)
    nucleus[:25] = True
    seg = Segmentation(nucleus=nucleus, cytoplasm=~nucleus, cell=np.ones((100, 100), bool), leukocytes=1)
    assert seg.nucleus_ratio == pytest.approx(0.25)


@pytest.mark.filterwarnings("error::sklearn.exceptions.ConvergenceWarning")  # a flat image: an empty nucleus, said by no warning
def test_feature_vector_is_finite_and_named():
    image = synthetic_cell(np.random.default_rng(3), 64, 0.5, 20)
    values = cell_features(image)
    assert values.shape == (len(FEATURE_NAMES),) and np.isfinite(values).all()
    flat = np.full((32, 32, 3), 128, np.uint8)  # no structure at all: still a finite vector
    assert np.isfinite(cell_features(flat)).all()


def test_segment_command_writes_masks_and_reports_bad_files(tmp_path, capsys):
    good = tmp_path / "cell one.png"
    Image.fromarray(synthetic_cell(np.random.default_rng(4), 96, 0.5, 20)).save(good)
    (tmp_path / "bad.jpg").write_text("<html>not an image</html>")
    assert main(["segment", str(good), str(tmp_path / "bad.jpg"), "--out", str(tmp_path / "seg")]) == 1
    rows = list(csv.DictReader(open(tmp_path / "seg" / "segmentation.csv", encoding="utf-8")))
    assert rows[0]["mode"] == "single" and rows[0]["leukocytes"] == "1" and not rows[0]["error"]
    assert rows[1]["error"].startswith("unreadable image")
    assert "bad.jpg: error: unreadable image" in capsys.readouterr().err
    for suffix in ("nucleus", "cytoplasm", "overlay"):
        assert (tmp_path / "seg" / f"cell one_{suffix}.png").is_file()


def test_segment_real_cells_and_smear_field(tmp_path, capsys):
    pbc = sorted((require(DATA / "pbc") / "lymphocyte").glob("*.jpg"))[0]
    cnmc = sorted((require(DATA / "cnmc2019") / "all").glob("*.bmp"))[0]
    field = sorted((require(DATA / "aria_all") / "Benign").glob("*.jpg"))[0]
    assert main(["segment", str(pbc), str(cnmc), str(field), "--out", str(tmp_path)]) == 0
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "segmentation.csv"))}
    for path in (pbc, cnmc):
        assert rows[str(path)]["mode"] == "single" and 0.2 < float(rows[str(path)]["nucleus_ratio"]) < 1
    assert rows[str(field)]["mode"] == "field" and int(rows[str(field)]["leukocytes"]) >= 3
    assert "leukocytes found" in capsys.readouterr().out


def test_auto_mode_tells_fields_from_single_cells_on_real_images():
    """The first 8 images of each class folder (sorted): the auto rule was set on random samples."""
    from leukoscope.classical.segment import segment_image
    from leukoscope.images import load_rgb

    def modes(folder, pattern):
        out = []
        for path in sorted(require(folder).rglob(pattern))[:8]:
            image = Image.fromarray(load_rgb(path))  # as `leukoscope segment` reads it
            image.thumbnail((512, 512))
            out.append(segment_image(np.asarray(image), "auto")[1])
        return out

    singles = modes(DATA / "pbc" / "neutrophil", "*.jpg") + modes(DATA / "all_idb2" / "blast", "*.tif") + modes(DATA / "cnmc2019", "*.bmp")
    fields = modes(DATA / "bccd_wbc" / "neutrophil", "*.jpg") + modes(DATA / "aria_all" / "Pro", "*.jpg")
    assert singles.count("single") >= len(singles) - 2, singles  # measured: about 3% of single cells read as fields
    assert fields.count("field") >= len(fields) - 1, fields


def _wbc_folder(root, n=18):
    """Three synthetic 'cell types' that differ in nucleus size and stain."""
    rng = np.random.default_rng(0)
    for label, fraction, hue in (("eosinophil", 0.3, 60), ("lymphocyte", 0.75, 0), ("neutrophil", 0.35, 0)):
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(synthetic_cell(rng, 48, fraction, hue)).save(root / label / f"{label}_{i}.png")
    return root


@pytest.fixture(scope="module")
def wbc(tmp_path_factory):
    root = tmp_path_factory.mktemp("wbc")
    data = _wbc_folder(root / "data")
    args = ["--arch", "cellnet_tiny", "--image-size", "48", "--epochs", "4", "--batch-size", "8"]
    assert main(["train", str(data), "--out", str(root / "cnn"), *args]) == 0
    return data, root


@pytest.mark.filterwarnings("error::FutureWarning")  # scikit-learn's deprecation of SVC(probability=True) filled the terminal
@pytest.mark.parametrize("method", ["svm", "mlp", "cnn-rf", "wbc-two-stage"])
def test_each_method_end_to_end(wbc, method, tmp_path):
    data, root = wbc
    run = tmp_path / method
    extra = ["--backbone", str(root / "cnn")] if method in ("cnn-rf", "wbc-two-stage") else []
    assert main(["train", str(data), "--out", str(run), "--method", method, "--image-size", "48", *extra]) == 0
    assert (run / "model.joblib").is_file() and (run / "splits.csv").read_bytes() == (root / "cnn" / "splits.csv").read_bytes()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["accuracy"] >= 0.9 and np.isfinite(metrics["test"]["loss"])
    model = load_model(run)
    assert model.kind == method and model.class_names == ["eosinophil", "lymphocyte", "neutrophil"]
    assert main(["predict", str(run), str(data / "lymphocyte"), "--out", str(tmp_path / "p.csv")]) == 0
    assert main(["evaluate", str(run), str(data), "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "report.html").is_file()


def test_features_are_cached(wbc, tmp_path):
    data, _ = wbc
    assert main(["train", str(data), "--out", str(tmp_path / "a"), "--method", "svm", "--image-size", "48"]) == 0
    shards = sorted(FeatureCache().folder.glob("*.npz"))
    index = json.loads((FeatureCache().folder / "index.json").read_text())
    assert shards and set(index.values()) == {p.name for p in shards}
    assert main(["train", str(data), "--out", str(tmp_path / "b"), "--method", "svm", "--image-size", "48"]) == 0
    assert sorted(FeatureCache().folder.glob("*.npz")) == shards  # nothing new computed
    assert main(["predict", str(tmp_path / "a"), str(data), "--out", str(tmp_path / "p.csv")]) == 0
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.full((48, 48, 3), 200, np.uint8)).save(other / "new.png")
    assert main(["predict", str(tmp_path / "a"), str(other), "--out", str(tmp_path / "q.csv")]) == 0
    assert sorted(FeatureCache().folder.glob("*.npz")) == shards  # predict computed a new image's features but wrote nothing


def test_feature_cache_is_keyed_by_the_feature_code(tmp_path, monkeypatch):
    from leukoscope.classical import features

    cache = FeatureCache(tmp_path)
    cache.save({"k": np.ones(len(FEATURE_NAMES), np.float32)})
    assert set(FeatureCache(tmp_path).load(["k", "absent"])) == {"k"}
    features.code_version.cache_clear()
    monkeypatch.setattr(features, "__file__", str(tmp_path / "edited_features.py"))
    (tmp_path / "edited_features.py").write_text("# the feature code changed\n")
    assert FeatureCache(tmp_path).load(["k"]) == {}  # features of the old code are not served
    features.code_version.cache_clear()


@pytest.mark.parametrize("argv, message", [
    (["--method", "cnn-rf"], "needs --backbone"),
    (["--method", "svn"], "did you mean 'svm'"),
])
def test_bad_method_options(wbc, tmp_path, capsys, argv, message):
    data, _ = wbc
    assert main(["train", str(data), "--out", str(tmp_path / "r"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_backbone_from_another_split_is_refused(wbc, tmp_path, capsys):
    data, root = wbc
    assert main(["train", str(data), "--out", str(tmp_path / "r"), "--method", "cnn-rf", "--backbone", str(root / "cnn"), "--seed", "5"]) == 2
    assert "was trained on" in capsys.readouterr().err
