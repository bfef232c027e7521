"""Every evaluation figure, computed once, as a Plotly figure dict.

A figure is ``{"data": [traces], "layout": {...}}`` made of plain JSON values (lists, rounded
floats, ``None`` for missing points), so one renderer draws it wherever it goes: plotly.js in
``report.html`` / ``compare.html`` (embedded inline, the files work offline) and on the web
app's ``/dashboard`` (served locally). Plotly's mode bar gives the PNG download of each figure.

The maths comes from scikit-learn (``roc_curve``, ``precision_recall_curve``, ...) and
:mod:`medlens.evaluation`; this module only arranges the results. The colour table, the layout
and the names of the headline metrics are defined here once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from medlens.evaluation.calibration import reliability_curve
from medlens.evaluation.metrics import _validate, expected_calibration_error, predict_labels

__all__ = [
    "COLORS",
    "HEADLINE",
    "HEADLINE_LABELS",
    "METRIC_LABELS",
    "TITLES",
    "layout",
    "figure",
    "evaluation_figures",
    "roc_figure",
    "pr_figure",
    "confusion_figure",
    "density_figure",
    "reliability_figure",
    "training_figures",
    "compare_metrics_figure",
    "compare_curve_figures",
    "compare_roc_figure",
]

#: The one colour table (matplotlib's tab10): run ``i`` / class ``i`` is ``COLORS[i % 10]``.
COLORS = [
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
_GREY = "#999999"
_INK = "#1f2933"
_DIGITS = 5  # significant digits kept in the JSON

#: Display names of the metrics in ``metrics.json`` (reports, comparisons, the dashboard).
METRIC_LABELS = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "auc": "AUC (ROC; macro over classes if more than two)",
    "sensitivity": "Sensitivity (recall)",
    "specificity": "Specificity",
    "precision": "Precision (PPV)",
    "f1": "F1",
    "f2": "F2",
    "log_loss": "Log loss",
    "brier": "Brier score",
    "ece": "ECE (15 bins)",
}
#: The headline metrics compared across runs (bar chart, dashboard table).
HEADLINE = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "f1")
HEADLINE_LABELS = [METRIC_LABELS[k] for k in HEADLINE]

#: Figure titles of a single evaluation (report section titles and the figures' own titles).
TITLES = {
    "roc": "ROC curve",
    "pr": "Precision–recall curve",
    "confusion": "Confusion matrix",
    "density": "Score distributions",
    "reliability": "Reliability diagram",
    "training": "Training curves",
}

_UNIT = [-0.01, 1.01]  # axis range of a probability / rate


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------
def _clean(obj: Any) -> Any:
    """Plain JSON values: lists, ints, floats rounded to ``_DIGITS`` significant digits,
    ``None`` for NaN / inf (``JSON.parse`` rejects ``NaN``)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(f"{float(obj):.{_DIGITS}g}") if math.isfinite(obj) else None
    return obj


def layout(
    title: str, xtitle: str = "", ytitle: str = "", *, subtitle: str | None = None, **extra: Any
) -> dict:
    """The shared Plotly layout; ``extra`` entries that are dicts are merged into the defaults.

    Args:
        title: Figure title.
        xtitle: Title of the x axis.
        ytitle: Title of the y axis.
        subtitle: Optional smaller line under the title.
        **extra: More layout keys (``xaxis={"range": [0, 1]}`` keeps the axis title).

    Returns:
        The layout dict.
    """
    out: dict[str, Any] = {
        # Above the plot area, below the mode bar (which sits in the figure's top corner).
        "title": {
            "text": title,
            "x": 0,
            "xref": "paper",
            "y": 1,
            "yref": "paper",
            "yanchor": "bottom",
            "pad": {"b": 14},
        },
        "xaxis": {"title": {"text": xtitle}, "automargin": True, "zeroline": False},
        "yaxis": {"title": {"text": ytitle}, "automargin": True, "zeroline": False},
        "margin": {"l": 60, "r": 20, "t": 100 if subtitle else 80, "b": 50},
        "legend": {"orientation": "h", "x": 0, "y": -0.28, "yanchor": "top"},
        "height": 420,
        "font": {"family": "-apple-system, Segoe UI, Roboto, Helvetica, Arial", "size": 12},
        "colorway": COLORS,
        "hovermode": "closest",
    }
    if subtitle:  # drawn under the title: lift both clear of the plot
        out["title"].update(subtitle={"text": subtitle}, pad={"b": 34})
    for key, value in extra.items():
        base = out.get(key)
        out[key] = (
            {**base, **value} if isinstance(value, dict) and isinstance(base, dict) else value
        )
    return out


