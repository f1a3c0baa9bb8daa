import shutil
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from conftest import make_image_folder
from leukoscope.data import Dataset, Sample, detect_layout, make_splits, read_splits, write_splits
from leukoscope.errors import LeukoscopeError


def _patient_dataset(tmp_path, n_patients=12, per_patient=5):
    samples = []
    for p in range(n_patients):
        label = "all" if p % 2 else "hem"
        for i in range(per_patient):
            path = tmp_path / label / f"UID_{p}_{i}_1_{label}.bmp"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(100 * p + i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)  # distinct pictures, not only distinct bytes
            samples.append(Sample(path.relative_to(tmp_path).as_posix(), label, f"P{p}"))
    return Dataset(tmp_path, "test", samples, ["all", "hem"])


def test_patients_never_cross_splits_and_classes_stratified(tmp_path):
    ds = _patient_dataset(tmp_path)
    splits, kind = make_splits(ds, (0.6, 0.2, 0.2), seed=3)
    assert kind == "patient"
    where = defaultdict(set)
    for s, k in zip(ds.samples, splits):
        where[s.patient].add(k)
    assert all(len(v) == 1 for v in where.values())
    for split in ("train", "val", "test"):
        assert {s.label for s, k in zip(ds.samples, splits) if k == split} == {"all", "hem"}


def test_seeded_and_seed_sensitive(tmp_path):
    ds = detect_layout(make_image_folder(tmp_path, n_per_class=30))
    a, _ = make_splits(ds, seed=1, by="image")
    b, _ = make_splits(ds, seed=1, by="image")
    c, _ = make_splits(ds, seed=2, by="image")
    assert a == b and a != c
    counts = {k: a.count(k) for k in ("train", "val", "test")}
    for split, fraction in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(counts[split] - fraction * 60) <= 2  # one image of rounding per class


def test_byte_identical_images_stay_together(tmp_path):
    root = make_image_folder(tmp_path, n_per_class=20)
    original = root / "blast" / "blast_000.png"
    for i in range(4):
        (root / "blast" / f"copy_{i}.png").write_bytes(original.read_bytes())
    ds = detect_layout(root)
    for seed in range(5):
        splits, kind = make_splits(ds, seed=seed, by="image")
        dup = {k for s, k in zip(ds.samples, splits) if s.path.endswith(("blast_000.png",)) or "copy_" in s.path}
        assert len(dup) == 1
        assert kind == "image"


def test_a_copy_filed_under_another_class_is_named_and_training_warns(tmp_path, capsys):
    from leukoscope.config import TrainConfig
    from leukoscope.data.splits import label_conflicts
    from leukoscope.runs import prepare_run

    root = make_image_folder(tmp_path / "cells", n_per_class=20)
    (root / "normal" / "misfiled.png").write_bytes((root / "blast" / "blast_003.png").read_bytes())
    (root / "blast" / "copy.png").write_bytes((root / "blast" / "blast_007.png").read_bytes())  # same class: no conflict
    ds = detect_layout(root)
    assert label_conflicts(ds) == [["blast/blast_003.png", "normal/misfiled.png"]]
    prepare_run(root, tmp_path / "run", TrainConfig(), "test")
    err = capsys.readouterr().err
    assert "warning: 1 image filed under two or more classes" in err
    assert "blast/blast_003.png (blast), normal/misfiled.png (normal)" in err
    (root / "normal" / "misfiled.png").unlink()
    assert label_conflicts(detect_layout(root)) == []


def test_patient_request_without_ids_falls_back_and_says_so(tmp_path):
    ds = detect_layout(make_image_folder(tmp_path, n_per_class=10))
    _, kind = make_splits(ds, by="patient")
    assert kind == "image (no patient ids known)"


def test_split_file_round_trip(tmp_path):
    ds = _patient_dataset(tmp_path, n_patients=6, per_patient=2)
    splits, _ = make_splits(ds, seed=0)
    write_splits(tmp_path / "splits.csv", ds.samples, splits)
    assert (tmp_path / "splits.csv").read_text().splitlines()[0] == "path,label,patient,split"
    samples, read = read_splits(tmp_path / "splits.csv")
    assert samples == ds.samples and read == splits


