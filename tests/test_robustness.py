"""Perturbations behave as intended, and the bundled PBC model holds up under another lab's look."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA, require, synthetic_cell

from leukoscope import load_model
from leukoscope.inference import bundled_models
from leukoscope.metrics import WBC_TYPES
from leukoscope.perturb import PERTURBATIONS, stain

WBC5 = list(WBC_TYPES)


def test_perturbations_keep_shape_and_change_pixels():
    image = synthetic_cell(np.random.default_rng(0), 64, 0.5, 20)
    for name, perturb in PERTURBATIONS.items():
        out = perturb(image)
        assert out.shape == image.shape and out.dtype == np.uint8, name
        assert (name == "none") == np.array_equal(out, image), name
    assert np.abs(stain(image, 1.0, 1.0).astype(int) - image).mean() < 2  # near identity (deconvolution round trip)


@pytest.fixture(scope="module")
def held_out_wbc():
    """8 test-split cells of each WBC type: images the bundled model neither trained nor validated on."""
    if "pbc" not in bundled_models():
        pytest.skip("bundled model pbc not built (make models)")
    from leukoscope.data.splits import fingerprint

    predictor = load_model("pbc")
    seen = {h for split in predictor.checkpoint["seen_images"].values() for h in split}
    paths, labels = [], []
    for cls in WBC5:
        files = [f for f in sorted((require(DATA / "pbc") / cls).glob("*.jpg")) if fingerprint(f) not in seen][:8]
        paths += files
        labels += [cls] * len(files)
    return predictor, paths, labels


@pytest.mark.parametrize("name", ["stain: haematoxylin x1.3", "white balance (1.1, 1.0, 0.85)", "zoom x0.8", "defocus blur r=1.5"])
def test_bundled_pbc_model_is_robust_to_perturbation(held_out_wbc, name):
    from leukoscope.images import load_rgb

    predictor, paths, labels = held_out_wbc
    assert len(paths) == 40
    perturbed = [PERTURBATIONS[name](load_rgb(p)) for p in paths]
    called = [p.label for p in predictor.predict(perturbed)]  # the model's own 8-class call
    accuracy = float(np.mean(np.array(called) == np.array(labels)))
    assert accuracy >= 0.85, f"{name}: {accuracy:.3f} on {len(paths)} held-out images"


def test_ood_score_is_higher_on_another_lab_than_on_held_out_images(held_out_wbc):
    """A small real sample: 40 held-out PBC cells against 40 BCCD fields from another lab."""
    from leukoscope.metrics import binary_auc

    predictor, paths, _ = held_out_wbc
    other = sorted(require(DATA / "bccd_wbc").rglob("*.jpg"))[::8][:40]
    own = np.array([p.ood_score for p in predictor.predict(paths)])
    foreign = predictor.predict(other)
    scores = np.array([p.ood_score for p in foreign])
    assert binary_auc(np.r_[np.zeros(len(own)), np.ones(len(scores))].astype(bool), np.r_[own, scores]) > 0.9
    assert sum(p.in_domain is False for p in foreign) > 0.75 * len(foreign)
    assert sum(p.in_domain is False for p in predictor.predict(paths)) < 0.25 * len(paths)
