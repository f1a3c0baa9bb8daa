"""Classical classifiers behind the same interface as the CNN (a Predictor backend).

Methods (``--method``):
- ``svm``: RBF SVM on the handcrafted features;
- ``mlp``: a feed-forward network trained by back-propagation on the same features;
- ``cnn-rf``: random forest on a trained CNN's pooled features (``--backbone``);
- ``wbc-two-stage``: an SVM on the handcrafted features (granularity among them) first
  separates eosinophils and basophils from the other cells; a random forest on CNN features
  then names the other cells.

Standardisation and the hyper-parameter search (stratified 3-fold CV) see only the training
split. A fitted model maps (N, 3, S, S) uint8 images to log-probabilities.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any

import joblib
import numpy as np
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from ..checkpoint import model_from_checkpoint
from ..errors import UNPICKLING_ERRORS, LeukoscopeError, first_line
from ..refit import pooled_features
from . import NEEDS_BACKBONE, check_method
from .features import FEATURE_NAMES, FeatureCache, features_batch

GRANULAR = ("eosinophil", "basophil")


def _search(estimator, grid: dict, seed: int, jobs: int = 2) -> GridSearchCV:
    return GridSearchCV(estimator, grid, cv=StratifiedKFold(3, shuffle=True, random_state=seed), scoring="balanced_accuracy", n_jobs=jobs)


def build_estimator(kind: str, seed: int) -> GridSearchCV:
    if kind == "svm":
        # Platt probabilities by libsvm's internal cross-validation. scikit-learn 1.9 deprecates them (removed in 1.11,
        # hence the pin in pyproject.toml); the suggested CalibratedClassifierCV(SVC(), ensemble=False) refuses a class
        # with fewer than 5 images in a training fold, which small classes reach inside the grid search.
        pipe = make_pipeline(StandardScaler(), SVC(probability=True, class_weight="balanced", random_state=seed))
        return _search(pipe, {"svc__C": [1, 10, 100], "svc__gamma": ["scale", 0.003]}, seed)
    if kind == "mlp":
        pipe = make_pipeline(StandardScaler(), MLPClassifier(max_iter=400, early_stopping=True, random_state=seed))
        return _search(pipe, {"mlpclassifier__hidden_layer_sizes": [(128,), (256, 128)], "mlpclassifier__alpha": [1e-4, 1e-2]}, seed)
    if kind == "rf":
        forest = RandomForestClassifier(n_estimators=300, class_weight="balanced", random_state=seed, n_jobs=1)
        return _search(forest, {"max_features": ["sqrt", 0.2], "min_samples_leaf": [1, 3]}, seed)
    raise ValueError(kind)


def _content_keys(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in images]


class ClassicalModel:
    """A fitted classical method; ``__call__`` makes it a Predictor backend."""

    def __init__(self, method: str, class_names: list[str], image_size: int, backbone: dict[str, Any] | None = None, seed: int = 0):
        check_method(method)
        if method == "cnn":
            raise LeukoscopeError("method 'cnn' is trained by the CNN trainer, not as a classical model")
        if method in NEEDS_BACKBONE and backbone is None:
            raise LeukoscopeError(f"--method {method} needs --backbone RUN_OR_BUNDLED_MODEL: a CNN trained on the same split")
        self.method, self.class_names, self.image_size, self.seed = method, list(class_names), image_size, seed
        self.backbone = backbone
        self.estimators: dict[str, Any] = {}
        self.kind = method
        self._net = None
        self.cache_writes = False  # training turns it on; predict and serve only read the feature cache

    # features -------------------------------------------------------------------------------
    def handcrafted(self, images: torch.Tensor) -> np.ndarray:
        cache = FeatureCache()
        keys = _content_keys(images)
        found = cache.load(keys)
        missing = [i for i, k in enumerate(keys) if k not in found]
        if missing:
            computed = features_batch(images[missing].permute(0, 2, 3, 1).numpy())
            new = {keys[i]: f for i, f in zip(missing, computed)}
            if self.cache_writes:
                cache.save(new)
            found.update(new)
        return np.stack([found[k] for k in keys]) if keys else np.zeros((0, len(FEATURE_NAMES)), np.float32)

    def cnn_features(self, images: torch.Tensor) -> np.ndarray:
        if self._net is None:
            self._net = model_from_checkpoint(self.backbone).eval()
        return pooled_features(self._net, images, self.backbone["mean"], self.backbone["std"])

    # fit / predict ---------------------------------------------------------------------------
    def fit(self, images: torch.Tensor, labels: np.ndarray) -> ClassicalModel:
        with warnings.catch_warnings():  # the deprecation (build_estimator) is ours to handle, not the user's to read
            warnings.filterwarnings("ignore", message="The `probability` parameter was deprecated", category=FutureWarning)
            return self._fit(np.asarray(labels), images)

    def _fit(self, labels: np.ndarray, images: torch.Tensor) -> ClassicalModel:
        if self.method in ("svm", "mlp"):
            self.estimators["main"] = build_estimator(self.method, self.seed).fit(self.handcrafted(images), labels).best_estimator_
        elif self.method == "cnn-rf":
            self.estimators["main"] = build_estimator("rf", self.seed).fit(self.cnn_features(images), labels).best_estimator_
        else:
            self._fit_two_stage(images, labels)
        return self

    def _stage_groups(self) -> tuple[list[int], list[int]]:
        granular = [i for i, c in enumerate(self.class_names) if c.lower() in GRANULAR]
        if not granular:
            raise LeukoscopeError(f"wbc-two-stage needs eosinophil and/or basophil classes; the data has {self.class_names}")
        return granular, [i for i in range(len(self.class_names)) if i not in granular]

    def _fit_two_stage(self, images: torch.Tensor, labels: np.ndarray) -> None:
        granular, rest = self._stage_groups()
        other = len(self.class_names)  # stage 1 label for "not a granular cell"
        stage1 = np.where(np.isin(labels, granular), labels, other)
        self.estimators["stage1"] = build_estimator("svm", self.seed).fit(self.handcrafted(images), stage1).best_estimator_
        keep = np.isin(labels, rest)
        self.estimators["stage2"] = build_estimator("rf", self.seed).fit(self.cnn_features(images[torch.from_numpy(keep)]), labels[keep]).best_estimator_

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        k = len(self.class_names)
        if self.method in ("svm", "mlp", "cnn-rf"):
            x = self.cnn_features(images) if self.method == "cnn-rf" else self.handcrafted(images)
            return _full_proba(self.estimators["main"], x, k)
        granular, rest = self._stage_groups()
        p1 = _full_proba(self.estimators["stage1"], self.handcrafted(images), k + 1)
        p2 = _full_proba(self.estimators["stage2"], self.cnn_features(images), k)
        out = np.zeros((len(images), k))
        out[:, granular] = p1[:, granular]
        out[:, rest] = p1[:, [k]] * p2[:, rest]
        return out

    def __call__(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.log(np.clip(self.predict_proba(batch_uint8), 1e-7, 1.0))).float()


def _full_proba(estimator, x: np.ndarray, k: int) -> np.ndarray:
    """predict_proba spread over all k class indices (classes absent from training get 0)."""
    probs = np.zeros((len(x), k))
    if len(x):
        probs[:, estimator.classes_.astype(int)] = estimator.predict_proba(x)
    return probs


def save_classical(path: str | os.PathLike, model: ClassicalModel, meta: dict[str, Any]) -> None:
    from ..io import atomic_write

    payload = {**meta, "kind": "classical", "method": model.method, "class_names": model.class_names, "image_size": model.image_size,
               "seed": model.seed, "estimators": model.estimators, "backbone": model.backbone}
    with atomic_write(path, "wb") as handle:
        joblib.dump(payload, handle, compress=3)


def load_classical(path: str | os.PathLike) -> tuple[dict[str, Any], ClassicalModel]:
    """(metadata, model) of a saved classical run. joblib files are pickles: load only your own."""
    try:
        payload = joblib.load(path)
    except (*UNPICKLING_ERRORS, ImportError) as err:
        raise LeukoscopeError(f"{path}: not a readable leukoscope classical model ({first_line(err)})") from None
    if not isinstance(payload, dict) or payload.get("kind") != "classical":
        raise LeukoscopeError(f"{path}: not a leukoscope classical model")
    model = ClassicalModel(payload["method"], payload["class_names"], payload["image_size"], payload["backbone"], payload.get("seed", 0))
    model.estimators = payload["estimators"]
    meta = {k: v for k, v in payload.items() if k not in ("estimators", "backbone")}
    return meta, model
