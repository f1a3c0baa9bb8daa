"""Perturbations behave as intended, and the bundled PBC model holds up under another lab's look."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA, require, synthetic_cell

from leukoscope import load_model
from leukoscope.inference import bundled_models
from leukoscope.perturb import PERTURBATIONS, stain

WBC5 = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def test_perturbations_keep_shape_and_change_pixels():
    image = synthetic_cell(np.random.default_rng(0), 64, 0.5, 20)
    for name, perturb in PERTURBATIONS.items():
        out = perturb(image)
        assert out.shape == image.shape and out.dtype == np.uint8, name
        assert (name == "none") == np.array_equal(out, image), name
    assert np.abs(stain(image, 1.0, 1.0).astype(int) - image).mean() < 2  # near identity (deconvolution round trip)


@pytest.mark.parametrize("name", ["stain: haematoxylin x1.3", "white balance (1.1, 1.0, 0.85)", "zoom x0.8", "defocus blur r=1.5"])
def test_bundled_pbc_model_is_robust_to_perturbation(name):
    if "pbc" not in bundled_models():
        pytest.skip("bundled model pbc not built (make models)")
    predictor = load_model("pbc")
    paths, labels = [], []
    for cls in WBC5:
        files = sorted((require(DATA / "pbc") / cls).glob("*.jpg"))[::40][:8]
        paths += files
        labels += [cls] * len(files)
    from leukoscope.io import load_rgb

    perturbed = [PERTURBATIONS[name](load_rgb(p)) for p in paths]
    probs = np.array([[p.probabilities[c] for c in WBC5] for p in predictor.predict(perturbed)])
    accuracy = float((np.array(WBC5)[probs.argmax(1)] == np.array(labels)).mean())
    assert accuracy >= 0.85, f"{name}: {accuracy:.3f} on {len(paths)} images"
