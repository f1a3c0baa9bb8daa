import csv
import io
import json
import re
import shutil
import unicodedata
from collections import defaultdict

import pytest

from conftest import CNMC, link_real_cnmc_tree, make_image_folder, require
from leukoscope import load_model
from leukoscope.cli import build_parser, main
from leukoscope.errors import LeukoscopeError

TINY = ["--arch", "cellnet_tiny", "--image-size", "32", "--epochs", "2", "--batch-size", "8"]
REPORT_FILES = ["metrics.json", "classification_report.txt", "confusion_matrix.png", "training_curves.png",
                "history.csv", "report.html", "splits.csv", "config.yaml", "model.pt"]


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    data = make_image_folder(root / "data", n_per_class=16)
    assert main(["train", str(data), "--out", str(root / "run"), *TINY]) == 0
    return data, root / "run"


def test_train_writes_every_report_file(synthetic_run):
    _, run = synthetic_run
    for name in REPORT_FILES:
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        for key in ("loss", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "confusion_matrix", "per_class"):
            assert key in metrics[split]
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 3 and "split by" in html
    checkpoint = load_model(run).meta
    assert checkpoint["train_command"].startswith("leukoscope train ") and "--arch cellnet_tiny" in checkpoint["train_command"]
    assert 1 <= checkpoint["epoch"] <= 2


def test_training_into_a_run_of_other_images_is_refused(synthetic_run, tmp_path, capsys):
    _, run = synthetic_run
    other = make_image_folder(tmp_path / "other", n_per_class=3, seed=1)
    (other / "normal" / "extra.png").write_bytes((other / "normal" / "normal_000.png").read_bytes())
    (tmp_path / "run").mkdir()
    shutil.copy(run / "splits.csv", tmp_path / "run" / "splits.csv")
    assert main(["train", str(other), "--out", str(tmp_path / "run"), *TINY]) == 2
    assert "lists other images" in capsys.readouterr().err


def test_evaluate_and_predict_round_trip(synthetic_run, tmp_path, capsys):
    data, run = synthetic_run
    assert main(["evaluate", str(run), str(data), "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    assert evaluated["test"]["n"] == trained["test"]["n"]  # the run's splits.csv was reused
    assert abs(evaluated["test"]["accuracy"] - trained["test"]["accuracy"]) < 1e-9
    scored = _rows(tmp_path / "eval" / "predictions.csv")
    assert list(scored[0]) == ["path", "split", "label", "predicted", "confidence", "ood_score", "in_domain"]
    for split in ("train", "val", "test"):  # the per-image flags add up to the split's out-of-domain share
        flags = [r["in_domain"] for r in scored if r["split"] == split]
        assert set(flags) <= {"true", "false"} and flags.count("false") / len(flags) == evaluated[split]["out_of_domain"]
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run / "model.pt"), str(data), "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 32
    assert list(rows[0]) == ["path", "label", "confidence", "p_blast", "p_normal", "ood_score", "in_domain", "localised", "error"]
    assert all(float(r["ood_score"]) >= 0 and r["in_domain"] in ("true", "false") for r in rows)
    alarm = {r["path"].split("/")[-1]: (r["ood_score"], r["in_domain"]) for r in scored}
    assert all(alarm[r["path"].split("/")[-1]] == (r["ood_score"], r["in_domain"]) for r in rows)  # evaluate and predict agree
    for row in rows:
        assert row["label"] in ("blast", "normal") and not row["error"]
        assert abs(float(row["p_blast"]) + float(row["p_normal"]) - 1) < 1e-4
    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "torch.csv"), "--backend", "torch"]) == 0
    for fast, eager in zip(rows, _rows(tmp_path / "torch.csv")):  # ONNX Runtime (default) vs PyTorch
        assert fast["label"] == eager["label"] and abs(float(fast["p_blast"]) - float(eager["p_blast"])) < 1e-4


