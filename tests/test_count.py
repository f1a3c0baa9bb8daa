"""`leukoscope count`: detection, per-cell classification, per-image and per-slide roll-up, outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ARIA, DATA, require
from PIL import Image
from test_localise import field

import leukoscope
from leukoscope.cli import main
from leukoscope.counting import CELL_COLUMNS, count_image
from leukoscope.data import detect_layout
from leukoscope.data.splits import unseen_samples
from leukoscope.inference import bundled_models, load_model
from leukoscope.localise import BLACK, find_cells


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def fields(tmp_path):
    """Two slides of synthetic fields with known cells (two of them touching), an empty field and a broken file."""
    truth = {"slide_a/f1.png": [(80, 90, 28), (80, 146, 28), (200, 300, 24)], "slide_a/empty.png": [],
             "slide_b/f2.png": [(150, 200, 26)]}
    for name, cells in truth.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(field(300, 420, cells, seed=len(name))).save(tmp_path / name)
    (tmp_path / "slide_b" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return tmp_path, truth


def test_count_writes_cells_summary_overlays_and_report(tiny_run, fields, tmp_path, capsys):
    _, run = tiny_run
    root, truth = fields
    out = tmp_path / "count"
    assert main(["count", str(root / "slide_a"), str(root / "slide_b"), "--model", str(run), "--out", str(out)]) == 1  # a broken file
    cells = _rows(out / "cells.csv")
    assert list(cells[0]) == CELL_COLUMNS
    good = [c for c in cells if not c["error"]]
    per_image = {name: sum(c["image"].endswith(name) for c in good) for name in truth}
    assert per_image == {name: len(t) for name, t in truth.items()}  # touching cells are two; the empty field none
    assert [c["error"] for c in cells if c["error"]] and all(c["image"].endswith("broken.jpg") for c in cells if c["error"])
    summary = _rows(out / "summary.csv")
    totals = {r["slide"]: r for r in summary if r["image"] == "TOTAL"}
    assert set(totals) == {"slide_a", "slide_b", "ALL"}
    counted = {c: int(totals["ALL"][f"n_{c}"]) for c in ("blast", "normal")}
    assert int(totals["ALL"]["n_cells"]) == sum(counted.values()) == 4
    assert abs(float(totals["ALL"]["blast_percent"]) - 100 * counted["blast"] / 4) < 0.01
    assert int(totals["slide_a"]["n_cells"]) == 3 and int(totals["slide_b"]["n_cells"]) == 1
    errors = {r["image"].split("/")[-1]: r["error"] for r in summary if r["error"]}  # unreadable is not "no cells"
    assert set(errors) == {"broken.jpg", "TOTAL"} and "1 image not counted (unreadable, too large or grayscale)" in errors["TOTAL"]
    assert not totals["slide_a"]["error"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["empty.png", "f1.png", "f2.png"]
    assert "Differential count" in (out / "report.html").read_text()
    assert main(["count", str(root / "slide_a"), "--model", str(run), "--out", str(out)]) == 2  # earlier results are kept
    assert "--force" in capsys.readouterr().err
    assert main(["count", "WBC", str(root / "slide_a"), "--out", str(tmp_path / "again")]) == 2  # as predict is called
    assert "use --model wbc" in capsys.readouterr().err


def test_group_by_parent_and_the_python_api(tiny_run, fields):
    _, run = tiny_run
    root, _ = fields
    records = leukoscope.count(root, model=str(run), group_by="parent")
    assert {r.slide for r in records} == {"slide_a", "slide_b"}
    assert sum(not r.error for r in records) == 4 and sum(bool(r.error) for r in records) == 1
    whole = leukoscope.count(root, model=str(run))  # the folder given is one slide
    assert {r.slide for r in whole} == {root.name}


def test_an_empty_field_gives_zero_cells(tiny_run):
    model = load_model(tiny_run[1])
    cells, windows = count_image(model, field(200, 260, [], red_cells=30))
    assert cells == [] and windows == []


def test_a_field_given_twice_is_counted_once(tiny_run, tmp_path, capsys):
    Image.fromarray(field(200, 260, [(100, 130, 26)], red_cells=10)).save(tmp_path / "f.png")
    records = leukoscope.count([tmp_path, tmp_path / "f.png", tmp_path], model=str(tiny_run[1]))  # a folder, its file, again
    assert len(records) == 1 and "2 images given more than once: counted once" in capsys.readouterr().err


def test_a_folder_s_archives_and_slide_scans_are_named_rather_than_passed_over(tiny_run, tmp_path, capsys):
    """As predict says: a lab's zipped fields or a whole-slide scan in the folder are not silently left out of the count."""
    Image.fromarray(field(200, 260, [(100, 130, 26)], red_cells=10)).save(tmp_path / "f.png")
    (tmp_path / "more_fields.zip").write_bytes(b"PK\x03\x04" + bytes(60))
    (tmp_path / "slide.svs").write_bytes(b"II*\x00" + bytes(60))
    (tmp_path / "notes.txt").write_text("stained 2026-11-30")  # a lab's companion file: not an image, not worth a word
    records = leukoscope.count(tmp_path, model=str(tiny_run[1]))
    err = capsys.readouterr().err
    assert len(records) == 1 and "2 files not read" in err and ".svs: 1" in err and ".zip: 1" in err
    assert ".zip: archives: unpack them" in err and ".svs: whole-slide scans" in err and ".txt" not in err


