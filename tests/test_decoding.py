"""Decoding in worker processes gives what threads give, in order, with per-file errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_image_folder

from leukoscope import decoding
from leukoscope.decoding import Decoder, worker_processes
from leukoscope.images import View


@pytest.fixture
def files(tmp_path):
    folder = make_image_folder(tmp_path / "data", n_per_class=6, size=48, ext=".jpg")
    paths = sorted(folder.rglob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    return [*paths[:5], broken, *paths[5:]]


@pytest.mark.parametrize("view", [View(32, crop=0.7), View(32, cell=0.6)])
def test_processes_and_threads_decode_the_same_pixels_in_order(files, view):
    with Decoder(view, len(files), processes=2) as pool:
        assert pool.processes == 2
        by_process = pool.results(pool.submit(files))
    with Decoder(view, 0) as pool:
        assert pool.processes == 0
        by_thread = pool.results(pool.submit(files))
    assert len(by_process) == len(by_thread) == len(files)
    for (a, error_a, *flags_a), (b, error_b, *flags_b), path in zip(by_process, by_thread, files):
        if path.name == "broken.jpg":
            assert a is None and b is None and error_a == error_b and "unreadable" in error_a
        else:
            assert np.array_equal(a, b) and error_a == error_b == "" and flags_a == flags_b


def test_only_long_runs_of_cell_centric_files_use_processes(monkeypatch):
    cell, crop = View(32, cell=0.6), View(32, crop=0.7)
    monkeypatch.setattr(decoding.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert worker_processes(decoding.PROCESS_MIN - 1, cell) == 0
    assert worker_processes(decoding.PROCESS_MIN, cell) == (2 if decoding.sys.platform == "linux" else 0)
    assert worker_processes(10 * decoding.PROCESS_MIN, crop) == 0  # a central crop, the network in the parent: threads were faster
    assert worker_processes(10 * decoding.PROCESS_MIN, crop, infer=True) == (2 if decoding.sys.platform == "linux" else 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert worker_processes(10 * decoding.PROCESS_MIN, cell) == 0  # two torchrun ranks on two cores: one core each, threads
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(decoding.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert worker_processes(10 * decoding.PROCESS_MIN, cell) == 0  # one core: threads
    linux = decoding.sys.platform == "linux"
    assert [worker_processes(10 * decoding.PROCESS_MIN, cell, workers=n) for n in (0, 1, 3)] == [0, 0, 3 if linux else 0]  # asked
    assert worker_processes(decoding.PROCESS_MIN - 1, cell, workers=3) == 0  # a short run stays in threads


def test_a_worker_count_beyond_the_cores_is_capped_with_a_note(monkeypatch, capsys):
    """``--workers 10000`` forked ten thousand processes of about 40 MB each."""
    monkeypatch.setattr(decoding, "usable_cores", lambda: 2)
    cells = View(112, cell=0.6)
    assert decoding.worker_processes(300, cells, True, 10000) == 8
    assert "--workers 10000 is more than 4 per core on this machine's 2: decoding in 8 processes" in capsys.readouterr().err
    assert decoding.worker_processes(300, cells, True, 8) == 8 and decoding.worker_processes(10, cells, True, 10000) == 0
    assert capsys.readouterr().err == ""  # within the cap, or too few files for processes: nothing to say


def test_predict_workers_option_gives_the_same_csv(tmp_path, tiny_run):
    """--workers 2 (processes that run the network) and --workers 0 (threads) write the same rows."""
    from leukoscope.cli import main

    folder = make_image_folder(tmp_path / "many", n_per_class=decoding.PROCESS_MIN // 2 + 2, size=40, ext=".jpg")
    (folder / "blast" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    outputs = []
    for workers in ("2", "0"):
        outputs.append(tmp_path / f"workers{workers}.csv")
        assert main(["predict", str(tiny_run[1]), str(folder), "--out", str(outputs[-1]), "--workers", workers]) == 1  # the broken file
    assert outputs[0].read_text() == outputs[1].read_text()
    assert outputs[0].read_text().count("\n") == 2 * (decoding.PROCESS_MIN // 2 + 2) + 2  # header, every file, the broken one


def test_evaluate_workers_option_reaches_the_decoder(tmp_path, tiny_run, monkeypatch):
    from leukoscope.cli import main

    asked, decide = [], decoding.worker_processes
    monkeypatch.setattr(decoding, "worker_processes", lambda files, view, infer=False, workers=None: asked.append(workers) or decide(files, view, infer, workers))
    assert main(["evaluate", str(tiny_run[1]), str(tiny_run[0]), "--out", str(tmp_path / "eval"), "--workers", "3"]) == 0
    assert asked and set(asked) == {3}  # every split's decoding was asked for 3
    first = len(asked)
    assert main(["evaluate", str(tiny_run[1]), str(tiny_run[0]), "--out", str(tmp_path / "eval2")]) == 0
    assert len(asked) > first and set(asked[first:]) == {None}  # and without the option, the default
    assert (tmp_path / "eval" / "metrics.json").read_text() == (tmp_path / "eval2" / "metrics.json").read_text()


def test_predict_iter_in_processes_keeps_input_order_and_errors(files, monkeypatch, tiny_run):
    from leukoscope import load_model

    model = load_model(tiny_run[1], backend="torch")
    expected = list(model.predict_iter(files, batch_size=4))
    used = []
    monkeypatch.setattr(decoding, "worker_processes", lambda count, view, infer=False, workers=None: used.append(count) or 2)
    got = list(model.predict_iter(files, batch_size=4))
    assert used == [len(files)]  # one pool of 2 processes for the whole run
    assert [p.source for p in got] == [str(f) for f in files]
    assert [p.probabilities for p in got] == [p.probabilities for p in expected] and [p.error for p in got] == [p.error for p in expected]
    assert got[5].error and not got[0].error


def test_workers_that_run_the_network_give_the_same_rows(files, monkeypatch, tiny_run):
    """Long runs with an ONNX Runtime backend: the first batch runs here, the rest in the decoding
    workers, each with its own single-threaded session; same rows, order and errors as one process."""
    from leukoscope import inference, load_model

    model = load_model(tiny_run[1], backend="onnx")
    expected = list(model.predict_iter(files, batch_size=4))
    decoders = []

    class Spy(Decoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            decoders.append(self)

    monkeypatch.setattr(inference, "Decoder", Spy)
    monkeypatch.setattr(inference, "worker_processes", lambda count, view, infer=False, workers=None: 2)
    monkeypatch.setattr(decoding, "worker_processes", lambda count, view, infer=False, workers=None: 2 if count else 0)
    got = list(model.predict_iter(files, batch_size=4))
    assert [(d.processes, d.infers) for d in decoders] == [(0, False), (2, True)]  # the first batch here, then the workers
    assert [p.source for p in got] == [str(f) for f in files] and [p.error for p in got] == [p.error for p in expected]
    assert got[5].error and not got[0].error and got[0].localised == expected[0].localised
    for a, b in zip(got, expected):
        assert a.label == b.label and (a.probabilities == b.probabilities or
                                       max(abs(a.probabilities[c] - b.probabilities[c]) for c in a.probabilities) < 1e-5)
    again = list(model.predict_iter(files[:3], batch_size=4))  # the parent's own session still runs after the workers are gone
    assert all(abs(a.probabilities[c] - b.probabilities[c]) < 1e-5 for a, b in zip(again, got) for c in a.probabilities)


def test_load_and_infer_needs_a_worker_network(files):
    with pytest.raises(RuntimeError, match="worker process"):
        decoding.load_and_infer(files[:1], View(32, crop=0.7))


@pytest.mark.parametrize("shape, view, factor", [
    ((363, 360), View(112, crop=0.7, reduce=True), 2),   # 180 px reduced, its 70% crop 126 >= 112
    ((363, 360), View(126, crop=0.7, reduce=True), 2),   # exactly: 126 px of 180 (pbc)
    ((363, 360), View(128, crop=0.7, reduce=True), 1),   # 126 < 128: no reduction would cover it
    ((1452, 1440), View(112, crop=0.7, reduce=True), 8),  # 180 px at 1/8
    ((724, 720), View(112, crop=0.7, reduce=True), 4),
    ((363, 360), View(112, crop=0.7), 1),                  # reduce off
    ((363, 360), View(112, cell=0.6, reduce=True), 1),     # cell windows are never reduced
    ((363, 360), View(112, crop=0.7, reduce=True).with_context(1 / 0.7), 2),  # training context: 160 px of 180
])
def test_reduction_is_the_largest_factor_that_still_covers_the_view(shape, view, factor):
    from leukoscope.images import reduction

    assert reduction(*shape, view) == factor


def test_reduced_jpeg_files_uploads_and_arrays_agree_within_decoder_rounding(tmp_path):
    """A path and its bytes decode at 1/2 in libjpeg-turbo's DCT (identical); an array of the same image is
    block-averaged by 2 instead: same size, pixels within decoder rounding."""
    from PIL import Image

    from leukoscope.images import frame, load_view, reduction

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:363, :360]
    smooth = np.stack([128 + 60 * np.sin(yy / 9 + c) * np.cos(xx / 13 - c) for c in range(3)], -1) + rng.normal(0, 3, (363, 360, 3))
    path = tmp_path / "tile.jpg"
    Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8)).save(path, quality=95)
    whole = np.asarray(Image.open(path).convert("RGB"))
    view = View(112, crop=0.7, reduce=True)
    assert reduction(*whole.shape[:2], view) == 2
    from_path, _, _ = load_view(path, view)
    from_bytes, _, _ = load_view(path.read_bytes(), view)
    from_array, _, _ = frame(whole, view)
    assert from_path.shape == from_array.shape == (112, 112, 3)
    assert np.array_equal(from_path, from_bytes)
    difference = np.abs(from_path.astype(int) - from_array)
    assert difference.mean() < 1.0 and difference.max() <= 8
    unreduced, _, _ = frame(whole, View(112, crop=0.7))
    assert np.abs(unreduced.astype(int) - from_array).mean() > difference.mean()  # the reduction changed something


def test_a_view_of_the_reduced_size_is_the_dct_decode_itself_without_resampling(tmp_path):
    """`pbc`'s view of a 360x363 CellaVision tile: the JPEG decoded at half size, its central 126 px as they are."""
    import simplejpeg
    from PIL import Image

    from leukoscope.images import load_view

    rng = np.random.default_rng(1)
    path = tmp_path / "tile.jpg"
    Image.fromarray(rng.integers(0, 256, (363, 360, 3), dtype=np.uint8)).save(path, quality=90)
    half = simplejpeg.decode_jpeg(path.read_bytes(), colorspace="RGB", min_height=182, min_width=180)
    assert half.shape == (182, 180, 3)
    top, left = (182 - 126) // 2, (180 - 126) // 2
    assert np.array_equal(load_view(path, View(126, crop=0.7, reduce=True))[0], half[top : top + 126, left : left + 126])


