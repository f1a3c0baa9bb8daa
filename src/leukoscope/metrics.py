"""Classification metrics on integer labels and probability arrays.

Every function takes ``y_true`` (n,) ints in [0, k) and either ``y_pred`` (n,) ints or
``probs`` (n, k). The standard metrics are scikit-learn's (accuracy, balanced accuracy, F1,
ROC AUC and curve, log loss, confusion matrix, classification report); this module adds what it
lacks: calibration error and reliability bins, Wilson and stratified-bootstrap intervals, and the
operating threshold for a target sensitivity. Undefined ratios (0/0) are 0.0, as scikit-learn's
``zero_division=0`` makes them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np


def _skm():
    """scikit-learn's metrics, imported on first use: importing scikit-learn takes about a second, which every
    command (predict, serve, --help) would pay at start-up for metrics only evaluation and training compute."""
    from sklearn import metrics

    return metrics


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes (scikit-learn's, with every class a row)."""
    return _skm().confusion_matrix(np.asarray(y_true, int), np.asarray(y_pred, int), labels=list(range(num_classes))).astype(np.int64)


def per_class_prf(y_true, y_pred, num_classes: int) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support for each class."""
    precision, recall, f1, support = _skm().precision_recall_fscore_support(y_true, y_pred, labels=list(range(num_classes)), zero_division=0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def accuracy(y_true, y_pred) -> float:
    return float(_skm().accuracy_score(y_true, y_pred)) if len(y_true) else 0.0


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes present in y_true."""
    if len(y_true) == 0:
        return 0.0
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": exactly what we want it to ignore
        warnings.simplefilter("ignore", UserWarning)
        return float(_skm().balanced_accuracy_score(y_true, y_pred))


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean F1 over classes that occur in y_true or y_pred (scikit-learn's default labels)."""
    return float(_skm().f1_score(y_true, y_pred, average="macro", zero_division=0)) if len(y_true) else 0.0


def weighted_f1(y_true, y_pred) -> float:
    """F1 averaged with class support as weights (the C-NMC 2019 challenge metric)."""
    return float(_skm().f1_score(y_true, y_pred, average="weighted", zero_division=0)) if len(y_true) else 0.0


def binary_auc(y_true, scores) -> float:
    """Area under the ROC curve; NaN when only one class is present (the AUC is then undefined)."""
    y_true = np.asarray(y_true, bool)
    if y_true.all() or not y_true.any():
        return float("nan")
    return float(_skm().roc_auc_score(y_true, np.asarray(scores, float)))


def roc_auc(y_true, probs: np.ndarray, positive: int = 1) -> float:
    """Binary AUC of the ``positive`` class, or macro one-vs-rest AUC for k > 2.

    Classes absent from y_true are skipped in the macro average (scikit-learn's multi-class
    ``roc_auc_score`` refuses such a split, which small test splits often are).
    """
    y_true, probs = np.asarray(y_true, int), np.asarray(probs, float)
    if probs.shape[1] == 2:
        return binary_auc(y_true == positive, probs[:, positive])
    aucs = [binary_auc(y_true == c, probs[:, c]) for c in range(probs.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    y_true = np.asarray(y_true, bool)
    if y_true.all() or not y_true.any():
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]) if y_true.any() else np.array([0.0, 0.0])
    fpr, tpr, _ = _skm().roc_curve(y_true, np.asarray(scores, float), drop_intermediate=False)
    return fpr, tpr


def log_loss(y_true, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    y_true, probs = np.asarray(y_true, int), np.asarray(probs, float)
    if len(y_true) == 0:
        return float("nan")
    return float(_skm().log_loss(y_true, probs, labels=list(range(probs.shape[1]))))


def _counts(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """A confusion matrix by bincount: the bootstrap's inner loop, 1,000 times per metric, where
    scikit-learn's input validation costs ~20x more. tests/test_metrics.py checks both agree."""
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def _rank_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney U statistic (ties count one half): the bootstrap's inner loop,
    where scikit-learn's ``roc_auc_score`` and its input checks cost ~3 ms a call (measured: 77 s of
    a 92 s test run). tests/test_metrics.py checks it equals scikit-learn's."""
    from scipy.stats import rankdata

    n_pos = int(y_true.sum())
    n_neg = len(y_true) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _fast_roc_auc(y_true: np.ndarray, probs: np.ndarray, positive: int) -> float:
    """``roc_auc`` through ``_rank_auc``: the binary AUC of ``positive``, or the macro one-vs-rest AUC over present classes."""
    if probs.shape[1] == 2:
        return _rank_auc(y_true == positive, probs[:, positive])
    aucs = [a for c in range(probs.shape[1]) if not np.isnan(a := _rank_auc(y_true == c, probs[:, c]))]
    return float(np.mean(aucs)) if aucs else float("nan")


def _cm_balanced_accuracy(cm: np.ndarray) -> float:
    support = cm.sum(axis=1)
    present = support > 0
    return float((np.diag(cm)[present] / support[present]).mean()) if present.any() else 0.0


def _cm_macro_f1(cm: np.ndarray) -> float:
    tp = np.diag(cm).astype(float)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    seen = (predicted + actual) > 0
    f1 = np.divide(2 * tp, predicted + actual, out=np.zeros_like(tp), where=(predicted + actual) > 0)  # 2TP / (2TP + FP + FN)
    return float(f1[seen].mean()) if seen.any() else 0.0


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, accuracy, count) per equal-width confidence bin; empty bins hold NaN."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, int)
    confidence = probs.max(axis=1) if len(labels) else np.zeros(0)
    correct = probs.argmax(axis=1) == labels if len(labels) else np.zeros(0, bool)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, weights=confidence, minlength=bins) / counts
        acc = np.bincount(which, weights=correct.astype(float), minlength=bins) / counts
    return conf, acc, counts


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by count."""
    if len(labels) == 0:
        return float("nan")
    conf, acc, counts = reliability_bins(probs, labels, bins)
    filled = counts > 0
    return float((counts[filled] * np.abs(acc[filled] - conf[filled])).sum() / counts.sum())


def threshold_for_sensitivity(positive: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest threshold t such that ``scores >= t`` catches at least ``target`` of the positives."""
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    pos_scores = np.sort(np.asarray(scores, float)[np.asarray(positive, bool)])[::-1]
    if len(pos_scores) == 0:
        raise ValueError("no positive examples to choose a threshold on")
    needed = int(np.ceil(target * len(pos_scores) - 1e-9))
    return float(pos_scores[max(needed, 1) - 1])


