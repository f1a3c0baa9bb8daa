"""The web service: JSON API, upload validation, and the page in a real headless Chromium."""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ARIA, DATA, require
from fastapi.testclient import TestClient
from PIL import Image

from leukoscope import load_model
from leukoscope.inference import bundled_models
from leukoscope.serve import create_app

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def client() -> TestClient:
    if "pbc" not in bundled_models():
        pytest.skip("bundled model pbc not built (make models)")
    return TestClient(create_app(load_model("pbc"), "pbc", max_bytes=200_000, max_pixels=1_000_000))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_models_docs_and_page(client):
    assert client.get("/health").json()["status"] == "ok"
    model = client.get("/models").json()["models"][0]
    assert model["name"] == "pbc" and "neutrophil" in model["classes"]
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    assert 'id="drop"' in client.get("/").text


def test_predict_real_cells_with_heatmap(client):
    paths = [sorted((require(DATA / "pbc") / c).glob("*.jpg"))[0] for c in ("eosinophil", "platelet")]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    response = client.post("/predict?heatmap=true", files=files)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["label"] for r in results] == ["eosinophil", "platelet"]
    for r in results:
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-4
        assert r["confidence"] == max(r["probabilities"].values())
        heatmap = Image.open(io.BytesIO(__import__("base64").b64decode(r["heatmap"].split(",", 1)[1])))
        size = client.get("/models").json()["models"][0]["image_size"]
        assert heatmap.size == (size, size)


FIVE = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def test_a_service_restricted_to_some_classes_chooses_among_them_and_still_draws_heatmaps():
    from leukoscope.classes import restrict_classes

    if "pbc" not in bundled_models():
        pytest.skip("bundled model pbc not built (make models)")
    whole = load_model("pbc")
    app = TestClient(create_app(restrict_classes(whole, FIVE), "pbc"))
    assert app.get("/models").json()["models"][0]["restricted_from"] == whole.class_names
    paths = [min((require(DATA / "pbc") / c).glob("*.jpg")) for c in ("lymphocyte", "platelet")]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    results = app.post("/predict?heatmap=true", files=files).json()["results"]
    assert results[0]["label"] == "lymphocyte" and results[1]["label"] in FIVE  # a platelet must be called one of the five
    for r in results:
        assert list(r["probabilities"]) == FIVE and abs(sum(r["probabilities"].values()) - 1) < 1e-4
    # the heatmap is the whole model's for the called class (lymphocyte is the 3rd of five, the 5th of eight)
    unrestricted = TestClient(create_app(whole, "pbc")).post("/predict?heatmap=true", files=files[:1]).json()["results"][0]
    assert unrestricted["label"] == "lymphocyte" and results[0]["heatmap"] == unrestricted["heatmap"]


def test_serve_refuses_classes_the_model_lacks_before_listening(capsys):
    from leukoscope.cli import main

    if "pbc" not in bundled_models():
        pytest.skip("bundled model pbc not built (make models)")
    assert main(["serve", "pbc", "--classes", "neutrophil,blast", "--port", str(_free_port())]) == 2
    captured = capsys.readouterr()
    assert "blast" in captured.err and "serving" not in captured.out


@pytest.mark.parametrize("name, data, content_type, status, message", [
    ("notes.png", b"this is text, not an image", "image/png", 422, "unreadable image"),
    ("empty.jpg", b"", "image/jpeg", 422, "empty file"),
    ("cells.jpg", b"PK\x03\x04" + bytes(60), "image/jpeg", 422, "a zip archive, not an image: unpack it"),
    ("page.html", b"<html></html>", "text/html", 415, "unsupported content type"),
    ("big.png", b"\x89PNG" + b"0" * 300_000, "image/png", 413, "larger than"),
    ("wide.png", _png(np.zeros((2, 2_100_000, 3), np.uint8)), "image/png", 413, "too large"),  # over 4x the limit
])
def test_bad_uploads_get_4xx_json(client, name, data, content_type, status, message):
    response = client.post("/predict", files=[("files", (name, data, content_type))])
    assert response.status_code == status
    assert message in response.json()["error"] and response.json()["file"] == name


