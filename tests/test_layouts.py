import csv
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from conftest import CNMC, link_real_cnmc_tree, require
from leukoscope.data import detect_layout
from leukoscope.data.layouts import parse_uid
from leukoscope.errors import LeukoscopeError


def _tiny(path: Path, ext_format: str = "BMP") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path, format=ext_format)


def test_result_folders_inside_the_data_are_left_out(tmp_path, capsys):
    """A run, an evaluation or a count written inside the data folder is not data: its report PNGs are not a class
    of the next training, and predict/count do not take a count's overlays for fields."""
    from leukoscope.io import iter_image_files

    for rel in ["blast/a.png", "normal/b.png", "runs/r1/confusion_matrix.png", "runs/r1/gallery/x.png",
                "eval/confusion_matrix.png", "counts/overlay_a.png", "keep/normal/c.png"]:
        _tiny(tmp_path / rel, "PNG")
    (tmp_path / "runs/r1/run.json").write_text("{}")
    (tmp_path / "eval/metrics.json").write_text("{}")
    (tmp_path / "eval/report.html").write_text("")
    (tmp_path / "counts/cells.csv").write_text("")
    (tmp_path / "counts/summary.csv").write_text("")
    (tmp_path / "keep/normal/report.html").write_text("")  # one of a set alone marks nothing
    ds = detect_layout(tmp_path)
    assert ds.classes == ["blast", "normal"] and len(ds.samples) == 3
    err = capsys.readouterr().err
    assert "left out runs/r1: leukoscope's results (run.json), not data" in err.replace(str(tmp_path) + "/", "")
    assert "(metrics.json, report.html)" in err and "(cells.csv, summary.csv)" in err
    found = sorted(p.relative_to(tmp_path).as_posix() for p in iter_image_files([tmp_path]))
    assert found == ["blast/a.png", "keep/normal/c.png", "normal/b.png"]
    assert len(list(iter_image_files([tmp_path / "counts"]))) == 1  # a results folder given itself is read


def test_archives_in_the_data_are_named(tmp_path):
    """Images still zipped inside a class folder would be missing from training unsaid (train and check-data warn);
    a folder of archives only says to unpack them rather than that no layout matched."""
    from leukoscope.data.layouts import archives_warning

    _tiny(tmp_path / "a" / "blast" / "x.png", "PNG")
    _tiny(tmp_path / "a" / "normal" / "y.png", "PNG")
    (tmp_path / "a" / "normal" / "batch2.zip").write_bytes(b"PK\x03\x04")
    ds = detect_layout(tmp_path / "a")
    assert ds.archives == ["normal/batch2.zip"]
    assert archives_warning(ds.archives) == "1 archive not read (e.g. 'normal/batch2.zip'): unpack them where their images belong"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cells.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(LeukoscopeError, match=r"no dataset layout recognised in .*: 1 archive not read \(e.g. 'cells.tar.gz'\)"):
        detect_layout(tmp_path / "b")


def test_a_batch_folder_inside_a_class_folder_is_named_as_the_likely_mix_up(tmp_path, capsys):
    """`Lymphocyte/batch 2/*.jpg` makes 'batch 2' a class (the layout's class is each image's own folder): train,
    evaluate and check-data say so with the fix. Patient folders above class folders are not flagged."""
    from leukoscope.cli import main
    from leukoscope.data.layouts import folder_warnings

    for rel in ["a/Neutrophil/x.png", "a/Lymphocyte/batch 2/y.png", "a/Lymphocyte/batch 2/z.png", "a/Monocyte/w.png"]:
        _tiny(tmp_path / rel, "PNG")
    ds = detect_layout(tmp_path / "a")
    assert ds.classes == ["Monocyte", "Neutrophil", "batch 2"]
    assert folder_warnings(ds) == [("classes are the folders that hold the images: 1 class 'batch 2' (in Lymphocyte/) is the only "
                                    "class inside a folder above it; if 'Lymphocyte' is the class, move the images of "
                                    "Lymphocyte/batch 2/ up into Lymphocyte/, or label them in manifest.csv")]
    assert main(["check-data", str(tmp_path / "a")]) in (0, 1)
    assert "'batch 2' (in Lymphocyte/) is the only class" in capsys.readouterr().out
    (tmp_path / "a" / "manifest.csv").write_text("path,label\nLymphocyte/batch 2/y.png,Lymphocyte\nLymphocyte/batch 2/z.png,Lymphocyte\n")
    assert folder_warnings(detect_layout(tmp_path / "a")) == []  # the fix it names
    for rel in ["P1/blast/a.png", "P1/normal/b.png", "P2/blast/c.png", "P3/normal/d.png", "P4/Blasts/e.png"]:
        _tiny(tmp_path / "b" / rel, "PNG")  # one class per patient folder for P2 and P3, but shared: patients, not batches
    assert folder_warnings(detect_layout(tmp_path / "b")) == []
    for rel in ["neutrophil/neutrophils/a.png", "lymphocyte/b.png"]:  # the class's own name again: not a mix-up
        _tiny(tmp_path / "c" / rel, "PNG")
    assert folder_warnings(detect_layout(tmp_path / "c")) == []


