import math

import numpy as np
import pytest

from leukoscope import metrics as M
from leukoscope.metrics import positive_index, reliability_bins, sensitivity_specificity, threshold_for_sensitivity


def test_confusion_matrix_and_scores_hand_computed():
    # true: 0 0 0 1 1 2 ; pred: 0 0 1 1 2 2
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    cm = M.confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert M.accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # recalls: 2/3, 1/2, 1 -> balanced accuracy 13/18
    assert M.balanced_accuracy(y_true, y_pred) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert M._cm_balanced_accuracy(cm) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    prf = M.per_class_prf(y_true, y_pred, 3)
    # precisions: 2/2, 1/2, 1/2
    assert prf["precision"].tolist() == pytest.approx([1.0, 0.5, 0.5])
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 / 1.5]
    assert prf["f1"].tolist() == pytest.approx(f1)
    assert M.macro_f1(y_true, y_pred) == pytest.approx(np.mean(f1))
    assert M._cm_macro_f1(cm) == pytest.approx(np.mean(f1))
    assert M.weighted_f1(y_true, y_pred) == pytest.approx((3 * f1[0] + 2 * f1[1] + 1 * f1[2]) / 6)


def test_zero_division_is_zero_not_nan():
    prf = M.per_class_prf([0, 0], [0, 0], 2)
    assert prf["precision"][1] == 0.0 and prf["recall"][1] == 0.0
    assert M.balanced_accuracy([0, 0], [0, 0]) == 1.0  # class 1 absent from y_true is skipped
    assert M.macro_f1([0, 0], [0, 0]) == 1.0  # class 1 neither true nor predicted
    cm = M.confusion_matrix([0, 0], [0, 0], 2)
    assert M._cm_balanced_accuracy(cm) == 1.0 and M._cm_macro_f1(cm) == 1.0


def test_the_bootstraps_fast_statistics_agree_with_scikit_learn():
    """The bootstrap computes balanced accuracy and macro-F1 from bincount confusion matrices."""
    from sklearn import metrics as skm

    rng = np.random.default_rng(1)
    for trial in range(30):
        k = int(rng.integers(2, 7))
        y = rng.integers(0, k, int(rng.integers(1, 60)))
        pred = np.where(rng.random(len(y)) < 0.6, y, rng.integers(0, k, len(y)))
        cm = M._counts(y, pred, k)
        assert cm.tolist() == skm.confusion_matrix(y, pred, labels=list(range(k))).tolist()
        assert M._cm_macro_f1(cm) == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
        assert M._cm_balanced_accuracy(cm) == pytest.approx(M.balanced_accuracy(y, pred))
        probs = rng.dirichlet(np.ones(k), len(y))
        probs[:, 0] = np.round(probs[:, 0], 1)  # ties, which count one half
        for c in range(k):
            assert M._rank_auc(y == c, probs[:, c]) == pytest.approx(M.binary_auc(y == c, probs[:, c]), nan_ok=True)
        assert M._fast_roc_auc(y, probs, 1) == pytest.approx(M.roc_auc(y, probs, 1), nan_ok=True)


def test_binary_auc_hand_computed_with_ties():
    # positives scores 0.8, 0.4 ; negatives 0.4, 0.1 -> pairs: (0.8>0.4)=1, (0.8>0.1)=1, (0.4=0.4)=0.5, (0.4>0.1)=1
    assert M.binary_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)
    assert M.binary_auc([1, 0], [0.1, 0.9]) == 0.0
    assert math.isnan(M.binary_auc([1, 1], [0.2, 0.3]))


def test_roc_auc_multiclass_is_macro_one_vs_rest():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    y = [0, 1, 2, 1]
    expected = np.mean([M.binary_auc(np.array(y) == c, probs[:, c]) for c in range(3)])
    assert M.roc_auc(y, probs) == pytest.approx(expected)
    # class 0: pos 0.8 vs neg 0.2,0.3,0.5 -> 1.0 ; class 2: pos 0.4 vs 0.1,0.1,0.1 -> 1.0
    # class 1: pos 0.7,0.4 vs neg 0.1,0.3 -> 1.0
    assert M.roc_auc(y, probs) == pytest.approx(1.0)