def test_a_bad_upload_among_several_is_an_error_entry_and_the_others_are_answered(client):
    """One corrupt file in a batch of 32 must not cost the other 31 their results; only a request of nothing
    readable is refused (its first file's 4xx, as above)."""
    cell = min((require(DATA / "pbc") / "eosinophil").glob("*.jpg"))
    files = [("files", ("page.html", b"<html></html>", "text/html")), ("files", (cell.name, cell.read_bytes(), "image/jpeg")),
             ("files", ("notes.png", b"this is text", "image/png")), ("files", ("big.png", b"\x89PNG" + b"0" * 300_000, "image/png"))]
    response = client.post("/predict?heatmap=true", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["page.html", cell.name, "notes.png", "big.png"]  # in the order sent
    assert [r.get("status") for r in results] == [415, None, 422, 413]
    assert "unsupported content type" in results[0]["error"] and "unreadable image" in results[2]["error"]
    assert results[1]["label"] == "eosinophil" and results[1]["heatmap"] and "error" not in results[1]
    none_readable = client.post("/predict", files=[files[2], files[0]])
    assert none_readable.status_code == 422 and none_readable.json()["file"] == "notes.png"


@pytest.mark.parametrize("content_type", ["image/jpg", "image/pjpeg", "image/x-png", "application/octet-stream", ""])
def test_a_client_s_other_name_for_an_image_type_is_accepted(client, content_type):
    """The bytes decide the format: `curl -F files=@a.jpg;type=image/jpg` is a JPEG like any other."""
    cell = min((require(DATA / "pbc") / "eosinophil").glob("*.jpg"))
    response = client.post("/predict", files=[("files", (cell.name, cell.read_bytes(), content_type))])
    assert response.status_code == 200 and response.json()["results"][0]["label"] == "eosinophil"


def test_missing_or_misnamed_files_field_is_the_apps_json_error(client):
    for response in (client.post("/predict"), client.post("/predict", files=[("file", ("a.png", _png(np.zeros((8, 8, 3), np.uint8)), "image/png"))])):
        assert response.status_code == 422
        body = response.json()
        assert set(body) == {"error", "file"} and "files" in body["error"] and "multipart" in body["error"]


def test_a_form_sent_with_no_file_chosen_says_so(client):
    response = client.post("/predict", files=[("files", ("", b"", "image/jpeg"))])  # what a browser's empty file input sends
    assert response.status_code == 422
    assert response.json()["error"] == ("files.0: a form field with no file in it (no file chosen, or text instead of an image) "
                                        "(send images as multipart form field 'files')")


def test_unknown_query_options_are_rejected(client):
    image = ("files", ("a.png", _png(np.zeros((8, 8, 3), np.uint8)), "image/png"))
    response = client.post("/predict?heatmpa=true", files=[image])
    assert response.status_code == 422 and "unknown query option heatmpa" in response.json()["error"]
    assert client.get("/health?verbose=1").status_code == 422
    assert client.post("/predict?heatmap=false", files=[image]).status_code == 200


def test_too_many_files_is_the_apps_json_error(client):
    image = ("files", ("a.png", _png(np.zeros((8, 8, 3), np.uint8)), "image/png"))
    response = client.post("/predict", files=[image] * 33)
    assert response.status_code == 413 and "at most 32 files" in response.json()["error"]


def test_every_format_gets_a_server_preview_of_the_region_the_model_saw(client):
    rng = np.random.default_rng(0)
    cell = rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)  # under the fixture's 200 kB limit
    size = client.get("/models").json()["models"][0]["image_size"]
    for fmt, mime in (("TIFF", "image/tiff"), ("PNG", "image/png"), ("BMP", "image/bmp"), ("WEBP", "image/webp")):
        buffer = io.BytesIO()
        Image.fromarray(cell).save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        result = client.post("/predict", files=[("files", (f"cell.{fmt.lower()}", buffer.getvalue(), mime))]).json()["results"][0]
        preview = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(result["preview"].split(",", 1)[1]))))
        assert preview.shape == (size, size, 3)
        # the preview is the model's crop: the central 70% of the shorter side for pbc, not the whole 200x150 frame
        from leukoscope.images import resize_center_crop

        assert np.abs(preview.astype(int) - resize_center_crop(cell, size, 0.7).astype(int)).max() <= 1


def test_a_phone_s_heic_photo_is_accepted(client):
    data = (Path(__file__).parent / "fixtures" / "cell.heic").read_bytes()
    response = client.post("/predict", files=[("files", ("IMG_0001.HEIC", data, "image/heic"))])
    assert response.status_code == 200 and response.json()["results"][0]["label"]


def test_a_port_in_use_is_a_one_line_error_before_serving(tiny_run, capsys):
    from leukoscope.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tiny_run[1]), "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use; choose another --port" in captured.err
    assert "serving" not in captured.out  # no address announced that nothing answers