def test_image_folder_any_depth_any_extension_case(tmp_path):
    for rel in ["a/b/Early/x1.JPG", "a/b/Early/x2.jpeg", "a/c/Pro/y.TIFF", "a/c/Pro/z.Png", "a/c/Pro/w.bmp"]:
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "tiff": "TIFF", "png": "PNG", "bmp": "BMP"}[rel.rsplit(".", 1)[1].lower()]
        _tiny(tmp_path / rel, fmt)
    (tmp_path / "a/c/Pro/notes.txt").write_text("not an image")
    ds = detect_layout(tmp_path)
    assert ds.layout == "image-folder"
    assert ds.classes == ["Early", "Pro"]
    assert Counter(s.label for s in ds.samples) == {"Early": 2, "Pro": 3}
    assert not ds.has_patients


def test_symlinked_class_folders_are_read_once_and_a_link_loop_ends(tmp_path):
    from leukoscope.io import iter_image_files

    for rel in ["store/blast/a.png", "store/blast/b.png", "store/normal/c.png"]:
        _tiny(tmp_path / rel, "PNG")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("blast", "normal"):
        (data / name).symlink_to(tmp_path / "store" / name)  # a lab's folder of links to where images are kept
    (tmp_path / "store" / "blast" / "up").symlink_to(data)  # a loop
    ds = detect_layout(data)
    assert Counter(s.label for s in ds.samples) == {"blast": 2, "normal": 1}
    assert [p.name for p in iter_image_files([data])] == ["a.png", "b.png", "c.png"]


def test_a_class_folder_named_in_latin1_is_a_printable_label_and_a_cp1252_manifest_is_read(tmp_path):
    import os

    try:
        _tiny(tmp_path / "a" / os.fsdecode(b"caf\xe9") / "x.png", "PNG")  # the folder name's bytes are not UTF-8
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    _tiny(tmp_path / "a" / "normal" / "y.png", "PNG")
    assert detect_layout(tmp_path / "a").classes == ["caf\\xe9", "normal"]  # shown in plots and reports as it is
    for rel in ["b/one.png", "b/two.png"]:
        _tiny(tmp_path / rel, "PNG")
    (tmp_path / "b" / "manifest.csv").write_bytes("path,label\none.png,Neutrophile segmentée\ntwo.png,normal\n".encode("cp1252"))
    assert detect_layout(tmp_path / "b").classes == ["Neutrophile segmentée", "normal"]  # Excel's CSV on Windows


def test_a_manifest_with_windows_paths_is_read_and_rows_naming_nothing_are_reported(tmp_path):
    for name in ("a.png", "b.png"):
        _tiny(tmp_path / "imgs" / "sub" / name, "PNG")
    (tmp_path / "manifest.csv").write_bytes(b"path,label,patient\r\nimgs\\sub\\a.png,blast,P1\r\n.\\imgs\\sub\\b.png,normal,P2\r\n"
                                            b"imgs/sub/typo.png,blast,P3\r\n")  # as Excel on Windows writes it
    ds = detect_layout(tmp_path)
    assert {s.path: (s.label, s.patient) for s in ds.samples} == {"imgs/sub/a.png": ("blast", "P1"), "imgs/sub/b.png": ("normal", "P2")}
    assert any(n.startswith("1 of manifest.csv's 3 rows name no image") and "'imgs/sub/typo.png'" in n for n in ds.notes)