def _wide_rgb_profile() -> bytes:
    """sRGB's profile with its red and blue primaries swapped and its name changed: a profile other than sRGB's, as a
    camera's Adobe RGB or a phone's Display P3 is, whose effect cannot be missed."""
    import struct

    from PIL import ImageCms

    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", icc[128:132])[0]
    tags = {bytes(icc[132 + 12 * i : 136 + 12 * i]): struct.unpack(">II", icc[136 + 12 * i : 144 + 12 * i]) for i in range(count)}
    (red, _), (blue, _), (desc, size) = tags[b"rXYZ"], tags[b"bXYZ"], tags[b"desc"]
    icc[red + 8 : red + 20], icc[blue + 8 : blue + 20] = icc[blue + 8 : blue + 20], icc[red + 8 : red + 20]
    icc[desc : desc + size] = bytes(icc[desc : desc + size]).replace("sRGB".encode("utf-16-be"), "wRGB".encode("utf-16-be"))
    return bytes(icc)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_an_embedded_colour_profile_is_applied_the_same_way_for_every_input_kind(tmp_path, fmt):
    """Pixels saved with a colour profile other than sRGB's are read in sRGB, as a colour-managed viewer shows them,
    whether given as a path, its bytes or a PIL image opened from it; sRGB's own profile changes nothing."""
    from PIL import Image, ImageCms

    from leukoscope.images import decode_jpeg_fast, load_rgb, load_view

    path = tmp_path / f"cell.{fmt.lower()}"
    Image.new("RGB", (64, 64), (200, 40, 60)).save(path, format=fmt, icc_profile=_wide_rgb_profile())
    assert np.abs(load_rgb(path)[32, 32].astype(int) - (60, 40, 200)).max() <= 2  # its red primary is sRGB's blue
    view = View(size=32)
    views = [load_view(path, view)[0], load_view(path.read_bytes(), view)[0]]
    views.append(decoding.decode_item(Image.open(path), view)[0])
    assert all(np.array_equal(views[0], v) for v in views[1:])
    srgb = tmp_path / "srgb.jpg"
    Image.new("RGB", (64, 64), (200, 40, 60)).save(srgb, icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    assert decode_jpeg_fast(srgb.read_bytes()) is not None  # sRGB's profile keeps the fast decoder
    assert np.abs(load_rgb(srgb)[32, 32].astype(int) - (200, 40, 60)).max() <= 2