def figure(data: list[dict], fig_layout: dict) -> dict:
    """A Plotly figure dict of plain, rounded JSON values."""
    return _clean({"data": data, "layout": fig_layout})


def _line(x, y, name: str, color: str, *, dash: str = "solid", width: float = 2, **kw) -> dict:
    return {
        "type": "scatter",
        "mode": "lines",
        "x": x,
        "y": y,
        "name": name,
        "line": {"color": color, "dash": dash, "width": width},
        **kw,
    }


def _chance() -> dict:
    return _line([0, 1], [0, 1], "chance", _GREY, dash="dash", width=1, hoverinfo="skip")


def _note(text: str) -> dict:
    """A centred message on an empty figure (e.g. a curve that is undefined)."""
    return {"text": text, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5, "showarrow": False}


def _rate_axes(xtitle: str, ytitle: str) -> dict:
    return {
        "xaxis": {"title": {"text": xtitle}, "range": _UNIT},
        "yaxis": {"title": {"text": ytitle}, "range": _UNIT},
    }


def _vline(x: float, *, dash: str, name: str | None = None) -> dict:
    """A vertical line over the whole plot height (a layout shape)."""
    shape = {
        "type": "line",
        "xref": "x",
        "yref": "paper",
        "x0": x,
        "x1": x,
        "y0": 0,
        "y1": 1,
        "line": {"dash": dash, "color": "#666666", "width": 1.2},
    }
    return {**shape, "name": name, "showlegend": True} if name else shape


def _sens_spec(y_bin: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    tn, fp, fn, tp = confusion_matrix(y_bin, pred, labels=[0, 1]).ravel()
    return tp / max(tp + fn, 1), tn / max(tn + fp, 1)


def _panels(n: int, ncols: int) -> list[tuple[str, str, dict]]:
    """Axis references and layout entries of ``n`` panels on a grid (row by row)."""
    nrows = -(-n // ncols)
    out = []
    for i in range(n):
        r, c = divmod(i, ncols)
        suffix = "" if i == 0 else str(i + 1)
        x0, x1 = c / ncols + 0.04, (c + 1) / ncols - 0.04
        y0, y1 = 1 - (r + 1) / nrows + 0.1 / nrows, 1 - r / nrows - 0.04 / nrows
        axes = {
            f"xaxis{suffix}": {"domain": [x0, x1], "anchor": f"y{suffix}", "automargin": True},
            f"yaxis{suffix}": {"domain": [y0, y1], "anchor": f"x{suffix}", "automargin": True},
        }
        out.append((f"x{suffix}", f"y{suffix}", axes))
    return out


# --------------------------------------------------------------------------------------
# one evaluation
# --------------------------------------------------------------------------------------
def _binary_roc(y: np.ndarray, p: np.ndarray, labels: list[str], threshold: float) -> list[dict]:
    fpr, tpr, _ = roc_curve(y, p[:, 1])
    data = [_line(fpr, tpr, f"{labels[1]} (AUC = {roc_auc_score(y, p[:, 1]):.3f})", COLORS[0])]
    marks = [(threshold, "circle", COLORS[3])]
    if threshold != 0.5:
        marks.append((0.5, "square-open", "#666666"))
    for t, symbol, color in marks:
        sens, spec = _sens_spec(y, (p[:, 1] >= t).astype(int))
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "x": [1 - spec],
                "y": [sens],
                "name": f"threshold {t:.3f}: sens {sens:.2f}, spec {spec:.2f}",
                "marker": {"symbol": symbol, "size": 11, "color": color, "line": {"width": 2}},
            }
        )
    return data


