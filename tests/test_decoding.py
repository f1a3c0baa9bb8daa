"""Decoding in worker processes gives what threads give, in order, with per-file errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_image_folder

from leukoscope import decoding
from leukoscope.decoding import Decoder, worker_processes
from leukoscope.io import View


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
    for (a, error_a, found_a), (b, error_b, found_b), path in zip(by_process, by_thread, files):
        if path.name == "broken.jpg":
            assert a is None and b is None and error_a == error_b and "unreadable" in error_a
        else:
            assert np.array_equal(a, b) and error_a == error_b == "" and found_a == found_b


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
