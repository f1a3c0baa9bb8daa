"""The fast inference path (threaded, pipelined decoding, channels_last, fp16-stored weights,
batching) against a plain reference path (one decode at a time, contiguous fp32), on real images.

Both decode JPEGs at reduced scale (``draft``), because training does too: it is the models'
preprocessing. Its effect against full decoding is checked separately, on labels."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA, require
from leukoscope import load_model
from leukoscope.checkpoint import model_from_checkpoint
from leukoscope.inference import bundled_models
from leukoscope.io import load_rgb
from leukoscope.transforms import normalize, to_float

TOLERANCE = 1e-3  # max absolute difference of any class probability


def _reference_probs(predictor, paths, draft=True):
    model = model_from_checkpoint(predictor.checkpoint).float()
    arrays = np.stack([load_rgb(p, predictor.image_size, draft=draft, crop=predictor.crop) for p in paths])
    x = normalize(to_float(torch.from_numpy(arrays).permute(0, 3, 1, 2)), predictor.backend.mean, predictor.backend.std).contiguous()
    with torch.no_grad():
        return torch.softmax(model(x) / predictor.temperature, dim=1).numpy()


@pytest.mark.parametrize("name, folder", [("pbc", "pbc"), ("aria-all", "aria_all")])
def test_fast_path_matches_reference(name, folder):
    if name not in bundled_models():
        pytest.skip(f"bundled model {name} not built (make models)")
    paths = sorted(require(DATA / folder).rglob("*.jpg"))[::97][:48]
    predictor = load_model(name)
    fast = np.array([[p.probabilities[c] for c in predictor.class_names] for p in predictor.predict(paths, batch_size=16, tta=False)])
    reference = _reference_probs(predictor, paths)
    assert np.abs(fast - reference).max() <= TOLERANCE
    assert (fast.argmax(1) == reference.argmax(1)).all()
    full_decode = _reference_probs(predictor, paths, draft=False)
    assert (fast.argmax(1) == full_decode.argmax(1)).mean() >= 0.95


def test_bundled_models_describe_themselves():
    for name, path in bundled_models().items():
        predictor = load_model(name)
        meta = predictor.meta
        assert meta["train_command"].startswith("leukoscope train")
        assert len(meta["data_manifest_sha256"]) == 64
        assert meta["metrics"]["test"]["accuracy"] > 0.9
        assert Path(path).stat().st_size < 5e6
