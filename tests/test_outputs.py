"""Outputs never clobber: symlinks are written through, devices and FIFOs are streamed, ``-`` is stdout,
and run folders with results are refused unless --force."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import TINY_TRAIN as TINY
from leukoscope.cli import main
from leukoscope.errors import LeukoscopeError
from leukoscope.io import atomic_write, is_stream_output
from leukoscope.runs import prepare_output_folder



def test_regular_file_is_replaced_atomically_keeping_its_mode(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    os.chmod(target, 0o640)
    inode = target.stat().st_ino
    with atomic_write(target) as handle:
        handle.write("new")
    assert target.read_text() == "new" and target.stat().st_ino != inode  # renamed into place
    assert target.stat().st_mode & 0o777 == 0o640
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_symlink_is_written_through_and_kept(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "out.csv"
    target.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    with atomic_write(link) as handle:
        handle.write("new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "real" / "created.csv")
    with atomic_write(dangling) as handle:
        handle.write("made")
    assert dangling.is_symlink() and (tmp_path / "real" / "created.csv").read_text() == "made"


def test_fifo_is_streamed_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo).read()))
    reader.start()
    assert is_stream_output(fifo)
    with atomic_write(fifo) as handle:
        handle.write("through the pipe")
    reader.join(timeout=10)
    assert received == ["through the pipe"]
    assert fifo.is_fifo()  # still a FIFO, not a regular file renamed over it


def test_character_device_and_dash_are_streams(tmp_path, capsysbinary):
    assert is_stream_output("/dev/null") and is_stream_output("-")
    with atomic_write("/dev/null") as handle:
        handle.write("discarded")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    with atomic_write("-", "wb") as handle:
        handle.write(b"bytes to stdout")
    assert capsysbinary.readouterr().out == b"bytes to stdout"
    with pytest.raises(IsADirectoryError):
        is_stream_output(tmp_path)


def test_predict_to_stdout_keeps_logs_on_stderr(tiny_run, capsys):
    data, run = tiny_run
    assert main(["predict", str(run), str(data / "blast"), "--out", "-"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert len(rows) == 12 and rows[0]["label"] in ("blast", "normal")
    assert "12 images predicted, 0 failed; written to standard output" in captured.err
    assert not os.path.exists("-")


def test_predict_into_a_pipe_closed_early_ends_quietly(tiny_run):
    """`predict MODEL cells/ --out - | head -1`: once the reader stops, predict stops, with no error and no traceback."""
    data, run = tiny_run
    proc = subprocess.Popen([sys.executable, "-m", "leukoscope", "predict", str(run), str(data), "--out", "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader has gone before the first row
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_predict_through_a_symlink_and_into_a_fifo(tiny_run, tmp_path):
    data, run = tiny_run
    target = tmp_path / "target.csv"
    target.write_text("")
    (tmp_path / "link.csv").symlink_to(target)
    assert main(["predict", str(run), str(data / "normal"), "--out", str(tmp_path / "link.csv")]) == 0
    assert (tmp_path / "link.csv").is_symlink() and len(target.read_text().splitlines()) == 13
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo).read()))
    reader.start()
    assert main(["predict", str(run), str(data / "normal"), "--out", str(fifo)]) == 0
    reader.join(timeout=30)
    assert fifo.is_fifo() and len(received[0].splitlines()) == 13


def test_output_that_is_a_folder_is_a_one_line_error(tiny_run, tmp_path, capsys):
    """A folder, or a new name ending in '/' (which was written as a file of that name), is bad input: exit 2, nothing written."""
    data, run = tiny_run
    assert main(["predict", str(run), str(data), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} names a folder, but this writes CSV to a file: give a file name (e.g. {tmp_path}/predictions.csv)" \
        in capsys.readouterr().err
    results = str(tmp_path / "results") + "/"
    for command in (["predict", str(run), str(data), "--out", results], ["export", str(run), "--out", results],
                    ["check-data", str(data), "--json", results]):
        assert main(command) == 2
        assert "names a folder, but this writes" in capsys.readouterr().err and not (tmp_path / "results").exists()


def test_train_refuses_a_run_with_results_and_force_replaces_it(tiny_run, tmp_path, capsys):
    data, run = tiny_run
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), *TINY]) == 0
    (out / "gallery" / "99_stale.png").parent.mkdir(exist_ok=True)
    (out / "gallery" / "99_stale.png").write_bytes(b"stale")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert main(["train", str(data), "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "already holds" in err and "--force" in err and "--resume" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing touched
    splits = (out / "splits.csv").read_bytes()
    assert main(["train", str(data), "--out", str(out), *TINY, "--force"]) == 0
    assert not (out / "gallery" / "99_stale.png").exists() and (out / "model.pt").is_file()
    assert (out / "splits.csv").read_bytes() == splits  # the same split, reused


def test_force_never_clears_a_folder_leukoscope_did_not_write(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(LeukoscopeError, match="did not write"):
        prepare_output_folder(tmp_path, force=True)
    assert (tmp_path / "thesis.tex").read_text() == "precious"
    (tmp_path / "thesis.tex").unlink()
    (tmp_path / "splits.csv").write_text("a split to reuse")
    prepare_output_folder(tmp_path)  # only a given split: accepted as it is


def test_the_refusal_names_what_the_folder_holds(tmp_path):
    (tmp_path / "blast").mkdir()
    (tmp_path / "normal").mkdir()
    with pytest.raises(LeukoscopeError, match=r"already holds 2 folders \(e.g. blast/\); choose a new folder"):
        prepare_output_folder(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LeukoscopeError, match=r"holds 3 files and folders \(e.g. blast/\) that leukoscope did not write"):
        prepare_output_folder(tmp_path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blast", "normal", "notes.txt"]


@pytest.mark.parametrize("command", [["segment"], ["explain", "pbc"]])
def test_images_are_not_written_into_the_folder_they_are_read_from(tmp_path, capsys, command):
    """Heatmaps or masks among the lab's images would be read as images by the next run on that folder."""
    from conftest import make_image_folder

    cells = make_image_folder(tmp_path / "data", n_per_class=1) / "blast"
    before = sorted(cells.iterdir())
    assert main([*command, str(cells), "--out", str(tmp_path / "data" / "blast" / ".." / "blast")]) == 2
    err = capsys.readouterr().err
    assert f"is the folder of images given to {command[0]}: its outputs would be mixed with the images" in err
    assert f"give a folder of its own, e.g. --out {command[0]}_results" in err and sorted(cells.iterdir()) == before


