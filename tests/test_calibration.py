import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn.calibration import calibration_curve

from medlens.evaluation.calibration import (
    _nll,
    choose_threshold,
    fit_temperature,
    logits_to_probs,
    reliability_curve,
)


def _binary_logits(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < expit(z)).astype(int)  # y ~ Bernoulli(sigmoid(z)): z is calibrated
    return 2.0 * z, y


def _multiclass_logits(n=20000, k=4, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, k))
    cdf = softmax(z, axis=1).cumsum(axis=1)
    y = np.minimum((rng.random((n, 1)) > cdf).sum(axis=1), k - 1)  # y ~ Categorical
    return 2.0 * z, y


@pytest.mark.parametrize("shape", ["flat", "column"])
def test_fit_temperature_binary_recovers_two(shape):
    logits, y = _binary_logits()
    if shape == "column":
        logits = logits[:, None]
    t = fit_temperature(logits, y)
    assert t == pytest.approx(2.0, rel=0.1)
    z = logits.ravel()
    assert _nll(z, y, True, t) <= _nll(z, y, True, 1.0)


def test_fit_temperature_multiclass_recovers_two():
    logits, y = _multiclass_logits()
    t = fit_temperature(logits, y)
    assert t == pytest.approx(2.0, rel=0.1)
    assert _nll(logits, y, False, t) <= _nll(logits, y, False, 1.0)


def test_fit_temperature_is_clipped():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 50, 2000)  # confident noise: optimum T is huge
    y = rng.integers(0, 2, 2000)
    assert fit_temperature(logits, y) == pytest.approx(20.0)


def test_logits_to_probs():
    z = np.array([-2.0, 0.0, 3.0])
    p = logits_to_probs(z, 2.0)
    assert p.shape == (3, 2)
    np.testing.assert_allclose(p[:, 1], expit(z / 2))
    np.testing.assert_allclose(p.sum(1), 1)
    np.testing.assert_allclose(logits_to_probs(z[:, None]), logits_to_probs(z))
    zk = np.random.default_rng(0).normal(size=(5, 3))
    pk = logits_to_probs(zk, 3.0)
    np.testing.assert_allclose(pk.sum(1), 1)
    assert (pk.argmax(1) == zk.argmax(1)).all()
    with pytest.raises(ValueError):
        logits_to_probs(z, 0.0)


def test_youden_threshold_on_constructed_case():
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.45, 0.6, 0.5, 0.7, 0.8, 0.9])
    # t=0.7: J=0.75+1-1=0.75; t=0.5: J=1+0.8-1=0.8 (best); t=0.45: J=0.6
    # The threshold sits midway between the best score (0.5) and the next lower one (0.45).
    r = choose_threshold(y, p)
    assert r == {
        "threshold": pytest.approx(0.475),
        "method": "youden",
        "sensitivity": 1.0,
        "specificity": 0.8,
        "target_sensitivity": None,
    }


def test_target_sensitivity():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = expit(rng.normal(size=500) + 1.5 * (2 * y - 1))
    r = choose_threshold(y, p, target_sensitivity=0.95)
    assert r["method"] == "target_sensitivity" and r["target_sensitivity"] == 0.95
    assert (p[y == 1] >= r["threshold"]).mean() == pytest.approx(r["sensitivity"])
    assert r["sensitivity"] >= 0.95
    assert r["specificity"] == pytest.approx((p[y == 0] < r["threshold"]).mean())
    # it is the highest such cut: it lies just below one score (the decisive one), and
    # cutting at the next higher score misses the target
    higher = np.unique(p[p > r["threshold"]])
    lower = p[p < r["threshold"]].max()
    assert r["threshold"] == pytest.approx((higher[0] + lower) / 2)
    assert (p[y == 1] >= higher[1]).mean() < 0.95
    assert 0 < r["threshold"] < 1


def test_threshold_errors():
    with pytest.raises(ValueError, match="both"):
        choose_threshold(np.ones(5), np.linspace(0, 1, 5))
    with pytest.raises(ValueError, match="method"):
        choose_threshold([0, 1], [0.2, 0.8], method="f1")
    with pytest.raises(ValueError):
        choose_threshold([0, 1], [0.2, 0.8], method="target_sensitivity")


def test_reliability_curve():
    rng = np.random.default_rng(0)
    p1 = rng.random(1000)
    y = (rng.random(1000) < p1).astype(int)
    probs = np.column_stack([1 - p1, p1])
    mean_pred, frac_pos, counts = reliability_curve(y, probs, n_bins=10)
    ref_true, ref_pred = calibration_curve(y, p1, n_bins=10)
    np.testing.assert_allclose(mean_pred, ref_pred)
    np.testing.assert_allclose(frac_pos, ref_true)
    assert counts.sum() == 1000 and len(counts) == len(mean_pred)
    assert np.abs(mean_pred - frac_pos).max() < 0.1
    pk = softmax(rng.normal(size=(300, 3)), axis=1)
    mp, fp, c = reliability_curve(rng.integers(0, 3, 300), pk, n_bins=5)
    assert c.sum() == 300 and (mp >= 1 / 3 - 1e-9).all()
