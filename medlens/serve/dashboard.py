"""Plotly figures (plain JSON dicts) of a run folder's training and validation results.

Everything is read from files ``medlens train`` writes into a run folder:
``training_metrics.csv`` (curves) and ``eval/val/{metrics.json,predictions.csv}`` (ROC,
confusion matrix, classification report). The browser draws the dicts with the plotly.js
bundled in the ``plotly`` package (served locally).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["run_results", "comparison", "HEADLINE_LABELS"]

_COLORS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
_HEADLINE = [
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("auc", "AUC"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("f1", "F1"),
]
HEADLINE_LABELS = [label for _, label in _HEADLINE]


def _layout(title: str, xtitle: str, ytitle: str, **extra) -> dict:
    return {
        "title": {"text": title},
        "xaxis": {"title": {"text": xtitle}},
        "yaxis": {"title": {"text": ytitle}},
        "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
        "legend": {"orientation": "h", "y": -0.25},
        "height": 360,
        **extra,
    }


def _r(values, digits: int = 4) -> list:
    return [None if v is None or not np.isfinite(v) else round(float(v), digits) for v in values]


def _curve_figures(history: list[dict]) -> list[dict]:
    """Accuracy and loss per epoch, train vs validation, with stage boundaries shaded."""
    x = list(range(1, len(history) + 1))
    stages = [r.get("stage") for r in history]
    shapes = [
        {
            "type": "line",
            "xref": "x",
            "yref": "paper",
            "x0": i + 0.5,
            "x1": i + 0.5,
            "y0": 0,
            "y1": 1,
            "line": {"dash": "dot", "color": "#888"},
        }
        for i in range(1, len(stages))
        if stages[i] != stages[i - 1]
    ]
    figs = []
    for key, title in (("acc", "Accuracy"), ("loss", "Loss")):
        data = []
        for i, (split, name) in enumerate((("train", "train"), ("val", "validation"))):
            ys = [r.get(f"{split}_{key}") for r in history]
            if any(v is not None for v in ys):
                data.append(
                    {
                        "type": "scatter",
                        "mode": "lines+markers",
                        "name": name,
                        "x": x,
                        "y": _r([np.nan if v is None else v for v in ys]),
                        "line": {
                            "color": _COLORS[i],
                            "dash": "dash" if split == "train" else "solid",
                        },
                        "marker": {"size": 4},
                    }
                )
        if data:
            figs.append(
                {
                    "id": f"curve-{key}",
                    "data": data,
                    "layout": _layout(
                        f"{title} per epoch",
                        "epoch (all stages; dotted line: next stage)",
                        title.lower(),
                        shapes=shapes,
                    ),
                }
            )
    return figs


def _roc_figure(
    y_true: np.ndarray, probs: np.ndarray, labels: list[str], threshold: float | None
) -> dict | None:
    from sklearn.metrics import roc_auc_score, roc_curve

    data = [
        {
            "type": "scatter",
            "mode": "lines",
            "name": "chance",
            "x": [0, 1],
            "y": [0, 1],
            "line": {"dash": "dash", "color": "#aaa"},
        }
    ]
    if len(labels) == 2:
        pairs = [(1, labels[1])]
    else:
        pairs = list(enumerate(labels))
    for c, name in pairs:
        yb = (y_true == c).astype(int)
        if not 0 < yb.sum() < len(yb):
            continue
        fpr, tpr, _ = roc_curve(yb, probs[:, c])
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "x": _r(fpr),
                "y": _r(tpr),
                "name": f"{name} (AUC {roc_auc_score(yb, probs[:, c]):.3f})",
                "line": {"color": _COLORS[c % len(_COLORS)]},
            }
        )
        if len(labels) == 2 and threshold is not None:
            pred = probs[:, 1] >= threshold
            sens, spec = pred[yb == 1].mean(), (~pred[yb == 0]).mean()
            data.append(
                {
                    "type": "scatter",
                    "mode": "markers",
                    "x": [round(1 - spec, 4)],
                    "y": [round(sens, 4)],
                    "marker": {"size": 11, "color": "#d62728"},
                    "name": f"threshold {threshold:.3f}",
                }
            )
    if len(data) == 1:
        return None
    return {
        "id": "roc",
        "data": data,
        "layout": _layout(
            "ROC curve (validation)",
            "1 − specificity",
            "sensitivity",
            xaxis={"title": {"text": "1 − specificity"}, "range": [-0.01, 1.01]},
            yaxis={"title": {"text": "sensitivity"}, "range": [-0.01, 1.01]},
        ),
    }


def _confusion_figure(cm: list[list[int]], labels: list[str]) -> dict:
    z = np.asarray(cm, dtype=float)
    rows = z.sum(1, keepdims=True)
    pct = np.divide(z, rows, out=np.zeros_like(z), where=rows > 0) * 100
    text = [[f"{int(v)}<br>{p:.1f}%" for v, p in zip(rv, rp)] for rv, rp in zip(z, pct)]
    # Light-to-mid blue keeps the dark cell text readable; axes are categorical so that
    # labels like "0"/"1" are not read as numbers.
    return {
        "id": "confusion",
        "data": [
            {
                "type": "heatmap",
                "z": pct.round(2).tolist(),
                "x": labels,
                "y": labels,
                "text": text,
                "texttemplate": "%{text}",
                "colorscale": [[0, "#f7fbff"], [1, "#4a90c8"]],
                "zmin": 0,
                "zmax": 100,
                "colorbar": {"title": {"text": "% of row"}},
                "hovertemplate": "true %{y}, predicted %{x}: %{text}<extra></extra>",
            }
        ],
        "layout": _layout(
            "Confusion matrix (validation)",
            "predicted",
            "true",
            xaxis={"title": {"text": "predicted"}, "type": "category"},
            yaxis={
                "title": {"text": "true"},
                "type": "category",
                "autorange": "reversed",
                "automargin": True,
            },
        ),
    }


def _report_rows(metrics: dict) -> list[dict]:
    return [
        {"class": c, **{k: v.get(k) for k in ("precision", "recall", "f1", "support")}}
        for c, v in (metrics.get("per_class") or {}).items()
    ]


def run_results(name: str, folder: Path) -> dict:
    """Everything the dashboard shows for one model folder.

    Returns:
        ``{"name", "figures": [plotly dicts with "id"], "report": per-class rows,
        "headline": {label: (value, ci)}, "missing": [what is not there], "history", "eval"}``.
    """
    from medlens.artifacts.folders import read_history
    from medlens.errors import ModelLoadError
    from medlens.reporting.compare import load_run_evaluation

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
    history = read_history(folder)
    if history:
        out["figures"] += _curve_figures(history)
        out["history"] = history
    else:
        out["missing"].append("training curves (no training_metrics.csv)")
    try:
        ev = load_run_evaluation(folder, "val")
    except ModelLoadError:
        out["missing"].append("validation results (no eval/val/metrics.json)")
        return out
    out["eval"] = ev
    m = ev["metrics"]
    if ev["y_true"] is not None:
        roc = _roc_figure(ev["y_true"], ev["probs"], ev["labels"], m.get("threshold"))
        if roc:
            out["figures"].append(roc)
    else:
        out["missing"].append("ROC curve (no eval/val/predictions.csv)")
    if m.get("confusion_matrix"):
        out["figures"].append(_confusion_figure(m["confusion_matrix"], ev["labels"]))
    out["report"] = _report_rows(m)
    ci = m.get("ci") or {}
    out["headline"] = {label: (m[k], ci.get(k)) for k, label in _HEADLINE if m.get(k) is not None}
    out["n"] = m.get("n")
    return out


def comparison(runs: list[dict]) -> list[dict]:
    """Figures comparing the runs that have results: metric bars with 95% intervals,
    validation accuracy curves, ROC curves."""
    from sklearn.metrics import roc_curve

    with_eval = [r for r in runs if r["eval"] is not None]
    figs = []
    if with_eval:
        data = []
        for i, r in enumerate(with_eval):
            m, ci = r["eval"]["metrics"], r["eval"]["metrics"].get("ci") or {}
            keys = [k for k, _ in _HEADLINE if m.get(k) is not None]
            lo = [m[k] - ci[k][0] if ci.get(k) and None not in ci[k] else 0 for k in keys]
            hi = [ci[k][1] - m[k] if ci.get(k) and None not in ci[k] else 0 for k in keys]
            data.append(
                {
                    "type": "bar",
                    "name": r["name"],
                    "x": keys,
                    "y": _r([m[k] for k in keys]),
                    "marker": {"color": _COLORS[i % len(_COLORS)]},
                    "error_y": {
                        "type": "data",
                        "symmetric": False,
                        "array": _r(hi),
                        "arrayminus": _r(lo),
                    },
                }
            )
        figs.append(
            {
                "id": "compare-metrics",
                "data": data,
                "layout": _layout(
                    "Validation metrics (95% bootstrap intervals)",
                    "",
                    "value",
                    barmode="group",
                    yaxis={"title": {"text": "value"}, "range": [0, 1.05]},
                ),
            }
        )
    curves = [r for r in runs if r["history"]]
    if curves:
        figs.append(
            {
                "id": "compare-curves",
                "data": [
                    {
                        "type": "scatter",
                        "mode": "lines",
                        "name": r["name"],
                        "x": list(range(1, len(r["history"]) + 1)),
                        "y": _r(
                            [
                                np.nan if h.get("val_acc") is None else h["val_acc"]
                                for h in r["history"]
                            ]
                        ),
                        "line": {"color": _COLORS[i % len(_COLORS)]},
                    }
                    for i, r in enumerate(curves)
                ],
                "layout": _layout("Validation accuracy per epoch", "epoch", "accuracy"),
            }
        )
    rocs = []
    for i, r in enumerate(with_eval):
        ev = r["eval"]
        if ev["y_true"] is None:
            continue
        k = ev["probs"].shape[1]
        if k == 2:
            yb, s, tag = (ev["y_true"] == 1).astype(int), ev["probs"][:, 1], ""
        else:
            yb, s, tag = np.eye(k)[ev["y_true"]].ravel(), ev["probs"].ravel(), " (micro-average)"
        if 0 < yb.sum() < len(yb):
            fpr, tpr, _ = roc_curve(yb, s)
            rocs.append(
                {
                    "type": "scatter",
                    "mode": "lines",
                    "name": r["name"] + tag,
                    "x": _r(fpr),
                    "y": _r(tpr),
                    "line": {"color": _COLORS[i % len(_COLORS)]},
                }
            )
    if rocs:
        figs.append(
            {
                "id": "compare-roc",
                "data": rocs,
                "layout": _layout("ROC curves (validation)", "1 − specificity", "sensitivity"),
            }
        )
    return figs