def test_a_manifest_saved_by_excel_with_semicolons_is_read(tmp_path):
    """Excel writes "CSV" with ';' (and a byte-order mark) where the decimal mark is a comma: German, French, ... settings."""
    for name in ("a.png", "b.png"):
        _tiny(tmp_path / "imgs" / name, "PNG")
    (tmp_path / "manifest.csv").write_bytes("path;label;patient\r\nimgs\\a.png;blast;P1\r\nimgs\\b.png;normal;P2\r\n".encode("utf-8-sig"))
    ds = detect_layout(tmp_path)
    assert {s.path: (s.label, s.patient) for s in ds.samples} == {"imgs/a.png": ("blast", "P1"), "imgs/b.png": ("normal", "P2")}


def test_a_manifest_that_is_not_a_table_is_a_one_line_error(tmp_path):
    """A field beyond the csv module's limit (a log or an image saved as manifest.csv) was a csv.Error traceback."""
    _tiny(tmp_path / "blast" / "a.png", "PNG")
    (tmp_path / "manifest.csv").write_text("path,label\n" + "x" * 200_000 + ",blast\n", encoding="utf-8")
    with pytest.raises(LeukoscopeError, match=r"manifest.csv: not a readable table \(field larger than field limit"):
        detect_layout(tmp_path)


def test_names_decomposed_by_macos_and_composed_by_windows_are_one_class_and_match_the_manifest(tmp_path):
    import unicodedata

    composed, decomposed = (unicodedata.normalize(form, "segmentée") for form in ("NFC", "NFD"))
    _tiny(tmp_path / "mac" / decomposed / "a.png", "PNG")  # copied from a Mac: é as e + combining accent
    _tiny(tmp_path / "win" / composed / "b.png", "PNG")
    _tiny(tmp_path / "win" / "normal" / f"{decomposed}.png", "PNG")
    (tmp_path / "manifest.csv").write_text(f"path,label,patient\nwin/normal/{composed}.png,normal,P7\n", encoding="utf-8")
    ds = detect_layout(tmp_path)
    assert ds.classes == ["normal", composed]
    assert [s.patient for s in ds.samples if s.label == "normal"] == ["P7"]  # the manifest row found its file
    assert not any("name no image" in n for n in ds.notes)


def test_image_folder_manifest_gives_patients(tmp_path):
    _tiny(tmp_path / "pos/a.png", "PNG")
    _tiny(tmp_path / "neg/b.png", "PNG")
    (tmp_path / "manifest.csv").write_text("file,cls,patient_id\npos/a.png,pos,P1\nneg/b.png,neg,P2\n")
    ds = detect_layout(tmp_path)
    assert {s.path: s.patient for s in ds.samples} == {"pos/a.png": "P1", "neg/b.png": "P2"}
    assert ds.has_patients


def test_uid_names():
    assert parse_uid("UID_12_3_1_all.bmp") == ("12", "all")
    assert parse_uid("UID_h3_6_1_hem.bmp") == ("H3", "hem")
    assert parse_uid("1005.bmp") is None


def test_cnmc_layout_from_official_manifest(tmp_path):
    """Every path of the real 15,115-file Kaggle copy, as empty files: names alone drive detection."""
    manifest = require(CNMC / "official_sha256_manifest_from_lfs_pointers.tsv")
    with open(manifest) as handle:
        paths = [line.rstrip("\n").split("\t")[2] for line in handle if line.strip()]
    for rel in paths:
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    (tmp_path / "C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data_labels.csv").write_bytes(
        (CNMC / "C-NMC_test_prelim_phase_data_labels.csv").read_bytes())
    for root in (tmp_path, tmp_path / "C-NMC_Leukemia"):
        ds = detect_layout(root)
        assert ds.layout == "cnmc2019"
        train = [s for s in ds.samples if "training_data" in s.path]
        assert len(train) == 10661
        assert len({s.patient for s in train if s.label == "all"}) == 47
        assert len({s.patient for s in train if s.label == "hem"}) == 26
        prelim = [s for s in ds.samples if "prelim" in s.path]
        assert len(prelim) == 1867 and all(s.patient for s in prelim)
        assert len(ds.samples) == 10661 + 1867  # final-phase test images carry no labels
        assert any("2586 unlabelled" in note for note in ds.notes)


