"""Has a served model's input moved away from what it was validated on?

Three signals from predictions alone (no labels needed), each against the model's own
validation predictions and training prevalence:

* :func:`psi`: the population stability index of a probability's distribution, over the
  reference's deciles (0.1 is commonly read as a moderate shift, 0.25 as a large one);
* :func:`ks`: the two-sample Kolmogorov-Smirnov statistic and its p-value;
* :func:`em_prevalence`: the class prevalence of the unlabelled predictions, estimated by
  re-weighting the calibrated posteriors with EM (Saerens, Latinne and Decaestecker, Neural
  Computation 14(1), 2002), which corrects the bias of simply counting predicted labels.

Plus :func:`excess_rate`, a one-sided binomial test of an observed flag rate (the OOD guard's)
against the rate it was set to give on validation images.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["psi", "ks", "em_prevalence", "excess_rate"]


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``current`` against ``reference`` (1-D samples).

    Bins are the reference's quantiles (``bins`` of them, merged where ties make edges
    equal); each bin's share gets half a count added on both sides so an empty bin stays
    finite. Sampling noise alone gives roughly ``(bins - 1) * (1/n_cur + 1/n_ref)``: read a
    small sample's value with that in mind.
    """
    ref = np.asarray(reference, float).ravel()
    cur = np.asarray(current, float).ravel()
    if ref.size == 0 or cur.size == 0:
        raise ValueError("psi needs a non-empty reference and current sample")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    r_n = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1)
    c_n = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1)
    r = (r_n + 0.5) / (ref.size + 0.5 * r_n.size)
    c = (c_n + 0.5) / (cur.size + 0.5 * c_n.size)
    return float(np.sum((c - r) * np.log(c / r)))


def ks(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: ``(statistic, p-value)`` (scipy, exact when small)."""
    res = stats.ks_2samp(np.asarray(reference, float).ravel(), np.asarray(current, float).ravel())
    return float(res.statistic), float(res.pvalue)


def em_prevalence(
    probs: np.ndarray, train_prior: np.ndarray, max_iter: int = 200, tol: float = 1e-7
) -> np.ndarray:
    """The class prevalence of unlabelled images (Saerens et al. 2002).

    ``probs`` (N, K) are calibrated posteriors under the training prior ``train_prior`` (K,).
    EM alternates: posteriors re-weighted by new prior / training prior and renormalised, then
    the new prior is their mean. Returns the prior at convergence (sums to 1).
    """
    p = np.clip(np.asarray(probs, float), 1e-12, 1.0)
    prior0 = np.asarray(train_prior, float)
    prior0 = prior0 / prior0.sum()
    if p.ndim != 2 or p.shape[1] != prior0.size:
        raise ValueError(f"probs must be (N, {prior0.size}), got {p.shape}")
    prior = p.mean(axis=0)
    for _ in range(max_iter):
        w = p * (prior / prior0)
        w /= w.sum(axis=1, keepdims=True)
        new = w.mean(axis=0)
        if np.max(np.abs(new - prior)) < tol:
            return new
        prior = new
    return prior


def excess_rate(flagged: int, n: int, expected: float) -> float:
    """One-sided binomial p-value that ``flagged`` of ``n`` exceeds the ``expected`` rate."""
    if n <= 0:
        return 1.0
    return float(stats.binomtest(int(flagged), int(n), float(expected), "greater").pvalue)