def test_a_file_given_by_its_bare_name_is_a_slide_named_after_its_folder(tiny_run, tmp_path, capsys, monkeypatch):
    """`count f.png gray.png` in the fields' folder: the slide is that folder, not "."; a field not counted is said beside the slide's total."""
    folder = tmp_path / "slide_7"
    folder.mkdir()
    colour = field(200, 260, [(100, 130, 26)], red_cells=10)
    Image.fromarray(colour).save(folder / "f.png")
    Image.fromarray(colour).convert("L").save(folder / "gray.png")
    monkeypatch.chdir(folder)
    assert main(["count", "f.png", "gray.png", "--model", str(tiny_run[1]), "--out", str(tmp_path / "c")]) == 1
    line = capsys.readouterr().out.splitlines()[0]  # the tiny model is a blast model: its total gives a blast percentage
    assert line.startswith("slide_7: 1 white cell, blasts ") and line.endswith("%; 1 image not counted (unreadable, too large or grayscale)")
    assert {r["slide"] for r in _rows(tmp_path / "c" / "summary.csv")} == {"slide_7"}


def test_a_phone_s_48_mpixel_field_is_counted_with_boxes_in_its_own_pixels(tiny_run, tmp_path):
    """Over the 40 Mpixel limit, a JPEG is decoded at 1/2 scale (images.jpeg_reduction); its cells' boxes and areas are
    still given in the file's pixels, and its overlay puts them on the cells."""
    small = field(300, 420, [(80, 90, 28), (200, 300, 24)], seed=3)
    Image.fromarray(small).save(tmp_path / "small.png")
    Image.fromarray(small).resize((420 * 19, 300 * 19), Image.BICUBIC).save(tmp_path / "big.jpg", quality=92)  # 45.5 Mpixel
    cells = {}
    for r in leukoscope.count(tmp_path, model=str(tiny_run[1])):
        cells.setdefault(Path(r.image).name, []).append(r)
    assert not any(c.error for c in cells["big.jpg"]) and len(cells["big.jpg"]) == len(cells["small.png"]) == 2
    for big, plain in zip(sorted(cells["big.jpg"], key=lambda c: c.x0), sorted(cells["small.png"], key=lambda c: c.x0)):
        assert all(abs(getattr(big, k) - 19 * getattr(plain, k)) <= 0.06 * 19 * (plain.x1 - plain.x0) for k in ("x0", "y0", "x1", "y1"))
        assert 0.8 < big.area / (19 * 19 * plain.area) < 1.25
    assert main(["count", str(tmp_path / "big.jpg"), "--model", str(tiny_run[1]), "--out", str(tmp_path / "c")]) == 0
    drawn = np.asarray(Image.open(tmp_path / "c" / "overlays" / "big.png"))
    assert drawn.shape[:2] == (1143, 1600)  # 1600 px at most, whatever the file
    top = min(cells["big.jpg"], key=lambda c: c.x0)
    k = 1600 / (420 * 19)
    edge = drawn[round(top.y0 * k) + 4 : round(top.y1 * k) - 4, round(top.x0 * k)]  # the box's left side, drawn in a class colour
    assert (np.abs(edge.astype(int) - drawn[round(top.y0 * k) + 4 : round(top.y1 * k) - 4, round(top.x0 * k) - 8]).sum(axis=1) > 60).mean() > 0.8


def test_a_grayscale_field_is_not_counted_rather_than_counted_as_empty(tiny_run, tmp_path):
    colour = field(200, 260, [(100, 130, 26)], red_cells=10)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    Image.fromarray(colour).convert("L").save(tmp_path / "gray.png")  # a monochrome camera's field of the same cell
    records = {Path(r.image).name: r for r in leukoscope.count(tmp_path, model=str(tiny_run[1]))}
    assert not records["colour.png"].error and records["colour.png"].label
    assert "grayscale" in records["gray.png"].error and not records["gray.png"].label


