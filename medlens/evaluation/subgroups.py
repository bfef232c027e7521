"""Subgroup (fairness) results: the same metrics for each value of each attribute.

A clinical reviewer asks whether a model works as well for women as for men, for the old as
for the young, on every site and scanner. :func:`subgroup_metrics` answers with each group's
figures and bootstrap intervals (:func:`medlens.evaluation.metrics.compute_metrics` on the
group's images), the largest gap between groups of an attribute, and a warning where a group
is too small for its figures to mean much.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from medlens.evaluation.metrics import (
    class_support,
    compute_metrics,
    headline_metrics,
    small_split_warning,
)

__all__ = ["subgroup_metrics", "GAP_METRICS"]

GAP_METRICS = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity")
"""The metrics whose largest between-group gap is reported."""


def _largest_gaps(groups: dict[str, dict]) -> dict[str, dict]:
    """For each gap metric, the groups with the highest and lowest value (groups with a
    warning excluded when at least two groups are large enough)."""
    solid = {v: m for v, m in groups.items() if not m["warning"]}
    pool = solid if len(solid) >= 2 else groups
    out = {}
    for key in GAP_METRICS:
        vals = {v: m[key] for v, m in pool.items() if m.get(key) is not None}
        if len(vals) < 2:
            continue
        hi, lo = max(vals, key=lambda v: vals[v]), min(vals, key=lambda v: vals[v])
        out[key] = {"gap": vals[hi] - vals[lo], "highest": hi, "lowest": lo}
    return out


def _group_notes(m: dict, labels: Sequence[str]) -> dict:
    """``warning`` (too few images of a class for its intervals to mean much) and, for a group
    that holds some classes only, ``missing_classes`` and ``undefined`` (the metrics that need
    the missing classes: AUC, sensitivity without positives, ...), with a ``note`` that says
    which figures are reported instead."""
    present = [c for c, n in class_support(m).items() if n > 0]
    missing = [c for c in labels if c not in present]
    if not missing:
        return {"warning": small_split_warning(m)}
    undefined = [k for k in GAP_METRICS if m.get(k) is None]
    defined = [k for k in GAP_METRICS if m.get(k) is not None]
    return {
        "warning": None,
        "missing_classes": missing,
        "undefined": undefined,
        "note": (
            f"holds no {', '.join(missing)} image: {', '.join(undefined) or 'no metric'} cannot "
            f"be computed; reported: {', '.join(defined) or 'none'}"
        ),
    }


def subgroup_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    threshold: float | None,
    attributes: Mapping[str, Sequence[str | None]],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """Metrics of each group of each attribute.

    Args:
        y_true: ``(N,)`` class indices.
        probs: ``(N, K)`` calibrated probabilities.
        labels: Class names.
        threshold: The model's binary threshold (None: argmax).
        attributes: ``{attribute: [value of image i, or None when unknown]}``.

    Returns:
        ``{attribute: {"groups": {value: {the model.json headline metrics, ci, support, warning}}, "largest_gap":
        {metric: {gap, highest, lowest}}, "unknown": images without a value}}``.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    out = {}
    for attr, raw in attributes.items():
        values = np.array(["" if v is None else str(v) for v in raw], dtype=object)
        groups: dict[str, dict] = {}
        for value in sorted({str(v) for v in values if v != ""}):
            idx = np.flatnonzero(values == value)
            m = compute_metrics(
                y_true[idx], probs[idx], labels, threshold, n_bootstrap=n_bootstrap, seed=seed
            )
            groups[value] = {**headline_metrics(m), **_group_notes(m, labels)}
        out[attr] = {
            "groups": groups,
            "largest_gap": _largest_gaps(groups),
            "unknown": int(np.sum(values == "")),
        }
    return out