def test_split_file_saved_by_excel_is_read_and_wrong_files_are_named(tmp_path):
    """A split file edited in Excel (';' where the decimal mark is a comma, a byte-order mark, CRLF) reads as written;
    an image, a folder or another CSV given as --split is named as such, not dumped as bytes."""
    ds = _patient_dataset(tmp_path, n_patients=6, per_patient=2)
    splits, _ = make_splits(ds, seed=0)
    write_splits(tmp_path / "splits.csv", ds.samples, splits)
    lines = (tmp_path / "splits.csv").read_text().splitlines()
    (tmp_path / "excel.csv").write_bytes("\r\n".join(line.replace(",", ";") for line in lines).encode("utf-8-sig"))
    samples, read = read_splits(tmp_path / "excel.csv")
    assert samples == ds.samples and read == splits
    Image.new("RGB", (8, 8)).save(tmp_path / "cell.png")  # --split given an image: arguments mixed up
    with pytest.raises(LeukoscopeError, match=r"is not a split file \(binary data, not CSV text\)"):
        read_splits(tmp_path / "cell.png")
    with pytest.raises(LeukoscopeError, match=r"is a folder: give the split file in it, '.*splits.csv'"):
        read_splits(tmp_path)
    (tmp_path / "other.csv").write_text("path,label\n" + "x" * 200 + ",y\n")
    with pytest.raises(LeukoscopeError, match=r"expected columns path,label,patient,split, found 'path,label'$"):
        read_splits(tmp_path / "other.csv")


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (1.2, -0.1, -0.1), (0.5, 0.5)])
def test_bad_fractions_rejected(tmp_path, fractions):
    ds = _patient_dataset(tmp_path, n_patients=4, per_patient=1)
    with pytest.raises(LeukoscopeError, match="fractions"):
        make_splits(ds, fractions)


def test_near_duplicates_stay_in_one_split_and_are_reported(tmp_path):
    """A picture saved again as JPEG and slightly resized is not byte-identical, but is the same picture."""
    from PIL import Image

    from conftest import make_image_folder
    from leukoscope.data import detect_layout, make_splits
    from leukoscope.data.check import check_data
    from leukoscope.data.splits import near_duplicate_pairs

    data = make_image_folder(tmp_path / "data", n_per_class=20, size=64)
    original = data / "blast" / "blast_000.png"
    copy = Image.open(original).convert("RGB").resize((70, 70))
    copy.save(data / "blast" / "copy_of_000.jpg", quality=85)
    copy.save(data / "normal" / "mislabelled_copy.jpg", quality=70)
    dataset = detect_layout(data)
    index = {s.path: i for i, s in enumerate(dataset.samples)}
    pairs = {tuple(sorted((dataset.samples[i].path, dataset.samples[j].path))) for i, j in near_duplicate_pairs([dataset.abspath(s) for s in dataset.samples])}
    assert ("blast/blast_000.png", "blast/copy_of_000.jpg") in pairs
    distinct = [p for p in pairs if "copy" not in p[0] + p[1] and "blast_000" not in p[0] + p[1]]
    assert not distinct, distinct  # different synthetic cells are not near-duplicates
    for seed in range(5):
        splits, _ = make_splits(dataset, (0.6, 0.2, 0.2), seed)
        group = {splits[index[p]] for p in ("blast/blast_000.png", "blast/copy_of_000.jpg", "normal/mislabelled_copy.jpg")}
        assert len(group) == 1, (seed, group)
    report = check_data(data)
    assert any(len(d["labels"]) == 2 for d in report["near_duplicates"])
    assert any("across classes" in w for w in report["warnings"])


