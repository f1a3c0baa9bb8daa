"""A corpus of hostile files: every command handles each file or reports it, and keeps going."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import psutil
import pytest
from conftest import FIXTURES, make_hostile_corpus, make_image_folder, synthetic_cell
from PIL import Image

from leukoscope import load_model
from leukoscope.cli import main
from leukoscope.images import decode_bytes, load_rgb

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
    assert "not a regular file" in rows["pipe.jpg"]["error"] and "not a regular file" in rows["device.jpg"]["error"]
    assert rss_growth < 300e6


def test_other_image_extensions_are_read_and_unreadable_formats_named(trained, tmp_path, capsys):
    folder = tmp_path / "lab"
    folder.mkdir()
    cell = Image.open(next((trained / "data" / "blast").iterdir())).convert("RGB")
    cell.save(folder / "a.jfif", format="JPEG")  # what Windows names many JPEGs
    cell.save(folder / "b.jp2")
    cell.save(folder / "c.AVIF")
    shutil.copy(FIXTURES / "cell.heic", folder / "d.HEIC")  # what phones write
    (folder / ".git").mkdir()
    for name in ("e.cr2", "f.CR2", "g.svs", "manifest.csv", ".DS_Store", ".git/index"):
        (folder / name).write_bytes(b"not read")
    out = tmp_path / "p.csv"
    assert main(["predict", str(trained / "run"), str(folder), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.read_text(encoding="utf-8").splitlines()))
    assert sorted(r["path"].split("/")[-1] for r in rows) == ["a.jfif", "b.jp2", "c.AVIF", "d.HEIC"]
    assert not any(r["error"] for r in rows)
    err = capsys.readouterr().err
    assert "3 files not read" in err and ".cr2: 2" in err and ".csv" not in err.split("(it reads")[0]
    assert ".svs: whole-slide scans, too large to read whole: export fields or tiles" in err


def test_tiff_files_of_several_pages_are_named_with_the_page_read(trained, tmp_path, capsys):
    """A z-stack or several fields saved as the pages of one TIFF: the first page is read, and that is said."""
    import tifffile

    folder = tmp_path / "lab"
    folder.mkdir()
    cell = Image.open(next((trained / "data" / "blast").iterdir())).convert("RGB")
    cell.save(folder / "stack.tif", save_all=True, append_images=[cell.rotate(90)] * 4)  # 5 pages
    tifffile.imwrite(folder / "big.tiff", np.stack([np.asarray(cell)] * 3), bigtiff=True, photometric="rgb")
    cell.save(folder / "thumbnail.tif", save_all=True, append_images=[cell.resize((8, 8))])  # one image and its preview
    cell.save(folder / "one.tif")
    os.mkfifo(folder / "pipe.tif")  # its header is not waited for
    out = tmp_path / "p.csv"
    assert main(["predict", str(trained / "run"), str(folder), "--out", str(out)]) == 1  # the FIFO's row
    rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(out.read_text(encoding="utf-8").splitlines())}
    assert all(rows[name]["label"] for name in ("stack.tif", "big.tiff", "thumbnail.tif", "one.tif"))
    assert "note: 2 TIFF files hold several images (a z-stack, or several fields saved as pages; big.tiff: 3 pages): " \
           "only the first page of each is read" in capsys.readouterr().err
    (folder / "pipe.tif").unlink()
    shutil.copytree(trained / "data", tmp_path / "data")
    shutil.move(folder / "stack.tif", tmp_path / "data" / "blast")  # in training data too, as train and evaluate say
    assert main(["check-data", str(tmp_path / "data")]) == 0
    assert "warning: 1 TIFF file holds several images (a z-stack, or several fields saved as pages; stack.tif: 5 pages)" \
           in capsys.readouterr().out


def test_a_tiff_whose_pages_are_its_colour_channels_is_read_as_one_rgb_image(tmp_path, capsys):
    """Fiji saves a 3-channel image, and OME-TIFF a CYX one, as three grey pages: read as the RGB picture (in 8 or
    16 bits, from a file or its bytes), not as its red page with a note about a stack. Pages without such axes
    (a z-stack of grey pages) stay a stack whose first page is read."""
    import tifffile

    from leukoscope.images import several_pages

    rgb = synthetic_cell(np.random.default_rng(0), 64, 0.5, 20)
    planes = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
    tifffile.imwrite(tmp_path / "fiji.tif", planes, imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "scope.ome.tif", planes.astype(np.uint16) * 257, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "pages.tif", planes, photometric="minisblack")  # three grey pages, no metadata: a stack whose first page is read
    for name in ("fiji.tif", "scope.ome.tif"):
        np.testing.assert_array_equal(load_rgb(tmp_path / name), rgb)
        np.testing.assert_array_equal(decode_bytes((tmp_path / name).read_bytes()), rgb)
    np.testing.assert_array_equal(load_rgb(tmp_path / "pages.tif"), np.repeat(rgb[..., :1], 3, axis=2))
    paths = sorted(tmp_path.glob("*.tif"))
    assert several_pages(paths).startswith("1 TIFF file holds several images (a z-stack, or several fields saved as pages; "
                                           "pages.tif: 3 pages)")


def test_a_focal_stack_named_by_its_metadata_is_read_by_its_sharpest_plane(tmp_path):
    """A microscope's z-stack saved by Fiji (RGB planes, or three channel pages per plane) or as OME-TIFF: the plane in
    best focus is read, whichever it is, from a file or its bytes, with no note; the same planes saved without
    metadata (pages that may as well be fields) keep their first page and the note."""
    import tifffile
    from scipy import ndimage

    from leukoscope.images import several_pages

    rgb = synthetic_cell(np.random.default_rng(1), 96, 0.5, 24)
    blurred = lambda sigma: ndimage.gaussian_filter(rgb.astype(np.float32), (sigma, sigma, 0)).round().astype(np.uint8)
    stack = np.stack([blurred(3.0), blurred(1.5), rgb, blurred(1.0), blurred(2.0)])  # in focus at the third plane
    tifffile.imwrite(tmp_path / "fiji.tif", stack, imagej=True, metadata={"axes": "ZYXS"}, photometric="rgb")
    tifffile.imwrite(tmp_path / "scope.ome.tif", stack, metadata={"axes": "ZYXS"}, photometric="rgb")
    tifffile.imwrite(tmp_path / "channels.tif", np.ascontiguousarray(np.moveaxis(stack, -1, 1)), imagej=True, metadata={"axes": "ZCYX"})
    tifffile.imwrite(tmp_path / "plain.tif", stack, photometric="rgb")
    for name in ("fiji.tif", "scope.ome.tif", "channels.tif"):
        np.testing.assert_array_equal(load_rgb(tmp_path / name), rgb)
        np.testing.assert_array_equal(decode_bytes((tmp_path / name).read_bytes()), rgb)
    np.testing.assert_array_equal(load_rgb(tmp_path / "plain.tif"), stack[0])
    assert several_pages(sorted(tmp_path.glob("*.tif"))).startswith("1 TIFF file holds several images (a z-stack, or several "
                                                                      "fields saved as pages; plain.tif: 5 pages)")


def test_damaged_files_of_every_format_are_unreadable_images_not_crashes(tmp_path):
    """Bytes flipped in the headers of real encodings (TIFF, ImageJ and OME-TIFF, HEIC, PNG, JPEG, WebP): the parsers
    raise errors of many kinds (tifffile a ZeroDivisionError or an AssertionError, pi-heif an IndexError); each must
    be the file's one-line ImageReadError, so that a run goes on to the next file."""
    import io as bytes_io
    import logging
    import warnings

    import tifffile

    from leukoscope.images import ImageReadError

    rgb = synthetic_cell(np.random.default_rng(0), 64, 0.5, 20)
    planes = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
    encodings = {"heic": (FIXTURES / "cell.heic").read_bytes()}
    for name, kwargs in {"imagej": {"imagej": True, "metadata": {"axes": "CYX"}}, "ome": {"metadata": {"axes": "CYX"}, "ome": True},
                         "lzw": {"compression": "zlib"}}.items():
        buffer = bytes_io.BytesIO()
        tifffile.imwrite(buffer, planes if name != "lzw" else rgb, **kwargs)
        encodings[name] = buffer.getvalue()
    for fmt in ("PNG", "JPEG", "WEBP"):
        buffer = bytes_io.BytesIO()
        Image.fromarray(rgb).save(buffer, format=fmt)
        encodings[fmt] = buffer.getvalue()
    rng = np.random.default_rng(1)
    outcomes = {"read": 0, "unreadable": 0}
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # its warnings about the damage, not what is tested
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, data in encodings.items():
            for _ in range(120):
                damaged = bytearray(data)
                for _ in range(rng.integers(1, 8)):
                    damaged[int(rng.integers(0, min(len(damaged), 1024)))] = int(rng.integers(0, 256))
                try:
                    decode_bytes(bytes(damaged))
                    outcomes["read"] += 1
                except ImageReadError:
                    outcomes["unreadable"] += 1
    assert min(outcomes.values()) > 50, outcomes  # both happen: the damage is neither always harmless nor always fatal