WBC_TYPES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")  # the five normal white-cell types


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (numerically stable): the one used everywhere."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


MALIGNANT_NAMES = ("all", "malignant", "blast", "blasts", "leukemia", "leukaemia", "abnormal", "positive", "cancer", "tumor", "tumour")


def positive_index(class_names: Sequence[str]) -> int:
    """The class a sensitivity refers to in a binary task: a malignant-sounding name, else index 1."""
    for i, name in enumerate(class_names):
        if name.lower() in MALIGNANT_NAMES:
            return i
    return 1


def sensitivity_specificity(positive: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    positive = np.asarray(positive, bool)
    called = np.asarray(scores, float) >= threshold
    sens = float(called[positive].mean()) if positive.any() else float("nan")
    spec = float((~called[~positive]).mean()) if (~positive).any() else float("nan")
    return sens, spec


def per_group_accuracy(y_true, y_pred, groups: Sequence[str]) -> dict[str, dict]:
    """Accuracy and count per group (e.g. per patient), for groups that are not empty strings."""
    out: dict[str, dict] = {}
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    groups = np.asarray(groups, dtype=object)
    for group in sorted({g for g in groups if g}):
        mask = groups == group
        out[str(group)] = {"n": int(mask.sum()), "accuracy": float((y_true[mask] == y_pred[mask]).mean())}
    return out


Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (nan, nan) for n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0/n or n/n:
    391/391 gives (0.9903, 1.0).
    """
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return float(0.0 if successes == 0 else low), float(1.0 if successes == n else high)


def bootstrap_interval(statistic, *arrays: np.ndarray, strata: np.ndarray, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``statistic(*arrays)`` over bootstrap resamples stratified by ``strata``.

    Each resample draws, within every stratum (the true class), as many items as it has, with
    replacement, so class proportions stay fixed as they are in a stratified split. Resamples
    where the statistic is undefined (NaN) are dropped.
    """
    strata = np.asarray(strata)
    if len(strata) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == c) for c in np.unique(strata)]
    values = []
    for _ in range(n_boot):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        values.append(statistic(*(np.asarray(a)[idx] for a in arrays)))
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def summarize(y_true, probs: np.ndarray, class_names: Sequence[str], patients: Sequence[str] | None = None,
              y_pred: np.ndarray | None = None, n_boot: int = 1000) -> dict:
    """All report metrics for one split, as plain JSON-ready Python values.

    ``y_pred`` are the decisions (default: argmax; a binary model with an operating threshold
    passes its thresholded calls). Proportions (accuracy, per-class recall) carry Wilson 95%
    intervals; balanced accuracy, macro-F1 and ROC AUC carry stratified-bootstrap 95% intervals
    (``n_boot`` seeded resamples). In a binary task the AUC is that of the malignant class.
    """
    y_true = np.asarray(y_true, int)
    probs = np.asarray(probs, float)
    k = len(class_names)
    if y_pred is None:
        y_pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, int)
    y_pred = np.asarray(y_pred, int)
    cm = confusion_matrix(y_true, y_pred, k)
    prf = per_class_prf(y_true, y_pred, k)
    positive = positive_index(class_names) if k == 2 else 1

    def from_calls(metric):
        return lambda y, pred: metric(_counts(y, pred, k))

    def auc(y, p):  # the bootstrap's statistic: rank-based, equal to scikit-learn's (tested)
        return _fast_roc_auc(y, p, positive)

    nan2 = [float("nan")] * 2
    seen = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    wilson_mean = [float(v) for v in np.mean([wilson_interval(int(cm[i, i]), int(cm[i].sum())) for i in np.flatnonzero(cm.sum(axis=1))], axis=0)] \
        if cm.sum() else nan2

    def averaged(metric) -> list[float]:
        """Bootstrap interval of a class-averaged metric; when every resample scores the same (a perfect
        split), the mean of the per-class Wilson intervals instead of a zero-width interval."""
        low, high = bootstrap_interval(from_calls(metric), y_true, y_pred, strata=y_true, n_boot=n_boot)
        return wilson_mean if low == high and seen.any() else [low, high]

    result = {
        "n": int(len(y_true)),
        "loss": log_loss(y_true, probs),
        "accuracy": accuracy(y_true, y_pred),
        "accuracy_ci": list(wilson_interval(int(np.trace(cm)), int(cm.sum()))),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "balanced_accuracy_ci": averaged(_cm_balanced_accuracy),
        "macro_f1": macro_f1(y_true, y_pred),
        "macro_f1_ci": averaged(_cm_macro_f1),
        "weighted_f1": weighted_f1(y_true, y_pred),
        "roc_auc": roc_auc(y_true, probs, positive) if len(y_true) else float("nan"),
        "roc_auc_ci": list(bootstrap_interval(auc, y_true, probs, strata=y_true, n_boot=n_boot)) if len(y_true) else nan2,
        "ece": expected_calibration_error(probs, y_true),
        "confusion_matrix": cm.tolist(),
        "per_class": {
            name: {**{key: (int(prf[key][i]) if key == "support" else float(prf[key][i])) for key in prf},
                   "recall_ci": list(wilson_interval(int(cm[i, i]), int(cm[i].sum())))}
            for i, name in enumerate(class_names)
        },
    }
    if patients is not None and any(patients):
        result["per_patient"] = per_group_accuracy(y_true, y_pred, patients)
    return result


def classification_report(summary: dict, class_names: Sequence[str], digits: int = 4) -> str:
    """scikit-learn's classification report of a summarised split (its calls rebuilt from the confusion matrix);
    classes that are neither true nor called in it are left out, so its macro average is ``macro_f1``."""
    cm = np.asarray(summary["confusion_matrix"], int)
    true, pred = np.nonzero(cm)
    counts = cm[true, pred]
    y_true, y_pred = np.repeat(true, counts), np.repeat(pred, counts)
    if len(y_true) == 0:
        return "no images\n"
    seen = np.flatnonzero(cm.sum(axis=0) + cm.sum(axis=1))  # classes never true nor called are left out, as in macro_f1
    return _skm().classification_report(y_true, y_pred, labels=seen.tolist(), target_names=[class_names[i] for i in seen], digits=digits,
                                     zero_division=0)