def test_check_data_counts_grayscale_images_among_colour_ones_per_class(tmp_path):
    from leukoscope.data.check import check_data

    data = make_image_folder(tmp_path / "data", n_per_class=6, size=64)
    assert check_data(data)["grayscale"] == {} and not any("grayscale" in w for w in check_data(data)["warnings"])
    for path in sorted((data / "normal").iterdir())[:4]:
        Image.open(path).convert("L").save(path)  # a class photographed in grayscale: a shortcut to learn
    report = check_data(data)
    assert report["grayscale"] == {"normal": 4}
    assert any(w.startswith("4 grayscale image(s) among colour ones (normal: 4 of 6)") for w in report["warnings"])


def test_split_by_patient_keeps_patients_whole_and_by_image_does_not(tmp_path):
    ds = _patient_dataset(tmp_path, n_patients=12, per_patient=5)
    by_patient, kind = make_splits(ds, seed=0, by="patient")
    assert kind == "patient"
    spans = {}
    for sample, split in zip(ds.samples, by_patient):
        spans.setdefault(sample.patient, set()).add(split)
    assert all(len(s) == 1 for s in spans.values())
    by_image, kind = make_splits(ds, seed=0, by="image")
    assert kind == "image"
    spans = {}
    for sample, split in zip(ds.samples, by_image):
        spans.setdefault(sample.patient, set()).add(split)
    assert any(len(s) > 1 for s in spans.values())  # an image-level split mixes a patient's images


def test_check_data_warns_of_a_class_the_default_split_leaves_without_test_images(tmp_path):
    from leukoscope.cli import main
    from leukoscope.data.check import check_data

    data = make_image_folder(tmp_path / "data", n_per_class=12, size=40)
    assert not any("default split" in w for w in check_data(data)["warnings"])
    for path in sorted((data / "normal").iterdir())[1:]:
        path.unlink()  # one image left: no split can give it validation and test images
    warnings = check_data(data)["warnings"]
    assert any("leaves normal without test images: train refuses it" in w for w in warnings), warnings
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--arch", "cellnet_tiny", "--image-size", "32", "--epochs", "1"]) == 2
    for path in (data / "normal").iterdir():
        path.unlink()
    (data / "normal").rmdir()
    report = check_data(data)  # one class: a folder to score a model on, not to train
    assert report["ok"] and "1 class (blast): train needs at least 2; evaluate can still score a model's calls on it" in report["warnings"]


def test_check_data_says_what_train_does_when_the_default_split_leaves_no_test_images(tmp_path):
    """Too few images for any test image: train runs and reports training and validation numbers; check-data had said it
    would refuse (it refuses a test split that lacks some classes, not an empty one)."""
    from leukoscope.cli import main
    from leukoscope.data.check import check_data

    data = make_image_folder(tmp_path / "data", n_per_class=2, size=40)
    warnings = check_data(data)["warnings"]
    assert any("leaves no test images: train reports training and validation numbers only" in w for w in warnings), warnings
    assert not any("train refuses it" in w for w in warnings), warnings
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--arch", "cellnet_tiny", "--image-size", "32", "--epochs", "1"]) == 0


def test_class_names_spelt_two_ways_are_named_by_check_data_and_train(tmp_path, capsys):
    from leukoscope.config import TrainConfig
    from leukoscope.data.check import check_data
    from leukoscope.data.layouts import look_alike_classes
    from leukoscope.runs import prepare_run

    assert look_alike_classes(["Neutrophil", "neutrophils ", "NEUTROPHIL", "lymphocyte", "ALL", "all", "hem", "ig"]) == [
        ["NEUTROPHIL", "Neutrophil", "neutrophils "], ["ALL", "all"]]
    assert look_alike_classes(["blast", "normal", "ig", "igs"]) == []  # "igs" is too short to be read as a plural
    data = make_image_folder(tmp_path / "data", n_per_class=12)
    assert not any("differ only in case" in w for w in check_data(data)["warnings"])
    (data / "normal").rename(data / "Blasts")  # a second lab's folder name for the same class
    report = check_data(data)
    assert any("'Blasts' / 'blast'" in w and "manifest.csv" in w for w in report["warnings"])
    prepare_run(data, tmp_path / "run", TrainConfig(), "test")
    assert "warning: class names that differ only in case, spaces or a plural are separate classes: 'Blasts' / 'blast'" in capsys.readouterr().err


