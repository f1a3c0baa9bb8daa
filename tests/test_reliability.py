"""Training that survives kill -9, runs data-parallel under torchrun, and reproduces itself."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_image_folder

from leukoscope.cli import main

TINY = ["--arch", "cellnet_tiny", "--image-size", "32", "--batch-size", "8", "--patience", "100"]
KEYS = ("loss", "accuracy", "balanced_accuracy", "macro_f1", "ece")


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _assert_same_metrics(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for split in a:
        for key in KEYS:
            assert abs(a[split][key] - b[split][key]) <= tol, (split, key, a[split][key], b[split][key])


def test_same_seed_same_splits_and_metrics(tmp_path):
    data = make_image_folder(tmp_path / "data", n_per_class=16)
    for name in ("a", "b"):
        assert main(["train", str(data), "--out", str(tmp_path / name), *TINY, "--epochs", "3", "--seed", "7"]) == 0
    assert (tmp_path / "a" / "splits.csv").read_bytes() == (tmp_path / "b" / "splits.csv").read_bytes()
    _assert_same_metrics(_metrics(tmp_path / "a"), _metrics(tmp_path / "b"))


@pytest.mark.parametrize(("extra", "stop"), [([], signal.SIGKILL), (["--ema", "0.9"], signal.SIGKILL), ([], signal.SIGTERM)],
                         ids=["plain", "ema", "sigterm"])
def test_resume_after_kill_9_or_sigterm_matches_uninterrupted_run(tmp_path, extra, stop):
    data = make_image_folder(tmp_path / "data", n_per_class=48, size=48)
    args = ["train", str(data), *TINY, "--epochs", "8", "--seed", "3", *extra]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "leukoscope", *args, "--out", str(run)], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    history = run / "history.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) >= 3:  # header + 2 epochs
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed; make the test data larger"
    os.kill(proc.pid, stop)
    proc.wait(timeout=60)
    if stop == signal.SIGTERM:  # a scheduler's stop: the run says how to continue it
        assert proc.returncode == 143 and f"terminated; continue it with: leukoscope train --resume {run}" in log.read_text()
    epochs_done = len(history.read_text().splitlines()) - 1
    assert 2 <= epochs_done < 8 and not (run / "metrics.json").exists()

    assert main(["train", "--resume", str(run)]) == 0
    _assert_same_metrics(_metrics(tmp_path / "straight"), _metrics(run))
    assert len(history.read_text().splitlines()) == 1 + 8
    assert json.loads((run / "run.json").read_text())["resumed"] is True


def test_resume_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_torchrun_two_gloo_ranks_stay_in_sync(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found beside the Python interpreter")
    data = make_image_folder(tmp_path / "data", n_per_class=16)
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "leukoscope", "train", str(data),
                             "--out", str(run), *TINY, "--epochs", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    digests = dict(re.findall(r"rank (\d)/2: final weights sha256 ([0-9a-f]{64})", result.stdout + result.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    single = tmp_path / "single"
    assert main(["train", str(data), "--out", str(single), *TINY, "--epochs", "3"]) == 0
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in single.iterdir())
    assert (run / "splits.csv").read_bytes() == (single / "splits.csv").read_bytes()
    assert len((run / "history.csv").read_text().splitlines()) == 1 + 3
    assert json.loads((run / "run.json").read_text())["world_size"] == 2


def _predict_blocked_on_its_output(tmp_path: Path, run: Path, image: Path) -> tuple[subprocess.Popen, list]:
    """A predict run whose CSV goes to a pipe that nobody reads: it blocks there, its decoding workers started."""
    import psutil

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2000):  # 2,000 rows: several times what a pipe holds
        os.link(image, images / f"{i:04d}.png")
    proc = subprocess.Popen([sys.executable, "-m", "leukoscope", "predict", str(run), str(images), "--out", "-", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(workers := psutil.Process(proc.pid).children()) < 2:
        assert proc.poll() is None and time.time() < deadline, "predict ended before it started its workers"
        time.sleep(0.05)
    return proc, workers


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_predict_leaves_no_worker_processes_behind(tmp_path, tiny_run, stop):
    """SIGTERM (a scheduler, `timeout`, `docker stop`) ends predict as Ctrl-C does: exit status 143 and its workers
    stopped. Killed outright (kill -9, the OOM killer), its workers end with it instead of waiting forever."""
    import psutil

    data, run = tiny_run
    proc, workers = _predict_blocked_on_its_output(tmp_path, run, next(data.rglob("*.png")))
    try:
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=60)
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"{len(alive)} worker processes left running after {stop.name}"
        if stop == signal.SIGTERM:
            assert proc.returncode == 143 and "leukoscope: terminated" in err.decode()
    finally:
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