def test_roc_curve_endpoints_and_steps():
    fpr, tpr = M.roc_curve([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]


def test_log_loss_and_summary():
    probs = np.array([[0.5, 0.5], [0.9, 0.1]])
    assert M.log_loss([0, 1], probs) == pytest.approx(-(np.log(0.5) + np.log(0.1)) / 2)
    summary = M.summarize([0, 1], probs, ["a", "b"], patients=["p1", "p2"])
    assert summary["accuracy"] == 0.5
    assert summary["per_class"]["a"]["support"] == 1
    assert summary["per_patient"] == {"p1": {"n": 1, "accuracy": 1.0}, "p2": {"n": 1, "accuracy": 0.0}}
    text = M.classification_report(summary, ["a", "b"])
    assert "weighted avg" in text and "0.5000" in text


def test_per_group_accuracy_ignores_unknown_groups():
    result = M.per_group_accuracy([0, 1, 1], [0, 0, 1], ["A", "A", ""])
    assert result == {"A": {"n": 2, "accuracy": 0.5}}


def test_ece_hand_computed():
    # two predictions at confidence 0.9 (one right, one wrong) -> |0.5 - 0.9| = 0.4
    probs = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert M.expected_calibration_error(probs, np.array([0, 1]), bins=10) == pytest.approx(0.4)
    # perfectly confident and right -> 0
    assert M.expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == pytest.approx(0.0)


def test_temperature_scaling_softens_overconfident_logits():
    import torch

    from leukoscope.calibration import fit_temperature

    torch.manual_seed(0)
    labels = torch.randint(0, 2, (400,))
    correct = torch.rand(400) < 0.8  # 80% right but with logit gap 10 (~100% confident)
    predicted = torch.where(correct, labels, 1 - labels)
    logits = torch.nn.functional.one_hot(predicted, 2).float() * 10
    t = fit_temperature(logits, labels)
    # the optimum makes the confidence ~0.8: sigmoid(10 / T) = 0.8 -> T = 10 / ln 4 ~ 7.2
    assert t == pytest.approx(10 / np.log(4), rel=0.1)


def test_reliability_bins_hand_computed():
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 0])
    conf, acc, counts = reliability_bins(probs, labels, bins=5)
    assert counts.tolist() == [0, 0, 1, 1, 2]  # 0.6 -> (0.4, 0.6], 0.7 -> (0.6, 0.8], 0.9/0.95 -> (0.8, 1]
    assert conf[4] == pytest.approx(0.925) and acc[4] == pytest.approx(0.5)
    assert acc[2] == 0 and acc[3] == 1 and np.isnan(conf[0])


def test_threshold_for_target_sensitivity_hand_computed():
    positive = np.array([1, 1, 1, 1, 0, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.4, 0.2, 0.5, 0.3, 0.1])
    assert threshold_for_sensitivity(positive, scores, 0.5) == 0.8   # 2 of 4 positives
    assert threshold_for_sensitivity(positive, scores, 0.75) == 0.4  # 3 of 4
    assert threshold_for_sensitivity(positive, scores, 0.76) == 0.2  # ceil(3.04) = 4
    assert sensitivity_specificity(positive, scores, 0.4) == (0.75, pytest.approx(2 / 3))
    with pytest.raises(ValueError, match="target sensitivity"):
        threshold_for_sensitivity(positive, scores, 1.5)


def test_positive_class_is_the_malignant_one():
    assert positive_index(["all", "hem"]) == 0
    assert positive_index(["benign", "malignant"]) == 1
    assert positive_index(["cats", "dogs"]) == 1


def test_wilson_interval_hand_computed():
    # p = 0.8, n = 10: centre (0.8 + 0.192) / 1.384 = 0.7168, half 0.2266 -> (0.4902, 0.9433)
    low, high = M.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    low, high = M.wilson_interval(391, 391)  # not "100%": 100% (95% CI 99.0-100)
    assert low == pytest.approx(0.9903, abs=1e-4) and high == 1.0
    assert M.wilson_interval(0, 10)[0] == 0.0 and M.wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert all(np.isnan(M.wilson_interval(0, 0)))


def test_bootstrap_interval_is_seeded_stratified_and_brackets_the_value():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [50, 30, 20])
    pred = np.where(rng.random(100) < 0.8, y, (y + 1) % 3)
    stat = lambda t, p: M.balanced_accuracy(t, p)  # noqa: E731
    seen_sizes = []

    def counting(t, p):
        seen_sizes.append(np.bincount(t, minlength=3).tolist())
        return stat(t, p)

    low, high = M.bootstrap_interval(counting, y, pred, strata=y, n_boot=200)
    assert all(sizes == [50, 30, 20] for sizes in seen_sizes)  # class sizes fixed in every resample
    assert low < stat(y, pred) < high and high - low < 0.25
    assert M.bootstrap_interval(stat, y, pred, strata=y, n_boot=200) == (low, high)  # seeded
    assert M.bootstrap_interval(stat, y, y, strata=y, n_boot=50) == (1.0, 1.0)
    # in a summary a perfect split gets the mean of the per-class Wilson intervals, not (1, 1)
    perfect = M.summarize(y, np.eye(3)[y], ["a", "b", "c"], n_boot=50)
    expected = np.mean([M.wilson_interval(n, n) for n in (50, 30, 20)], axis=0)
    assert perfect["balanced_accuracy_ci"] == pytest.approx(list(expected)) and perfect["balanced_accuracy_ci"][0] < 0.95


def test_binary_auc_and_summary_use_the_malignant_class():
    names = ["blast", "normal"]  # the malignant class first
    y = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    summary = M.summarize(y, probs, names, n_boot=50)
    # blast scores of blasts 0.9, 0.8, 0.4 vs normals 0.3, 0.2, 0.6: 8 of 9 pairs ordered -> 0.8889
    assert summary["roc_auc"] == pytest.approx(8 / 9)
    assert summary["accuracy_ci"] == pytest.approx(list(M.wilson_interval(4, 6)))
    assert summary["per_class"]["blast"]["recall_ci"] == pytest.approx(list(M.wilson_interval(2, 3)))


