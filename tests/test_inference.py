"""The fast inference path (threaded, pipelined decoding, channels_last, fp16-stored weights,
batching) against a plain reference path (one decode at a time, contiguous fp32), on real images.

Both decode every image the same way (``images.load_view``): a path, its bytes, a PIL image and an array of it are one input."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA, require
from leukoscope import load_model, onnx_backend
from leukoscope.checkpoint import model_from_checkpoint
from leukoscope.errors import LeukoscopeError
from leukoscope.inference import bundled_models
from leukoscope.images import load_view
from PIL import Image
from leukoscope.onnx_backend import onnx_bytes
from leukoscope.transforms import normalize, to_float

TOLERANCE = 1e-3  # max absolute difference of any class probability
REDUCED_TOLERANCE = 0.1  # files against arrays of the same image for models whose view reduces JPEGs in the DCT


def _reference_probs(predictor, paths):
    model = model_from_checkpoint(predictor.checkpoint).float()
    arrays = np.stack([load_view(p, predictor.view)[0] for p in paths])  # one at a time, as every path decodes
    x = normalize(to_float(torch.from_numpy(arrays).permute(0, 3, 1, 2)), predictor.checkpoint["mean"], predictor.checkpoint["std"]).contiguous()
    with torch.no_grad():
        return torch.softmax(model(x) / predictor.temperature, dim=1).numpy()


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("name, folder", [("pbc", "pbc"), ("aria-all", "aria_all")])
def test_fast_path_matches_reference(name, folder, backend):
    """Threaded decoding and batches, folded BatchNorm and (auto) ONNX Runtime vs plain PyTorch on PIL-decoded images."""
    if name not in bundled_models():
        pytest.skip(f"bundled model {name} not built (make models)")
    paths = sorted(require(DATA / folder).rglob("*.jpg"))[::97][:48]
    predictor = load_model(name, backend=backend)
    assert predictor.kind == {"auto": "onnx", "torch": "cnn"}[backend]
    fast = np.array([[p.probabilities[c] for c in predictor.class_names] for p in predictor.predict(paths, batch_size=16, tta=False)])
    reference = _reference_probs(predictor, paths)
    assert np.abs(fast - reference).max() <= TOLERANCE
    assert (fast.argmax(1) == reference.argmax(1)).all()


@pytest.mark.parametrize("name, folder", [("pbc", "pbc"), ("wbc", "bccd_wbc")])
def test_a_path_pil_image_array_and_upload_give_the_same_probabilities(name, folder):
    """One decode-and-frame function for every kind of input: within 1e-3 (in fact identical pixels), but for
    files against arrays where the view reduces JPEGs (``images.reduction``)."""
    if name not in bundled_models():
        pytest.skip(f"bundled model {name} not built (make models)")
    from leukoscope.images import load_view

    paths = sorted(require(DATA / folder).rglob("*.jpg"))[::61][:12]
    predictor = load_model(name, backend="torch")
    pils = [Image.open(p) for p in paths]
    arrays = [np.asarray(im.convert("RGB")) for im in pils]
    uploads = [load_view(p.read_bytes(), predictor.view)[0] for p in paths]
    by_kind = [predictor.predict(paths), predictor.predict(pils), predictor.predict(arrays), predictor.predict_arrays(uploads, [""] * len(paths))]
    path, pil, array, upload = (np.array([[p.probabilities[c] for c in predictor.class_names] for p in kind]) for kind in by_kind)
    assert np.abs(upload - path).max() <= TOLERANCE and np.abs(pil - array).max() <= TOLERANCE
    # a file and a decoded array take one pipeline; with `reduce` (pbc) a JPEG shrinks in the DCT and an array by block
    # averaging, which moved probabilities by at most 0.084 on pbc's 1,030 validation images (docs/benchmarks.md, "Decoding")
    assert np.abs(array - path).max() <= (REDUCED_TOLERANCE if predictor.view.reduce else TOLERANCE)


def test_file_objects_are_images_and_other_objects_are_refused():
    """An open file (``open(path, "rb")``, an upload's BytesIO) is one encoded image, as its bytes are; a text-mode
    file or an object that is no image says what to give instead, rather than failing deep in decoding."""
    import io

    paths = sorted(require(DATA / "pbc").rglob("*.jpg"))[::500][:3]
    predictor = load_model("pbc", backend="torch")
    by_path = predictor.predict(paths)
    with open(paths[0], "rb") as first:
        files = predictor.predict([first, *(io.BytesIO(p.read_bytes()) for p in paths[1:])])
    probs = lambda predictions: np.array([list(p.probabilities.values()) for p in predictions])
    assert np.abs(probs(files) - probs(by_path)).max() <= TOLERANCE and not any(f.error for f in files)
    assert files[0].source == str(paths[0]) and files[1].source == "<image 1>"  # an open file by its name; a BytesIO has none
    with open(paths[0], "rb") as first:  # one file object alone (a batch of one: other kernels, same call)
        assert np.abs(probs(predictor.predict(first)) - probs(by_path[:1])).max() <= TOLERANCE
    with open(paths[0]) as text, pytest.raises(TypeError, match=r"is open in text mode: open images in binary mode"):
        predictor.predict([text])
    with pytest.raises(TypeError, match=r"cannot predict an item of type 'float': give image paths, folders, bytes"):
        predictor.predict([paths[0], 3.5])
    with pytest.raises(TypeError, match=r"cannot predict 'NoneType'"):
        predictor.predict(None)
    with pytest.raises(TypeError, match=r"cannot predict 'dict'"):  # not its keys read as file names
        predictor.predict({str(paths[0]): "neutrophil"})


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "8", True, 1025])
def test_a_bad_batch_size_is_refused_before_any_decoding(batch_size):
    predictor = load_model("pbc", backend="torch")
    with pytest.raises(LeukoscopeError, match=rf"batch_size must be a whole number from 1 to 1024, got {re.escape(repr(batch_size))}") as err:
        predictor.predict(np.zeros((2, 8, 8, 3), np.uint8), batch_size=batch_size)
    assert ("larger batches hold more memory" in str(err.value)) == (batch_size == 1025)
    assert len(predictor.predict(np.zeros((3, 8, 8, 3), np.uint8), batch_size=2)) == 3


def test_a_model_says_what_it_is():
    """``print(model)`` in a notebook names the file, the classes, what the network sees and what runs it."""
    assert repr(load_model("pbc", backend="torch")) == (
        f"Predictor({str(bundled_models()['pbc'])!r}: cellnet, classes [basophil, eosinophil, erythroblast, ig, lymphocyte, "
        "monocyte, neutrophil, platelet], sees the central 70% of each image at 126 px, runs on PyTorch, fp32)")
    assert "sees 112 px windows centred on the white cell, runs on ONNX Runtime, fp32" in repr(load_model("wbc", backend="onnx"))


def test_bundled_models_describe_themselves():
    for name, path in bundled_models().items():
        predictor = load_model(name)
        meta = predictor.meta
        assert meta["train_command"].startswith("leukoscope train")
        assert len(meta["data_manifest_sha256"]) == 64
        assert Path(path).stat().st_size < 5e6
        test = meta["metrics"]["test"]
        assert test["accuracy_ci"][0] <= test["accuracy"] <= test["accuracy_ci"][1]


@pytest.mark.parametrize("name, folder", [("pbc", "pbc"), ("aria-all", "aria_all")])
def test_bundled_test_accuracy_is_recomputed_not_trusted(name, folder):
    """Every 4th test-split image (by the model's own record of what it saw): the stored accuracy must hold."""
    from leukoscope.data import detect_layout
    from leukoscope.data.splits import splits_from_seen
    from leukoscope.metrics import wilson_interval

    predictor = load_model(name)
    dataset = detect_layout(require(DATA / folder))
    splits, n_train, n_val = splits_from_seen(dataset, predictor.checkpoint["seen_images"])
    test = [s for s, k in zip(dataset.samples, splits) if k == "test"]
    assert len(test) == predictor.meta["metrics"]["test"]["n"]  # the recorded split is the one found by content
    sample = test[::4]
    called = [p.label for p in predictor.predict([dataset.abspath(s) for s in sample])]
    hits = sum(c == s.label for c, s in zip(called, sample))
    low, high = wilson_interval(hits, len(sample))
    stored = predictor.meta["metrics"]["test"]["accuracy"]
    assert low <= stored <= high, f"stored {stored:.4f}, recomputed {hits}/{len(sample)} (95% CI {low:.4f}-{high:.4f})"


def test_backend_choice_and_bad_backends(tmp_path):
    assert load_model("pbc").kind == "onnx"  # CellNet checkpoints run on ONNX Runtime by default
    assert load_model("pbc", backend="torch").kind == "cnn"
    with pytest.raises(LeukoscopeError, match=r"unknown backend 'onx' \(did you mean 'onnx'\?\); choose from auto, torch, onnx"):
        load_model("pbc", backend="onx")
    onnx_file = tmp_path / "pbc.onnx"
    onnx_file.write_bytes(onnx_bytes(load_model("pbc", backend="torch").checkpoint))
    assert load_model(onnx_file, backend="onnx").kind == "onnx"
    with pytest.raises(LeukoscopeError, match="is an exported ONNX graph; --backend torch needs a PyTorch checkpoint"):
        load_model(onnx_file, backend="torch")
    with pytest.raises(LeukoscopeError, match=r"is an exported ONNX graph; explain \(Grad-CAM"):  # the command names itself
        load_model(onnx_file, backend="torch", purpose="explain (Grad-CAM reads the network's layers)")


def test_onnx_graph_is_exported_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LEUKOSCOPE_CACHE", str(tmp_path / "cache"))
    size = load_model("pbc").view.size
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    first = load_model("pbc").predict_proba(images)
    (graph,) = (tmp_path / "cache" / "onnx").glob("*.onnx")
    monkeypatch.setattr(onnx_backend, "onnx_bytes", _must_not_export)
    assert np.array_equal(load_model("pbc").predict_proba(images), first)  # from the cache, no export
    monkeypatch.undo()
    graph.write_bytes(b"damaged")
    monkeypatch.setenv("LEUKOSCOPE_CACHE", str(tmp_path / "cache"))
    assert np.array_equal(load_model("pbc").predict_proba(images), first)  # rebuilt
    assert graph.stat().st_size > 100_000
    (tmp_path / "file").write_text("a file where the cache folder should be")
    monkeypatch.setenv("LEUKOSCOPE_CACHE", str(tmp_path / "file"))
    assert np.array_equal(load_model("pbc").predict_proba(images), first)  # unwritable cache: runs from memory


def _must_not_export(checkpoint):
    raise AssertionError("the cached graph should have been used")


def test_tta_modes_average_the_right_views():
    predictor = load_model("pbc", backend="torch")
    size = predictor.view.size
    x = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    plain = predictor.logits(x, "none")
    mirrored = predictor.logits(x.flip(3).contiguous(), "none")
    torch.testing.assert_close(predictor.logits(x, "flip"), (plain + mirrored) / 2)
    turned = predictor.logits(torch.rot90(x, 1, dims=(2, 3)).contiguous(), "none")
    dihedral = predictor.logits(x, True)
    torch.testing.assert_close(dihedral, predictor.logits(x, "dihedral"))
    assert not torch.allclose(dihedral, predictor.logits(x, "flip"))  # the rotations count too
    torch.testing.assert_close(predictor.logits(torch.rot90(x, 1, dims=(2, 3)).contiguous(), "dihedral"), dihedral, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(turned, plain)
    torch.testing.assert_close(predictor.logits(x, False), plain)
    with pytest.raises(LeukoscopeError, match=r"unknown TTA mode 'flp' \(did you mean 'flip'\?\)"):
        predictor.logits(x, "flp")