def test_archives_are_named_as_archives(trained, tmp_path, capsys):
    """A lab's images often come zipped: predict, count and train say "unpack it", not "unreadable image"."""
    import tarfile
    import zipfile

    cells = next((trained / "data" / "blast").iterdir())
    with zipfile.ZipFile(tmp_path / "cells.zip", "w") as packed:
        packed.write(cells, "blast/a.png")
    with tarfile.open(tmp_path / "cells.tgz", "w:gz") as packed:
        packed.add(cells, "blast/a.png")
    (tmp_path / "lab").mkdir()
    shutil.copy(tmp_path / "cells.zip", tmp_path / "lab" / "more.zip")
    shutil.copy(cells, tmp_path / "lab" / "a.png")
    out = tmp_path / "p.csv"
    assert main(["predict", str(trained / "run"), str(tmp_path / "cells.zip"), str(tmp_path / "cells.tgz"), str(tmp_path / "lab"),
                 "--out", str(out)]) == 1
    errors = [r["error"] for r in csv.DictReader(out.read_text(encoding="utf-8").splitlines())]
    assert errors == ["a zip archive, not an image: unpack it and give its images",
                      "a gzip archive, not an image: unpack it and give its images", ""]
    assert "1 file not read" in capsys.readouterr().err.replace("(.zip: 1)", "").split(".zip: archives: unpack them")[0]
    assert main(["train", str(tmp_path / "cells.zip"), "--out", str(tmp_path / "run")]) == 2
    assert "data path" in (err := capsys.readouterr().err) and "is a zip archive, not a folder: unpack it" in err
    data = make_image_folder(tmp_path / "data", n_per_class=12)
    shutil.copy(tmp_path / "cells.zip", data / "blast" / "batch2.zip")  # images a lab forgot to unpack
    assert main(["train", str(data), "--out", str(tmp_path / "run"), *TINY]) == 0
    assert "warning: 1 archive not read (e.g. 'blast/batch2.zip'): unpack them where their images belong" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "run"), str(data), "--out", str(tmp_path / "eval")]) == 0
    assert "warning: 1 archive not read (e.g. 'blast/batch2.zip')" in capsys.readouterr().err


