"""Training that survives kill -9, runs data-parallel under torchrun, and reproduces itself."""

from __future__ import annotations

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


@pytest.mark.parametrize("extra", [[], ["--ema", "0.9"]], ids=["plain", "ema"])
def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path, extra):
    data = make_image_folder(tmp_path / "data", n_per_class=48, size=48)
    args = ["train", str(data), *TINY, "--epochs", "8", "--seed", "3", *extra]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "leukoscope", *args, "--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = run / "history.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) >= 3:  # header + 2 epochs
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed; make the test data larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
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