def _multiclass_roc(y: np.ndarray, p: np.ndarray, labels: list[str]) -> list[dict]:
    k = p.shape[1]
    onehot = np.eye(k, dtype=int)[y]
    grid, tprs, aucs, data = np.linspace(0, 1, 201), [], [], []
    for c in range(k):
        if not 0 < onehot[:, c].sum() < len(y):
            continue
        fpr, tpr, _ = roc_curve(onehot[:, c], p[:, c])
        a = roc_auc_score(onehot[:, c], p[:, c])
        tprs.append(np.interp(grid, fpr, tpr))
        aucs.append(a)
        data.append(_line(fpr, tpr, f"{labels[c]} (AUC = {a:.3f})", COLORS[c % 10], width=1.5))
    if not data:
        return []
    fpr, tpr, _ = roc_curve(onehot.ravel(), p.ravel())
    micro = roc_auc_score(onehot.ravel(), p.ravel())
    macro_tpr = np.mean(tprs, axis=0)
    macro_tpr[0] = 0.0
    data.append(_line(fpr, tpr, f"micro-average (AUC = {micro:.3f})", _INK, dash="dot"))
    data.append(_line(grid, macro_tpr, f"macro-average (AUC = {np.mean(aucs):.3f})", _INK))
    return data


def roc_figure(
    y_true: ArrayLike,
    probs: ArrayLike,
    labels: Sequence[str],
    threshold: float | None = None,
    *,
    title: str = TITLES["roc"],
) -> dict:
    """ROC curve: binary with the operating point (and 0.5), multi-class one-vs-rest per class
    with micro- and macro-averages.

    Args:
        y_true: ``(N,)`` integer labels.
        probs: ``(N, K)`` class probabilities.
        labels: Class names.
        threshold: Binary decision threshold (``None``: 0.5); ignored for multi-class.
        title: Figure title.

    Returns:
        The figure; a note replaces the curves when only one class is present.
    """
    y, p = _validate(y_true, probs, labels)
    labels = [str(s) for s in labels]
    if p.shape[1] == 2:
        t = 0.5 if threshold is None else float(threshold)
        curves = _binary_roc(y, p, labels, t) if len(np.unique(y)) == 2 else []
    else:
        curves = _multiclass_roc(y, p, labels)
    fig_layout = layout(
        title,
        **_rate_axes("1 − specificity (false-positive rate)", "sensitivity (true-positive rate)"),
    )
    if not curves:
        fig_layout["annotations"] = [_note("ROC undefined: only one class present")]
    return figure([_chance(), *curves], fig_layout)


def pr_figure(
    y_true: ArrayLike,
    probs: ArrayLike,
    labels: Sequence[str],
    threshold: float | None = None,
    *,
    title: str = TITLES["pr"],
) -> dict:
    """Precision–recall curve per positive class, its prevalence (dashed) and, for a binary
    task, the operating point."""
    y, p = _validate(y_true, probs, labels)
    labels = [str(s) for s in labels]
    k = p.shape[1]
    data = []
    for c in [1] if k == 2 else range(k):
        yc = (y == c).astype(int)
        if yc.sum() == 0:
            continue
        prec, rec, _ = precision_recall_curve(yc, p[:, c], drop_intermediate=True)
        ap = average_precision_score(yc, p[:, c])
        color = COLORS[(0 if k == 2 else c) % 10]
        data.append(_line(rec, prec, f"{labels[c]} (AP = {ap:.3f})", color, legendgroup=str(c)))
        prevalence = float(yc.mean())
        name = f"prevalence of {labels[c]} ({prevalence:.3f})"
        data.append(
            _line([0, 1], [prevalence] * 2, name, color, dash="dash", width=1, legendgroup=str(c))
            | {"showlegend": False}
        )
    fig_layout = layout(title, **_rate_axes("recall (sensitivity)", "precision (PPV)"))
    if not data:
        fig_layout["annotations"] = [_note("no positive cases: precision-recall undefined")]
    elif k == 2:
        t = 0.5 if threshold is None else float(threshold)
        pred = predict_labels(p, t)
        if pred.any():
            rec, prec = recall_score(y, pred), precision_score(y, pred)
            data.append(
                {
                    "type": "scatter",
                    "mode": "markers",
                    "x": [rec],
                    "y": [prec],
                    "name": f"threshold {t:.3f}: recall {rec:.2f}, precision {prec:.2f}",
                    "marker": {"size": 11, "color": COLORS[3]},
                }
            )
    return figure(data, fig_layout)


