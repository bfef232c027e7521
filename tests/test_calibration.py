import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn.calibration import calibration_curve

from medlens.evaluation.calibration import (
    _nll,
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
