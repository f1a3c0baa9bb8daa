"""The out-of-distribution score: the Mahalanobis distance it claims, the same on every backend."""

from __future__ import annotations

import numpy as np
import torch

from leukoscope import load_model
from leukoscope.models import create_model
from leukoscope.ood import WithOOD, fit_ood, pooled_features


def test_score_is_the_squared_mahalanobis_distance_to_the_nearest_class():
    torch.manual_seed(0)
    model = create_model("cellnet_tiny", 3).eval()
    images = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8)
    labels = np.arange(60) % 3
    stats = ([0.5] * 3, [0.25] * 3)
    alarm = fit_ood(model, images[:45], labels[:45], images[45:], *stats)
    features = pooled_features(model, images[45:], *stats)
    precision = (alarm["chol"] @ alarm["chol"].T).double().numpy()
    means = alarm["means"].double().numpy()
    expected = np.array([min((f - m) @ precision @ (f - m) for m in means) for f in features.astype(np.float64)])
    from leukoscope.transforms import eval_transform

    with torch.no_grad():
        out = WithOOD(model, alarm).eval()(eval_transform(images[45:], *stats))
    assert out.shape == (15, 4)
    assert np.allclose(out[:, -1].numpy(), expected, rtol=1e-3)
    assert np.allclose(out[:, :3].numpy(), model(eval_transform(images[45:], *stats)).detach().numpy(), atol=1e-5)
    assert abs(alarm["threshold"] - np.percentile(expected, 95)) < 1e-2 * alarm["threshold"]  # 95% of validation below


def test_torch_and_onnx_backends_agree_on_the_score(tiny_run):
    data, run = tiny_run
    paths = sorted(data.rglob("*.png"))[:10]
    torch_scores = np.array([p.ood_score for p in load_model(run, backend="torch").predict(paths)])
    onnx_scores = np.array([p.ood_score for p in load_model(run, backend="onnx").predict(paths)])
    assert np.isfinite(torch_scores).all() and np.allclose(torch_scores, onnx_scores, rtol=1e-3, atol=1e-3)


def test_the_report_shows_how_much_is_out_of_domain(tiny_run):
    import json

    _, run = tiny_run
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        assert 0 <= metrics[split]["out_of_domain"] <= 1 and len(metrics[split]["out_of_domain_ci"]) == 2
    assert metrics["val"]["out_of_domain"] <= 0.25  # the threshold keeps 95% of validation below it
    assert "out of domain" in (run / "report.html").read_text()