def confusion_figure(
    cm: ArrayLike, labels: Sequence[str], *, title: str = TITLES["confusion"]
) -> dict:
    """Confusion matrix as a heatmap of row percentages, each cell labelled with its count.

    Args:
        cm: ``(K, K)`` counts, rows the true class and columns the predicted class.
        labels: Class names.
        title: Figure title.
    """
    z = np.asarray(cm, dtype=float)
    rows = z.sum(1, keepdims=True)
    pct = np.divide(z, rows, out=np.zeros_like(z), where=rows > 0) * 100
    text = [[f"{int(v)}<br>{q:.1f}%" for v, q in zip(rv, rq)] for rv, rq in zip(z, pct)]
    labels = [str(s) for s in labels]
    heat = {
        "type": "heatmap",
        "z": pct,
        "x": labels,
        "y": labels,
        "customdata": z.astype(int),
        "text": text,
        "texttemplate": "%{text}",
        "colorscale": [[0, "#f7fbff"], [1, "#4a90c8"]],  # light: the dark text stays readable
        "zmin": 0,
        "zmax": 100,
        "colorbar": {"title": {"text": "% of true class"}},
        "hovertemplate": "true %{y}, predicted %{x}: %{customdata} (%{z:.1f}%)<extra></extra>",
    }
    # Categorical axes: labels such as "0" / "1" are names, not numbers.
    fig_layout = layout(
        title,
        xaxis={"title": {"text": "predicted class"}, "type": "category"},
        yaxis={"title": {"text": "true class"}, "type": "category", "autorange": "reversed"},
    )
    return figure([heat], fig_layout)


def _histogram(values: np.ndarray, name: str, color: str, xref: str, yref: str) -> dict:
    edges = np.linspace(0, 1, 31)
    heights, _ = np.histogram(values, bins=edges, density=True)
    return {
        "type": "bar",
        "x": (edges[:-1] + edges[1:]) / 2,
        "y": heights,
        "width": edges[1] - edges[0],
        "name": f"{name} (n={len(values)})",
        "opacity": 0.5,
        "marker": {"color": color, "line": {"color": color, "width": 1}},
        "xaxis": xref,
        "yaxis": yref,
        "hovertemplate": "p %{x:.3f}: density %{y:.2f}<extra>" + name + "</extra>",
    }