def test_cnmc_tcia_layout(tmp_path):
    _tiny(tmp_path / "C-NMC_training_data/fold_0/all/UID_1_1_1_all.bmp")
    _tiny(tmp_path / "C-NMC_training_data/fold_1/hem/UID_H2_1_1_hem.bmp")
    ds = detect_layout(tmp_path)
    assert ds.layout == "cnmc2019"
    assert sorted((s.label, s.patient) for s in ds.samples) == [("all", "1"), ("hem", "H2")]


def test_real_cells_as_shared(tmp_path):
    ds = detect_layout(require(CNMC))
    assert ds.layout == "image-folder" and ds.classes == ["all", "hem"]
    assert len(ds.samples) == 15 and ds.has_patients
    with open(CNMC / "manifest.csv", newline="") as handle:
        expected = {row["file"]: row["patient_id"] for row in csv.DictReader(handle)}
    assert {s.path: s.patient for s in ds.samples} == expected


def test_real_cells_in_kaggle_layout(tmp_path):
    ds = detect_layout(link_real_cnmc_tree(tmp_path))
    assert ds.layout == "cnmc2019"
    assert len(ds.samples) == 15
    by_path = {Path(s.path).name: (s.label, s.patient) for s in ds.samples}
    assert by_path["1005.bmp"] == ("all", "57")  # label and patient recovered from the prelim CSV
    assert by_path["1002.bmp"] == ("hem", "H49")


@pytest.mark.parametrize("make", ["missing", "file", "empty", "flat"])
def test_nothing_matches_is_one_line_error(tmp_path, make):
    target = tmp_path / "data"
    if make == "file":
        target.write_text("x")
    elif make == "empty":
        target.mkdir()
    elif make == "flat":
        target.mkdir()
        (target / "readme.txt").write_text("no images")
    with pytest.raises(LeukoscopeError) as info:
        detect_layout(target)
    message = str(info.value)
    assert str(target) in message and "C-NMC" in message and "\n" not in message


def test_the_third_lab_annotation_describes_every_normal_all_idb2_cell_once():
    """benchmarks/annotations/all_idb2_normal_types.csv (the cross-lab benchmark's third lab) names each
    of ALL-IDB2's normal cells once, by its sha256, with a PBC white-cell type."""
    import hashlib

    from conftest import DATA

    folder = require(DATA / "all_idb2")
    rows = list(csv.DictReader((Path(__file__).resolve().parents[1] / "benchmarks" / "annotations" / "all_idb2_normal_types.csv").open()))
    assert sorted(row["path"] for row in rows) == sorted(f"normal/{p.name}" for p in (folder / "normal").iterdir())
    assert all(hashlib.sha256((folder / row["path"]).read_bytes()).hexdigest() == row["sha256"] for row in rows)
    types = Counter(row["type"] for row in rows)
    assert set(types) <= {"basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"}
    assert {row["certain"] for row in rows} == {"yes", "no"} and types["lymphocyte"] > types["neutrophil"] > 0


def test_a_link_to_another_class_folder_takes_none_of_its_images(tmp_path):
    from leukoscope.io import iter_image_files

    for rel in ["data/normal/a.png", "data/normal/b.png", "data/blast/c.png"]:
        _tiny(tmp_path / rel, "PNG")
    (tmp_path / "data" / "aaa").symlink_to(tmp_path / "data" / "normal")  # sorts before normal
    (tmp_path / "data" / "blast" / "copy").symlink_to(tmp_path / "data" / "normal")
    _tiny(tmp_path / "data" / ".store" / "eo" / "d.png", "PNG")  # a hidden folder is not read, a link to it is
    (tmp_path / "data" / "eosinophil").symlink_to(tmp_path / "data" / ".store" / "eo")
    ds = detect_layout(tmp_path / "data")
    assert Counter(s.label for s in ds.samples) == {"normal": 2, "blast": 1, "eosinophil": 1}
    assert sorted(p.name for p in iter_image_files([tmp_path / "data"])) == ["a.png", "b.png", "c.png", "d.png"]