def test_heic_photos_decode_to_their_pixels():
    from PIL import ImageDraw

    drawn = Image.new("RGB", (120, 80), (236, 214, 212))  # how tests/fixtures/cell.heic was drawn (README there)
    draw = ImageDraw.Draw(drawn)
    draw.ellipse((35, 15, 85, 65), fill=(190, 160, 200))
    draw.ellipse((45, 25, 75, 55), fill=(90, 40, 130))
    decoded = load_rgb(FIXTURES / "cell.heic")
    assert decoded.shape == (80, 120, 3)  # width 120, height 80: not transposed
    assert np.abs(decoded.astype(int) - np.asarray(drawn)).mean() < 2  # HEVC is lossy: chroma edges differ
    assert np.array_equal(decode_bytes((FIXTURES / "cell.heic").read_bytes()), decoded)
    halved = decode_bytes((FIXTURES / "cell.heic").read_bytes(), max_pixels=3_000)  # a 48 Mpixel photo, scaled down
    assert np.abs(halved.astype(int) - np.asarray(Image.fromarray(decoded).reduce(2), int)).max() <= 1


def test_python_api_reports_per_file_errors(trained, tmp_path):
    expected = make_hostile_corpus(tmp_path / "corpus")
    predictions = load_model(trained / "run").predict([tmp_path / "corpus" / n for n in expected])
    assert [not p.error for p in predictions] == list(expected.values())


