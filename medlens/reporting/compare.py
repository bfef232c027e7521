"""``medlens compare``: runs side by side (the seeds' custom CNN vs transfer learning), or, with
``--data``, models scored on the same images with paired tests (McNemar, DeLong) and a
non-inferiority gate for promoting a retrained model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medlens.artifacts.folders import ModelFolder
from medlens.artifacts.model import read_meta
from medlens.errors import DataError, ModelLoadError, UsageError

log = logging.getLogger(__name__)


def load_run_evaluation(run: str | Path, split: str = "val") -> dict:
    """What :func:`medlens.reporting.report.write_comparison` needs from one run folder."""
    folder = ModelFolder(run)
    metrics = folder.read_metrics(split)
    if metrics is None:
        raise ModelLoadError(
            f"{folder.path} has no {split} evaluation ({folder.metrics_json(split)} is "
            "missing); is it a finished `medlens train` run? (--split val or test)"
        )
    labels = metrics.get("labels") or read_meta(folder.path).labels
    pred = folder.read_predictions(split, labels)
    return {
        "name": folder.name,
        "metrics": metrics,
        "history": folder.read_history(),
        "y_true": None if pred is None else pred.y_true,
        "probs": None if pred is None else pred.probs,
        "labels": labels,
    }


def compare_runs(runs: list[str], out: str | Path, split: str = "val") -> tuple[str, Path]:
    """Table (text) and ``compare.html`` for several runs. Returns ``(table, html_path)``."""
    from medlens.reporting.report import comparison_table, write_comparison

    loaded = [load_run_evaluation(r, split) for r in runs]
    names = [r["name"] for r in loaded]
    if len(set(names)) != len(names):  # two runs called "run" in different folders
        for r, path in zip(loaded, runs):
            r["name"] = str(path)
    return comparison_table(loaded, split), write_comparison(loaded, out, split)


# --------------------------------------------------------------------------------------
# `medlens compare A B ... --data FOLDER`: every model on the same images, paired tests
# --------------------------------------------------------------------------------------
def _check_request(models: list[str], data: str | Path, margin: float | None) -> None:
    if len(models) < 2:
        raise UsageError(
            f"--data compares at least two models, got {len(models)}: give the current model "
            "first, then the candidate(s) (bundled names, model or run folders)"
        )
    if margin is not None:
        if not 0 <= margin < 1:
            raise UsageError(
                f"--promote-if-not-worse {margin}: the margin must be in [0, 1) (e.g. 0.02 "
                "for two points of accuracy and AUC)"
            )
        if len(models) != 2:
            raise UsageError(
                f"--promote-if-not-worse needs exactly two models (current, candidate), got "
                f"{len(models)}"
            )
    if not Path(data).exists():
        raise UsageError(
            f"--data {data} does not exist; give a labelled image folder (<root>/<class>/<image>)"
        )


def _load_predictors(models: list[str]) -> list:
    """A :class:`Predictor` per model; an unknown model or mismatched labels is a UsageError."""
    from medlens.artifacts.folders import resolve_model
    from medlens.inference.predictor import Predictor

    for ref in models:
        try:
            resolve_model(ref)
        except ModelLoadError as e:
            raise UsageError(str(e)) from None
    predictors = [Predictor(ref) for ref in models]
    labels = [p.meta.labels for p in predictors]
    if any(lab != labels[0] for lab in labels):
        which = "; ".join(f"{ref}: {', '.join(lab)}" for ref, lab in zip(models, labels))
        raise UsageError(
            f"the models must have the same labels (in the same order) to be compared on one "
            f"folder: {which}; compare models of one task"
        )
    return predictors


def _model_names(models: list[str], predictors: list) -> list[str]:
    names = [p.folder.name for p in predictors]
    if len(set(names)) < len(names):  # a copy of the bundled model called the same
        names = list(models)
    if len(set(names)) < len(names):  # the same model given twice
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    return names


def _score_all(predictors: list, samples: list, skip_bad: bool, progress: bool) -> tuple:
    """Every model's probabilities on the images all of them could read (each model with its
    own preprocessing; images decoded once per distinct geometry)."""
    from medlens.data.cache import PreparedImages, prepare_samples, refuse_unreadable

    prepared: dict[str, PreparedImages] = {}
    for p in predictors:
        key = p.pre.geometry_key()
        if key not in prepared:
            prepared[key] = prepare_samples(samples, p.pre, progress=progress, desc="decode")
    errors = sorted({e for res in prepared.values() for e in res.errors})
    refuse_unreadable(errors, skip_bad)
    keep = sorted(set.intersection(*(set(res.keep) for res in prepared.values())))
    if not keep:
        raise DataError("no image could be read by every model; check the folder's images")
    probs = []
    for p in predictors:
        res = prepared[p.pre.geometry_key()]
        rows = {idx: i for i, idx in enumerate(res.keep)}
        probs.append(p.probs_prepared(res.pixels[[rows[i] for i in keep]]))
    if errors:
        log.warning("skipped %d unreadable image(s)", len(errors))
    return keep, probs


def _model_summary(name: str, ref: str, pred, y: np.ndarray, probs: np.ndarray) -> dict:
    from medlens.evaluation.metrics import compute_metrics

    m = compute_metrics(y, probs, pred.meta.labels, pred.meta.threshold)
    return {
        "name": name,
        "model": ref,
        "folder": str(pred.folder),
        "threshold": m["threshold"],
        "accuracy": m["accuracy"],
        "accuracy_ci": m["ci"].get("accuracy"),
        "auc": m["auc"],
        "auc_ci": m["ci"].get("auc"),
        "sensitivity": m["sensitivity"],
        "specificity": m["specificity"],
    }


def promotion_verdict(comparison: dict, margin: float) -> dict:
    """Non-inferiority of the candidate at ``margin``: the lower 95% bound of ``B - A`` must
    be at least ``-margin`` for accuracy (McNemar's pair, Newcombe's interval) and for AUC
    (DeLong's interval; the bootstrap one of the macro AUC for a multiclass model)."""
    lows = {"accuracy": comparison["mcnemar"]["ci"][0], "auc": comparison["delong"]["ci"][0]}
    failed = [
        {"figure": k, "lower": lo, "short_by": -margin - lo}
        for k, lo in lows.items()
        if lo < -margin - 1e-12
    ]
    return {
        "margin": margin,
        "promote": not failed,
        "accuracy_lower": lows["accuracy"],
        "auc_lower": lows["auc"],
        "failed": failed,
        "rule": "promote when the lower 95% bound of (candidate - current) is >= -margin "
        "for both accuracy and AUC",
    }


def compare_on_data(
    models: list[str],
    data: str | Path,
    *,
    margin: float | None = None,
    skip_bad_images: bool = False,
    progress: bool = True,
) -> dict:
    """Score every model on the images of ``data`` and test each against the first.

    Each model uses its own preprocessing, temperature and threshold (its operating point).
    Returns a JSON-ready dict: ``models`` (accuracy and AUC with 95% bootstrap intervals),
    ``comparisons`` (per model after the first: ``mcnemar`` and ``delong``, see
    :mod:`medlens.evaluation.paired`) and, with ``margin``, ``promotion``.

    Raises:
        UsageError: fewer than two models, an unknown model, models with other labels, a
            missing folder, a margin outside [0, 1) or with other than two models.
    """
    from medlens.data.datasets import load_dataset
    from medlens.evaluation.metrics import predict_labels
    from medlens.evaluation.paired import mcnemar, paired_auc

    _check_request(models, data, margin)
    predictors = _load_predictors(models)
    labels = predictors[0].meta.labels
    samples = load_dataset(data, mode="all", classes=labels).splits["all"]
    keep, probs = _score_all(predictors, samples, skip_bad_images, progress)
    y = np.array([samples[i].label for i in keep])
    names = _model_names(models, predictors)
    summaries = [
        _model_summary(n, r, p, y, pr) for n, r, p, pr in zip(names, models, predictors, probs)
    ]
    correct = [predict_labels(pr, p.meta.threshold) == y for p, pr in zip(predictors, probs)]
    comparisons = [
        {
            "reference": names[0],
            "model": names[i],
            "mcnemar": mcnemar(correct[0], correct[i]),
            "delong": paired_auc(y, probs[0], probs[i], labels),
        }
        for i in range(1, len(models))
    ]
    out = {
        "data": str(data),
        "n": len(y),
        "labels": list(labels),
        "class_counts": {lab: int(np.sum(y == i)) for i, lab in enumerate(labels)},
        "reference": names[0],
        "models": summaries,
        "comparisons": comparisons,
        "difference": "candidate - reference (positive: the candidate is better)",
        "promotion": None if margin is None else promotion_verdict(comparisons[0], margin),
    }
    return out


def _fmt(v: float | None, ci: list | None = None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci and None not in ci else "")


def paired_table(result: dict) -> str:
    """The text report of :func:`compare_on_data`."""
    counts = ", ".join(f"{k} {v}" for k, v in result["class_counts"].items())
    lines = [
        f"{result['n']} images of {result['data']} ({counts}); each model at its own "
        "operating point, 95% intervals",
    ]
    width = max(len(m["name"]) for m in result["models"]) + 2
    lines.append(f"{'model':<{width}}{'accuracy':<28}{'auc':<28}threshold")
    for m in result["models"]:
        thr = "argmax" if m["threshold"] is None else f"{m['threshold']:.6g}"
        lines.append(
            f"{m['name']:<{width}}{_fmt(m['accuracy'], m['accuracy_ci']):<28}"
            f"{_fmt(m['auc'], m['auc_ci']):<28}{thr}"
        )
    for c in result["comparisons"]:
        mc, dl = c["mcnemar"], c["delong"]
        lines += [
            f"{c['model']} vs {c['reference']} (difference = {c['model']} - {c['reference']}):",
            f"  accuracy: {mc['difference']:+.4f} [{mc['ci'][0]:+.4f}, {mc['ci'][1]:+.4f}]  "
            f"McNemar b={mc['b']} c={mc['c']} statistic={mc['statistic']:.3f} p={mc['p']:.4g} "
            f"({mc['method']})",
            f"  auc:      {dl['difference']:+.4f} [{dl['ci'][0]:+.4f}, {dl['ci'][1]:+.4f}]  "
            f"p={dl['p']:.4g} ({dl['method']})",
        ]
    v = result.get("promotion")
    if v:
        lines.append(promotion_line(v))
    return "\n".join(lines)


def promotion_line(verdict: dict) -> str:
    """One line: promote, or which figure failed the margin and by how much."""
    m = verdict["margin"]
    if verdict["promote"]:
        return (
            f"promote: not worse at margin {m:g} (lower 95% bounds: accuracy "
            f"{verdict['accuracy_lower']:+.4f}, auc {verdict['auc_lower']:+.4f} >= {-m:+.4f})"
        )
    why = "; ".join(
        f"{f['figure']} lower 95% bound {f['lower']:+.4f} is below {-m:+.4f} by {f['short_by']:.4f}"
        for f in verdict["failed"]
    )
    return f"do not promote: {why}"