def test_a_refused_split_is_not_recorded_so_the_same_command_works_once_the_data_is_fixed(tmp_path):
    from leukoscope.config import TrainConfig
    from leukoscope.runs import prepare_run

    data = make_image_folder(tmp_path / "cells", n_per_class=12)
    (data / "rare").mkdir()
    (data / "normal" / "normal_000.png").rename(data / "rare" / "only.png")  # one image: none left for test
    with pytest.raises(LeukoscopeError, match=r"classes \['rare'\] have no (test|training) images"):
        prepare_run(data, tmp_path / "run", TrainConfig(), "test")
    assert not (tmp_path / "run" / "splits.csv").exists()
    (data / "rare" / "only.png").rename(data / "normal" / "normal_000.png")
    (data / "rare").rmdir()
    _, splits, _ = prepare_run(data, tmp_path / "run", TrainConfig(), "test")  # the fixed folder trains in the same --out
    assert read_splits(tmp_path / "run" / "splits.csv")[1] == splits
    (data / "normal" / "normal_005.png").unlink()
    with pytest.raises(LeukoscopeError) as refused:
        prepare_run(data, tmp_path / "run", TrainConfig(), "test")
    assert str(refused.value).endswith("(24 images listed, 23 found; it lists 'normal/normal_005.png', which is not there): "
                                       "delete it to split again, or use a new --out folder")


def test_the_stage_folders_of_the_wbc_data_keep_each_image_in_the_split_of_the_wbc_model(tmp_path):
    """tools/make_wbc_data.py --subtypes: PBC's neutrophil and immature-granulocyte stages, from its file names, in
    folders of their own, each image in the part of configs/wbc.splits.csv it had under its type."""
    import csv
    import subprocess
    import sys
    from collections import Counter
    from pathlib import Path

    from conftest import DATA, require

    require(DATA / "pbc")
    require(DATA / "bccd_wbc")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "tools" / "make_wbc_data.py"), "--shared", str(DATA), "--out", str(tmp_path / "stages"),
                    "--splits", str(tmp_path / "run" / "splits.csv"), "--subtypes"], check=True, capture_output=True)
    samples, splits = read_splits(tmp_path / "run" / "splits.csv")
    folders = Counter(s.label for s in samples)
    assert folders["neutrophil_band"] == 648 and folders["ig_metamyelocyte"] == 431 and folders["ig_promyelocyte"] == 231
    assert "neutrophil" not in folders and "ig" not in folders and folders["eosinophil"] == 1349
    band = [s.path for s in samples if s.label == "neutrophil_band"]
    assert all(Path(p).name.startswith("pbc__BNE_") for p in band)
    assert all(s.path.startswith("neutrophil_segmented/") for s in samples if "bccd_wbc__" in s.path and "neutrophil" in s.path)
    with open(root / "configs" / "wbc.splits.csv", newline="") as handle:
        split_of = {Path(r["path"]).name: r["split"] for r in csv.DictReader(handle)}
    assert len(samples) == len(split_of) and all(split_of[Path(s.path).name] == k for s, k in zip(samples, splits))
    assert {s.path for s in detect_layout(tmp_path / "stages").samples} == {s.path for s in samples}


