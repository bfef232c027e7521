"""The dashboard's data: each served model folder's training and evaluation results.

Everything is read from the files ``medlens train`` writes into a run folder, and
``medlens export --bundle`` into a bundled model: ``training_metrics.csv`` (curves) and
``eval/<split>/{metrics.json,predictions.csv}`` for the carved test and validation splits (ROC,
confusion matrix, classification report). The carved test split comes first: validation chose
the epoch, temperature and threshold, so its figures are optimistic. The figures are the
Plotly dicts of :mod:`medlens.reporting.figures`, the ones ``report.html`` draws; the browser
draws them with the plotly.js of the ``plotly`` package, served locally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlens.artifacts.folders import ModelFolder
from medlens.artifacts.model import read_meta
from medlens.errors import ModelLoadError
from medlens.evaluation.metrics import split_views
from medlens.reporting import figures
from medlens.reporting.compare import load_run_evaluation
from medlens.reporting.figures import HEADLINE, HEADLINE_LABELS

__all__ = ["run_results", "comparison", "HEADLINE_LABELS"]

SPLITS = ("test", "val")


def _report_rows(metrics: dict) -> list[dict]:
    return [
        {"class": c, **{k: v.get(k) for k in ("precision", "recall", "f1", "support")}}
        for c, v in (metrics.get("per_class") or {}).items()
    ]


def _evaluation_figures(ev: dict, title: str) -> list[dict]:
    """ROC curve (needs ``predictions.csv``) and confusion matrix of one evaluated split."""
    m, labels, out = ev["metrics"], ev["labels"], []
    if ev["y_true"] is not None:
        roc = figures.roc_figure(
            ev["y_true"], ev["probs"], labels, m.get("threshold"), title=f"ROC curve ({title})"
        )
        out.append({"id": "roc", **roc})
    if m.get("confusion_matrix"):
        cm = figures.confusion_figure(
            m["confusion_matrix"], labels, title=f"Confusion matrix ({title})"
        )
        out.append({"id": "confusion", **cm})
    return out


def _headline(m: dict) -> dict:
    ci = m.get("ci") or {}
    return {
        label: (m[k], ci.get(k))
        for k, label in zip(HEADLINE, HEADLINE_LABELS)
        if m.get(k) is not None
    }


def _curves_source(text: str | None) -> str | None:
    """Whose training curves a bundle ships, without the trainer's own run names."""
    import re

    if not text:
        return None
    if text.startswith("run "):
        return "the model's own training run"
    members = re.search(r"the first of (\d+)", text)
    if members:
        return f"the first of its {members.group(1)} fold members (the others trained alike)"
    return text


def _evaluations(folder: Path) -> dict[str, dict]:
    out = {}
    for split in SPLITS:
        try:
            out[split] = load_run_evaluation(folder, split)
        except ModelLoadError:
            continue
    return out


def run_results(name: str, folder: Path) -> dict:
    """Everything the dashboard shows for one model folder.

    Args:
        name: The model's name.
        folder: Its model (run or bundled) folder.

    Returns:
        ``{"name", "figures": [plotly dicts with "id"], "report": per-class rows of the first
        split, "splits": [{"split", "title", "role", "warning", "n", "headline": {label:
        (value, ci)}}], carved test first, "missing": [what is not there], "history",
        "eval": the first split's evaluation, "curves": whose curves they are}``.
    """
    out: dict[str, Any] = {"name": name, "figures": [], "report": [], "splits": [], "missing": [],
           "history": None, "eval": None, "curves": None}  # fmt: skip
    evs = _evaluations(folder)
    history = ModelFolder(folder).read_history()
    if history:
        curves = figures.training_figures(history)
        out["figures"] += [{"id": f"curve-{key}", **fig} for key, fig in curves.items()]
        out["history"] = history
        export = read_meta(folder).export
        out["curves"] = _curves_source(export.curves if export is not None else None)
    else:
        out["missing"].append("training curves (no training_metrics.csv)")
    if not evs:
        out["missing"].append("evaluation results (no eval/test or eval/val metrics.json)")
        return out
    views = split_views({split: ev["metrics"] for split, ev in evs.items()})
    for view in views:
        m = view["metrics"]
        out["splits"].append(
            {
                **{k: view[k] for k in ("split", "title", "role", "warning")},
                "n": m.get("n"),
                "headline": _headline(m),
            }  # fmt: skip
        )
    first = evs[views[0]["split"]]
    out["eval"] = {**first, "split_title": views[0]["title"]}
    if first["y_true"] is None:
        out["missing"].append(f"ROC curve (no eval/{views[0]['split']}/predictions.csv)")
    out["figures"] += _evaluation_figures(first, views[0]["title"].lower())
    out["report"] = _report_rows(first["metrics"])
    return out


def comparison(runs: list[dict]) -> list[dict]:
    """Figures comparing the models on each one's first split (carved test where there is
    one): headline metrics with 95% intervals, validation curves, ROC curves (model ``i`` has
    colour ``i`` in each).

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
            merged, title="Each model's carved test split (validation where it has none), 95% CI"
        ),
        **figures.compare_curve_figures(merged),
        "roc": figures.compare_roc_figure(
            merged, title="ROC curves (carved test, or validation where there is none)"
        ),
    }
    return [{"id": f"compare-{key}", **fig} for key, fig in figs.items() if fig]
