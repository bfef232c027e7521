"""Classification metrics with percentile-bootstrap confidence intervals.

Conventions (shared across MedLens):

* ``labels``: class names in model output order.
* ``y_true``: integer class indices, shape ``(N,)``.
* ``probs``: class probabilities, always shape ``(N, K)``; for binary tasks ``K == 2`` and
  column 1 is the positive class ``labels[1]``.
* Binary predictions use a decision ``threshold`` on ``p(positive)`` (positive iff
  ``probs[:, 1] >= threshold``); multi-class predictions are the argmax.

Undefined quantities (e.g. sensitivity when there are no positives, AUC when only one class
is present) are reported as ``None`` rather than raising, so a report can still be written.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from medlens.errors import DataError

__all__ = [
    "compute_metrics",
    "classification_report_text",
    "expected_calibration_error",
    "predict_labels",
]

#: Metrics that depend on the decision rule (threshold / argmax); these get bootstrap CIs.

# Upper bound on the size of one (resamples x N) count matrix in the bootstrap.
_BOOTSTRAP_CELLS = 4_000_000


# --------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------
def _as_probs(probs) -> np.ndarray:
    """Return probabilities as float64 ``(N, K)``; a 1-D array is read as binary p(positive)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.column_stack([1.0 - p, p])
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, K) with K >= 2, got {p.shape}")
    return p


def _validate(y_true, probs, labels: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = _as_probs(probs)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if len(y) == 0:
        raise DataError("cannot compute metrics on an empty set (N=0): no images were evaluated")
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} entries but probs has {len(p)} rows")
    if labels is not None and len(labels) != p.shape[1]:
        raise ValueError(f"{len(labels)} labels given but probs has {p.shape[1]} columns")
    yi = y.astype(np.int64)
    if not np.array_equal(yi, y) or yi.min() < 0 or yi.max() >= p.shape[1]:
        raise ValueError(f"y_true must hold integer class indices in [0, {p.shape[1] - 1}]")
    return yi, p