def test_train_and_evaluate_skip_bad_files(trained, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    expected = make_hostile_corpus(tmp_path / "corpus")
    copied = [n for n in expected if (tmp_path / "corpus" / n).is_file() and not (tmp_path / "corpus" / n).is_symlink()]
    for i, name in enumerate(copied):
        shutil.copy(tmp_path / "corpus" / name, data / ("blast" if i % 2 else "normal") / name)
    (data / "normal" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(data / "blast" / "pipe.png")  # a FIFO among the images: reported, not waited on
    assert main(["train", str(data), "--out", str(tmp_path / "run"), *TINY]) == 0
    assert "warning: skipping" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "run"), str(data), "--out", str(tmp_path / "eval")]) == 0
    err = capsys.readouterr().err
    assert main(["check-data", str(data), "--json", str(tmp_path / "check.json")]) == 1
    report = json.loads((tmp_path / "check.json").read_text())
    bad = {item["path"].split("/")[-1] for item in report["unreadable"]}
    assert bad == {n for n in copied if not expected[n]} | {"dangling.png", "pipe.png"}
    named = {line.split(": ")[1].split("/")[-1] for line in err.splitlines() if line.startswith("warning: skipping /")}
    more = [line for line in err.splitlines() if "more unreadable image" in line]
    assert named <= bad and len(named) + sum(int(line.split()[2]) for line in more) == len(bad)  # each left-out file counted once
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert sum(m["unreadable"] for m in metrics.values()) == len(bad)
    assert "unreadable (left out)" in (tmp_path / "eval" / "report.html").read_text()


def test_serve_answers_4xx_never_5xx(trained, tmp_path):
    from fastapi.testclient import TestClient

    from leukoscope.serve import create_app

    expected = make_hostile_corpus(tmp_path / "corpus")
    client = TestClient(create_app(load_model(trained / "run"), "tiny"), raise_server_exceptions=False)
    for name, ok in expected.items():
        path = tmp_path / "corpus" / name
        data = path.read_bytes() if path.is_file() else b""  # a FIFO or device sends nothing
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
            assert ("2000x3" if name.startswith("strip") else "1x1") in rows[name]["error"], name  # the file's own size
        else:
            assert bool(rows[name]["error"]) != ok, (name, rows[name]["error"])


