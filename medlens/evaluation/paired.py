"""Paired tests of two models scored on the same images.

Two models judged on the same cases are correlated: an image that is hard for one is usually
hard for the other. Comparing their intervals side by side ignores that and is far too timid
(or, when the intervals are drawn from different images, simply wrong). The tests here use the
pairing:

* :func:`mcnemar`: accuracy. McNemar's test (McNemar 1947, Psychometrika 12:153) on the
  discordant pairs; the interval of the accuracy difference is Newcombe's square-and-add
  interval for paired proportions (Newcombe 1998, Stat Med 17:2635, method 10).
* :func:`delong`: ROC AUC of a binary task. DeLong, DeLong & Clarke-Pearson (1988, Biometrics
  44:837) with the fast midrank algorithm of Sun & Xu (2014, IEEE Signal Process Lett 21:1389).
* :func:`paired_auc`: :func:`delong` for a binary model; for a multiclass model DeLong per
  class (one-vs-rest) and a paired bootstrap interval of the macro AUC difference.

Every difference is ``B - A``: positive when model B (the candidate) is better.
"""

from __future__ import annotations

import math
from typing import TypedDict

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from medlens.errors import DataError
from medlens.evaluation.metrics import _weighted_auc  # Mann-Whitney AUC per resample

__all__ = ["mcnemar", "delong", "paired_auc", "wilson", "EXACT_BELOW"]

EXACT_BELOW = 25
"""McNemar uses the exact binomial test when fewer than this many pairs are discordant."""

_BOOTSTRAP_CELLS = 4_000_000  # upper bound on one (resamples x N) count matrix


def _z(ci_level: float) -> float:
    if not 0 < ci_level < 1:
        raise ValueError(f"ci_level must be in (0, 1), got {ci_level}")
    return float(stats.norm.ppf(0.5 + ci_level / 2))