def test_a_cell_segmented_onto_black_is_counted_on_a_plain_background(tiny_run):
    image = field(200, 260, [(100, 130, 26)], red_cells=0)
    yy, xx = np.ogrid[:200, :260]
    image[(yy - 100) ** 2 + (xx - 130) ** 2 > 40**2] = 0  # everything outside the cell masked to black
    cells, windows = count_image(load_model(tiny_run[1]), image)
    assert len(cells) == 1 and (windows[0].max(2) <= BLACK).mean() == 0  # the window shows slide, not black


def _unseen_fields(model, folder, limit: int, seed: int = 0):
    dataset = detect_layout(folder)
    chosen = unseen_samples(dataset, model.checkpoint.get("seen_images"))
    rng = np.random.default_rng(seed)
    return [chosen[i] for i in rng.choice(len(chosen), min(limit, len(chosen)), replace=False)], dataset


def test_real_bccd_fields_the_labelled_cell_is_found_and_named():
    """Held-out BCCD fields (never seen by `wbc`): one white cell is labelled per field."""
    folder = require(DATA / "bccd_wbc")
    if "wbc" not in bundled_models():
        pytest.skip("bundled model wbc not built (make models)")
    model = load_model("wbc")
    samples, dataset = _unseen_fields(model, folder, 40)
    found, named, familiar = 0, 0, []
    for sample in samples:
        rgb = np.asarray(Image.open(dataset.abspath(sample)).convert("RGB"))
        cells, _ = count_image(model, rgb)
        found += bool(cells)
        named += sample.label in {c.label for c in cells}
        familiar += [c.in_domain for c in cells]
    assert found >= 0.95 * len(samples), f"a white cell found in {found} of {len(samples)} fields"
    assert set(familiar) <= {True, False} and sum(familiar) >= 0.6 * len(familiar)  # a lab `wbc` trained on: mostly in domain
    assert named >= 0.6 * len(samples), f"the labelled type among the detected cells in {named} of {len(samples)} fields"


def test_real_aria_fields_hold_detected_cells_and_count_runs_with_the_blast_model(tmp_path):
    folder = require(ARIA)
    paths = sorted(folder.rglob("*.jpg"))[::150][:16]
    detected = [len(find_cells(np.asarray(Image.open(p).convert("RGB")))) for p in paths]
    assert sum(n >= 1 for n in detected) >= 0.9 * len(paths), detected
    if "blast" not in bundled_models():
        pytest.skip("bundled model blast not built (make models)")
    assert main(["count", *map(str, paths[:4]), "--model", "blast", "--out", str(tmp_path / "c")]) == 0
    total = [r for r in _rows(tmp_path / "c" / "summary.csv") if r["image"] == "TOTAL"][-1]
    assert int(total["n_cells"]) >= 4 and 0 <= float(total["blast_percent"]) <= 100


def test_count_flags_cells_of_a_lab_the_model_never_saw_and_warns(tmp_path, capsys):
    folder = require(ARIA)
    if "wbc" not in bundled_models():
        pytest.skip("bundled model wbc not built (make models)")
    paths = sorted((folder / "Benign").glob("*.jpg"))[:2]  # another lab's marrow-like fields: nothing `wbc` trained on
    assert main(["count", *map(str, paths), "--out", str(tmp_path / "c")]) == 0
    cells = [c for c in _rows(tmp_path / "c" / "cells.csv") if c["label"] != "platelet"]
    total = [r for r in _rows(tmp_path / "c" / "summary.csv") if r["image"] == "TOTAL"][-1]
    assert int(total["n_out_of_domain"]) == sum(c["in_domain"] == "false" for c in cells) > 0.75 * int(total["n_cells"])
    assert "counted cells look unlike the model's training images" in capsys.readouterr().err


