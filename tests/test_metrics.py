import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from medlens.evaluation.metrics import (
    _bootstrap,
    _confusion_metrics,
    _weighted_auc,
    classification_report_text,
    compute_metrics,
    expected_calibration_error,
    predict_labels,
)

# fmt: off
KEYS = {
    "n", "labels", "accuracy", "balanced_accuracy", "auc", "f1", "f2", "precision",
    "sensitivity", "specificity", "log_loss", "brier", "ece", "confusion_matrix", "per_class",
    "threshold", "at_0_5", "ci", "ci_level", "n_bootstrap",
}
# fmt: on


def _binary(p_pos):
    p = np.asarray(p_pos, float)
    return np.column_stack([1 - p, p])


def _random_task(k, n, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += signal
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return y, p


def _known_case():
    """20 images: at threshold 0.75 TP=6, FN=2, FP=3, TN=9; at 0.5 TP=8, FN=0."""
    y = np.array([1] * 8 + [0] * 12)
    p = np.array([0.8] * 6 + [0.6] * 2 + [0.9] * 3 + [0.1] * 9)
    return y, _binary(p)


def test_perfect_classifier():
    y = np.array([0, 0, 1, 1])
    m = compute_metrics(y, _binary([0.1, 0.2, 0.7, 0.9]), ["normal", "disease"], n_bootstrap=50)
    assert m["accuracy"] == 1 and m["auc"] == 1
    assert m["sensitivity"] == 1 and m["specificity"] == 1
    assert m["confusion_matrix"] == [[2, 0], [0, 2]]
    assert m["threshold"] == 0.5
    assert set(m) == KEYS


def test_known_confusion_matrix_at_threshold():
    y, p = _known_case()
    m = compute_metrics(y, p, ["neg", "pos"], threshold=0.75, n_bootstrap=100)
    assert m["confusion_matrix"] == [[9, 3], [2, 6]]
    assert m["threshold"] == 0.75
    assert m["accuracy"] == pytest.approx(15 / 20)
    assert m["sensitivity"] == pytest.approx(6 / 8)
    assert m["specificity"] == pytest.approx(9 / 12)
    assert m["precision"] == pytest.approx(6 / 9)
    assert m["f1"] == pytest.approx(2 * 6 / (2 * 6 + 3 + 2))
    assert m["f2"] == pytest.approx(5 * 6 / (5 * 6 + 4 * 2 + 3))
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    # the same data at the default threshold 0.5: every positive is detected
    assert m["at_0_5"]["sensitivity"] == pytest.approx(1.0)
    assert m["at_0_5"]["specificity"] == pytest.approx(9 / 12)
    assert m["at_0_5"]["precision"] == pytest.approx(8 / 11)
    assert m["brier"] == pytest.approx(np.mean((p[:, 1] - y) ** 2))
    assert m["per_class"]["pos"]["support"] == 8 and m["per_class"]["neg"]["support"] == 12


def test_threshold_rule_is_inclusive():
    p = _binary([0.3, 0.5, 0.7])
    assert predict_labels(p, 0.5).tolist() == [0, 1, 1]
    assert predict_labels(p, 0.7).tolist() == [0, 0, 1]
    assert predict_labels(p).tolist() == [0, 1, 1]
    assert predict_labels(np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])).tolist() == [1, 0]


def test_multiclass_matches_sklearn():
    y, p = _random_task(3, 300)
    m = compute_metrics(y, p, ["a", "b", "c"], threshold=0.9, n_bootstrap=100)
    assert m["threshold"] is None and m["at_0_5"] is None
    assert m["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    pred = p.argmax(1)
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    cm = np.array(m["confusion_matrix"])
    spec = [
        (cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]) / (cm.sum() - cm[c].sum())
        for c in range(3)
    ]
    assert m["specificity"] == pytest.approx(np.mean(spec))
    assert sum(r["support"] for r in m["per_class"].values()) == m["n"] == 300
    for c, lab in enumerate("abc"):
        assert m["per_class"][lab]["auc"] == pytest.approx(roc_auc_score(y == c, p[:, c]))


def test_binary_per_class_auc_shared():
    y, p = _random_task(2, 200)
    m = compute_metrics(y, p, ["neg", "pos"], n_bootstrap=0)
    assert m["per_class"]["neg"]["auc"] == m["per_class"]["pos"]["auc"] == m["auc"]
    assert m["ci"] == {}