def density_figure(
    y_true: ArrayLike,
    probs: ArrayLike,
    labels: Sequence[str],
    threshold: float | None = None,
    *,
    title: str = TITLES["density"],
) -> dict:
    """Histograms (densities) of the predicted probability split by the true class: binary,
    p(positive) with the threshold; multi-class, one panel per class against all others."""
    y, p = _validate(y_true, probs, labels)
    labels = [str(s) for s in labels]
    k = p.shape[1]
    classes = [1] if k == 2 else list(range(k))
    panels = _panels(len(classes), min(len(classes), 3))
    data: list[dict] = []
    fig_layout = layout(title, barmode="overlay", bargap=0)
    for c, (xref, yref, axes) in zip(classes, panels):
        classes_of: list[tuple[np.ndarray, str | None, str]]
        if k == 2:
            classes_of = [(y == 0, labels[0], COLORS[0]), (y == 1, labels[1], COLORS[3])]
        else:
            classes_of = [(y != c, None, _GREY), (y == c, labels[c], COLORS[c % 10])]
        groups = [(m, f"true {n}" if n else "other classes", col) for m, n, col in classes_of]
        data += [_histogram(p[m, c], n, col, xref, yref) for m, n, col in groups if m.any()]
        axes[f"xaxis{xref[1:]}"].update(title={"text": f"predicted p({labels[c]})"}, range=[0, 1])
        axes[f"yaxis{yref[1:]}"].update(title={"text": "density"})
        fig_layout.update(axes)
    if k == 2:
        t = 0.5 if threshold is None else float(threshold)
        top = max([max(d["y"], default=0) for d in data], default=1) * 1.05
        data.append(_line([t, t], [0, top], f"threshold {t:.3f}", "#000000", dash="dash"))
    else:
        nrows = -(-k // 3)
        fig_layout["height"] = 320 * nrows + 80
        fig_layout["legend"]["y"] = -0.28 / nrows
    return figure(data, fig_layout)


def reliability_figure(
    y_true: ArrayLike,
    probs: ArrayLike,
    labels: Sequence[str],
    *,
    title: str = TITLES["reliability"],
) -> dict:
    """Reliability diagram (10 uniform bins) above the count of images per bin; the subtitle
    gives the ECE (top-class confidence, 15 bins)."""
    y, p = _validate(y_true, probs, labels)
    labels = [str(s) for s in labels]
    binary = p.shape[1] == 2
    mean_pred, frac_pos, _ = reliability_curve(y, p, n_bins=10)
    score = p[:, 1] if binary else p.max(axis=1)  # what reliability_curve bins
    edges = np.linspace(0, 1, 11)
    counts, _ = np.histogram(score, bins=edges)
    data = [
        _line([0, 1], [0, 1], "perfectly calibrated", _GREY, dash="dash", width=1),
        {**_line(mean_pred, frac_pos, "model", COLORS[0]), "mode": "lines+markers"},
        {
            "type": "bar",
            "x": (edges[:-1] + edges[1:]) / 2,
            "y": counts,
            "width": 0.09,
            "name": "images per bin",
            "marker": {"color": COLORS[0], "opacity": 0.6},
            "yaxis": "y2",
            "showlegend": False,
        },
    ]
    ece = expected_calibration_error(y, p)
    xtitle = f"predicted p({labels[1]})" if binary else "confidence (top-class probability)"
    fig_layout = layout(
        title,
        subtitle=f"ECE = {ece:.3f} (top-class confidence, 15 bins)",
        xaxis={"title": {"text": xtitle}, "range": [0, 1], "anchor": "y2"},
        yaxis={
            "title": {"text": f"observed fraction {labels[1]}" if binary else "observed accuracy"},
            "range": _UNIT,
            "domain": [0.32, 1],
        },
        yaxis2={"title": {"text": "images"}, "domain": [0, 0.22], "anchor": "x"},
        legend={"x": 0.01, "y": 0.99, "yanchor": "top", "orientation": "v"},
        height=480,
    )
    return figure(data, fig_layout)


def evaluation_figures(
    y_true: ArrayLike, probs: ArrayLike, labels: Sequence[str], threshold: float | None
) -> dict[str, dict]:
    """The figures of one evaluation.

    Args:
        y_true: ``(N,)`` integer labels.
        probs: ``(N, K)`` class probabilities.
        labels: Class names.
        threshold: Binary decision threshold (``None``: 0.5); ignored for multi-class.

    Returns:
        ``{"roc", "pr", "confusion", "density", "reliability"}`` to figure dicts; the
        confusion matrix is computed at ``threshold`` (binary) or argmax.
    """
    y, p = _validate(y_true, probs, labels)
    labels = [str(s) for s in labels]
    k = p.shape[1]
    t = (0.5 if threshold is None else float(threshold)) if k == 2 else None
    cm = confusion_matrix(y, predict_labels(p, t), labels=list(range(k)))
    return {
        "roc": roc_figure(y, p, labels, t),
        "pr": pr_figure(y, p, labels, t),
        "confusion": confusion_figure(
            cm, labels, title=TITLES["confusion"] + (f" (threshold {t:.3f})" if k == 2 else "")
        ),
        "density": density_figure(y, p, labels, t),
        "reliability": reliability_figure(y, p, labels),
    }


# --------------------------------------------------------------------------------------
# training history
# --------------------------------------------------------------------------------------
# figure key: (title, y-axis title, [(history column, trace name)])
_TRAINING = {
    "acc": (
        "Accuracy per epoch",
        "accuracy / AUC",
        [("train_acc", "train"), ("val_acc", "validation"), ("val_auc", "validation AUC")],
    ),
    "loss": ("Loss per epoch", "loss", [("train_loss", "train"), ("val_loss", "validation")]),
    "lr": ("Learning rate per epoch", "learning rate", [("lr", "learning rate")]),
}
_VALIDATION_TITLES = {
    "val_acc": ("Validation accuracy per epoch", "accuracy"),
    "val_auc": ("Validation AUC per epoch", "AUC"),
    "val_loss": ("Validation loss per epoch", "loss"),
}


def _series(history: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) in (None, "") else float(r[key]) for r in history])