def test_fast_jpeg_decoding_gives_the_pixels_of_pil_draft_mode(tmp_path):
    """simplejpeg (libjpeg-turbo), whole or at PIL's draft scale: identical pixels, EXIF orientation still honoured."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from conftest import DATA, synthetic_cell
    from leukoscope.images import _decode, decode_bytes, load_rgb

    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(((360, 363), (640, 480), (224, 224), (1000, 90))):
        image = Image.fromarray(synthetic_cell(rng, max(w, h), 0.5, 20)).resize((w, h))
        image.save(tmp_path / f"cell{i}.jpg", quality=90)
        paths.append(tmp_path / f"cell{i}.jpg")
    real = DATA / "pbc" / "neutrophil"
    paths += sorted(real.glob("*.jpg"))[:20] if real.is_dir() else []
    for path in paths:
        for size, crop in ((112, 0.7), (128, 1.0), (64, 1.0)):
            assert np.array_equal(load_rgb(path, size, crop=crop), _decode(Path(path), size, True, str(path), crop=crop)), (path, size)
        assert np.array_equal(load_rgb(path), _decode(Path(path), None, False, str(path))), path  # whole: simplejpeg = PIL
        assert np.array_equal(decode_bytes(Path(path).read_bytes()), load_rgb(path))
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(synthetic_cell(rng, 80, 0.5, 20)).resize((120, 80)).save(rotated, exif=exif)
    assert load_rgb(rotated).shape == (120, 80, 3)  # EXIF honoured (PIL path)


def test_a_jpeg_too_large_to_decode_whole_is_read_at_a_reduced_scale(tmp_path):
    """A phone's 48 Mpixel photo through the eyepiece: the JPEG decoder's 1/2, 1/4 or 1/8 scale brings it within the
    pixel limit without decoding it whole (with or without EXIF, so by simplejpeg or PIL); other formats are decoded
    whole up to 4x the limit (a 48 Mpixel HEIC photo), then averaged over blocks of 2 or 4, and refused beyond it."""
    import io as bytes_io

    import tifffile
    from conftest import synthetic_cell

    from leukoscope.images import ImageReadError, jpeg_reduction

    assert [jpeg_reduction(w, h, 40_000_000) for w, h in ((6000, 4000), (8064, 6048), (16000, 12000), (40000, 30000), (60000, 60000))] == [1, 2, 4, 8, None]
    rng = np.random.default_rng(0)
    image = Image.fromarray(synthetic_cell(rng, 400, 0.5, 20)).resize((400, 300))
    plain, tagged = bytes_io.BytesIO(), bytes_io.BytesIO()
    image.save(plain, format="JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 1  # an orientation tag, as phones write: the PIL path
    image.save(tagged, format="JPEG", quality=95, exif=exif)
    whole = decode_bytes(plain.getvalue())
    for data in (plain.getvalue(), tagged.getvalue()):
        half = decode_bytes(data, max_pixels=40_000)  # 120,000 pixels: 1/2 scale (30,000) is within it
        assert half.shape == (150, 200, 3)
        assert np.abs(half.astype(int) - np.asarray(Image.fromarray(whole).resize((200, 150), Image.BOX), int)).mean() < 3
        assert decode_bytes(data, max_pixels=8_000).shape == (75, 100, 3)  # 1/4
        with pytest.raises(ImageReadError, match=r"image too large: 400x300 pixels \(limit 64,000\)"):
            decode_bytes(data, max_pixels=1_000)  # beyond 1/8
    odd = bytes_io.BytesIO()
    image.resize((401, 301)).save(odd, format="JPEG", quality=95, exif=exif)  # odd sides, by PIL: 1/2 still, not whole
    assert decode_bytes(odd.getvalue(), max_pixels=40_000).shape == (151, 201, 3)
    png, tiff = bytes_io.BytesIO(), bytes_io.BytesIO()  # formats decoded whole: up to 4x the limit, then averaged
    image.save(png, format="PNG")
    tifffile.imwrite(tiff, np.asarray(image, np.uint16) * 16, photometric="rgb")  # 12 bits, by tifffile
    for data in (png.getvalue(), tiff.getvalue()):
        assert np.abs(decode_bytes(data, max_pixels=40_000).astype(int) - np.asarray(image.reduce(2), int)).max() <= 1
        with pytest.raises(ImageReadError, match=r"image too large: 400x300 pixels \(limit 100,000\)"):
            decode_bytes(data, max_pixels=25_000)
    odd_png = bytes_io.BytesIO()
    image.resize((401, 301)).save(odd_png, format="PNG")  # 120,701 pixels; 1/2: 201 x 151 = 30,351, over 30,200: 1/4
    assert decode_bytes(odd_png.getvalue(), max_pixels=30_200).shape == (76, 101, 3)


@pytest.mark.parametrize("name, samples", [
    ("twelve_bit.tif", lambda rgb: rgb.astype("uint16") * 16),  # 12 bits in a 16-bit container: PIL made it near black
    ("twelve_bit_lzw.tif", lambda rgb: rgb.astype("uint16") * 16),  # LZW, as cameras write it (needs imagecodecs)
    ("sixteen_bit.tif", lambda rgb: rgb.astype("uint16") * 257),
    ("float.tif", lambda rgb: rgb.astype("float32") / 255),  # PIL cannot open float TIFFs
    ("planar_16.tif", lambda rgb: (rgb.astype("uint16") * 257).transpose(2, 0, 1)),
    ("gray_12.png", lambda rgb: rgb[:, :, 1].astype("uint16") * 16),
])
def test_deep_images_keep_their_exposure(tmp_path, name, samples):
    import numpy as np
    import tifffile
    from PIL import Image

    from leukoscope.images import decode_bytes, image_size, load_rgb

    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    rgb[0, 0] = 255  # white somewhere, as a smear's background is
    path = tmp_path / name
    if name.endswith(".tif"):
        tifffile.imwrite(path, samples(rgb), photometric="minisblack" if "gray" in name else "rgb", compression="lzw" if "lzw" in name else None,
                         **({"planarconfig": "separate"} if "planar" in name else {}))
    else:
        Image.fromarray(samples(rgb)).save(path)
    expected = rgb if "gray" not in name else np.repeat(rgb[:, :, 1:2], 3, axis=2)
    for decoded in (load_rgb(path), decode_bytes(path.read_bytes())):
        assert decoded.shape == (20, 30, 3) and decoded.dtype == np.uint8
        assert np.abs(decoded.astype(int) - expected).max() <= 1  # 12-bit data scaled by 4095, not by its own maximum
    assert image_size(path) == (30, 20)


def test_arrays_tensors_and_bytes_in_every_common_form_are_one_image(trained):
    import io

    import torch

    model = load_model(trained / "run")
    path = next((trained / "data" / "blast").iterdir())
    rgb = np.asarray(Image.open(path).convert("RGB"))
    encoded = io.BytesIO()
    Image.fromarray(rgb).save(encoded, format="PNG")
    forms = {
        "float 0-1": rgb / 255.0, "float 0-255": rgb.astype(np.float32), "16-bit": rgb.astype(np.uint16) * 257,
        "channels first": rgb.transpose(2, 0, 1).copy(), "tensor": torch.from_numpy(rgb.transpose(2, 0, 1) / 255.0),
        "bytes": encoded.getvalue(), "bytearray": bytearray(encoded.getvalue()),
        "memoryview": encoded.getbuffer(),  # a buffer shared without a copy
    }
    reference = model.predict(rgb)[0].probabilities
    for name, form in forms.items():
        (prediction,) = model.predict(form)
        assert not prediction.error, name
        assert max(abs(prediction.probabilities[c] - p) for c, p in reference.items()) < 1e-6, name
    batch = model.predict(torch.from_numpy(np.stack([rgb.transpose(2, 0, 1)] * 3)))  # N x 3 x H x W: three images
    assert len(batch) == 3 and all(p.probabilities == batch[0].probabilities for p in batch)
    normalised = model.predict((rgb / 255.0 - 0.5) / 0.25)[0]  # a tensor already normalised: not pixels
    assert "not a normalised tensor" in normalised.error and not normalised.label
    assert "of numbers, got bool" in model.predict(rgb > 128)[0].error