@pytest.mark.parametrize("k", [2, 4])
def test_confidence_intervals(k):
    y, p = _random_task(k, 400, seed=k)
    m = compute_metrics(y, p, [str(i) for i in range(k)], n_bootstrap=300)
    for key in ("accuracy", "auc", "sensitivity", "specificity", "balanced_accuracy", "f1"):
        lo, hi = m["ci"][key]
        assert lo <= m[key] <= hi, key
        assert hi - lo < 0.25
    assert m["ci_level"] == 0.95 and m["n_bootstrap"] == 300


def test_bootstrap_is_reproducible():
    y, p = _random_task(2, 150)
    a = compute_metrics(y, p, ["n", "p"], n_bootstrap=200, seed=3)
    b = compute_metrics(y, p, ["n", "p"], n_bootstrap=200, seed=3)
    c = compute_metrics(y, p, ["n", "p"], n_bootstrap=200, seed=4)
    assert a == b
    assert a["ci"] != c["ci"]


@pytest.mark.parametrize("k", [2, 3])
def test_vectorised_bootstrap_matches_point_estimates(k):
    y, p = _random_task(k, 120, seed=5)
    m = compute_metrics(y, p, [str(i) for i in range(k)], threshold=0.4, n_bootstrap=0)
    pred = predict_labels(p, m["threshold"])
    identity = _confusion_metrics(np.array(m["confusion_matrix"])[None])
    for key, value in identity.items():
        assert value[0] == pytest.approx(m[key]), key
    reps = _bootstrap(y, pred, p, 5, seed=0)
    assert all(v.shape == (5,) for v in reps.values())


def test_weighted_auc_equals_sklearn_on_resamples_with_ties():
    rng = np.random.default_rng(1)
    s = np.round(rng.random(80), 1)  # many ties
    y = rng.integers(0, 2, 80)
    idx = rng.integers(0, 80, (6, 80))
    counts = np.stack([np.bincount(i, minlength=80) for i in idx])
    expected = [roc_auc_score(y[i], s[i]) for i in idx]
    np.testing.assert_allclose(_weighted_auc(s, y == 1, counts), expected)


def test_one_class_gives_none_auc():
    y = np.ones(10, int)
    p = _binary(np.linspace(0.05, 0.95, 10))
    m = compute_metrics(y, p, ["neg", "pos"], n_bootstrap=50)
    assert m["auc"] is None and m["specificity"] is None
    assert m["per_class"]["pos"]["auc"] is None
    assert m["ci"]["auc"] is None
    assert m["sensitivity"] == pytest.approx(0.5)
    json.dumps(m)


def test_json_serialisable():
    y, p = _random_task(3, 60)
    m = compute_metrics(y, p, ["a", "b", "c"], n_bootstrap=50)
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m


def test_empty_input_raises():
    with pytest.raises(ValueError, match="empty"):
        compute_metrics(np.array([], int), np.zeros((0, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="labels"):
        compute_metrics(np.array([0, 1]), _binary([0.2, 0.8]), ["a", "b", "c"])


def test_bootstrap_interval_brackets_estimate_on_large_n():
    y, p = _random_task(2, 5000)
    m = compute_metrics(y, p, ["n", "p"], n_bootstrap=1000)
    assert m["ci"]["auc"][0] < m["auc"] < m["ci"]["auc"][1]
    # With n=5000 the 95% interval of AUC is narrow.
    assert m["ci"]["auc"][1] - m["ci"]["auc"][0] < 0.05


def test_ece_zero_for_calibrated_data():
    # confidence 0.8 with 8/10 correct, confidence 0.6 with 3/5 correct, confidence 1 all correct
    y = np.array([1] * 8 + [0] * 2 + [0] * 3 + [1] * 2 + [1] * 4)
    p1 = np.array([0.8] * 10 + [0.4] * 5 + [1.0] * 4)
    assert expected_calibration_error(y, _binary(p1)) == pytest.approx(0.0, abs=1e-12)


def test_ece_positive_for_overconfident_predictions():
    # always 90% confident, right 60% of the time -> ECE = 0.3
    y = np.array([1] * 6 + [0] * 4)
    assert expected_calibration_error(y, _binary(np.full(10, 0.9))) == pytest.approx(0.3)
    yk, pk = _random_task(3, 500)
    sharp = pk**8 / (pk**8).sum(1, keepdims=True)
    assert expected_calibration_error(yk, sharp) > expected_calibration_error(yk, pk)


def test_classification_report_text():
    y, p = _known_case()
    text = classification_report_text(y, p, ["neg", "pos"], 0.75)
    assert "neg" in text and "pos" in text and "0.750" in text
