"""Pure classification metrics on integer labels and probability arrays (numpy only).

Every function takes ``y_true`` (n,) ints in [0, k) and either ``y_pred`` (n,) ints or
``probs`` (n, k). Undefined ratios (0/0) are reported as 0.0, as scikit-learn does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, float), np.asarray(den, float)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def per_class_prf(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support for each class of a confusion matrix."""
    tp = np.diag(cm).astype(float)
    precision = _safe_div(tp, cm.sum(axis=0))
    recall = _safe_div(tp, cm.sum(axis=1))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": cm.sum(axis=1)}


def accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in y_true."""
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return 0.0
    return float((np.diag(cm)[present] / support[present]).mean())


def seen_classes(cm: np.ndarray) -> np.ndarray:
    """Classes that occur in y_true or y_pred: the ones every macro average is taken over."""
    return (cm.sum(axis=0) + cm.sum(axis=1)) > 0


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean F1 over classes that occur in y_true or y_pred (scikit-learn's default labels)."""
    prf = per_class_prf(cm)
    seen = seen_classes(cm)
    return float(prf["f1"][seen].mean()) if seen.any() else 0.0


def weighted_f1(cm: np.ndarray) -> float:
    """F1 averaged with class support as weights (the C-NMC 2019 challenge metric)."""
    prf = per_class_prf(cm)
    total = prf["support"].sum()
    return float((prf["f1"] * prf["support"]).sum() / total) if total else 0.0


def binary_auc(y_true, scores) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half).

    Returns NaN when only one class is present, since the AUC is then undefined.
    """
    y_true, scores = np.asarray(y_true, bool), np.asarray(scores, float)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=float)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y_true].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_auc(y_true, probs: np.ndarray, positive: int = 1) -> float:
    """Binary AUC of the ``positive`` class, or macro one-vs-rest AUC for k > 2.

    Classes absent from y_true are skipped in the macro average.
    """
    y_true, probs = np.asarray(y_true, int), np.asarray(probs, float)
    if probs.shape[1] == 2:
        return binary_auc(y_true == positive, probs[:, positive])
    aucs = [binary_auc(y_true == c, probs[:, c]) for c in range(probs.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    y_true, scores = np.asarray(y_true, bool), np.asarray(scores, float)
    order = np.argsort(-scores, kind="mergesort")
    y_sorted, s_sorted = y_true[order], scores[order]
    cut = np.r_[np.nonzero(np.diff(s_sorted))[0], len(s_sorted) - 1]
    tps = np.cumsum(y_sorted)[cut]
    fps = (cut + 1) - tps
    tpr = np.r_[0.0, tps / max(tps[-1], 1)]
    fpr = np.r_[0.0, fps / max(fps[-1], 1)]
    return fpr, tpr


def log_loss(y_true, probs: np.ndarray, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class."""
    y_true, probs = np.asarray(y_true, int), np.asarray(probs, float)
    if len(y_true) == 0:
        return float("nan")
    picked = np.clip(probs[np.arange(len(y_true)), y_true], eps, 1.0)
    return float(-np.log(picked).mean())


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
    prf = per_class_prf(cm)
    positive = positive_index(class_names) if k == 2 else 1

    def from_calls(metric):
        return lambda y, pred: metric(confusion_matrix(y, pred, k))

    def auc(y, p):
        return roc_auc(y, p, positive)

    nan2 = [float("nan")] * 2
    seen = seen_classes(cm)
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
        "accuracy": accuracy(cm),
        "accuracy_ci": list(wilson_interval(int(np.trace(cm)), int(cm.sum()))),
        "balanced_accuracy": balanced_accuracy(cm),
        "balanced_accuracy_ci": averaged(balanced_accuracy),
        "macro_f1": macro_f1(cm),
        "macro_f1_ci": averaged(macro_f1),
        "weighted_f1": weighted_f1(cm),
        "roc_auc": auc(y_true, probs) if len(y_true) else float("nan"),
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
    """Text table in the layout of scikit-learn's classification_report.

    Macro averages are over the classes that occur in y_true or y_pred, as ``macro_f1`` is.
    """
    width = max(len("weighted avg"), *(len(c) for c in class_names))
    head = f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}\n\n"
    rows = []
    for name in class_names:
        r = summary["per_class"][name]
        rows.append(f"{name:>{width}} {r['precision']:9.{digits}f} {r['recall']:9.{digits}f} {r['f1']:9.{digits}f} {r['support']:9d}")
    n = summary["n"]
    per = [summary["per_class"][c] for c in class_names]
    seen = seen_classes(np.asarray(summary["confusion_matrix"]))  # the same classes as summary["macro_f1"]
    macro = [np.mean([r[k] for r, s in zip(per, seen) if s]) if seen.any() else 0.0 for k in ("precision", "recall", "f1")]
    weights = np.array([r["support"] for r in per], float)
    weighted = [float(np.dot([r[k] for r in per], weights) / max(weights.sum(), 1)) for k in ("precision", "recall", "f1")]
    tail = [
        "",
        f"{'accuracy':>{width}} {'':>9} {'':>9} {summary['accuracy']:9.{digits}f} {n:9d}",
        f"{'macro avg':>{width}} {macro[0]:9.{digits}f} {macro[1]:9.{digits}f} {macro[2]:9.{digits}f} {n:9d}",
        f"{'weighted avg':>{width}} {weighted[0]:9.{digits}f} {weighted[1]:9.{digits}f} {weighted[2]:9.{digits}f} {n:9d}",
    ]
    return head + "\n".join(rows + tail) + "\n"