def _epochs(history: list[dict]) -> np.ndarray:
    return np.array(
        [
            i + 1 if r.get("epoch") in (None, "") else float(r["epoch"])
            for i, r in enumerate(history)
        ]
    )


def _epoch_ticks(n_epochs: int) -> dict:
    """Whole-number epoch ticks, at most about 12."""
    return {"dtick": max(1, math.ceil(n_epochs / 12))}


def _best_epoch(history: list[dict], epochs: np.ndarray) -> tuple[float, str] | None:
    """The epoch of the best validation AUC (else loss, else accuracy) and its label."""
    for key, pick in (
        ("val_auc", np.nanargmax),
        ("val_loss", np.nanargmin),
        ("val_acc", np.nanargmax),
    ):
        s = _series(history, key)
        if np.isfinite(s).any():
            best = epochs[pick(s)]
            return float(best), f"best {key} (epoch {best:g})"
    return None


def _stage_marks(history: list[dict], epochs: np.ndarray) -> tuple[list[dict], list[dict]]:
    """Dash-dot lines where the training stage changes, each labelled with the new stage."""
    shapes, notes = [], []
    for i in range(1, len(history)):
        stage = history[i].get("stage")
        if stage and stage != history[i - 1].get("stage"):
            x = (epochs[i - 1] + epochs[i]) / 2
            shapes.append(_vline(x, dash="dashdot"))
            notes.append(
                {
                    "text": str(stage),
                    "x": x,
                    "xref": "x",
                    "y": 1,
                    "yref": "paper",
                    "xanchor": "left",
                    "yanchor": "top",
                    "showarrow": False,
                    "font": {"size": 10, "color": "#666666"},
                }
            )
    return shapes, notes


def training_figures(history: list[dict] | None) -> dict[str, dict]:
    """Training curves per epoch: accuracy (and validation AUC), loss, learning rate.

    Training is dashed, validation solid; a dotted line marks the best validation epoch and
    dash-dot lines the start of each training stage.

    Args:
        history: Rows of ``training_metrics.csv`` (``epoch, stage, train_loss, train_acc,
            val_loss, val_acc, val_auc, lr``; missing keys and values allowed).

    Returns:
        ``{"acc", "loss", "lr"}`` to figure dicts, each only where the history has values.
    """
    if not history:
        return {}
    epochs = _epochs(history)
    best = _best_epoch(history, epochs)
    shapes, notes = _stage_marks(history, epochs)
    tick = _epoch_ticks(len(epochs))
    out = {}
    for name, (title, ytitle, columns) in _TRAINING.items():
        data = []
        for i, (key, trace) in enumerate(columns):
            s = _series(history, key)
            if np.isfinite(s).any():
                dash = "dash" if key.startswith("train") else "solid"
                data.append(
                    {
                        **_line(epochs, s, trace, COLORS[i], dash=dash),
                        "mode": "lines+markers",
                        "marker": {"size": 5},
                        "connectgaps": True,
                    }
                )
        if not data:
            continue
        marks = list(shapes)
        if best is not None and name != "lr":
            marks.append(_vline(best[0], dash="dot", name=best[1]))
        fig_layout = layout(title, "epoch", ytitle, xaxis=tick, shapes=marks, annotations=notes)
        if name == "lr":
            # Readable ticks ("3.0e-4"), not plotly's bare log-axis digits ("2", "100µ").
            fig_layout["yaxis"].update(type="log", tickformat=".1e", nticks=6)
        out[name] = figure(data, fig_layout)
    return out


