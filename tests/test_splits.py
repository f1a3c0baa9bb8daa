from collections import defaultdict

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
            Image.new("RGB", (3, 3), (p, i, 7)).save(path)  # distinct bytes per image
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


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (1.2, -0.1, -0.1), (0.5, 0.5)])
def test_bad_fractions_rejected(tmp_path, fractions):
    ds = _patient_dataset(tmp_path, n_patients=4, per_patient=1)
    with pytest.raises(LeukoscopeError, match="fractions"):
        make_splits(ds, fractions)