def test_a_dataset_shared_already_split_keeps_its_train_and_test_folders_unless_they_leak(tmp_path, capsys):
    """DATA/train/<class>/, DATA/test/<class>/ (Kaggle's usual layout): train keeps that split, dealing validation
    images from train/; where the folders share a picture it warns and splits the pooled images anew."""
    from dataclasses import replace

    from leukoscope.config import TrainConfig
    from leukoscope.data.check import check_data
    from leukoscope.runs import prepare_run

    data = tmp_path / "data"
    make_image_folder(data / "Train", n_per_class=10, size=40)
    make_image_folder(data / "test", n_per_class=4, size=40, seed=1)
    dataset, splits, kind = prepare_run(data, tmp_path / "run", TrainConfig(), "test")
    assert dataset.classes == ["blast", "normal"] and kind == "image (no patient ids known), from the dataset's own folders"
    by_folder = defaultdict(set)
    for sample, split in zip(dataset.samples, splits):
        by_folder[sample.path.split("/")[0]].add(split)
    assert by_folder == {"Train": {"train", "val"}, "test": {"test"}}
    assert splits.count("test") == 8 and splits.count("val") == 4  # 0.15 / 0.85 of train/'s 20 images, per class
    assert "note: split as the dataset's own folders give it: train 16, val 4, test 8 images (validation dealt from train/)" in capsys.readouterr().err
    assert any(n.startswith("split as the dataset's own folders give it") for n in check_data(data)["notes"])
    _, pooled, kind = prepare_run(data, tmp_path / "pooled", replace(TrainConfig(), split_folders=False), "test")
    assert kind == "image (no patient ids known)" and any(k != "test" for s, k in zip(dataset.samples, pooled) if s.path.startswith("test/"))

    moved = [data / "test" / "normal" / p.name for p in sorted((data / "test" / "normal").iterdir())]
    for path in moved:
        path.rename(data / "Train" / "normal" / f"from_test_{path.name}")
    with pytest.raises(LeukoscopeError, match=r"classes \['normal'\] have no test images, so they could not be evaluated; add "
                                              r"images of those classes \(patients\) to the dataset's test/ folder, or give train --no-split-folders"):
        prepare_run(data, tmp_path / "run3", TrainConfig(), "test")
    for path in moved:
        (data / "Train" / "normal" / f"from_test_{path.name}").rename(path)

    make_image_folder(data / "TEST_SIMPLE", n_per_class=2, size=40, seed=2)  # images in no split folder: pooled, said
    _, _, kind = prepare_run(data, tmp_path / "run4", TrainConfig(), "test")
    assert kind == "image (no patient ids known)" and "but also images in none of them (e.g. TEST_SIMPLE/" in capsys.readouterr().err
    shutil.rmtree(data / "TEST_SIMPLE")

    Image.open(data / "Train" / "blast" / "blast_003.png").save(data / "test" / "blast" / "again.png")  # one picture in both
    dataset, splits, kind = prepare_run(data, tmp_path / "run2", TrainConfig(), "test")
    assert kind == "image (no patient ids known)"
    assert ("warning: the dataset's train and test folders share identical or near-identical images (e.g. "
            "Train/blast/blast_003.png, test/blast/again.png): that split would not be honest") in capsys.readouterr().err
    assert len({k for s, k in zip(dataset.samples, splits) if s.path in ("Train/blast/blast_003.png", "test/blast/again.png")}) == 1
    assert any("pools the images and splits them anew" in w for w in check_data(data)["warnings"])


def test_a_class_that_cannot_be_split_says_why_instead_of_asking_for_other_fractions(tmp_path):
    """A class folder of empty files (a failed copy or sync) or of one picture copied: train said "no training images
    after splitting; add data or change --fractions", which no fraction fixes."""
    from leukoscope.config import TrainConfig
    from leukoscope.runs import prepare_run

    data = make_image_folder(tmp_path / "data", n_per_class=12, size=40)
    (data / "rare").mkdir()
    for i in range(6):
        (data / "rare" / f"cell_{i}.png").write_bytes(b"")
    with pytest.raises(LeukoscopeError, match=r"class 'rare' cannot be trained: all 6 of its files are unreadable \(e\.g\. cell_0\.png: "):
        prepare_run(data, tmp_path / "run", TrainConfig(), "test")
    for i in range(6):
        (data / "rare" / f"cell_{i}.png").write_bytes((data / "blast" / "blast_000.png").read_bytes())
    (data / "blast" / "blast_000.png").unlink()
    with pytest.raises(LeukoscopeError, match="class 'rare' cannot be trained: its 6 images are copies of one picture"):
        prepare_run(data, tmp_path / "run", TrainConfig(), "test")