# --------------------------------------------------------------------------------------
# comparison of runs
# --------------------------------------------------------------------------------------
def compare_metrics_figure(runs: Sequence[dict], *, title: str = "Headline metrics") -> dict | None:
    """Grouped bars of the :data:`HEADLINE` metrics per run with bootstrap-interval error bars.

    Args:
        runs: ``[{"name": str, "metrics": dict | None, ...}]``; run ``i`` has ``COLORS[i]``.
        title: Figure title.

    Returns:
        The figure, or ``None`` when no run has metrics.
    """
    data = []
    for i, run in enumerate(runs):
        m = run.get("metrics")
        if not m:
            continue
        ci = m.get("ci") or {}
        vals = [m.get(k) for k in HEADLINE]
        lo, hi = [], []
        for k, v in zip(HEADLINE, vals):
            interval = ci.get(k) if v is not None else None
            if interval and None not in interval:
                lo.append(max(v - interval[0], 0))
                hi.append(max(interval[1] - v, 0))
            else:
                lo.append(0)
                hi.append(0)
        data.append(
            {
                "type": "bar",
                "name": str(run["name"]),
                "x": HEADLINE_LABELS,
                "y": [np.nan if v is None else v for v in vals],
                "marker": {"color": COLORS[i % 10]},
                "error_y": {"type": "data", "symmetric": False, "array": hi, "arrayminus": lo},
            }
        )
    if not data:
        return None
    fig_layout = layout(
        title, "", "value (error bars: bootstrap CI)", barmode="group", yaxis={"range": [0, 1.05]}
    )
    return figure(data, fig_layout)


def compare_curve_figures(runs: Sequence[dict]) -> dict[str, dict]:
    """Validation accuracy, AUC and loss per epoch, one line per run that has a history.

    Returns:
        ``{"val_acc", "val_auc", "val_loss"}`` to figure dicts, each only where some run has
        that column.
    """
    out = {}
    for key, (title, ytitle) in _VALIDATION_TITLES.items():
        data = []
        for i, run in enumerate(runs):
            history = run.get("history") or []
            s = _series(history, key)
            if np.isfinite(s).any():
                data.append(
                    {
                        **_line(_epochs(history), s, str(run["name"]), COLORS[i % 10]),
                        "connectgaps": True,
                    }
                )
        if data:
            longest = max(len(run.get("history") or []) for run in runs)
            out[key] = figure(data, layout(title, "epoch", ytitle, xaxis=_epoch_ticks(longest)))
    return out


def compare_roc_figure(runs: Sequence[dict], *, title: str = "ROC curves") -> dict | None:
    """ROC curve of each run that has predictions (multi-class runs: micro-average).

    Args:
        runs: ``[{"name", "y_true": array | None, "probs": array | None, ...}]``.
        title: Figure title.

    Returns:
        The figure, or ``None`` when no run has predictions with both outcomes.
    """
    data = []
    for i, run in enumerate(runs):
        if run.get("y_true") is None or run.get("probs") is None:
            continue
        y, p = _validate(run["y_true"], run["probs"])
        if p.shape[1] == 2:
            yb, s, tag = (y == 1).astype(int), p[:, 1], ""
        else:
            yb, s, tag = np.eye(p.shape[1], dtype=int)[y].ravel(), p.ravel(), " micro-average"
        if not 0 < yb.sum() < len(yb):
            continue
        fpr, tpr, _ = roc_curve(yb, s)
        name = f"{run['name']}{tag} (AUC = {roc_auc_score(yb, s):.3f})"
        data.append(_line(fpr, tpr, name, COLORS[i % 10]))
    if not data:
        return None
    fig_layout = layout(title, **_rate_axes("1 − specificity", "sensitivity"))
    return figure([_chance(), *data], fig_layout)


# --------------------------------------------------------------------------------------
# hyperparameter search
# --------------------------------------------------------------------------------------
def tune_history_figure(trials: Sequence[dict], *, title: str = "Search history") -> dict | None:
    """Each trial's validation AUC by trial number (pruned trials at their last reported
    value are not shown) and the best value so far.

    Args:
        trials: ``[{"trial": int, "state": str, "value": float | None}]``.
        title: Figure title.

    Returns:
        The figure, or ``None`` when no trial has a value.
    """
    done = [t for t in trials if t.get("value") is not None]
    if not done:
        return None
    xs = [t["trial"] for t in done]
    ys = [t["value"] for t in done]
    best = np.maximum.accumulate(ys)
    data = [
        {"type": "scatter", "mode": "markers", "x": xs, "y": ys, "name": "trial",
         "marker": {"size": 8, "color": COLORS[0]}},
        _line(xs, best, "best so far", COLORS[3], dash="dash") | {"line": {"shape": "hv", "color": COLORS[3], "dash": "dash", "width": 2}},
    ]  # fmt: skip
    return figure(data, layout(title, "trial", "validation AUC", xaxis=_epoch_ticks(max(xs) + 1)))
