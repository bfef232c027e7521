import numpy as np
import pytest

from medlens.evaluation.ood import FeatureGuard, fit_guard


def _features(rng, n, center, dim=64):
    # Two classes on a low-dimensional manifold inside a 64-d feature space.
    basis = np.linalg.qr(np.random.default_rng(1).normal(size=(dim, 8)))[0].T  # fixed (8, 64)
    y = rng.integers(0, 2, n)
    coef = rng.normal(size=(n, 8)) + 3.0 * y[:, None] * np.eye(8)[0]
    return center + coef @ basis + 0.05 * rng.normal(size=(n, dim)), y


def test_in_distribution_rarely_flagged_and_outliers_always():
    rng = np.random.default_rng(0)
    xtr, ytr = _features(rng, 2000, 0.0)
    xva, _ = _features(rng, 500, 0.0)
    xte, _ = _features(rng, 1000, 0.0)
    guard = fit_guard(xtr, ytr, xva, dim=8, quantile=0.99)
    assert np.mean([o["flag"] for o in guard(xva)]) == pytest.approx(0.01, abs=0.005)
    assert np.mean([o["flag"] for o in guard(xte)]) < 0.05  # unseen in-distribution
    shifted = xte + 5.0  # other data: far away
    assert all(o["flag"] for o in guard(shifted))
    # Off the training manifold but near its centre: caught by the residual term.
    off = 0.0 + 1.0 * rng.normal(size=(200, 64))
    assert np.mean([o["flag"] for o in guard(off)]) > 0.95


def test_scores_are_finite_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    xtr, ytr = _features(rng, 300, 0.0)
    xva, _ = _features(rng, 100, 0.0)
    guard = fit_guard(xtr, ytr, xva)
    guard.save(tmp_path / "ood.npz")
    back = FeatureGuard.load(tmp_path / "ood.npz")
    np.testing.assert_allclose(back.score(xva), guard.score(xva), rtol=1e-4)
    assert back.threshold == pytest.approx(guard.threshold)
    assert back.summary()["dim"] == guard.components.shape[0]
    out = guard(xva[:3])
    assert set(out[0]) == {"flag", "score", "ratio"} and isinstance(out[0]["flag"], bool)
    assert out[0]["ratio"] == pytest.approx(out[0]["score"] / guard.threshold, abs=0.01)
    assert out[0]["flag"] == (out[0]["score"] > guard.threshold)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 4 training"):
        fit_guard(np.zeros((2, 8)), np.array([0, 1]), np.zeros((5, 8)))


def test_every_guard_kind_is_a_guard():
    """The predictor and site calibration use guards only through the Guard protocol: the
    bundled models' guards (per-stage and ensemble) and the older feature guard all meet it."""
    from medlens.artifacts.folders import bundled_models_dir
    from medlens.evaluation.ood import EnsembleGuard, FeatureGuard, Guard, StageGuard, load_guard

    kinds = set()
    for folder in sorted(bundled_models_dir().iterdir()):
        guard = load_guard(folder / "ood.npz")
        assert isinstance(guard, Guard) and guard.input in ("stats", "features")
        kinds.add(type(guard))
    assert {StageGuard, EnsembleGuard} <= kinds
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(60, 8))
    fg = fit_guard(feats, np.arange(60) % 2, feats, dim=4)
    assert isinstance(fg, FeatureGuard) and isinstance(fg, Guard)
    verdict = fg(feats[:3])
    assert set(verdict[0]) == {"flag", "score", "ratio"}
