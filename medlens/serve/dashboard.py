"""The dashboard's data: each served model folder's training and validation results.

Everything is read from the files ``medlens train`` writes into a run folder:
``training_metrics.csv`` (curves) and ``eval/val/{metrics.json,predictions.csv}`` (ROC,
confusion matrix, classification report). The figures are the Plotly dicts of
:mod:`medlens.reporting.figures`, the ones ``report.html`` draws; the browser draws them with
the plotly.js of the ``plotly`` package, served locally.
"""

from __future__ import annotations

from pathlib import Path

from medlens.artifacts.folders import ModelFolder
from medlens.errors import ModelLoadError
from medlens.reporting import figures
from medlens.reporting.compare import load_run_evaluation
from medlens.reporting.figures import HEADLINE, HEADLINE_LABELS

__all__ = ["run_results", "comparison", "HEADLINE_LABELS"]

SPLIT = "val"


def _report_rows(metrics: dict) -> list[dict]:
    return [
        {"class": c, **{k: v.get(k) for k in ("precision", "recall", "f1", "support")}}
        for c, v in (metrics.get("per_class") or {}).items()
    ]


def _evaluation_figures(ev: dict) -> list[dict]:
    """ROC curve (needs ``predictions.csv``) and confusion matrix of a validation split."""
    m, labels, out = ev["metrics"], ev["labels"], []
    if ev["y_true"] is not None:
        roc = figures.roc_figure(
            ev["y_true"], ev["probs"], labels, m.get("threshold"), title="ROC curve (validation)"
        )
        out.append({"id": "roc", **roc})
    if m.get("confusion_matrix"):
        cm = figures.confusion_figure(
            m["confusion_matrix"], labels, title="Confusion matrix (validation)"
        )
        out.append({"id": "confusion", **cm})
    return out


def run_results(name: str, folder: Path) -> dict:
    """Everything the dashboard shows for one model folder.

    Args:
        name: The model's name.
        folder: Its model (run) folder.

    Returns:
        ``{"name", "figures": [plotly dicts with "id"], "report": per-class rows,
        "headline": {label: (value, ci)}, "missing": [what is not there], "history", "eval",
        "n"}``.
    """
    out = {
        "name": name,
        "figures": [],
        "report": [],
        "headline": {},
        "missing": [],
        "history": None,
        "eval": None,
        "n": None,
    }
    try:
        ev = load_run_evaluation(folder, SPLIT)
    except ModelLoadError:
        ev = None
    history = ev["history"] if ev else ModelFolder(folder).read_history()
    if history:
        curves = figures.training_figures(history)
        out["figures"] += [{"id": f"curve-{key}", **fig} for key, fig in curves.items()]
        out["history"] = history
    else:
        out["missing"].append("training curves (no training_metrics.csv)")
    if ev is None:
        out["missing"].append("validation results (no eval/val/metrics.json)")
        return out
    out["eval"] = ev
    if ev["y_true"] is None:
        out["missing"].append("ROC curve (no eval/val/predictions.csv)")
    out["figures"] += _evaluation_figures(ev)
    m = ev["metrics"]
    out["report"] = _report_rows(m)
    ci = m.get("ci") or {}
    out["headline"] = {
        label: (m[k], ci.get(k))
        for k, label in zip(HEADLINE, HEADLINE_LABELS)
        if m.get(k) is not None
    }
    out["n"] = m.get("n")
    return out


def comparison(runs: list[dict]) -> list[dict]:
    """Figures comparing the models: headline metrics with 95% intervals, validation curves,
    ROC curves (model ``i`` has colour ``i`` in each).

    Args:
        runs: :func:`run_results` of each model.

    Returns:
        Plotly dicts with ``"id"`` (``compare-metrics``, ``compare-val_acc``,
        ``compare-val_auc``, ``compare-val_loss``, ``compare-roc``), each where some model has
        the data.
    """
    merged = [{**(r["eval"] or {}), "name": r["name"], "history": r["history"]} for r in runs]
    figs = {
        "metrics": figures.compare_metrics_figure(
            merged, title="Validation metrics (95% bootstrap intervals)"
        ),
        **figures.compare_curve_figures(merged),
        "roc": figures.compare_roc_figure(merged, title="ROC curves (validation)"),
    }
    return [{"id": f"compare-{key}", **fig} for key, fig in figs.items() if fig]
