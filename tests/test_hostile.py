"""A corpus of hostile files: every command handles each file or reports it, and keeps going."""

from __future__ import annotations

import csv
import shutil

import psutil
import pytest
from conftest import make_hostile_corpus, make_image_folder

from leukoscope import load_model
from leukoscope.cli import main

TINY = ["--arch", "cellnet_tiny", "--image-size", "32", "--epochs", "2", "--batch-size", "8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = make_image_folder(root / "data", n_per_class=12)
    assert main(["train", str(data), "--out", str(root / "run"), *TINY]) == 0
    return root


def test_predict_survives_the_corpus(trained, tmp_path):
    expected = make_hostile_corpus(tmp_path / "corpus")
    rss_before = psutil.Process().memory_info().rss
    out = tmp_path / "preds.csv"
    assert main(["predict", str(trained / "run"), str(tmp_path / "corpus"), "--out", str(out)]) == 1  # some files failed
    rss_growth = psutil.Process().memory_info().rss - rss_before
    rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(open(out, encoding="utf-8"))}
    assert set(rows) == set(expected)  # the directory named folder.jpg is not a file
    for name, ok in expected.items():
        if ok:
            assert rows[name]["label"] in ("blast", "normal") and not rows[name]["error"], name
        else:
            assert rows[name]["error"] and not rows[name]["label"], name
    assert "too large" in rows["bomb.png"]["error"] and "empty" in rows["zero.png"]["error"]
    assert "broken symlink" in rows["broken_link.png"]["error"]
    assert rss_growth < 300e6


def test_python_api_reports_per_file_errors(trained, tmp_path):
    expected = make_hostile_corpus(tmp_path / "corpus")
    predictions = load_model(trained / "run").predict([tmp_path / "corpus" / n for n in expected])
    assert [not p.error for p in predictions] == list(expected.values())


def test_train_and_evaluate_skip_bad_files(trained, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    expected = make_hostile_corpus(tmp_path / "corpus")
    for i, name in enumerate(n for n in expected if not (tmp_path / "corpus" / n).is_symlink()):
        shutil.copy(tmp_path / "corpus" / name, data / ("blast" if i % 2 else "normal") / name)
    (data / "normal" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    assert main(["train", str(data), "--out", str(tmp_path / "run"), *TINY]) == 0
    assert "warning: skipping" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "run"), str(data), "--out", str(tmp_path / "eval")]) == 0
    assert main(["check-data", str(data), "--json", str(tmp_path / "check.json")]) == 1
    report = __import__("json").loads((tmp_path / "check.json").read_text())
    bad = {item["path"].split("/")[-1] for item in report["unreadable"]}
    assert bad == {n for n, ok in expected.items() if not ok and n != "broken_link.png"} | {"dangling.png"}


def test_serve_answers_4xx_never_5xx(trained, tmp_path):
    from fastapi.testclient import TestClient

    from leukoscope.serve import create_app

    expected = make_hostile_corpus(tmp_path / "corpus")
    client = TestClient(create_app(load_model(trained / "run"), "tiny"), raise_server_exceptions=False)
    for name, ok in expected.items():
        path = tmp_path / "corpus" / name
        data = path.read_bytes() if path.exists() else b""
        response = client.post("/predict", files=[("files", (name, data, "image/png"))])
        assert response.status_code == (200 if ok else response.status_code) and response.status_code < 500, name
        assert (response.status_code == 200) == ok, (name, response.json())


def test_segment_survives_the_corpus(tmp_path):
    expected = make_hostile_corpus(tmp_path / "corpus")
    assert main(["segment", str(tmp_path / "corpus"), "--out", str(tmp_path / "seg")]) == 1
    rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(open(tmp_path / "seg" / "segmentation.csv", encoding="utf-8"))}
    assert set(rows) == set(expected)
    for name, ok in expected.items():
        if name in ("one_pixel.png", "strip_2000x3.png"):  # too thin to segment: reported, not crashed
            assert "at least 8x8" in rows[name]["error"], name
        else:
            assert bool(rows[name]["error"]) != ok, (name, rows[name]["error"])