def test_evaluate_matches_class_folders_named_otherwise(synthetic_run, tmp_path, capsys):
    """A lab's folders "Blasts" and "NORMAL" are the model's blast and normal: the same scores, said in a note."""
    data, run = synthetic_run
    renamed = tmp_path / "lab"
    shutil.copytree(data / "blast", renamed / "Blasts")
    shutil.copytree(data / "normal", renamed / "NORMAL")
    assert main(["evaluate", str(run), str(renamed), "--out", str(tmp_path / "eval")]) == 0
    assert "class names matched by name: Blasts = blast, NORMAL = normal" in capsys.readouterr().err
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert main(["evaluate", str(run), str(data), "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert evaluated["test"]["n"] == plain["test"]["n"] and evaluated["test"]["accuracy"] == plain["test"]["accuracy"]
    (renamed / "Smudge").mkdir()
    shutil.copy(next((data / "normal").iterdir()), renamed / "Smudge" / "x.png")
    assert main(["evaluate", str(run), str(renamed), "--out", str(tmp_path / "eval2")]) == 2  # a class with no match
    assert "that the model does not know" in capsys.readouterr().err


def test_match_class_names():
    from leukoscope.classes import match_class_names

    wbc = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    assert match_class_names(["Neutrophils", "LYT", "eos", "Baso", "ig"], wbc) == {
        "basophil": "Baso", "eosinophil": "eos", "lymphocyte": "LYT", "neutrophil": "Neutrophils"}
    assert match_class_names(["neutrophil", "lymphocyte"], wbc) is None  # nothing to match
    assert match_class_names(["Neutrophils", "Smudge"], wbc) is None  # an unknown class: no partial guess
    assert match_class_names(["Neutrophils", "Band"], wbc) is None  # two folders for one class: merged first (subtype_merges)
    assert match_class_names(["Neutrophils", "NEUTROPHIL"], wbc) is None  # two folders for one class
    assert match_class_names(["Neutrophils", "neutrophil"], wbc) is None
    assert match_class_names(["NGS", "LYT"], wbc) == {"neutrophil": "NGS", "lymphocyte": "LYT"}  # a subtype alone
    own = ["band", "lymphocyte", "neutrophil"]  # a lab's model that tells band cells apart
    assert match_class_names(["Bands", "Neutrophils", "Lymphocytes"], own) == {"band": "Bands", "neutrophil": "Neutrophils",
                                                                               "lymphocyte": "Lymphocytes"}
    spanish = ["Basófilos", "Eosinófilos", "Eritroblastos", "Granulocitos inmaduros", "Linfocitos", "Monocitos", "Neutrófilos",
               "Plaquetas"]  # a lab's folders in its own language, accents as macOS (decomposed) or Windows writes them
    assert match_class_names(spanish, wbc) == dict(zip(wbc, spanish))
    assert match_class_names([unicodedata.normalize("NFD", c) for c in spanish], wbc) == {
        m: unicodedata.normalize("NFD", c) for m, c in zip(wbc, spanish)}
    assert match_class_names(["Lymphozyten", "Monozyten", "Thrombozyten", "Neutrophile"], wbc) == {
        "lymphocyte": "Lymphozyten", "monocyte": "Monozyten", "platelet": "Thrombozyten", "neutrophil": "Neutrophile"}  # German
    assert match_class_names(["Linfociti", "Piastrine", "éosinophiles"], wbc) == {
        "lymphocyte": "Linfociti", "platelet": "Piastrine", "eosinophil": "éosinophiles"}  # Italian, French


def test_subtype_merges():
    from leukoscope.classes import subtype_merges

    wbc = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    munich = ["BAS", "EOS", "LYT", "MMZ", "MON", "MYB", "NGB", "NGS", "PMO"]  # Munich AML's folders for PBC's types
    assert subtype_merges(munich, wbc) == {"NGB": "neutrophil", "NGS": "neutrophil", "MMZ": "ig", "MYB": "ig", "PMO": "ig"}
    assert subtype_merges(["Neutrophils", "Bands", "lymphocyte"], wbc) == {"Bands": "Neutrophils"}
    assert subtype_merges(["neutrophil", "Myelocytes", "ig"], wbc) == {"Myelocytes": "ig"}
    assert subtype_merges(["Neutrófilo en cayado", "Neutrófilo segmentado", "Mielocitos", "Granulocitos inmaduros"], wbc) == {
        "Neutrófilo en cayado": "neutrophil", "Neutrófilo segmentado": "neutrophil", "Mielocitos": "Granulocitos inmaduros"}
    stages = ["ig_metamyelocyte", "ig_myelocyte", "ig_promyelocyte", "neutrophil_band", "neutrophil_segmented", "eosinophil"]
    assert subtype_merges(stages, wbc) == {"ig_metamyelocyte": "ig", "ig_myelocyte": "ig", "ig_promyelocyte": "ig",
                                           "neutrophil_band": "neutrophil", "neutrophil_segmented": "neutrophil"}  # make_wbc_data --subtypes
    assert subtype_merges(["Neutrophils", "NEUTROPHIL", "band"], wbc) == {}  # two folders name the class itself: ambiguous
    assert subtype_merges(["band", "lymphocyte"], wbc) == {}  # one folder for the class: matched by name, nothing to merge
    assert subtype_merges(["NGB", "NGS"], ["blast", "normal"]) == {}  # not classes of this model
    for data in (["neutrophil", "band", "lymphocyte"], ["Neutrophils", "Bands"]):  # a model that tells band cells apart
        assert subtype_merges(data, ["band", "lymphocyte", "neutrophil"]) == {}


def test_python_api(synthetic_run):
    data, run = synthetic_run
    predictor = load_model(run)
    preds = predictor.predict([data / "blast" / "blast_000.png", data / "nope.png"])
    assert preds[0].label in ("blast", "normal") and 0.5 <= preds[0].confidence <= 1
    assert preds[1].error == "file not found"


@pytest.fixture(scope="module")
def cnmc_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnmc")
    data = link_real_cnmc_tree(root / "data")
    assert main(["train", str(data), "--out", str(root / "run"), "--arch", "cellnet_tiny", "--image-size", "64",
                 "--epochs", "2", "--batch-size", "4", "--fractions", "0.5,0.25,0.25"]) == 0
    return data, root / "run"


def test_real_cnmc_tree_trains_with_patient_split(cnmc_run):
    _, run = cnmc_run
    rows = _rows(run / "splits.csv")
    assert len(rows) == 15 and all(r["patient"] for r in rows)
    where = defaultdict(set)
    for r in rows:
        where[r["patient"]].add(r["split"])
    assert all(len(s) == 1 for s in where.values())
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert json.loads((run / "run.json").read_text())["split_kind"] == "patient"
    assert "per_patient" in json.loads((run / "metrics.json").read_text())["test"]
    assert "<b>patient</b>" in (run / "report.html").read_text()


def test_predict_real_cells_plus_broken_file(cnmc_run, tmp_path, capsys):
    _, run = cnmc_run
    folder = tmp_path / "cells"
    shutil.copytree(require(CNMC), folder, ignore=shutil.ignore_patterns("*.csv", "*.tsv"))
    (folder / "broken.bmp").write_bytes(b"BM\x00\x01 truncated")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run), str(folder), "--out", str(out)]) == 1
    rows = _rows(out)
    assert len(rows) == 16
    errors = [r for r in rows if r["error"]]
    assert len(errors) == 1 and errors[0]["path"].endswith("broken.bmp") and "\n" not in errors[0]["error"]
    assert sum(r["label"] in ("all", "hem") for r in rows) == 15
    captured = capsys.readouterr()
    assert "15 images predicted, 1 failed" in captured.out
    assert f"{folder / 'broken.bmp'}: error: {errors[0]['error']}" in captured.err  # the reason, without opening the CSV
    for name in ("a.jpg", "b.jpg", "c.jpg"):  # many: the first few said, the rest counted
        (folder / name).write_bytes(b"junk")
    assert main(["predict", str(run), str(folder), "--out", str(out)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line or line.startswith("...")]
    assert len(lines) == 4 and lines[-1] == f"... and 1 more: see the error column of {out}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "{tmp}/nowhere", "--out", "{tmp}/run"], "does not exist"),
        (["train", "{data}", "--out", "{tmp}/run", "--arch", "resnet19"], "did you mean 'resnet18'"),
        (["train", "{data}", "--out", "{tmp}/run", "--config", "{tmp}/bad.yaml"], "did you mean 'epochs'"),
        (["train", "{data}", "--out", "{tmp}/run", "--config", "{tmp}/typed.yaml"], "typed.yaml: epochs must be a whole number, got 'three'"),
        (["train", "{data}", "--out", "{tmp}/run", "--config", "{tmp}/aug.yaml"], "aug.yaml: augment.hue must be a finite number, got 'lots'"),
        (["train", "{data}", "--out", "{tmp}/run", "--config", "{tmp}/fr.yaml"], "fractions must be a list of 3 numbers, got [0.7, 0.3]"),
        (["train", "{data}", "--out", "{tmp}/run", "--config", "{image}"], "not a YAML text file (it holds binary data)"),
        (["predict", "{tmp}/no_model", "{data}", "--out", "{tmp}/p.csv"], "neither a run folder"),
        (["evaluate", "{tmp}/no_model", "{data}", "--out", "{tmp}/e"], "neither a run folder"),
        (["predict", "pbc", "{data}", "--out", "{tmp}/p.csv", "--backend", "tensorrt"], "invalid choice: 'tensorrt'"),
        (["predict", "pbc", "{data}", "--out", "{tmp}/p.csv", "--tta", "flp"], "invalid choice: 'flp'"),
        (["predict", "pbc", "{data}", "--out", "{tmp}/p.csv", "--device", "gpu"], "(did you mean 'cuda'?)"),  # not 'cpu'
        (["predict", "pbc", "{data}", "--out", "{tmp}/p.csv", "--backend", "pytorch"], "(did you mean 'torch'?)"),
        (["predict", "pbc", "--tta", "{data}", "--out", "{tmp}/p.csv"], "argument --tta: invalid choice"),
        (["train", "{data}", "--out", "{tmp}/run", "--method", "svn"], "(did you mean 'svm'?)"),
        (["train", "{data}", "--out", "{tmp}/run", "--optimizer", "adam"], "(did you mean 'adamw'?)"),
        (["predict", "pbc", "{data}"], "required: --out (--out: CSV file to write, or - for standard output)"),
        (["count", "{data}"], "required: --out (--out: folder for cells.csv, summary.csv"),
        (["predict", "{image}", "{data}", "--out", "{tmp}/p.csv"], "an image, not a model; give the model first"),
        (["explain", "pbc", "{data}", "--out", "{image}"], "is a file, not a folder"),
        (["predict", "{tmp}/notes.pt", "{data}", "--out", "{tmp}/p.csv"], "not a readable leukoscope checkpoint"),  # text
        (["models", "{tmp}/cut.pt"], "not a readable leukoscope checkpoint"),  # a download cut short
        (["predict", "{tmp}/notes.joblib", "{data}", "--out", "{tmp}/p.csv"], "not a readable leukoscope classical model"),
        (["explain", "{tmp}/model.onnx", "{data}", "--out", "{tmp}/x"], "is an exported ONNX graph; explain (Grad-CAM"),
        (["serve", "pbc", "--port", "99999"], "argument --port: must be at most 65535, got 99999"),  # was the socket's traceback
        (["serve", "pbc", "--port", "http"], "argument --port: expected a whole number, got 'http'"),
        (["export", "pbc", "--format", "onnx", "--out", "{tmp}/m.onnx", "--tolerance", "-1"], "argument --tolerance: must be > 0, got -1.0"),
        (["predict", "pbc", "https://lab.example/cell.jpg", "--out", "{tmp}/p.csv"], "it is a URL, and leukoscope reads local files only"),
        (["evaluate", "pbc", "https://lab.example/cells", "--out", "{tmp}/e"], "data path 'https://lab.example/cells' does not exist; it is a URL"),
        (["predict", "https://lab.example/m.pt", "{data}", "--out", "{tmp}/p.csv"], "bundled model; it is a URL, and leukoscope"),
        (["count", "{tmp}/nowhere", "--out", "{tmp}/c"], "nowhere' does not exist"),  # was a field 'not counted'
        (["count", "-", "--out", "{tmp}/c"], "'-' (an image piped into standard input) is read by predict only"),
        (["train", "{data}", "--out", "{tmp}/run", "--learning-rate", "0.1"], "unrecognized arguments: --learning-rate 0.1 (did you mean --lr?)"),
        (["predict", "pbc", "{data}", "--out", "{tmp}/p.csv", "--batch-size", "100000"], "argument --batch-size: must be at most 1024, got 100000"),
        (["predict", "pbc", "{data}", "--out", "{tmp}/p.csv", "--batchsize=3"], "leukoscope predict: unrecognized arguments: --batchsize=3 (did you mean --batch-size?)"),
        (["train", "{data}", "--out", "{tmp}/run", "--config", "{tmp}/lr.yaml"], "lr.yaml: unknown option 'learning_rate' (did you mean 'lr'?)"),
        (["train", "{data}", "--out", "{tmp}/run", "--augment", "{{hu: 0.1}}"], "unknown option 'augment.hu' (did you mean 'hue'?); valid: "),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, capsys, argv, message):
    data = make_image_folder(tmp_path / "data", n_per_class=2)
    (tmp_path / "bad.yaml").write_text("epoch: 3\n")
    (tmp_path / "typed.yaml").write_text("epochs: three\n")  # was a TypeError traceback
    (tmp_path / "aug.yaml").write_text("augment:\n  hue: lots\n")
    (tmp_path / "fr.yaml").write_text("fractions: [0.7, 0.3]\n")
    (tmp_path / "lr.yaml").write_text("learning_rate: 0.1\n")  # as other tools name it
    (tmp_path / "notes.pt").write_text("hi\n")  # torch.load raised KeyError on it
    (tmp_path / "notes.joblib").write_text("junk\n")  # joblib.load: UnpicklingError
    (tmp_path / "model.onnx").write_bytes(b"")  # refused for what it is, before it is read
    (tmp_path / "cut.pt").write_bytes(b"\x80\x02}q\x00(X\x04\x00\x00\x00arch")  # a pickle that stops mid-way
    image = next(p for p in sorted(data.rglob("*")) if p.is_file())
    argv = [a.format(tmp=tmp_path, data=data, image=image) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("leukoscope: error:") and "\n" not in err


@pytest.mark.parametrize("argv, name", [
    (["predict", "pbc", "", "--out", "p.csv"], "INPUTS"),
    (["predict", "pbc", "cells", "--out", ""], "--out"),
    (["predict", "", "cells", "--out", "-"], "MODEL"),
    (["segment", "cells", "--out", " "], "--out"),
    (["explain", "pbc", "cells", "--out", ""], "--out"),
    (["evaluate", "pbc", "cells", "--out", "", "--force"], "--out"),
    (["count", "", "--out", "c"], "INPUTS"),
    (["train", "cells", "--out", ""], "--out"),
    (["check-data", ""], "DATA"),
])
def test_an_empty_argument_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, capsys, argv, name):
    """``--out "$OUT"`` or an input ``"$DIR"`` with the variable unset: ``Path("")`` is the folder the command was started
    in, which segment and explain wrote their files into, evaluate --force cleared and predict read."""
    make_image_folder(tmp_path / "cells", n_per_class=2)
    (tmp_path / "keep.txt").write_text("mine\n")
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"{name} is empty (an unset shell variable?)" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells", "keep.txt"]
    with pytest.raises(LeukoscopeError, match="an empty path among the images"):
        load_model("pbc", backend="torch").predict(["cells", ""])
    with pytest.raises(LeukoscopeError, match="no model given"):
        load_model("")