@pytest.mark.parametrize("command, what", [(["segment"], "masks and overlays"), (["explain", "pbc"], "heatmaps")])
def test_a_file_given_as_the_output_folder_is_named(tmp_path, capsys, command, what):
    from conftest import make_image_folder

    cells = make_image_folder(tmp_path / "data", n_per_class=1) / "blast"
    (tmp_path / "notes.txt").write_text("mine")
    assert main([*command, str(cells), "--out", str(tmp_path / "notes.txt")]) == 2  # segment: "[Errno 17] File exists"
    assert f"is a file, not a folder; give a folder for the {what}" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "blocked").write_text("a file where a folder would go")
    assert main([*command, str(cells), "--out", str(tmp_path / "blocked" / "out")]) == 2
    assert "cannot create --out" in capsys.readouterr().err


@pytest.mark.parametrize("command, own", [(["segment"], "blast_000_overlay.png"), (["explain", "pbc"], "blast_000_cam.png")])
def test_heatmaps_and_masks_never_replace_a_folder_s_own_files(tmp_path, capsys, command, own):
    """explain and segment name their PNGs after the images: written into any folder, they replaced a file of the same
    name there, and a second run replaced the first's index. Like count, they refuse a folder that holds files."""
    from conftest import make_image_folder

    cells = make_image_folder(tmp_path / "data", n_per_class=1) / "blast"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / own).write_text("a picture of mine")
    assert main([*command, str(cells), "--out", str(mine)]) == 2
    assert "already holds 1 file" in capsys.readouterr().err and sorted(p.name for p in mine.iterdir()) == [own]
    assert main([*command, str(cells), "--out", str(mine), "--force"]) == 2
    assert "that leukoscope did not write" in capsys.readouterr().err and (mine / own).read_text() == "a picture of mine"
    out = tmp_path / "results"
    assert main([*command, str(cells), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert own in written
    assert main([*command, str(cells), "--out", str(out)]) == 2
    assert "add --force to replace them" in capsys.readouterr().err
    assert main([*command, str(cells), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == written


def test_a_file_where_the_output_s_folder_would_be_is_named(tmp_path):
    (tmp_path / "results").write_text("a file, not a folder")
    refused = pytest.raises(LeukoscopeError, match=r"cannot write '.*p.csv': '.*results' is a file, not a folder")  # was: [Errno 17]
    with refused, atomic_write(tmp_path / "results" / "run 1" / "p.csv") as handle:
        handle.write("path,label\n")
    assert (tmp_path / "results").read_text() == "a file, not a folder"


def test_check_data_refuses_an_unwritable_json_before_checking(tiny_run, tmp_path, capsys):
    data, _ = tiny_run
    (tmp_path / "results").write_text("a file, not a folder")
    assert main(["check-data", str(data), "--json", str(tmp_path / "results" / "check.json")]) == 2
    captured = capsys.readouterr()
    assert "'results' is a file, not a folder" in captured.err.replace(str(tmp_path) + os.sep, "")
    assert "result:" not in captured.out + captured.err  # refused before the (long) check, not after printing it
    assert main(["check-data", str(data), "--json", str(tmp_path / "check.json")]) == 0
    assert json.loads((tmp_path / "check.json").read_text())["ok"] is True and "result: OK" in capsys.readouterr().out


def test_evaluate_refuses_earlier_results_and_training_runs(tiny_run, tmp_path, capsys):
    data, run = tiny_run
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), str(data), "--out", str(out)]) == 0
    assert main(["evaluate", str(run), str(data), "--out", str(out)]) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(["evaluate", str(run), str(data), "--out", str(out), "--force"]) == 0
    assert main(["evaluate", str(run), str(data), "--out", str(run), "--force"]) == 2
    assert "is a training run" in capsys.readouterr().err
    assert (run / "model.pt").is_file()


def test_evaluate_elsewhere_recognises_the_models_own_images(tiny_run, tmp_path, capsys):
    """Copied and renamed into another folder, training images are still not scored as test."""
    import json
    import shutil

    data, run = tiny_run
    splits = list(csv.DictReader(open(run / "splits.csv")))
    copy = tmp_path / "copy"
    for i, row in enumerate(splits):
        (copy / row["label"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(data / row["path"], copy / row["label"] / f"renamed_{i}.png")
    model = tmp_path / "model.pt"
    shutil.copy(run / "model.pt", model)  # away from the run's splits.csv
    assert main(["evaluate", str(model), str(copy), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    expected = {k: sum(r["split"] == k for r in splits) for k in ("train", "val", "test")}
    assert {k: metrics[k]["n"] for k in metrics} == expected
    assert f"{expected['train']} images of this data trained the model" in capsys.readouterr().err


def test_evaluate_with_a_given_split_reproduces_the_run_and_never_tests_on_training_images(tiny_run, tmp_path, capsys):
    import json
    import shutil

    data, run = tiny_run
    model = tmp_path / "model.pt"
    shutil.copy(run / "model.pt", model)
    assert main(["evaluate", str(model), str(data), "--out", str(tmp_path / "a"), "--split", str(run / "splits.csv")]) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    own = json.loads((run / "metrics.json").read_text())
    assert {k: metrics[k]["n"] for k in metrics} == {k: own[k]["n"] for k in own}
    everything_test = tmp_path / "all_test.csv"
    rows = list(csv.DictReader(open(run / "splits.csv")))
    with open(everything_test, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "split": "test"} for r in rows)
    assert main(["evaluate", str(model), str(data), "--out", str(tmp_path / "b"), "--split", str(everything_test)]) == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["test"]["n"] == own["test"]["n"]
    assert "trained or validated this model" in capsys.readouterr().err


def test_a_file_name_in_another_encoding_is_written_escaped_in_valid_utf8(tiny_run, tmp_path, capsys):
    import shutil

    data, run = tiny_run
    folder = tmp_path / "archive"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as an old Windows archive unpacks: not UTF-8
    try:
        shutil.copy(min((data / "blast").iterdir()), folder / name)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(folder), "--out", str(out)]) == 0  # a traceback after the work, before
    (row,) = csv.DictReader(out.read_text(encoding="utf-8").splitlines())  # valid UTF-8
    assert row["path"].endswith("caf\\xe9.png") and row["label"]
    assert main(["predict", str(run), str(folder), "--out", "-"]) == 0
    assert "caf\\xe9.png" in capsys.readouterr().out
    assert main(["count", str(folder), "--model", str(run), "--out", str(tmp_path / "count")]) in (0, 1)
    assert "caf\\xe9.png" in (tmp_path / "count" / "summary.csv").read_text(encoding="utf-8")


def test_a_run_on_folders_named_in_latin1_trains_evaluates_and_resumes(tmp_path):
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", n_per_class=12)
    try:
        os.rename(data / "normal", data / os.fsdecode(b"norm\xe9l"))  # class folder from an old archive
        first = min((data / "blast").iterdir())
        os.rename(first, first.parent / os.fsdecode(b"caf\xe9.png"))
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), *TINY]) == 0  # matplotlib could not draw the label
    assert main(["evaluate", str(run), str(data), "--out", str(tmp_path / "eval")]) == 0  # splits.csv read back: same images
    assert main(["train", "--resume", str(run)]) == 0
    assert "norm\\xe9l" in (tmp_path / "eval" / "classification_report.txt").read_text(encoding="utf-8")


