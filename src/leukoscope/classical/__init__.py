"""The classical pipeline: colour-clustering segmentation, handcrafted features, scikit-learn classifiers."""

from ..errors import LeukoscopeError, did_you_mean

METHODS = ("cnn", "svm", "mlp", "cnn-rf", "wbc-two-stage")
NEEDS_BACKBONE = ("cnn-rf", "wbc-two-stage")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise LeukoscopeError(f"unknown method {method!r}{did_you_mean(method, METHODS)}; choose from {', '.join(METHODS)}")