def test_an_image_piped_into_standard_input_is_the_input_dash(tiny_run, tmp_path, monkeypatch, capsys):
    """``cat cell.png | leukoscope predict MODEL - --out -``: its row is named ``-`` and matches the file's."""
    data, run = tiny_run
    image = next((data / "blast").iterdir())
    pipe = lambda content: io.TextIOWrapper(io.BytesIO(content))  # a pipe: not a terminal
    monkeypatch.setattr("sys.stdin", pipe(image.read_bytes()))
    assert main(["predict", str(run), "-", str(data / "normal"), "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert rows[1][0] == "-" and len(rows) == 1 + 1 + 12
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "file.csv")]) == 0
    assert rows[1][1:] == list(csv.reader((tmp_path / "file.csv").open()))[1][1:]
    for content, message in [(b"", "standard input is empty"), (None, "but none is")]:
        monkeypatch.setattr("sys.stdin", pipe(content) if content is not None else io.TextIOWrapper(_Terminal()))
        assert main(["predict", str(run), "-", "--out", "-"]) == 2
        assert message in capsys.readouterr().err
    assert main(["predict", str(run), "-", "-", "--out", "-"]) == 2
    assert "input '-' given twice" in capsys.readouterr().err


def test_a_file_named_with_a_leading_dash_is_pointed_to_its_dot_slash_form(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-cell.png").write_bytes(b"")
    for argv in (["predict", "pbc", "-cell.png", "--out", "-"], ["predict", "pbc", "a.png", "-cell.png", "--out", "-"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("'-cell.png' is a file whose name starts with '-', read as an option: give it as './-cell.png'")
    assert main(["predict", "pbc", "--out", "-", "-x"]) == 2  # no such file: argparse's message alone
    assert "starts with '-'" not in capsys.readouterr().err


class _Terminal(io.BytesIO):
    def isatty(self) -> bool:
        return True


def test_a_quoted_tilde_is_pointed_to_the_home_folder_it_meant(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "cells").mkdir()
    assert main(["predict", "pbc", "~/cells", "--out", str(tmp_path / "p.csv")]) == 2
    assert f"input '~/cells' does not exist; a quoted '~' is not expanded: did you mean '{tmp_path / 'cells'}'?" in capsys.readouterr().err
    assert main(["predict", "pbc", "~/elsewhere", "--out", str(tmp_path / "p.csv")]) == 2
    assert capsys.readouterr().err.strip() == "leukoscope: error: input '~/elsewhere' does not exist"  # no guess where none holds


@pytest.mark.parametrize("flags, mode", [([], None), (["--tta", "dihedral"], "dihedral"), (["--tta", "flip"], "flip"), (["--no-tta"], "none")])
def test_tta_flags(flags, mode):
    args = build_parser().parse_args(["predict", "pbc", "cells/", "--out", "p.csv", *flags])
    assert args.tta == mode and args.inputs == ["cells/"]


def test_every_training_option_is_a_flag_and_a_yaml_key(tmp_path):
    """Options are defined once (TrainConfig); each is settable from the command line and from YAML alike."""
    from dataclasses import fields

    from leukoscope.config import TrainConfig, load_config

    values = {"arch": "cellnet_tiny", "arch_kwargs": "{dropout: 0.1}", "image_size": "48", "min_image_size": "32", "crop": "0.8",
              "crop_context": None, "epochs": "7", "batch_size": "16", "optimizer": "sgd", "lr": "0.1", "weight_decay": "0.01",
              "label_smoothing": "0.0", "class_balance": None, "patience": "3", "seed": "5", "split_seed": "9", "split_by": "image",
              "fractions": "0.6,0.2,0.2", "precision": "fp32", "device": "cpu", "sync_bn": None, "target_sensitivity": "0.95",
              "ema": "0.99", "refit_head": "2.0", "refit_views": "1", "method": "cnn", "backbone": "pbc", "augment": "{hue: 0.04}",
              "init": "pbc", "freeze_epochs": "2", "backbone_lr": "0.1", "cv": "3", "track": "mlruns", "cell": "0.6",
              "colour_norm": "white", "teacher": "pbc", "distill": "0.3", "distill_temperature": "3.0",
              "reduce": None, "colour_cast": None, "merge_classes": "{}", "split_folders": None}
    assert set(values) == {f.name for f in fields(TrainConfig)}, "a new option needs a case here"
    argv = ["train", "data", "--out", "run"]
    for name, value in values.items():
        argv += [f"--{name.replace('_', '-')}"] + ([value] if value is not None else [])
    argv[argv.index("--reduce")] = "--no-reduce"  # --reduce with --cell is refused (test_training)
    argv[argv.index("--split-folders")] = "--no-split-folders"
    args = build_parser().parse_args(argv)
    from_flags = load_config(None, {f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    assert from_flags.split_seed == 9 and from_flags.seed == 5 and from_flags.split_seed_value == 9
    assert from_flags.init == "pbc" and from_flags.freeze_epochs == 2 and from_flags.backbone_lr == 0.1 and from_flags.cv == 3
    assert from_flags.arch == "cellnet_tiny" and from_flags.image_size == 48  # given options win over the parent's
    assert from_flags.crop_context is True and from_flags.sync_bn is True and from_flags.fractions == (0.6, 0.2, 0.2)
    assert from_flags.cell == 0.6 and from_flags.colour_norm == "white" and from_flags.context == 1.3 and from_flags.reduce is False
    assert from_flags.colour_cast is True and from_flags.split_folders is False
    assert from_flags.augment.hue == 0.04 and from_flags.augment.rotate is True and from_flags.arch_kwargs == {"dropout": 0.1}
    (tmp_path / "c.yaml").write_text(__import__("yaml").safe_dump(from_flags.to_dict()))
    assert load_config(tmp_path / "c.yaml", {}) == from_flags  # the same options through YAML
    args = build_parser().parse_args(["train", "data", "--out", "run", "--merge-classes", "{blast_a: blast}", "--refit-head", "1"])
    assert load_config(None, {f.name: getattr(args, f.name) for f in fields(TrainConfig)}).merge_classes == {"blast_a": "blast"}
    merged = load_config(tmp_path / "c.yaml", {"augment": {"blur_p": 0.0}, "class_balance": False})
    assert merged.augment.hue == 0.04 and merged.augment.blur_p == 0.0 and merged.class_balance is False


def test_split_seed_fixes_the_split_while_the_seed_varies(tmp_path):
    data = make_image_folder(tmp_path / "data", n_per_class=12)
    for seed in ("1", "2"):
        assert main(["train", str(data), "--out", str(tmp_path / seed), *TINY, "--epochs", "1", "--seed", seed, "--split-seed", "0"]) == 0
    assert (tmp_path / "1" / "splits.csv").read_bytes() == (tmp_path / "2" / "splits.csv").read_bytes()
    assert main(["train", str(data), "--out", str(tmp_path / "3"), *TINY, "--epochs", "1", "--seed", "3"]) == 0
    assert (tmp_path / "3" / "splits.csv").read_bytes() != (tmp_path / "1" / "splits.csv").read_bytes()


def test_inputs_after_the_options_are_inputs_too(tmp_path, capsys):
    """`predict MODEL a/ --out p.csv b/`: argparse takes only the inputs before the options; the rest were refused."""
    data = make_image_folder(tmp_path / "data", n_per_class=2)
    first, *rest = sorted(data.rglob("*.png"))
    out = tmp_path / "p.csv"
    assert main(["predict", "pbc", str(first), "--out", str(out), *map(str, rest)]) == 0
    assert [row["path"] for row in _rows(out)] == [str(p) for p in [first, *rest]]


def test_a_pattern_the_shell_left_as_it_is_reads_the_files_it_matches(tmp_path, capsys):
    """`predict pbc "cells/*.png"` (quoted, or from Windows' shell, which leaves patterns as they are)."""
    data = make_image_folder(tmp_path / "data", n_per_class=2)
    out = tmp_path / "p.csv"
    assert main(["predict", "pbc", str(data / "blast" / "*.png"), "--out", str(out)]) == 0
    assert [row["path"] for row in _rows(out)] == sorted(map(str, (data / "blast").glob("*.png")))
    assert main(["predict", "pbc", str(data / "**" / "normal_00?.png"), "--out", str(out)]) == 0
    assert len(_rows(out)) == 2
    assert main(["predict", "pbc", str(data / "*.jpg"), "--out", str(out)]) == 2
    assert "does not exist; as a pattern it matches no file either" in capsys.readouterr().err


def test_a_list_file_given_as_at_list_reads_the_images_it_names(tmp_path, capsys, monkeypatch):
    """`predict pbc @cells.txt`: one path per line, blank lines skipped, relative to the current folder or else to the
    list's (a byte-order mark ignored); the list given
    without '@' is an error row that says how, and a list that names a missing file is a one-line error."""
    data = make_image_folder(tmp_path / "data", n_per_class=2)
    images = sorted(data.rglob("*.png"))
    monkeypatch.chdir(tmp_path)
    listed = [str(images[0]), str(images[1].relative_to(tmp_path)), "data/normal"]
    (tmp_path / "cells.txt").write_text(f"{listed[0]}\r\n\n  {listed[1]}  \n{listed[2]}\n", encoding="utf-8-sig")  # as Notepad saves
    out = tmp_path / "p.csv"
    assert main(["predict", "pbc", "@cells.txt", "--out", str(out)]) == 0
    expected = [listed[0], listed[1], *sorted(str(p.relative_to(tmp_path)) for p in (data / "normal").glob("*.png"))]
    assert [row["path"] for row in _rows(out)] == expected
    assert main(["predict", "pbc", "cells.txt", "--out", str(out)]) == 1
    assert _rows(out)[0]["error"] == "unreadable image: a text file (a list of images? give it as @cells.txt: one image or folder per line)"
    (data / "blast" / "here.txt").write_text("blast_000.png\n")  # `ls > here.txt` beside the images, run from elsewhere
    assert main(["predict", "pbc", "@data/blast/here.txt", "--out", str(out)]) == 0
    assert [row["path"] for row in _rows(out)] == ["data/blast/blast_000.png"]
    (tmp_path / "bad.txt").write_text("data/normal/missing.png\n")
    capsys.readouterr()
    assert main(["predict", "pbc", "@bad.txt", "--out", str(out)]) == 2
    assert "list @bad.txt: 'data/normal/missing.png' does not exist" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n \n")
    assert main(["predict", "pbc", "@empty.txt", "--out", str(out)]) == 2
    assert "list @empty.txt names no images" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(f"{listed[0]}\n{listed[1]}\n".encode())))  # find ... | predict @-
    assert main(["predict", "pbc", "@-", "--out", str(out)]) == 0
    assert [row["path"] for row in _rows(out)] == listed[:2]
    shutil.copy(images[2], tmp_path / "@cell.png")  # an image whose name begins with '@' is that image
    assert main(["predict", "pbc", "@cell.png", "--out", str(out)]) == 0
    assert [row["path"] for row in _rows(out)] == ["@cell.png"]


@pytest.mark.parametrize("text, message", [
    ("lr: .nan\n", "lr must be a finite number, got nan"),  # NaN passed every bound
    ("weight_decay: .inf\n", "weight_decay must be a finite number, got inf"),
    ("weight_decay: -0.5\n", "weight_decay must be >= 0, got -0.5"),
    ("label_smoothing: 1.5\n", "label_smoothing must be at least 0 and below 1, got 1.5"),  # was PyTorch's error mid-run
    ("seed: -1\n", "seed and split_seed must be whole numbers from 0 to 4294967295, got -1"),  # was numpy's, after decoding
    ("split_seed: 99999999999999999999\n", "got 0 and 99999999999999999999"),
    ("target_sensitivity: 2\n", "target_sensitivity must be between 0 and 1 (e.g. 0.98), got 2"),
    ("image_size: 100000\n", "image_size must be between 16 and 4096, got 100000"),
    ("arch_kwargs: 5\n", "arch_kwargs must be a mapping (YAML {key: value}), got 5"),  # was a TypeError in training
    ("merge_classes: [a, b]\n", "merge_classes must be a mapping (YAML {key: value}) or empty (null), got ['a', 'b']"),  # AttributeError
    ("init: 3\n", "init must be a string or empty (null), got 3"),  # was a TypeError traceback
    ("augment: {brightness: 1.5}\n", "augment.brightness must be at least 0 and below 1, got 1.5"),  # negative pixels
    ("augment: {hue: -0.1}\n", "augment.hue must be between 0 and 0.5 (a fraction of the colour circle), got -0.1"),
    ("augment: {blur_p: 2}\n", "augment.blur_p must be between 0 and 1, got 2"),
    ("augment: {scale: [1.2, 0.8]}\n", "augment.scale must be [low, high] with 0 < low <= high, got [1.2, 0.8]"),
    ("augment: {hed: .nan}\n", "augment.hed must be a finite number, got nan"),
])
def test_a_config_value_out_of_its_range_is_refused_before_training(tmp_path, text, message):
    from leukoscope.config import load_config

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(LeukoscopeError, match=re.escape(message)):
        load_config(tmp_path / "c.yaml", {})