def wilson(x: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's score interval of the proportion ``x / n`` (Wilson 1927); ``z`` 1.96: 95%.
    NaN for ``n == 0``."""
    if n == 0:
        return float("nan"), float("nan")
    p = x / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _newcombe_paired(both: int, only_a: int, only_b: int, neither: int, z: float) -> list[float]:
    """Newcombe's (1998) method 10 interval of ``acc_B - acc_A`` for paired outcomes.

    The Wilson intervals of the two accuracies are combined "square and add", with the
    correlation ``phi`` of the paired outcomes (continuity-corrected towards 0 when positive,
    as Newcombe prescribes; 0 when a margin of the table is empty).
    """
    n = both + only_a + only_b + neither
    pa, pb = (both + only_a) / n, (both + only_b) / n
    la, ua = wilson(both + only_a, n, z)
    lb, ub = wilson(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b
    if margins == 0 or 0 <= cross <= n / 2:
        phi = 0.0
    else:
        phi = (cross - n / 2 if cross > 0 else cross) / math.sqrt(margins)
    d = pb - pa
    lower = d - math.sqrt(
        max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2)
    )
    upper = d + math.sqrt(
        max(0.0, (ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2)
    )
    return [max(-1.0, lower), min(1.0, upper)]


class McNemarResult(TypedDict):
    """:func:`mcnemar`'s answer."""

    n: int
    b: int  # images A got right and B wrong
    c: int  # images A got wrong and B right
    accuracy_a: float
    accuracy_b: float
    difference: float  # accuracy_b - accuracy_a
    ci: list[float]
    ci_level: float
    ci_method: str
    statistic: float
    p: float
    method: str


class DeLongResult(TypedDict):
    """:func:`delong`'s answer."""

    auc_a: float
    auc_b: float
    se_a: float
    se_b: float
    difference: float  # auc_b - auc_a
    se: float
    z: float | None  # None: a degenerate variance estimate
    p: float
    ci: list[float]
    ci_level: float
    method: str


def mcnemar(correct_a: ArrayLike, correct_b: ArrayLike, *, ci_level: float = 0.95) -> McNemarResult:
    """McNemar's test of two models' accuracy on the same images, and the difference.

    ``b`` counts the images A got right and B wrong, ``c`` those A got wrong and B right.
    With ``b + c < 25`` the p-value is the exact two-sided binomial test of ``b`` out of
    ``b + c`` at 1/2 (``method: "exact binomial"``; ``statistic`` is then ``min(b, c)``, as
    statsmodels reports it); otherwise the chi-square test with continuity correction,
    ``statistic = (|b - c| - 1)^2 / (b + c)`` on 1 degree of freedom (Edwards 1948).

    ``difference`` is ``accuracy_B - accuracy_A = (c - b) / n``; ``ci`` its interval by
    Newcombe's square-and-add method for paired proportions (Newcombe 1998, method 10),
    which stays inside [-1, 1] and keeps its coverage when few pairs are discordant, unlike
    the Wald interval.

    Args:
        correct_a, correct_b: ``(N,)`` booleans, whether each model got each image right.
        ci_level: confidence level of ``ci``.
    """
    a = np.asarray(correct_a, dtype=bool)
    b_ = np.asarray(correct_b, dtype=bool)
    if a.ndim != 1 or a.shape != b_.shape or len(a) == 0:
        raise ValueError(
            f"correct_a and correct_b must be 1-D of one non-zero length, got {a.shape} and "
            f"{b_.shape}"
        )
    n = len(a)
    b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    both, neither = int(np.sum(a & b_)), int(np.sum(~a & ~b_))
    if b + c == 0:
        method, statistic, p = "exact binomial", 0.0, 1.0
    elif b + c < EXACT_BELOW:
        method, statistic = "exact binomial", float(min(b, c))
        p = float(stats.binomtest(b, b + c, 0.5).pvalue)
    else:
        method = "chi-square with continuity correction"
        statistic = (abs(b - c) - 1) ** 2 / (b + c)
        p = float(stats.chi2.sf(statistic, 1))
    return {
        "n": n,
        "b": b,
        "c": c,
        "accuracy_a": (both + b) / n,
        "accuracy_b": (both + c) / n,
        "difference": (c - b) / n,
        "ci": _newcombe_paired(both, b, c, neither, _z(ci_level)),
        "ci_level": ci_level,
        "ci_method": "Newcombe 1998 square-and-add (method 10) for paired proportions",
        "statistic": statistic,
        "p": min(1.0, p),
        "method": method,
    }


def _components(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, list]:
    """AUCs and the DeLong structural components of ``scores (k, N)``, by midranks."""
    x, y = scores[:, positive], scores[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    tx = stats.rankdata(x, axis=1)  # "average": midranks, so ties count 1/2
    ty = stats.rankdata(y, axis=1)
    tz = stats.rankdata(np.concatenate([x, y], axis=1), axis=1)
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: share of negatives it outranks
    v01 = 1 - (tz[:, m:] - ty) / m  # per negative: share of positives that outrank it
    return auc, [v10, v01]


def _auc_covariance(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs ``(k,)`` and DeLong's covariance matrix ``(k, k)`` of them (Sun & Xu 2014)."""
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        raise DataError(
            f"DeLong's test needs at least 2 positive and 2 negative images; the data has "
            f"{m} positive and {n} negative: add images of the missing class"
        )
    auc, (v10, v01) = _components(positive, scores)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return auc, cov


def delong(
    y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike, *, ci_level: float = 0.95
) -> DeLongResult:
    """DeLong's test of two correlated ROC AUCs on the same images.

    The AUCs are Mann-Whitney statistics (ties count 1/2); their covariance is DeLong et
    al.'s (1988) estimate from the structural components, computed with the midrank
    algorithm of Sun & Xu (2014). ``difference = auc_b - auc_a``, ``se`` its standard
    error, ``z = difference / se``, ``p`` the two-sided normal p-value and ``ci`` the Wald
    interval ``difference ± z_(1+level)/2 · se``. Identical scores give difference 0, p 1;
    a zero ``se`` with a non-zero difference (a degenerate estimate, e.g. constant scores
    against perfect ones) gives ``z`` None and ``p`` 0.

    Args:
        y_true: ``(N,)`` 1 (or True) for a positive image, 0 for a negative one.
        score_a, score_b: ``(N,)`` each model's score for the positive class.
        ci_level: confidence level of ``ci``.
    """
    positive = np.asarray(y_true).astype(bool)
    a, b = np.asarray(score_a, float), np.asarray(score_b, float)
    if positive.ndim != 1 or a.shape != positive.shape or b.shape != positive.shape:
        raise ValueError(
            f"y_true, score_a and score_b must be 1-D of one length, got {positive.shape}, "
            f"{a.shape} and {b.shape}"
        )
    scores = np.vstack([a, b])
    auc, cov = _auc_covariance(positive, scores)
    diff = float(auc[1] - auc[0])
    se = math.sqrt(max(0.0, cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))
    if se > 0:
        z, p = diff / se, float(2 * stats.norm.sf(abs(diff / se)))
    elif abs(diff) < 1e-12:  # the two score vectors rank every pair alike
        z, p = 0.0, 1.0
    else:  # a degenerate variance estimate (e.g. constant scores against perfect ones)
        z, p = None, 0.0
    half = _z(ci_level) * se
    return {
        "auc_a": float(auc[0]),
        "auc_b": float(auc[1]),
        "se_a": math.sqrt(max(0.0, cov[0, 0])),
        "se_b": math.sqrt(max(0.0, cov[1, 1])),
        "difference": diff,
        "se": se,
        "z": z,
        "p": p,
        "ci": [diff - half, diff + half],
        "ci_level": ci_level,
        "method": "DeLong et al. 1988 (fast midrank algorithm, Sun & Xu 2014)",
    }


def _bootstrap_macro_difference(
    y: np.ndarray, pa: np.ndarray, pb: np.ndarray, n_bootstrap: int, seed: int
) -> np.ndarray:
    """Paired bootstrap replicates of ``macro AUC(B) - macro AUC(A)`` (NaN: a class absent)."""
    n, k = pa.shape
    rng = np.random.default_rng(seed)
    out = []
    chunk = max(1, _BOOTSTRAP_CELLS // n)
    for start in range(0, n_bootstrap, chunk):
        size = min(chunk, n_bootstrap - start)
        idx = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]
        counts = np.bincount(idx.ravel(), minlength=size * n).reshape(size, n)
        diff = [
            _weighted_auc(pb[:, c], y == c, counts) - _weighted_auc(pa[:, c], y == c, counts)
            for c in range(k)
        ]
        out.append(np.mean(diff, axis=0))
    return np.concatenate(out)


def paired_auc(
    y_true: ArrayLike,
    probs_a: ArrayLike,
    probs_b: ArrayLike,
    labels: list[str] | None = None,
    *,
    ci_level: float = 0.95,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> DeLongResult | dict:
    """The paired AUC comparison of two models' ``(N, K)`` probabilities on the same images.

    Binary (``K == 2``): :func:`delong` on ``p(labels[1])``. Multiclass: :func:`delong` per
    class one-vs-rest (``per_class``), and for the macro (unweighted mean one-vs-rest) AUC a
    paired percentile bootstrap (Efron 1979): the N images are resampled ``n_bootstrap``
    times with ``seed``, both models' macro AUCs computed on each resample, and ``ci`` is the
    percentile interval of their difference; ``se`` is the replicates' standard deviation and
    ``p`` the two-sided normal p-value of ``difference / se``. ``method`` says which was used.
    """
    y = np.asarray(y_true).astype(np.int64)
    pa, pb = np.asarray(probs_a, float), np.asarray(probs_b, float)
    if pa.ndim != 2 or pa.shape != pb.shape or pa.shape[0] != len(y):
        raise ValueError(f"probs_a and probs_b must both be (N, K), got {pa.shape}, {pb.shape}")
    k = pa.shape[1]
    labels = list(labels) if labels is not None else [str(i) for i in range(k)]
    if k == 2:
        return delong(y == 1, pa[:, 1], pb[:, 1], ci_level=ci_level)
    per_class = {labels[c]: delong(y == c, pa[:, c], pb[:, c], ci_level=ci_level) for c in range(k)}
    auc_a = float(np.mean([r["auc_a"] for r in per_class.values()]))
    auc_b = float(np.mean([r["auc_b"] for r in per_class.values()]))
    reps = _bootstrap_macro_difference(y, pa, pb, n_bootstrap, seed)
    reps = reps[np.isfinite(reps)]
    diff = auc_b - auc_a
    alpha = (1 - ci_level) / 2
    se = float(np.std(reps, ddof=1)) if len(reps) > 1 else 0.0
    if se > 0:
        p = float(2 * stats.norm.sf(abs(diff) / se))
    else:
        p = 1.0 if abs(diff) < 1e-12 else 0.0
    if len(reps):
        ci = [float(v) for v in np.percentile(reps, [100 * alpha, 100 * (1 - alpha)])]
    else:  # every resample lost a class: too few images of one class
        ci = [diff, diff]
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "difference": diff,
        "se": se,
        "z": diff / se if se > 0 else 0.0,
        "p": p,
        "ci": ci,
        "ci_level": ci_level,
        "method": f"macro one-vs-rest AUC: paired percentile bootstrap ({len(reps)} resamples, "
        f"seed {seed}); per class: DeLong et al. 1988 (Sun & Xu 2014)",
        "per_class": per_class,
    }
