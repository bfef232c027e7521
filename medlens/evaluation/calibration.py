"""Probability calibration and operating-threshold selection.

* :func:`fit_temperature` - temperature scaling (Guo et al., 2017).
* :func:`logits_to_probs` - logits to ``(N, K)`` probabilities at a temperature.
* :func:`calibrate` - temperature and, for two classes, the operating point
  (:mod:`medlens.evaluation.operating_point`) from validation data.
* :func:`reliability_curve` - data for reliability diagrams.

Binary models output one logit per image, shape ``(N,)`` or ``(N, 1)``:
``p = sigmoid(logit / T)``. Multi-class models output ``(N, K)``: ``p = softmax(logits / T)``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, softmax
from sklearn.calibration import calibration_curve

from medlens.evaluation.operating_point import OperatingPointChoice, OperatingPointSpec

__all__ = [
    "fit_temperature",
    "logits_to_probs",
    "calibrate",
    "reliability_curve",
    "T_MIN",
    "T_MAX",
]

T_MIN, T_MAX = 0.05, 20.0


def _as_logits(logits) -> tuple[np.ndarray, bool]:
    """Return ``(z, binary)``: binary logits flattened to ``(N,)``, multi-class ``(N, K)``."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if z.ndim == 1:
        return z, True
    if z.ndim == 2 and z.shape[1] >= 2:
        return z, False
    raise ValueError(f"logits must have shape (N,), (N, 1) or (N, K), got {z.shape}")


def _nll(z: np.ndarray, y: np.ndarray, binary: bool, temperature: float) -> float:
    """Mean negative log-likelihood of ``y`` under logits ``z / temperature``."""
    s = z / temperature
    if binary:  # -log sigmoid(s) for y=1, -log(1 - sigmoid(s)) for y=0, computed stably
        return float(np.mean(np.logaddexp(0.0, s) - y * s))
    return float(-np.mean(log_softmax(s, axis=1)[np.arange(len(y)), y]))


def fit_temperature(logits: ArrayLike, y_true: ArrayLike, *, max_iter: int = 200) -> float:
    """Fit a temperature by minimising validation NLL (temperature scaling).

    Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks",
    ICML) divides logits by one scalar ``T > 0`` chosen to minimise the negative
    log-likelihood on held-out data; it changes confidence but not the ranking (AUC) or the
    argmax. ``log T`` is optimised with bounded Brent search (the NLL is smooth in ``log T``).

    Args:
        logits: Binary ``(N,)``/``(N, 1)`` logits (sigmoid) or multi-class ``(N, K)`` (softmax).
        y_true: ``(N,)`` integer labels.
        max_iter: Maximum optimiser iterations.

    Returns:
        The temperature, clipped to ``[0.05, 20]``.

    Raises:
        ValueError: On empty input or mismatched shapes.
    """
    z, binary = _as_logits(logits)
    y = np.asarray(y_true).astype(np.int64).ravel()
    if len(y) == 0:
        raise ValueError("cannot fit a temperature on an empty set (N=0)")
    if len(y) != len(z):
        raise ValueError(f"y_true has {len(y)} entries but logits has {len(z)} rows")
    res = minimize_scalar(
        lambda log_t: _nll(z, y, binary, float(np.exp(log_t))),
        bounds=(np.log(T_MIN), np.log(T_MAX)),
        method="bounded",
        options={"maxiter": max_iter, "xatol": 1e-6},
    )
    return float(np.clip(np.exp(res.x), T_MIN, T_MAX))


def logits_to_probs(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """Convert logits to ``(N, K)`` class probabilities at a temperature.

    Args:
        logits: Binary ``(N,)``/``(N, 1)`` or multi-class ``(N, K)`` logits.
        temperature: ``T > 0``; probabilities are ``sigmoid(z / T)`` or ``softmax(z / T)``.

    Returns:
        ``(N, K)`` probabilities; binary gives two columns ``[1 - p, p]``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z, binary = _as_logits(logits)
    if binary:
        p = expit(z / temperature)
        return np.column_stack([1.0 - p, p])
    return softmax(z / temperature, axis=1)


def calibrate(
    logits: ArrayLike, y_true: ArrayLike, binary: bool, operating_point: OperatingPointSpec = None
) -> tuple[float, OperatingPointChoice | None]:
    """Temperature and, for a binary task, the operating point, from validation data.

    Args:
        logits: validation logits ``(N,)``, ``(N, 1)`` or ``(N, K)``.
        y_true: their labels.
        binary: a two-class task (the operating point is chosen on the calibrated
            probabilities).
        operating_point: the rule (:class:`~medlens.evaluation.operating_point.OperatingPoint`
            or its text; default ``balanced``).

    Returns:
        ``(temperature, operating_point)``: the second is the dict of
        :func:`~medlens.evaluation.operating_point.choose_operating_point` (threshold with its
        interval), None for multi-class (the most probable class is predicted).
    """
    from medlens.evaluation.operating_point import OperatingPoint, choose_operating_point

    op = OperatingPoint.parse(operating_point)
    if not binary and op.rule != "balanced":
        from medlens.errors import UsageError

        raise UsageError(
            f"--operating-point {op}: a model of more than two classes predicts the most "
            "probable class (balanced); other rules apply to two-class models"
        )
    temperature = float(fit_temperature(logits, y_true))
    if not binary:
        return temperature, None
    probs = logits_to_probs(logits, temperature)
    return temperature, choose_operating_point(y_true, probs[:, 1], op)


def reliability_curve(
    y_true: ArrayLike, probs: ArrayLike, n_bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability-diagram data from scikit-learn's ``calibration_curve`` (uniform bins).

    Binary ``(N, 2)`` probabilities use p(positive) against the positive label; multi-class
    uses the predicted-class confidence against whether the prediction was correct.

    Args:
        y_true: ``(N,)`` integer labels.
        probs: ``(N, K)`` probabilities (a 1-D array is read as binary p(positive)).
        n_bins: Number of equal-width bins.

    Returns:
        ``(mean_pred, frac_pos, counts)`` for the non-empty bins.
    """
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.column_stack([1.0 - p, p])
    if p.shape[1] == 2:
        score, hit = p[:, 1], (y == 1).astype(int)
    else:
        score, hit = p.max(axis=1), (p.argmax(axis=1) == y).astype(int)
    score = np.clip(score, 0.0, 1.0)
    frac_pos, mean_pred = calibration_curve(
        hit, score, n_bins=n_bins, strategy="uniform", pos_label=1
    )
    # Same binning as calibration_curve(strategy="uniform").
    bins = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], score)
    counts = np.bincount(bins, minlength=n_bins)
    return mean_pred, frac_pos, counts[counts > 0]
