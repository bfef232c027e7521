"""Operating points on constructed score distributions where the right answer is known."""

import numpy as np
import pytest
from scipy.special import expit

from medlens.errors import UsageError
from medlens.evaluation.calibration import calibrate
from medlens.evaluation.operating_point import (
    YOUDEN_TOLERANCE,
    OperatingPoint,
    choose_operating_point,
    rates_at,
)


def _plateau():
    """Separable classes with a wide empty gap: negatives in [0.01, 0.05], positives in
    [0.90, 0.99]. Every threshold between 0.05 and 0.90 is perfect (J = 1); plain argmax of J
    lands on the gap's lower edge, next to the highest negative."""
    rng = np.random.default_rng(0)
    neg = rng.uniform(0.01, 0.05, 200)
    pos = rng.uniform(0.90, 0.99, 200)
    return np.r_[np.zeros(200), np.ones(200)].astype(int), np.r_[neg, pos]


def test_parse_forms_and_errors():
    assert OperatingPoint.parse(None) == OperatingPoint("balanced")
    assert OperatingPoint.parse("sensitivity=0.95") == OperatingPoint("sensitivity", 0.95)
    assert OperatingPoint.parse({"specificity": 0.9}) == OperatingPoint("specificity", 0.9)
    assert OperatingPoint.parse("cost-ratio=3") == OperatingPoint("cost_ratio", 3.0)
    assert str(OperatingPoint.parse("cost_ratio=3")) == "cost_ratio=3"
    for bad, words in [
        ("f1", "unknown rule 'f1'"),
        ("sensitivity", "needs a number"),
        ("sensitivity=1.5", r"must be in \(0, 1\]"),
        ("cost_ratio=0", "must be > 0"),
        ("balanced=2", "takes no value"),
    ]:
        with pytest.raises(UsageError, match=words) as e:
            OperatingPoint.parse(bad)
        assert "--operating-point" in str(e.value)


def test_balanced_and_cost_ratio_are_the_bayes_decision():
    y, p = _plateau()
    assert OperatingPoint.parse("balanced").threshold(y, p) == 0.5
    # a missed case costs 4 false alarms: positive when 4p >= 1 - p, i.e. p >= 0.2
    assert OperatingPoint.parse("cost_ratio=4").threshold(y, p) == pytest.approx(0.2)
    op = choose_operating_point(y, p, "balanced", n_boot=200)
    assert op["threshold"] == 0.5 and op["threshold_ci"] == [0.5, 0.5]
    assert op["sensitivity"] == 1.0 and op["specificity"] == 1.0 and op["warning"] is None


def test_youden_takes_the_middle_of_a_plateau_not_its_edge():
    y, p = _plateau()
    t = OperatingPoint.parse("youden").threshold(y, p)
    lo, hi = p[y == 0].max(), p[y == 1].min()
    assert lo < t < hi
    assert t == pytest.approx((lo + hi) / 2, abs=2e-3)  # the gap's middle, about 0.475
    sens, spec = rates_at(y, p, [t])
    assert sens[0] == 1.0 and spec[0] == 1.0


def test_youden_near_optimal_range_uses_the_tolerance():
    # One negative at 0.7 inside the positives' range makes J dip by 1/200 (< tolerance) above
    # it: the near-optimal range still spans the whole gap and beyond that image.
    y, p = _plateau()
    p = p.copy()
    p[0] = 0.7
    t = OperatingPoint.parse("youden").threshold(y, p)
    sens, spec = rates_at(y, p, [t])
    assert sens[0] + spec[0] - 1 >= 1 - 1 / 200 - YOUDEN_TOLERANCE
    assert 0.05 < t < 0.9


def test_a_tie_between_classes_is_never_split():
    # 10 positives and 10 negatives share the score 0.6: any threshold treats them alike.
    y = np.r_[np.zeros(50), np.ones(50)].astype(int)
    p = np.r_[
        np.linspace(0.1, 0.4, 40), np.full(10, 0.6), np.full(10, 0.6), np.linspace(0.7, 0.95, 40)
    ]
    for rule in ("youden", "sensitivity=0.95", "specificity=0.9"):
        t = OperatingPoint.parse(rule).threshold(y, p)
        tied = p == 0.6
        decisions = p[tied] >= t
        assert decisions.all() or not decisions.any(), rule
    # sensitivity 0.95 needs the tied positives: the threshold must sit below the tie
    assert OperatingPoint.parse("sensitivity=0.95").threshold(y, p) < 0.6
    # specificity 0.9 cannot keep the tied negatives out and stay >= 0.9 only above the tie
    assert OperatingPoint.parse("specificity=0.9").threshold(y, p) > 0.6


def test_target_rules_pick_the_best_cut_that_meets_the_target():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = expit(rng.normal(size=500) + 1.5 * (2 * y - 1))
    op = choose_operating_point(y, p, "sensitivity=0.95", n_boot=200)
    assert op["sensitivity"] >= 0.95
    higher = np.unique(p[p > op["threshold"]])
    # the next candidate up (between the next two scores) misses the target
    assert (p[y == 1] >= (higher[0] + higher[1]) / 2).mean() < 0.95
    assert op["sensitivity_ci"][0] <= op["sensitivity"] <= op["sensitivity_ci"][1]
    spec = choose_operating_point(y, p, "specificity=0.9", n_boot=200)
    assert spec["specificity"] >= 0.9
    assert spec["threshold_ci"][0] <= spec["threshold"] <= spec["threshold_ci"][1]


def test_a_target_that_cannot_be_met_is_refused():
    # The positives' lowest score lies below every negative: sensitivity 1.0 means calling
    # every image positive (specificity 0).
    y = np.r_[np.zeros(20), np.ones(20)].astype(int)
    p = np.r_[np.linspace(0.3, 0.6, 20), [0.01], np.linspace(0.7, 0.99, 19)]
    with pytest.raises(UsageError, match="cannot be met .* calling every image positive"):
        OperatingPoint.parse("sensitivity=1.0").threshold(y, p)
    q = np.r_[np.linspace(0.3, 0.6, 19), [0.995], np.linspace(0.7, 0.99, 20)]
    with pytest.raises(UsageError, match="every image negative"):
        OperatingPoint.parse("specificity=1.0").threshold(y, q)


def test_one_class_and_multiclass_rules_are_refused():
    with pytest.raises(UsageError, match="both classes"):
        choose_operating_point(np.ones(10), np.linspace(0, 1, 10))
    z = np.random.default_rng(0).normal(size=(30, 3))
    with pytest.raises(UsageError, match="more than two classes"):
        calibrate(z, np.arange(30) % 3, False, "sensitivity=0.9")
    t, op = calibrate(z, np.arange(30) % 3, False, "balanced")
    assert op is None and t > 0


def test_a_small_validation_split_warns_that_the_point_is_uncertain():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(12), np.ones(12)].astype(int)
    p = expit(2.0 * rng.normal(size=24) + 1.0 * (2 * y - 1))
    op = choose_operating_point(y, p, "youden", n_boot=300)
    assert op["warning"] and "12 positive and 12 negative validation images" in op["warning"]
    lo, hi = op["threshold_ci"]
    assert hi - lo > 0.3 or op["sensitivity_ci"][1] - op["sensitivity_ci"][0] > 0.15
    # with 40x the images of the same distribution the interval narrows and the warning goes
    y2 = np.r_[np.zeros(2000), np.ones(2000)].astype(int)
    p2 = expit(np.random.default_rng(2).normal(size=4000) + 3.0 * (2 * y2 - 1))
    assert choose_operating_point(y2, p2, "balanced", n_boot=200)["warning"] is None