def test_count_service_endpoint(tiny_run):
    from fastapi.testclient import TestClient

    from leukoscope.serve.app import create_app

    client = TestClient(create_app(load_model(tiny_run[1]), "tiny"))
    image = field(300, 420, [(80, 90, 28), (80, 146, 28), (200, 300, 24)])
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    response = client.post("/count", files={"files": ("f.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    result = body["results"][0]
    assert len(result["cells"]) == 3 and result["filename"] == "f.png" and result["overlay"].startswith("data:image/png;base64,")
    assert body["summary"]["n_cells"] == 3 and set(body["summary"]) >= {"n_blast", "pct_blast", "blast_percent"}
    outside = body["summary"]["n_out_of_domain"]  # the page shows the service's warning, on count's own rule
    assert (body["summary"]["warning"] is None) == (outside <= 0.25 * 3)
    if body["summary"]["warning"]:
        assert body["summary"]["warning"].startswith(f"{outside} of the 3 cells look")
    bad = client.post("/count", files={"files": ("x.jpg", b"\xff\xd8 broken", "image/jpeg")})
    assert bad.status_code == 422 and "x.jpg" in json.dumps(bad.json())
    gray = client.post("/count", files={"files": ("g.png", _png_bytes(image[..., 0]), "image/png")})  # as the CLI: not "0 cells"
    assert gray.status_code == 422 and "grayscale" in gray.json()["error"] and gray.json()["file"] == "g.png"
    # Among several fields, a bad one is an error entry in its place and the others are counted.
    mixed = client.post("/count", files=[("files", ("x.jpg", b"\xff\xd8 broken", "image/jpeg")),
                                         ("files", ("f.png", buffer.getvalue(), "image/png")),
                                         ("files", ("g.png", _png_bytes(image[..., 0]), "image/png"))])
    assert mixed.status_code == 200, mixed.text
    first, second, third = mixed.json()["results"]
    assert first["filename"] == "x.jpg" and first["status"] == 422 and "unreadable" in first["error"] and "cells" not in first
    assert len(second["cells"]) == 3 and "grayscale" in third["error"]
    assert mixed.json()["summary"]["n_cells"] == 3 and mixed.json()["summary"]["error"] == "2 images not counted (unreadable, too large or grayscale)"


def test_count_service_gives_boxes_in_the_upload_s_pixels_when_it_decodes_it_reduced(tiny_run):
    """Over the service's pixel limit a JPEG is decoded at 1/2 scale; width, height and boxes stay in its own pixels."""
    import io

    from fastapi.testclient import TestClient

    from leukoscope.serve.app import create_app

    buffer = io.BytesIO()
    Image.fromarray(field(600, 840, [(160, 180, 56), (400, 600, 48)], seed=3)).save(buffer, format="JPEG", quality=95)
    upload = {"files": ("f.jpg", buffer.getvalue(), "image/jpeg")}
    model = load_model(tiny_run[1])
    whole = TestClient(create_app(model, "tiny")).post("/count", files=upload).json()["results"][0]
    half = TestClient(create_app(model, "tiny", max_pixels=200_000)).post("/count", files=upload).json()["results"][0]
    assert (half["width"], half["height"]) == (whole["width"], whole["height"]) == (840, 600)
    assert len(half["cells"]) == len(whole["cells"]) == 2
    for a, b in zip(sorted(half["cells"], key=lambda c: c["x0"]), sorted(whole["cells"], key=lambda c: c["x0"])):
        assert all(abs(a[k] - b[k]) <= 8 for k in ("x0", "y0", "x1", "y1")), (a, b)


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_count_corrects_a_yellow_cast_as_the_model_does(tiny_run):
    from dataclasses import replace

    from leukoscope.stain import fit_cast_range

    image = field(200, 260, [(100, 130, 26)], red_cells=20)
    model = load_model(tiny_run[1])
    model.view = replace(model.view, cast=fit_cast_range([image]))
    yellow = np.clip(image * np.array([1.0, 0.95, 0.6]), 0, 255).astype(np.uint8)
    plain_cells, _ = count_image(model, image)
    cells, windows = count_image(model, yellow)
    assert len(cells) == len(plain_cells) == 1 and abs(cells[0].x0 - plain_cells[0].x0) <= 2
    assert windows[0][..., 2].mean() > 0.85 * windows[0][..., 0].mean()  # blue restored in the window the model saw


def test_count_calls_every_cell_among_the_given_classes(tmp_path, capsys):
    """`count --classes`: a differential of the five normal types; a class the model lacks is refused."""
    folder = require(DATA / "bccd_wbc")
    if "wbc" not in bundled_models():
        pytest.skip("bundled model wbc not built (make models)")
    five = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    fields = sorted(folder.glob("*/*.jpg"))[:6]
    out = tmp_path / "count"
    assert main(["count", *map(str, fields), "--out", str(out), "--classes", ",".join(five)]) == 0
    cells = _rows(out / "cells.csv")
    assert cells and {c["label"] for c in cells} <= set(five)
    total = next(r for r in _rows(out / "summary.csv") if r["image"] == "TOTAL")
    assert [k[2:] for k in total if k.startswith("n_") and k not in ("n_cells", "n_edge", "n_out_of_domain")] == five
    assert main(["count", str(fields[0]), "--out", str(tmp_path / "bad"), "--classes", "neutrophil,smudge"]) == 2
    assert "no class 'smudge'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything is written