def test_macro_f1_is_the_same_in_the_summary_and_the_text_report():
    names = ["a", "b", "c"]  # class c never occurs in this split
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1, 0], [0.2, 0.8, 0], [0.1, 0.9, 0], [0.3, 0.7, 0]])
    summary = M.summarize(y, probs, names, n_boot=20)
    # a: P 1, R 0.5, F1 2/3; b: P 2/3, R 1, F1 0.8 -> macro over {a, b} = 0.7333
    assert summary["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    macro_line = next(line for line in M.classification_report(summary, names).splitlines() if "macro avg" in line)
    assert float(macro_line.split()[-2]) == pytest.approx(summary["macro_f1"], abs=1e-4)


def test_summary_scores_the_decisions_it_is_given():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.7, 0.3], [0.6, 0.4], [0.55, 0.45], [0.2, 0.8]])
    assert M.summarize(y, probs, ["normal", "blast"], n_boot=10)["accuracy"] == 0.75
    thresholded = (probs[:, 1] >= 0.4).astype(int)  # a threshold chosen for sensitivity
    assert M.summarize(y, probs, ["normal", "blast"], y_pred=thresholded, n_boot=10)["accuracy"] == 0.75
    assert M.summarize(y, probs, ["normal", "blast"], y_pred=np.array([0, 1, 1, 1]), n_boot=10)["accuracy"] == 0.75
    assert M.summarize(y, probs, ["normal", "blast"], y_pred=np.array([0, 0, 1, 1]), n_boot=10)["accuracy"] == 1.0


def test_summary_holds_only_builtin_values_for_json_and_weights_only_checkpoints():
    summary = M.summarize(np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]]), ["a", "b"], n_boot=20)

    def walk(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and walk(v) for k, v in value.items())
        if isinstance(value, list):
            return all(walk(v) for v in value)
        return type(value) in (int, float, str, bool)

    assert walk(summary)


def test_temperature_is_bounded_and_not_fitted_on_too_few_images():
    import torch

    from leukoscope.calibration import MIN_IMAGES, T_MAX, T_MIN, fit_temperature, temperature_warning

    labels = torch.arange(60) % 2
    separated = torch.nn.functional.one_hot(labels, 2).float() * 3  # every image right: NLL falls as T -> 0
    assert fit_temperature(separated, labels) == 1.0  # no evidence for sharpening: not the bound T_MIN
    assert "separated perfectly" in temperature_warning(60, 1.0, separated=True)
    mostly_right = separated.clone()
    mostly_right[:6] = mostly_right[:6].flip(1)  # 10% wrong with the same confidence: flatten, within bounds
    assert T_MIN < fit_temperature(mostly_right, labels) < T_MAX
    assert "stopped at its bound" in temperature_warning(60, T_MAX)
    assert fit_temperature(separated[:MIN_IMAGES - 1], labels[:MIN_IMAGES - 1]) == 1.0
    assert "not fitted" in temperature_warning(MIN_IMAGES - 1, 1.0)
    noisy = torch.randn(40, 2) * 0.01  # no signal: flatten as far as allowed
    assert fit_temperature(noisy, labels[:40]) <= T_MAX
    assert "only 40 validation images" in temperature_warning(40, 1.3)
    assert temperature_warning(500, 1.3) is None


@pytest.mark.parametrize("seed, k", [(0, 2), (1, 3), (2, 8)])
def test_metrics_agree_with_scikit_learn(seed, k):
    import sklearn.metrics as skm

    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, 300)
    logits = rng.normal(size=(300, k)) + 2.0 * np.eye(k)[y] * rng.random((300, 1))
    probs = M.softmax(logits)
    pred = probs.argmax(1)
    names = ["normal", "blast"] if k == 2 else [f"c{i}" for i in range(k)]
    summary = M.summarize(y, probs, names, n_boot=10)
    assert summary["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(k)).tolist()
    assert summary["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert summary["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert summary["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert summary["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert summary["loss"] == pytest.approx(skm.log_loss(y, probs, labels=range(k)))
    if k == 2:  # the malignant class ("blast", index 1 here) is the positive one
        assert summary["roc_auc"] == pytest.approx(skm.roc_auc_score(y == 1, probs[:, 1]))
    else:
        assert summary["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    report = skm.classification_report(y, pred, target_names=names, output_dict=True, zero_division=0)
    for name in names:
        for ours, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert summary["per_class"][name][ours] == pytest.approx(report[name][theirs])


def test_the_roc_figure_of_a_one_class_test_split_says_why_it_has_no_curve(tmp_path):
    """A lab's folder of one cell type: no ROC curve exists, and matplotlib's warning about an empty legend reached
    the user's terminal."""
    import warnings

    from leukoscope.report import plot_roc

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_roc([1, 1, 1], np.array([[0.2, 0.8], [0.4, 0.6], [0.1, 0.9]]), ["blast", "normal"], tmp_path / "roc.png")
    assert (tmp_path / "roc.png").stat().st_size > 0
