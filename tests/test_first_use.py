"""The rough edges of first use: suggestions, specific messages, class maps, folders in the Python API."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN as TINY
from conftest import DATA, make_image_folder, require
from leukoscope import load_model
from leukoscope.cli import main
from leukoscope.data import read_splits
from leukoscope.errors import LeukoscopeError
from leukoscope.classes import class_map_merges, map_classes, parse_class_map



def test_misspelt_command_gets_a_suggestion(capsys):
    assert main(["predcit", "pbc", "x"]) == 2
    assert "unknown command 'predcit' (did you mean 'predict'?)" in capsys.readouterr().err


def test_no_arguments_or_help_show_the_commands(capsys):
    assert main([]) == 2  # was only "the following arguments are required: COMMAND"
    out = capsys.readouterr().out
    assert out.startswith("usage: leukoscope") and all(c in out for c in ("train", "predict", "count", "check-data"))
    with pytest.raises(SystemExit) as done:
        main(["help", "predict"])  # as git and pip take it
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: leukoscope predict")
    assert main(["help", "predcit"]) == 2 and "did you mean 'predict'?" in capsys.readouterr().err


def test_the_readme_s_command_synopsis_matches_the_parser():
    """Each command's line in the README's synopsis names every option it takes (train's ends with '...': `train
    --help` lists its config fields), and no option that it does not take."""
    import re

    from leukoscope.cli import build_parser

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("## Command line") : readme.index("Every training option")]
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, parser in commands.items():
        lines = re.findall(rf"^leukoscope {re.escape(name)} (.*(?:\n {{8,}}.*)*)", block, re.MULTILINE)
        assert lines, f"the README's synopsis has no line for {name}"
        written = set(re.findall(r"--[a-z][a-z0-9-]*", " ".join(lines)))
        taken = {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
        assert written <= taken, f"{name}: the README names {sorted(written - taken)}, which it does not take"
        if name != "train":
            assert taken - {o for o in taken if o.startswith("--no-")} <= written, f"{name}: {sorted(taken - written)} missing"


def test_bundled_model_names_ignore_case(capsys):
    assert load_model("PBC").class_names == load_model("pbc").class_names
    assert main(["predict", "pcb", "x.png", "--out", "-"]) == 2
    assert "did you mean 'pbc'?" in capsys.readouterr().err


def test_a_split_by_image_for_want_of_patient_ids_is_said(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_per_class=12)
    assert main(["train", str(data), "--out", str(tmp_path / "run"), *TINY]) == 0
    assert f"note: split by image: {data} gives no patient ids" in capsys.readouterr().err
    rows = ["path,label,patient"] + [f"{p.relative_to(data).as_posix()},{p.parent.name},P{i % 6}" for i, p in enumerate(sorted(data.rglob("*.png")))]
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    assert main(["train", str(data), "--out", str(tmp_path / "by_patient"), *TINY]) == 0
    assert "split by image" not in capsys.readouterr().err


def test_flat_folder_gets_a_specific_message(tmp_path, capsys):
    make_image_folder(tmp_path / "nested", n_per_class=3)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted((tmp_path / "nested").rglob("*.png"))):
        path.rename(flat / f"{i}.png")
    assert main(["train", str(flat), "--out", str(tmp_path / "run"), *TINY]) == 2
    assert "holds 6 images but no class subfolders" in capsys.readouterr().err
    (flat / "manifest.csv").write_text("path,label\n" + "".join(f"{i}.png,{'a' if i < 3 else 'b'}\n" for i in range(6)))
    from leukoscope.data import detect_layout

    assert sorted(s.label for s in detect_layout(flat).samples) == ["a"] * 3 + ["b"] * 3  # a manifest labels a flat folder
    assert detect_layout(flat).loose == []


def test_images_outside_the_class_folders_are_named_not_dropped_unsaid(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_per_class=6)
    for name in ("stray.png", "another.png"):
        next((data / "blast").iterdir()).rename(data / name)  # dropped into the dataset's top folder
    assert main(["check-data", str(data)]) == 0
    captured = capsys.readouterr()
    err = captured.out + captured.err  # check-data's report is its output
    assert "warning: 2 images directly in data/, in no class folder, are left out (e.g. 'another.png'): move them into their " \
           "class's folder, or label them in manifest.csv" in err
    (data / "manifest.csv").write_text("path,label\nstray.png,normal\n")
    from leukoscope.data import detect_layout

    assert detect_layout(data).loose == ["another.png"]  # the labelled one is read


def test_predict_in_python_accepts_folders(tiny_run):
    data, run = tiny_run
    model = load_model(run)
    predictions = model.predict(data)
    assert len(predictions) == 24 and not any(p.error for p in predictions)
    assert [p.source for p in model.predict([data / "blast", data / "normal" / "normal_000.png"])][-1].endswith("normal_000.png")


def test_an_image_given_twice_is_predicted_once(tiny_run, tmp_path, capsys):
    """A folder and a file in it, or one folder twice: one row per file, as count counts a field once."""
    data, run = tiny_run
    one = data / "normal" / "normal_000.png"
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(data / "normal"), str(one), str(data / "normal"), "--out", str(out)]) == 0
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == len(list((data / "normal").iterdir())) == 12 and sum(r.startswith(str(one) + ",") for r in rows) == 1
    assert "note: 13 images given more than once: read once" in capsys.readouterr().err


def test_a_folder_copied_from_a_mac_is_read_without_its_metadata_twins(tiny_run, tmp_path, capsys):
    """macOS writes a ``._NAME`` twin beside every file copied to a USB drive or share, and a zip made on a Mac holds a
    ``__MACOSX`` folder of them: predict reads the images, not those, and names one given on its own."""
    import shutil

    data, run = tiny_run
    lab = tmp_path / "lab"
    shutil.copytree(data / "blast", lab / "blast")
    twin = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)  # an AppleDouble header
    for image in sorted((lab / "blast").iterdir()):
        (image.parent / f"._{image.name}").write_bytes(twin)
        (lab / "__MACOSX" / "blast").mkdir(parents=True, exist_ok=True)
        (lab / "__MACOSX" / "blast" / f"._{image.name}").write_bytes(twin)
    (lab / ".Trashes" / "501").mkdir(parents=True)
    shutil.copy(data / "normal" / "normal_000.png", lab / ".Trashes" / "501" / "deleted.png")
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(lab), "--out", str(out)]) == 0
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == 12 and all("/blast/blast_" in r and r.split(",")[-1] == "" for r in rows)
    assert "12 images predicted, 0 failed" in capsys.readouterr().out
    predictions = load_model(run).predict(lab / "blast" / "._blast_000.png")
    assert predictions[0].error.startswith("macOS's metadata for a file (an AppleDouble ._ file), not an image: leave it out")


def test_class_map_sums_probabilities_many_to_one(tiny_run):
    _, run = tiny_run
    model = load_model(run, backend="torch")
    mapping = parse_class_map("blast=abnormal , Normal=abnormal", model.class_names)
    assert mapping == {"blast": "abnormal", "normal": "abnormal"}
    merged = map_classes(model, mapping)
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert merged.class_names == ["abnormal"]
    assert np.allclose(merged.predict_proba(batch), 1.0, atol=1e-6)
    one_to_one = map_classes(model, parse_class_map("blast=ALL", model.class_names))
    assert one_to_one.class_names == ["ALL", "normal"]
    assert np.allclose(one_to_one.predict_proba(batch), model.predict_proba(batch), atol=1e-6)
    assert parse_class_map("blast=early, blast=late,blast=early", model.class_names) == {"blast": "early+late", "normal": "normal"}
    assert class_map_merges("blast=early, blast=late,normal=n", model.class_names) == {"early": "early+late", "late": "early+late"}
    with pytest.raises(LeukoscopeError, match="no class 'blst' \\(did you mean 'blast'\\?\\)"):
        parse_class_map("blst=x", model.class_names)
    with pytest.raises(LeukoscopeError, match="MODEL_CLASS=DATA_CLASS"):
        parse_class_map("blast", model.class_names)


def test_evaluate_with_a_class_map_scores_the_mapped_labels(tiny_run, tmp_path):
    data, run = tiny_run
    renamed = tmp_path / "renamed"
    for old, new in (("blast", "malignant"), ("normal", "benign")):
        (renamed / new).mkdir(parents=True)
        for path in (data / old).iterdir():
            (renamed / new / path.name).write_bytes(path.read_bytes())
    assert main(["evaluate", str(run), str(renamed), "--out", str(tmp_path / "refused")]) == 2
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), str(renamed), "--out", str(out), "--class-map", "blast=malignant,normal=benign"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    direct = json.loads((run / "metrics.json").read_text())
    # the same images, so the same calls: every split's accuracy matches the run's own
    for split in direct:
        assert metrics[split]["n"] == direct[split]["n"] and metrics[split]["accuracy"] == pytest.approx(direct[split]["accuracy"])
    assert "mapped onto the data" in (out / "report.html").read_text()


def _pbc_test_lab(root: Path, folders: list[tuple[str, str, int, int]]) -> Path:
    """A lab's class folders linked to PBC test images (which the bundled models never trained on):
    (folder, PBC class, first, count) each."""
    pbc = require(DATA / "pbc")
    samples, splits = read_splits(Path(__file__).resolve().parents[1] / "configs" / "pbc.splits.csv")
    test = [s for s, k in zip(samples, splits) if k == "test"]
    for folder, label, start, n in folders:
        (root / folder).mkdir(parents=True)
        for sample in [s for s in test if s.label == label][start : start + n]:
            (root / folder / Path(sample.path).name).symlink_to(pbc / sample.path)
    return root


def test_evaluate_scores_a_labs_subtype_folders_as_the_models_class(tmp_path, capsys):
    """Munich AML keeps band (NGB) and segmented (NGS) neutrophils apart; PBC's neutrophil folder holds both."""
    _pbc_test_lab(tmp_path / "lab", [("NGB", "neutrophil", 0, 4), ("NGS", "neutrophil", 4, 4), ("LYT", "lymphocyte", 0, 4)])
    out = tmp_path / "eval"
    assert main(["evaluate", "wbc", str(tmp_path / "lab"), "--out", str(out)]) == 0
    assert "data classes merged, as one class of the model: NGB, NGS -> neutrophil" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == 12 and {"neutrophil", "LYT"} <= set(metrics["test"]["per_class"])
    assert "NGB, NGS -&gt; neutrophil" in (out / "report.html").read_text()
    merged = tmp_path / "merged"
    assert main(["evaluate", "wbc", str(tmp_path / "lab"), "--out", str(merged), "--class-map",
                 "neutrophil=NGB,neutrophil=NGS,lymphocyte=LYT"]) == 0
    assert set(json.loads((merged / "metrics.json").read_text())["test"]["per_class"]) >= {"NGB+NGS", "LYT"}


def test_evaluate_leaves_out_classes_the_model_does_not_know_only_when_asked(tmp_path, capsys):
    _pbc_test_lab(tmp_path / "lab", [("LYT", "lymphocyte", 0, 4), ("MON", "monocyte", 0, 3), ("KSC", "platelet", 0, 2)])  # KSC: smudge
    assert main(["evaluate", "wbc", str(tmp_path / "lab"), "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "data has classes ['KSC'] that the model does not know (LYT = lymphocyte, MON = monocyte would match by name)" in err
    assert "--skip-unknown" in err and "decode" not in err  # refused before reading an image
    out = tmp_path / "eval"
    assert main(["evaluate", "wbc", str(tmp_path / "lab"), "--out", str(out), "--skip-unknown"]) == 0
    assert "left out 2 images of classes the model does not know: KSC (2)" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["test"]["n"] == 7
    assert "Left out, of classes the model does not know: KSC (2)." in (out / "report.html").read_text()


def test_restricting_the_classes_renormalises_the_kept_probabilities_and_keeps_the_alarm():
    from leukoscope.classes import parse_classes, restrict_classes

    wbc = load_model("wbc")
    five = parse_classes("Neutrophils, basophil,eosinophil ,LYMPHOCYTE,monocytes", wbc.class_names)  # case, plurals, spaces
    assert five == ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]  # the model's order
    assert parse_classes("Neutrófilos,Basófilos,eos,Linfocitos,MON", wbc.class_names) == five  # as labs name them
    restricted = restrict_classes(wbc, five)
    images = np.random.default_rng(0).integers(0, 256, (3, 150, 150, 3), dtype=np.uint8)
    for whole, kept in zip(wbc.predict(images), restricted.predict(images)):
        total = sum(whole.probabilities[c] for c in five)
        assert kept.probabilities == pytest.approx({c: whole.probabilities[c] / total for c in five}, abs=1e-5)
        assert kept.label == max(five, key=whole.probabilities.get)
        assert kept.ood_score == pytest.approx(whole.ood_score) and kept.in_domain == whole.in_domain
    assert restrict_classes(wbc, wbc.class_names) is wbc
    with pytest.raises(LeukoscopeError, match="no class 'neutrofil' \\(did you mean 'neutrophil'\\?\\)"):
        parse_classes("basophil,neutrofil", wbc.class_names)
    with pytest.raises(LeukoscopeError, match="at least two"):
        parse_classes("basophil", wbc.class_names)


def test_predict_and_evaluate_choose_among_the_given_classes(tmp_path, capsys):
    _pbc_test_lab(tmp_path / "lab", [("lymphocyte", "lymphocyte", 0, 3), ("monocyte", "monocyte", 0, 3)])
    csv_path = tmp_path / "p.csv"
    assert main(["predict", "wbc", str(tmp_path / "lab"), "--out", str(csv_path), "--classes", "lymphocyte,monocyte"]) == 0
    header, *rows = [line.split(",") for line in csv_path.read_text().splitlines()]
    assert [c for c in header if c.startswith("p_")] == ["p_lymphocyte", "p_monocyte"] and len(rows) == 6
    assert {r[1] for r in rows} <= {"lymphocyte", "monocyte"}
    out = tmp_path / "eval"
    assert main(["evaluate", "wbc", str(tmp_path / "lab"), "--out", str(out), "--classes", "lymphocyte,monocyte"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == 6 and set(metrics["test"]["per_class"]) <= {"lymphocyte", "monocyte"}
    assert "The model chose among lymphocyte, monocyte only (--classes)." in (out / "report.html").read_text()
    assert main(["evaluate", "wbc", str(tmp_path / "lab"), "--out", str(tmp_path / "e2"), "--classes", "lymphocyte,basophil"]) == 2
    assert "data has classes ['monocyte'] that the model does not know" in capsys.readouterr().err