def test_a_full_disk_is_a_one_line_error_naming_the_output(tiny_run, tmp_path, monkeypatch, capsys):
    """A write that fails for space names no file of its own ([Errno 28] alone): the message names --out and the fix."""
    import errno

    import leukoscope.predict

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    data, run = tiny_run
    monkeypatch.setattr(leukoscope.predict, "write_rows", full)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run), str(data), "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == (f"leukoscope: error: no space left on the disk of --out {out}: free some space there, "
                                               "or give an --out on another disk")


def test_an_output_never_replaces_an_input_nor_takes_an_image_s_name(tiny_run, tmp_path, capsys):
    data, run = tiny_run
    images = sorted((data / "blast").iterdir())[:2]
    before = images[1].read_bytes()
    assert main(["predict", str(run), str(images[0]), str(images[1]), "--out", str(images[1])]) == 2
    assert "is one of this command's inputs" in capsys.readouterr().err and images[1].read_bytes() == before
    assert main(["predict", str(run), str(images[0]), "--out", str(tmp_path / "preds.png")]) == 2  # arguments mixed up
    assert "names an image, but this writes CSV" in capsys.readouterr().err and not (tmp_path / "preds.png").exists()
    assert main(["predict", str(run), str(images[0]), "--out", str(tmp_path / "preds.xlsx")]) == 2  # CSV text Excel would refuse
    assert ("this writes CSV, not an Excel workbook: give a .csv, .tsv or .txt file name (Excel opens a .csv)" in capsys.readouterr().err
            and not (tmp_path / "preds.xlsx").exists())
    assert main(["predict", str(run), *map(str, images), "--out", str(tmp_path / "preds.tsv")]) == 0  # tab-separated, as named
    lines = (tmp_path / "preds.tsv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("path\tlabel\tconfidence\t") and "," not in lines[1]
    checkpoint = run / "model.pt"
    before = checkpoint.read_bytes()
    assert main(["export", str(run), "--out", str(checkpoint)]) == 2
    assert "is one of this command's inputs" in capsys.readouterr().err and checkpoint.read_bytes() == before


@pytest.mark.parametrize("command", ["train", "evaluate", "count", "segment", "explain"])
def test_commands_that_write_a_folder_refuse_stdout(tiny_run, tmp_path, monkeypatch, capsys, command):
    data, run = tiny_run
    monkeypatch.chdir(tmp_path)
    args = {"train": [str(data)], "evaluate": [str(run), str(data)], "count": [str(data / "blast"), "--model", str(run)],
            "segment": [str(data / "blast")], "explain": [str(run), str(data / "blast")]}[command]
    for out in ("-", "/dev/stdout"):
        assert main([command, *args, "--out", out]) == 2
        assert f"is standard output or a device, but {command} writes a folder" in capsys.readouterr().err
    assert not os.path.exists("-")


def test_an_ascii_console_of_the_c_locale_prints_names_escaped(tmp_path):
    """LC_ALL=C with Python's UTF-8 mode off: the console is ASCII with surrogateescape, which raised UnicodeEncodeError
    on 'ó' in a class name after check-data had read every image; a name's undecodable bytes are written back as bytes."""
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", n_per_class=2)
    (data / "blast").rename(data / "Eosinófilo")
    os.rename(os.fsencode(data / "normal"), os.path.join(os.fsencode(data), b"caf\xe9"))  # a Latin-1 name from an old archive
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
    env.pop("PYTHONIOENCODING", None)
    done = subprocess.run([sys.executable, "-m", "leukoscope", "check-data", str(data)], env=env, capture_output=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"Eosin\\xf3filo" in done.stdout and b"caf\\xe9" in done.stdout  # printable() escapes a label's bytes too


def test_a_name_the_console_cannot_encode_is_printed_escaped(tmp_path, monkeypatch):
    """Chinese file names under a console that cannot hold them (a Windows code page, LANG=C): the work was done, then
    the last message raised UnicodeEncodeError; now it prints the name escaped. And no matplotlib warning per glyph."""
    import shutil
    import warnings

    from conftest import DATA, require

    data = tmp_path / "細胞"
    data.mkdir()
    for tile in sorted((require(DATA / "pbc") / "neutrophil").glob("*.jpg"))[:2]:  # real tiles: a white cell in each
        shutil.copy(tile, data)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["predict", "pbc", str(data), "--out", str(data / "結果.csv")]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["count", str(data), "--out", str(data / "count")]) == 0
    stdout.flush()
    printed = stdout.buffer.getvalue().decode("ascii")
    assert "written to " + str(tmp_path) + "/\\u7d30\\u80de/\\u7d50\\u679c.csv" in printed
    assert "\\u7d30\\u80de: 2 white cells" in printed
    assert not [w for w in caught if "Glyph" in str(w.message)]


def test_onnx_runtime_records_and_sends_nothing(tmp_path):
    """ONNX Runtime (1.29 on) records usage events under ~/.cache/Microsoft for upload to Microsoft unless told not
    to; predicting a lab's images must leave no such trace."""
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", n_per_class=1)
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env.update(HOME=str(tmp_path / "home"), LEUKOSCOPE_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "leukoscope", "predict", "pbc", str(data), "--out", "-"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 + 2 and list((tmp_path / "cache" / "onnx").glob("*.onnx"))  # ONNX Runtime ran
    assert not (tmp_path / "home" / ".cache" / "Microsoft").exists()


def test_without_a_home_folder_the_cache_is_a_private_temporary_one(tmp_path, monkeypatch):
    """A container run under a user id with no home (HOME unset, no passwd entry): predict raised RuntimeError in
    Path.home(). The cache goes to a folder of the user's own in the temporary directory, never to one someone else
    made there (it could feed a model their graphs)."""
    import stat
    import tempfile
    from pathlib import Path

    from leukoscope.io import cache_root

    for name in ("LEUKOSCOPE_CACHE", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    own = cache_root()
    assert own == tmp_path / f"leukoscope-cache-{os.getuid()}" and stat.S_IMODE(own.stat().st_mode) == 0o700
    assert cache_root() == own  # reused from run to run
    own.chmod(0o777)  # as a folder another user made would be
    other = cache_root()
    assert other != own and other.parent == tmp_path and stat.S_IMODE(other.stat().st_mode) == 0o700
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "leukoscope"


def test_outputs_named_after_long_file_names_fit_the_file_system(tmp_path):
    """A file name of 250 bytes, the most a file system holds with its extension: explain's `<name>_cam.png` and
    segment's `<name>_cytoplasm.png` did not fit, and the whole run failed on it. Names cut at 160 bytes keep a hash
    of the whole name, so two that begin alike stay apart."""
    import shutil

    from conftest import DATA, require

    data = tmp_path / "cells"
    data.mkdir()
    tile = min((require(DATA / "pbc") / "neutrophil").glob("*.jpg"))
    names = ["a" * 246 + ".jpg", "a" * 245 + "b.jpg", "細" * 82 + ".jpg"]  # 250 bytes each (a CJK character is 3)
    for name in names:
        shutil.copy(tile, data / name)
    assert main(["explain", "pbc", str(data), "--out", str(tmp_path / "cams")]) == 0
    assert main(["segment", str(data), "--out", str(tmp_path / "seg")]) == 0
    assert main(["count", str(data), "--out", str(tmp_path / "count")]) == 0
    assert main(["predict", "pbc", str(data), "--out", str(tmp_path / ("p" * 246 + ".csv"))]) == 0  # its temporary name too
    written = [p.name for folder in ("cams", "seg", "count/overlays") for p in (tmp_path / folder).iterdir()]
    assert len([n for n in written if n.endswith("_cam.png")]) == 3 and len(list((tmp_path / "count/overlays").iterdir())) == 3
    assert max(len(n.encode()) for n in written) <= 160 + len("_cytoplasm.png")
    from leukoscope.io import output_name

    used: set[str] = set()
    assert output_name("細" * 82, used).startswith("細" * 50 + "~") and output_name("x", used) == "x" and output_name("x", used) == "x_2"


def test_an_output_that_cannot_be_written_is_named_not_its_temporary_file(tmp_path, monkeypatch):
    """A read-only folder said "Read-only file system: '.p.csv.hd68jh8a'": the temporary name, not the --out given."""
    import tempfile

    def refuse(**kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / ".p.csv.hd68jh8a"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OSError, match="Read-only file system") as info, atomic_write(tmp_path / "p.csv"):
        pass
    assert info.value.filename == str(tmp_path / "p.csv") and info.value.errno == 30


def test_the_next_write_of_an_output_removes_the_temporary_file_a_killed_process_left_for_it(tmp_path):
    """kill -9 (or the out-of-memory killer) leaves atomic_write's hidden temporary file beside the output; the next write
    of that output removes it, but never one a live process, another host or a recent writer may still own."""
    from leukoscope import io as lio

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        names = {"stale": f".p.csv.{lio._TEMP_OWNER}-{dead.pid}-abcd_123", "recent": f".p.csv.{lio._TEMP_OWNER}-{dead.pid}-efgh_456",
                 "live": f".p.csv.{lio._TEMP_OWNER}-{live.pid}-ijkl_789", "other host": f".p.csv.ffffff-{dead.pid}-mnop_000",
                 "other output": f".q.csv.{lio._TEMP_OWNER}-{dead.pid}-qrst_111", "user's": ".p.csv.notes"}
        old = os.stat(tmp_path).st_mtime - 2 * lio.STALE_SECONDS
        for key, name in names.items():
            (tmp_path / name).write_text("half a CSV")
            if key != "recent":
                os.utime(tmp_path / name, (old, old))
        with atomic_write(tmp_path / "p.csv") as handle:
            handle.write("path,label\n")
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"p.csv", *(name for key, name in names.items() if key != "stale")}
    finally:
        live.kill()
        live.wait()
