import numpy as np
import pytest
import torch

from leukoscope.errors import LeukoscopeError
from leukoscope.models import create_model
from leukoscope.refit import pooled_features, refit_classifier
from leukoscope.transforms import eval_transform


def _colour_batch(n: int = 40, classes: int = 2) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 60, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = np.arange(n) % classes
    for k in range(1, classes):
        images[labels == k, k - 1] += 180  # class k is bright in channel k - 1
    return images, labels


@pytest.mark.parametrize("classes", [2, 3])
def test_refit_head_fits_clean_features_and_the_model_uses_them(classes):
    torch.manual_seed(0)
    model = create_model("cellnet_tiny", classes)
    images, labels = _colour_batch(classes=classes)
    mean, std = [0.3] * 3, [0.2] * 3
    before = model.classifier.weight.detach().clone()
    accuracy = refit_classifier(model, images, labels, mean, std, c=10.0)
    assert accuracy >= 0.95 and not torch.equal(before, model.classifier.weight)
    with torch.inference_mode():
        predicted = model.eval()(eval_transform(images, mean, std)).argmax(1).numpy()
    assert (predicted == labels).mean() == accuracy  # the network now carries the regression's weights
    assert pooled_features(model, images, mean, std).shape == (40, model.classifier.in_features)


def test_refit_head_rejects_models_without_a_linear_classifier():
    images, labels = _colour_batch(8)
    with pytest.raises(LeukoscopeError, match="refit_head needs a model with forward_features"):
        refit_classifier(create_model("mobilenet_v3_small", 2), images, labels, [0.5] * 3, [0.5] * 3, c=1.0)
    with pytest.raises(LeukoscopeError, match="every class"):
        refit_classifier(create_model("cellnet_tiny", 3), images, labels, [0.5] * 3, [0.5] * 3, c=1.0)


def test_refit_head_with_augmented_views_is_seeded():
    from leukoscope.transforms import AugmentConfig

    images, labels = _colour_batch(classes=3)
    heads = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_model("cellnet_tiny", 3)
        accuracy = refit_classifier(model, images, labels, [0.3] * 3, [0.2] * 3, c=10.0, augment=AugmentConfig(), views=2, seed=5)
        assert accuracy >= 0.9
        heads.append(model.classifier.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])


def test_merged_classes_keep_the_training_order_and_refuse_unknown_names():
    from leukoscope.refit import merged_classes

    classes = ["basophil", "ig_metamyelocyte", "ig_myelocyte", "neutrophil_band", "neutrophil_segmented", "platelet"]
    merge = {"ig_metamyelocyte": "ig", "ig_myelocyte": "ig", "neutrophil_band": "neutrophil", "neutrophil_segmented": "neutrophil"}
    final, index = merged_classes(classes, merge)
    assert final == ["basophil", "ig", "neutrophil", "platelet"]
    assert index.tolist() == [0, 1, 1, 2, 2, 3]
    final, index = merged_classes(["b", "a"], {})
    assert final == ["b", "a"] and index.tolist() == [0, 1]  # nothing merged: unchanged
    with pytest.raises(LeukoscopeError, match=r"'neutrophil_bands', which is not a class of the data \(did you mean 'neutrophil_band'\?\)"):
        merged_classes(classes, {"neutrophil_bands": "neutrophil"})