def predict_labels(probs: ArrayLike, threshold: float | np.ndarray | None = None) -> np.ndarray:
    """Turn probabilities into predicted class indices.

    Args:
        probs: ``(N, K)`` class probabilities (a 1-D array is read as binary p(positive)).
        threshold: Binary decision threshold; positive iff ``probs[:, 1] >= threshold``.
            ``None`` means 0.5 for binary tasks. Ignored for multi-class (argmax). An ``(N,)``
            array gives each image its own (cross-fitted decisions: each image judged by the
            threshold fitted without it).

    Returns:
        Integer array of shape ``(N,)``.
    """
    p = _as_probs(probs)
    if p.shape[1] == 2:
        t = 0.5 if threshold is None else np.asarray(threshold, dtype=np.float64)
        return (p[:, 1] >= t).astype(np.int64)
    return np.argmax(p, axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------
# calibration error
# --------------------------------------------------------------------------------------
def expected_calibration_error(y_true: ArrayLike, probs: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error of the predicted-class confidence.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over ``n_bins`` equal-width bins
    ``(lo, hi]`` of the top-class confidence (Naeini et al., 2015, "Obtaining Well Calibrated
    Probabilities Using Bayesian Binning"; Guo et al., 2017). The predicted class is the
    argmax, so ECE does not depend on a binary decision threshold.

    Args:
        y_true: ``(N,)`` integer labels.
        probs: ``(N, K)`` probabilities.
        n_bins: Number of equal-width confidence bins.

    Returns:
        ECE in ``[0, 1]``.
    """
    y, p = _validate(y_true, probs)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], conf, side="left")  # (lo, hi] bins
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, conf, n_bins))
    return float(gap.sum() / count.sum())


# --------------------------------------------------------------------------------------
# point estimates
# --------------------------------------------------------------------------------------
def _nan_to_none(x: Any) -> Any:
    """Recursively convert numpy scalars/arrays to plain Python types, NaN/inf -> None."""
    if isinstance(x, dict):
        return {str(k): _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_nan_to_none(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _threshold_metrics(y: np.ndarray, pred: np.ndarray, k: int) -> dict[str, float]:
    """Decision-rule metrics via scikit-learn; undefined values are NaN."""
    cls = list(range(k))
    cm = confusion_matrix(y, pred, labels=cls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bal = balanced_accuracy_score(y, pred)
        if k == 2:
            prec, rec, f1, _ = precision_recall_fscore_support(
                y, pred, labels=cls, pos_label=1, average="binary", zero_division=np.nan
            )
            f2 = precision_recall_fscore_support(
                y, pred, labels=cls, pos_label=1, average="binary", beta=2.0, zero_division=np.nan
            )[2]
            tn, fp = cm[0, 0], cm[0, 1]
            spec = tn / (tn + fp) if tn + fp else np.nan
        else:
            prec, rec, f1, _ = precision_recall_fscore_support(
                y, pred, labels=cls, average="macro", zero_division=np.nan
            )
            f2 = precision_recall_fscore_support(
                y, pred, labels=cls, average="macro", beta=2.0, zero_division=np.nan
            )[2]
            neg = cm.sum() - cm.sum(axis=1)
            tn = neg - (cm.sum(axis=0) - np.diag(cm))
            spec = np.nanmean(np.where(neg > 0, tn / np.maximum(neg, 1), np.nan))
    if k == 2 and not (y == 1).any():
        rec = np.nan  # sensitivity is undefined without positives
    return {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": bal,
        "sensitivity": rec,
        "specificity": spec,
        "precision": prec,
        "f1": f1,
        "f2": f2,
    }


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """Binary ROC AUC of p(positive) or macro one-vs-rest AUC; NaN if undefined."""
    k = p.shape[1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if k == 2:
                return float(roc_auc_score(y, p[:, 1]))
            return float(
                roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(k)))
            )
    except ValueError:
        return float("nan")


def _brier(y: np.ndarray, p: np.ndarray) -> float:
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - y) ** 2))
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def _per_class(y: np.ndarray, pred: np.ndarray, p: np.ndarray, labels: Sequence[str]) -> dict:
    k = p.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prec, rec, f1, sup = precision_recall_fscore_support(
            y, pred, labels=list(range(k)), average=None, zero_division=np.nan
        )
    if k == 2:
        aucs = [_auc(y, p)] * 2
    else:
        aucs = [
            _auc((y == c).astype(int), np.column_stack([1 - p[:, c], p[:, c]])) for c in range(k)
        ]
    return {
        str(lab): {
            "precision": prec[c],
            "recall": rec[c],
            "f1": f1[c],
            "support": int(sup[c]),
            "auc": aucs[c],
        }
        for c, lab in enumerate(labels)
    }


# --------------------------------------------------------------------------------------
# bootstrap (vectorised over resamples)
# --------------------------------------------------------------------------------------
def _confusion_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Decision-rule metrics from a stack of confusion matrices ``(B, K, K)`` (rows true).

    Mirrors :func:`_threshold_metrics` (same NaN conventions) so bootstrap replicates are
    computed exactly like the point estimates.
    """
    cm = cm.astype(np.float64)
    k = cm.shape[1]
    n = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    negatives = n[:, None] - support
    tn = negatives - (predicted - tp)
    fp, fn = predicted - tp, support - tp

    def div(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)

    recall, precision, spec = div(tp, support), div(tp, predicted), div(tn, negatives)
    f1, f2 = div(2 * tp, 2 * tp + fp + fn), div(5 * tp, 5 * tp + 4 * fn + fp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = {"accuracy": div(tp.sum(axis=1), n), "balanced_accuracy": np.nanmean(recall, 1)}
        if k == 2:
            out.update(
                sensitivity=recall[:, 1],
                specificity=spec[:, 1],
                precision=precision[:, 1],
                f1=f1[:, 1],
                f2=f2[:, 1],
            )
        else:
            out.update(
                sensitivity=np.nanmean(recall, 1),
                specificity=np.nanmean(spec, 1),
                precision=np.nanmean(precision, 1),
                f1=np.nanmean(f1, 1),
                f2=np.nanmean(f2, 1),
            )
    return out


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ROC AUC (Mann-Whitney, ties count 1/2) for each row of sample multiplicities ``counts``.

    ``counts[b, i]`` is how often sample ``i`` occurs in resample ``b``; the result equals
    ``roc_auc_score`` on the expanded resample. NaN where a resample has one class only.
    """
    order = np.argsort(scores, kind="mergesort")
    s, pos = scores[order], positive[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    c = counts[:, order]
    pw = np.add.reduceat(c * pos, starts, axis=1).astype(np.float64)
    nw = np.add.reduceat(c * ~pos, starts, axis=1).astype(np.float64)
    below = np.cumsum(nw, axis=1) - nw
    denom = pw.sum(axis=1) * nw.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, (pw * (below + 0.5 * nw)).sum(axis=1) / denom, np.nan)


def _bootstrap(
    y: np.ndarray, pred: np.ndarray, p: np.ndarray, n_bootstrap: int, seed: int
) -> dict[str, np.ndarray]:
    """Bootstrap replicates (Efron, 1979) of the decision-rule metrics and AUC.

    Each resample draws N indices with replacement; it is represented by its count vector so
    confusion matrices and AUCs of many resamples are computed with array operations.
    """
    n, k = p.shape
    rng = np.random.default_rng(seed)
    cell = np.zeros((n, k * k))
    cell[np.arange(n), y * k + pred] = 1.0
    reps: dict[str, list[np.ndarray]] = {}
    chunk = max(1, _BOOTSTRAP_CELLS // n)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        idx = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)
        vals = _confusion_metrics((counts @ cell).reshape(b, k, k))
        if k == 2:
            vals["auc"] = _weighted_auc(p[:, 1], y == 1, counts)
        else:  # macro OvR: NaN as soon as one class is missing from the resample
            vals["auc"] = np.mean([_weighted_auc(p[:, c], y == c, counts) for c in range(k)], 0)
        for name, v in vals.items():
            reps.setdefault(name, []).append(v)
    return {name: np.concatenate(v) for name, v in reps.items()}


def _percentile_ci(values: np.ndarray, ci_level: float) -> list[float] | None:
    """Percentile interval of the finite replicates (NaN resamples are skipped)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None
    alpha = (1.0 - ci_level) / 2.0
    lo, hi = np.percentile(v, [100 * alpha, 100 * (1 - alpha)])
    return [float(lo), float(hi)]


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
CI_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "auc",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "f2",
)
"""The metrics that get bootstrap intervals (in ``metrics.json``'s ``ci``)."""

_KEY_ORDER = (
    "n",
    "labels",
    "accuracy",
    "balanced_accuracy",
    "auc",
    "f1",
    "f2",
    "precision",
    "sensitivity",
    "specificity",
    "log_loss",
    "brier",
    "ece",
    "confusion_matrix",
    "per_class",
    "threshold",
    "at_0_5",
    "ci",
    "ci_level",
    "n_bootstrap",
)
"""The keys of :func:`compute_metrics`' dict, in ``metrics.json``'s order."""


def compute_metrics(
    y_true: ArrayLike,
    probs: ArrayLike,
    labels: Sequence[str],
    threshold: float | None = None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci_level: float = 0.95,
) -> dict:
    """Compute the MedLens evaluation metrics with bootstrap confidence intervals.

    Binary tasks (``K == 2``) are evaluated at ``threshold`` (0.5 if ``None``) on
    ``probs[:, 1]`` and additionally at 0.5 (``at_0_5``) for comparison; sensitivity,
    specificity, precision and F-scores refer to the positive class ``labels[1]``.
    Multi-class tasks predict the argmax and report macro averages (sensitivity = macro
    recall, specificity = macro per-class TN/(TN+FP), AUC = macro one-vs-rest).

    Confidence intervals are percentile bootstrap intervals (Efron, 1979, "Bootstrap
    Methods: Another Look at the Jackknife"; Efron & Tibshirani, 1993): the N images are
    resampled with replacement ``n_bootstrap`` times with a fixed ``seed``; resamples in
    which a metric is undefined (e.g. AUC with one class) are skipped for that metric.

    Args:
        y_true: ``(N,)`` integer labels.
        probs: ``(N, K)`` class probabilities.
        labels: ``K`` class names in model output order.
        threshold: Binary decision threshold on p(positive); ignored for multi-class. An
            ``(N,)`` array: each image's own (see :func:`predict_labels`); ``threshold`` in
            the result is then their median.
        n_bootstrap: Number of bootstrap resamples (0 disables CIs).
        seed: Seed of the resampling RNG.
        ci_level: Confidence level of the intervals.

    Returns:
        JSON-serialisable dict with keys ``n, labels, accuracy, balanced_accuracy, auc, f1,
        f2, precision, sensitivity, specificity, log_loss, brier, ece, confusion_matrix,
        per_class, threshold, at_0_5, ci, ci_level, n_bootstrap``; undefined values are
        ``None``.

    Raises:
        ValueError: On empty input or inconsistent shapes.
    """
    y, p = _validate(y_true, probs, labels)
    n, k = p.shape
    binary = k == 2
    thr = (0.5 if threshold is None else threshold) if binary else None
    pred = predict_labels(p, thr)
    if thr is not None:
        thr = float(np.median(thr))
    point = _threshold_metrics(y, pred, k)
    auc = _auc(y, p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ll = log_loss(y, p, labels=list(range(k)))

    out: dict[str, Any] = {
        "n": n,
        "labels": [str(s) for s in labels],
        **point,
        "auc": auc,
        "log_loss": ll,
        "brier": _brier(y, p),
        "ece": expected_calibration_error(y, p),
        "confusion_matrix": confusion_matrix(y, pred, labels=list(range(k))),
        "per_class": _per_class(y, pred, p, labels),
        "threshold": thr,
        "at_0_5": _threshold_metrics(y, predict_labels(p, 0.5), k) if binary else None,
    }
    ci: dict[str, list[float] | None] = {}
    if n_bootstrap > 0:
        reps = _bootstrap(y, pred, p, int(n_bootstrap), seed)
        ci = {name: _percentile_ci(reps[name], ci_level) for name in CI_METRICS}
    out.update(ci=ci, ci_level=float(ci_level), n_bootstrap=int(n_bootstrap))
    return _nan_to_none({key: out[key] for key in _KEY_ORDER})


def classification_report_text(
    y_true: ArrayLike, probs: ArrayLike, labels: Sequence[str], threshold: float | None = None
) -> str:
    """scikit-learn ``classification_report`` at the MedLens decision rule.

    Args:
        y_true: ``(N,)`` integer labels.
        probs: ``(N, K)`` class probabilities.
        labels: Class names.
        threshold: Binary decision threshold (0.5 if ``None``); ignored for multi-class.

    Returns:
        The plain-text report.
    """
    y, p = _validate(y_true, probs, labels)
    return classification_report(
        y,
        predict_labels(p, threshold),
        labels=list(range(p.shape[1])),
        target_names=[str(s) for s in labels],
        digits=3,
        zero_division=0,
    )


# --------------------------------------------------------------------------------------
# which split says what
# --------------------------------------------------------------------------------------
SMALL_CLASS = 30
"""A split whose smallest class has fewer images gets a warning: its intervals say little."""

SPLIT_ROLES = {
    "site": (
        "Site images",
        "this hospital's own labelled images, on which the model was calibrated; each image "
        "judged by a temperature and threshold fitted without it (cross-fitting)",
    ),
    "test": (
        "Carved test split",
        "held out from training, from the choice of epoch and from calibration and the "
        "threshold: the figures to quote",
    ),
    "val": (
        "Validation split",
        "chose the epoch, the temperature and the threshold, so its figures are optimistic",
    ),
}
"""Title and role of each split a model is evaluated on."""


def class_support(metrics: dict) -> dict[str, int]:
    """Images per true class of a ``metrics.json`` dict (or a headline subset with ``support``)."""
    if metrics.get("support"):
        return {c: int(v) for c, v in metrics["support"].items()}
    per_class = metrics.get("per_class") or {}
    return {c: int(v["support"]) for c, v in per_class.items() if v.get("support") is not None}


HEADLINE_KEYS = (
    "n",
    "accuracy",
    "balanced_accuracy",
    "auc",
    "sensitivity",
    "specificity",
    "f1",
    "precision",
    "ece",
    "brier",
    "ci",
    "threshold",
)
"""The metrics a model keeps in ``model.json`` (and its card) for each evaluated split, and
subgroup reports for each group."""


def headline_metrics(metrics: dict) -> dict:
    """The :data:`HEADLINE_KEYS` subset of a full ``metrics.json`` dict, and ``support``
    (images per true class), which says how far its intervals can be trusted."""
    return {**{k: metrics.get(k) for k in HEADLINE_KEYS}, "support": class_support(metrics)}


def small_split_warning(metrics: dict) -> str | None:
    """A warning when a split is too small for its intervals to mean much, else None."""
    n = metrics.get("n") or 0
    support = class_support(metrics)
    if support:
        cls, smallest = min(support.items(), key=lambda kv: kv[1])
        if smallest >= SMALL_CLASS:
            return None
        return (
            f"Only {smallest} {cls} image(s) among {n}: too few for the interval to mean much "
            "(a perfect score on so few images is common by chance)."
        )
    return None if n >= 3 * SMALL_CLASS else f"Only {n} images: the interval says little."


def split_views(metrics: dict[str, dict]) -> list[dict]:
    """The evaluated splits of a model, carved test first, each with what it is for.

    Args:
        metrics: ``{split: metrics}`` (``model.json``'s ``metrics`` or ``metrics.json`` dicts).

    Returns:
        ``[{"split", "title", "role", "warning", "metrics"}]``; a split measured out of fold
        (a fold ensemble's ``measured_on``) says so in its title and role.
    """
    order = sorted(metrics, key=lambda s: (s != "site", s != "test", s != "val", s))
    out = []
    for split in order:
        m = metrics[split] or {}
        title, role = SPLIT_ROLES.get(split, (f"{split} split", "evaluated after training"))
        if m.get("measured_on") and split != "site":
            title, role = f"{title}, out of fold", m["measured_on"]
        out.append(
            {
                "split": split,
                "title": title,
                "role": role,
                "warning": small_split_warning(m),
                "metrics": m,
            }
        )
    return out


def collapse_warning(metrics: dict, temperature: float, t_max: float) -> str | None:
    """Plain words when a trained model has collapsed onto one class or learnt nothing, from its
    validation ``metrics``: one class predicted for >= 95% of images that are not 95% of one
    class, balanced accuracy within 0.05 of chance, or the temperature at its cap ``t_max``
    (calibration then flattens every probability). None when none of these holds."""
    cm = np.asarray(metrics.get("confusion_matrix") or [[0]])
    labels, n = metrics.get("labels") or [], cm.sum()
    if n == 0:
        return None
    reasons = []
    predicted, truth = cm.sum(0), cm.sum(1)
    if predicted.max() >= 0.95 * n and truth.max() < 0.95 * n:
        top = labels[int(predicted.argmax())] if labels else int(predicted.argmax())
        reasons.append(f"it predicts {top} for {predicted.max() / n:.0%} of the validation images")
    chance = 1 / max(len(truth), 2)
    bacc = metrics.get("balanced_accuracy")
    if bacc is not None and bacc <= chance + 0.05:
        reasons.append(f"its balanced accuracy {bacc:.3f} is at chance ({chance:.2f})")
    if temperature >= 0.99 * t_max:
        reasons.append(f"its temperature reached the cap ({t_max:g}): probabilities are flattened")
    if not reasons:
        return None
    return (
        "training did not produce a usable model: " + "; ".join(reasons) + ". Check the labels "
        "and the data, try another learning rate or more epochs; do not use this model"
    )


def likelihood_ratios(metrics: dict[str, dict]) -> dict | None:
    """Likelihood ratios of a binary model's positive and negative result at its operating
    point, from the first of :func:`split_views` (a site calibration's images where there are
    some, else the carved test split): LR+ = sensitivity / (1 - specificity), LR- = (1 -
    sensitivity) / specificity, each with a 95% interval by the log method (Simel, Samsa and
    Matchar 1991, J Clin Epidemiol 44:763) from the split's counts; a count of 0 gets 0.5
    added to each cell for the interval (the ratio itself is then not finite: None).

    Returns:
        ``{"positive", "positive_ci", "negative", "negative_ci", "sensitivity",
        "specificity", "split", "title", "n", "note"}``, or None when no split has both
        figures.
    """
    for view in split_views(metrics):
        m = view["metrics"]
        sens, spec = m.get("sensitivity"), m.get("specificity")
        if sens is None or spec is None:
            continue
        support = list(class_support(m).values())
        cis = _lr_intervals(sens, spec, *support) if len(support) == 2 else (None, None)
        return {
            "positive": sens / (1 - spec) if spec < 1 else None,
            "positive_ci": cis[0],
            "negative": (1 - sens) / spec if spec > 0 else None,
            "negative_ci": cis[1],
            "sensitivity": sens,
            "specificity": spec,
            "split": view["split"],
            "title": view["title"],
            "n": m.get("n"),
            "note": "likelihood ratios move between hospitals (other patients, other disease "
            "spectrum, other machines): a site calibration on your own images gives figures "
            "that fit your population",
        }
    return None


def _lr_intervals(sens: float, spec: float, n_neg: int, n_pos: int):
    """95% intervals of LR+ and LR- from the rates and class sizes (log method)."""
    if not n_neg or not n_pos:
        return None, None
    tp = round(sens * n_pos)
    tn = round(spec * n_neg)
    fn, fp = n_pos - tp, n_neg - tn

    def interval(a: float, na: int, b: float, nb: int) -> list[float]:
        if min(a, b, na - a, nb - b) == 0:  # Haldane: 0.5 in every cell
            a, b, na, nb = a + 0.5, b + 0.5, na + 1, nb + 1
        ratio = (a / na) / (b / nb)
        se = math.sqrt(1 / a - 1 / na + 1 / b - 1 / nb)
        return [ratio * math.exp(-1.959964 * se), ratio * math.exp(1.959964 * se)]

    return interval(tp, n_pos, fp, n_neg), interval(fn, n_pos, tn, n_neg)