def test_port_0_announces_the_port_it_bound(tiny_run, capsys, monkeypatch):
    import leukoscope.serve
    from leukoscope.cli import main

    bound = []
    monkeypatch.setattr(leukoscope.serve, "serve", lambda predictor, name, sock: bound.append(sock.getsockname()[1]) or sock.close())
    assert main(["serve", str(tiny_run[1]), "--port", "0"]) == 0
    assert bound and bound[0] > 0 and f"at http://127.0.0.1:{bound[0]}/ " in capsys.readouterr().out  # not ":0"


def test_serving_beyond_this_machine_is_said_to_have_no_login_and_no_encryption(tiny_run, capsys, monkeypatch):
    import leukoscope.serve
    from leukoscope.cli import main
    from leukoscope.serve import addresses

    assert addresses("127.0.0.1", 8000) == ("http://127.0.0.1:8000/", None)
    assert addresses("localhost", 8000) == ("http://localhost:8000/", None)
    assert addresses("::1", 8000) == ("http://[::1]:8000/", None)
    url, warning = addresses("0.0.0.0", 8000)  # every interface: the address to open is this machine's name
    assert url == f"http://{socket.gethostname()}:8000/" and "anyone who can reach port 8000 can send images" in warning
    assert "plain HTTP and without a login" in addresses("192.168.1.20", 8000)[1]
    assert addresses("::", 80)[0] == f"http://{socket.gethostname()}:80/"
    monkeypatch.setattr(leukoscope.serve, "serve", lambda predictor, name, sock: sock.close())
    assert main(["serve", str(tiny_run[1]), "--host", "0.0.0.0", "--port", "0"]) == 0
    captured = capsys.readouterr()
    assert "warning: --host 0.0.0.0 serves beyond this machine" in captured.err and f"http://{socket.gethostname()}:" in captured.out
    assert main(["serve", str(tiny_run[1]), "--port", "0"]) == 0
    assert "warning" not in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server():
    import uvicorn

    if "pbc" not in bundled_models():
        pytest.skip("bundled model pbc not built (make models)")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(load_model("pbc"), "pbc"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


def test_page_in_headless_chromium(live_server, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium not installed at /usr/bin/chromium (the test set-up installs it when run as root: apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    image = sorted((require(DATA / "pbc") / "eosinophil").glob("*.jpg"))[0]
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=flags)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(live_server)
        page.wait_for_function("document.getElementById('model').textContent.includes('neutrophil')")
        page.set_input_files("#files", str(image))
        page.wait_for_selector(".card .verdict .label", timeout=30_000)
        assert page.inner_text(".card .verdict .label") == "eosinophil"
        heatmap = page.wait_for_selector("img.heatmap")
        page.wait_for_function("document.querySelector('img.heatmap').naturalWidth > 0")
        assert heatmap.get_attribute("src").startswith("data:image/png;base64,")
        assert page.locator(".card .bar").count() == 8
        tiff = tmp_path / "cell.tif"
        Image.open(image).save(tiff)
        page.set_input_files("#files", str(tiff))
        page.wait_for_function("document.querySelectorAll('.card .verdict').length == 2", timeout=30_000)
        page.wait_for_function("document.querySelector('.card .pics img').naturalWidth > 0")  # the newest card: a TIFF, shown
        assert page.locator(".card").first.locator(".pics img").first.get_attribute("src").startswith("data:image/png;base64,")
        field = sorted((require(DATA / "bccd_wbc") / "neutrophil").glob("*.jpg"))[0]  # a smear field: count its white cells
        page.check("#field")
        page.set_input_files("#files", str(field))
        page.wait_for_selector(".card.field .verdict.count", timeout=30_000)
        page.wait_for_function("document.querySelector('.card.field img.overlay').naturalWidth > 0")
        assert "white cell" in page.inner_text(".card.field .verdict.count")
        assert page.locator(".card.field .cells tr").count() >= 2  # a header and at least one detected cell
        aria = min((require(ARIA) / "Benign").glob("*.jpg"))  # another lab's field: the differential is flagged
        page.set_input_files("#files", str(aria))
        page.wait_for_function("document.querySelectorAll('.card.field .verdict.count').length == 2", timeout=30_000)
        assert "cells look unlike the model's training images" in page.locator(".card.field").first.inner_text()
        cells = page.locator(".card.field").first.locator(".cells td").all_inner_texts()
        assert cells[4::5].count("no") >= 1  # the in-domain column
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
