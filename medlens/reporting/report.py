"""Evaluation reports: ``report.html`` for one evaluation, ``compare.html`` for several runs.

The figures are Plotly figure dicts from :mod:`medlens.reporting.figures` (the web app's
dashboard draws the same dicts). Each HTML file embeds plotly.js inline once, the figures as
JSON and its CSS, so a report works offline and can be mailed or archived as one file; the
mode bar of each figure downloads it as a PNG (no ``plots/`` folder is written).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from numpy.typing import ArrayLike

from medlens.artifacts.folders import COMPARE_CSV, COMPARE_HTML, REPORT_HTML
from medlens.evaluation.metrics import CI_METRICS, SPLIT_ROLES
from medlens.fileio import atomic_write_text, write_csv
from medlens.reporting.figures import (
    METRIC_LABELS,
    TITLES,
    compare_curve_figures,
    compare_metrics_figure,
    compare_roc_figure,
    evaluation_figures,
    training_figures,
    tune_history_figure,
)

__all__ = ["write_report", "write_comparison", "comparison_table", "CAPTIONS", "TITLES"]


CAPTIONS = {
    "roc": "Sensitivity (true-positive rate) against 1 − specificity (false-positive "
    "rate) as the threshold moves from 1 to 0. The diagonal is chance; AUC is the "
    "probability that a random positive case scores higher than a random negative one.",
    "pr": "Precision (positive predictive value) against recall (sensitivity). More telling than "
    "ROC when the positive class is rare: the dashed line is the prevalence, i.e. a "
    "classifier that guesses. AP = average precision.",
    "confusion": "Rows are the true class, columns the predicted class. Each cell shows the count "
    "and the percentage of its row, so the diagonal is each class's recall.",
    "density": "Distribution of the predicted probability, split by the true class. Little "
    "overlap means good separation.",
    "reliability": "Calibration: observed frequency against predicted probability in bins. "
    "Points below the diagonal mean the model is over-confident, above it "
    "under-confident. The lower panel counts images per bin (sparse bins are "
    "noisy).",
    "training": "Loss and accuracy per epoch on training and validation data. A widening gap "
    "between the training and validation curves indicates overfitting; the dotted "
    "line marks the best validation epoch.",
}
_HELP = {
    "accuracy": "fraction of images classified correctly",
    "balanced_accuracy": "mean recall over classes; robust to class imbalance",
    "auc": "ranking quality, independent of the threshold",
    "sensitivity": "fraction of true positives detected",
    "specificity": "fraction of true negatives correctly cleared",
    "precision": "fraction of positive calls that are correct (depends on prevalence)",
    "f1": "harmonic mean of precision and recall",
    "f2": "like F1 but weights recall 4× as much as precision",
    "log_loss": "penalises confident mistakes; lower is better",
    "brier": "mean squared error of the probabilities; lower is better",
    "ece": "mean gap between confidence and accuracy; lower is better",
}


# The rows of the headline table, in order.
_REPORT_METRICS = list(METRIC_LABELS)
_AT05_KEYS = [k for k in CI_METRICS if k != "auc"]  # threshold-dependent ones
_AT05_HEAD = [
    "Threshold",
    "Accuracy",
    "Balanced acc.",
    "Sensitivity",
    "Specificity",
    "Precision",
    "F1",
    "F2",
]

# compare.html: (figure block, title, caption)
_COMPARE_FIGURES = [
    (
        "metrics",
        "Metrics",
        "Headline metrics per run; error bars are bootstrap confidence intervals. "
        "Overlapping intervals mean the difference may be noise.",
    ),
    ("training", "Training", "Validation metrics per epoch for each run."),
    ("roc", "ROC", "ROC curves of the runs (multi-class runs: micro-average)."),
]
# compare.html table: (metrics key, higher is better)
_COMPARE_COLUMNS = [
    ("accuracy", True),
    ("balanced_accuracy", True),
    ("auc", True),
    ("sensitivity", True),
    ("specificity", True),
    ("f1", True),
    ("ece", False),
    ("brier", False),
]


# --------------------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------------------
def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "—"
    if isinstance(x, str):
        return x
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.{digits}f}"


def _ci(metrics: dict, key: str, sep: str = " – ") -> str:
    ci = (metrics.get("ci") or {}).get(key)
    return f"{_f(ci[0])}{sep}{_f(ci[1])}" if ci else ""


def _threshold_text(metrics: dict, model_info: dict) -> str:
    t = metrics.get("threshold")
    if t is None:
        return "multi-class: predicted class = highest probability (argmax)"
    op = model_info.get("operating_point") or {}
    method = model_info.get("threshold_method")
    if op.get("description"):
        lo, hi = op["threshold_ci"]
        how = (
            f"operating point {op['description']}; on {op['n']} {op['measured_on']} images the "
            f"threshold's 95% interval is {_f(lo)}–{_f(hi)}"
        )
        if op.get("warning"):
            how += f". Warning: {op['warning']}"
    elif method:
        how = f"chosen by: {method}"
    elif abs(t - 0.5) < 1e-12:
        how = "default 0.5 (not tuned)"
    else:
        how = "fixed (selection method not recorded)"
    return f"p({metrics['labels'][1]}) ≥ {_f(t)} — {how}"


def _env() -> Environment:
    return Environment(
        loader=PackageLoader("medlens", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )


@lru_cache(maxsize=1)
def _plotly_js() -> Markup:
    """The plotly.js bundled with the ``plotly`` package, safe inside a ``<script>``."""
    import plotly

    source = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text("utf-8")
    return Markup(re.sub(r"</(script)", r"<\\/\1", source, flags=re.IGNORECASE))


def _render(template: str, path: Path, blocks: list[dict], **context: Any) -> Path:
    """Render ``template`` with its figure blocks into ``path``.

    Args:
        template: Template name under ``medlens/templates``.
        path: File written (atomically).
        blocks: ``[{"name", "title", "caption", "figures": {key: figure dict}}]``; each figure
            is drawn into a ``<div id="fig-<name>[-<key>]">``.
        **context: The template's other variables.
    """
    plots: list[dict] = []
    figures: dict[str, dict] = {}
    for block in blocks:
        figs = block["figures"]
        ids = [f"fig-{block['name']}" + ("" if k == block["name"] else f"-{k}") for k in figs]
        figures.update(zip(ids, figs.values()))
        wide = len(ids) > 1 or any("xaxis2" in f["layout"] for f in figs.values())
        plots.append(
            {**{k: block[k] for k in ("name", "title", "caption")}, "ids": ids, "wide": wide}
        )
    html = (
        _env()
        .get_template(template)
        .render(
            generated=datetime.now().strftime("%Y-%m-%d %H:%M"),
            plots=plots,
            figure_data=figures,
            plotly_js=_plotly_js(),
            **context,
        )
    )
    atomic_write_text(path, html)
    return path


# --------------------------------------------------------------------------------------
# single report
# --------------------------------------------------------------------------------------
def _captions(binary: bool) -> dict[str, str]:
    captions = dict(CAPTIONS)
    if binary:
        captions["roc"] += " The dot marks the operating threshold (square: 0.5)."
        captions["density"] += (
            " Cases on the wrong side of the dashed threshold line are the "
            "errors: positives to its left are missed."
        )
    else:
        captions["roc"] += (
            " One-vs-rest curve per class, plus the micro-average (all "
            "decisions pooled) and macro-average (mean of class curves)."
        )
        captions["density"] += " One panel per class: that class against all others."
    return captions


def _at05_table(metrics: dict, binary: bool) -> dict | None:
    """Metrics at the operating threshold against those at the default 0.5 (binary)."""
    if not binary or not metrics.get("at_0_5"):
        return None
    return {
        "keys": _AT05_HEAD,
        "rows": [
            [f"{_f(metrics.get('threshold'))} (operating)"]
            + [_f(metrics.get(k)) for k in _AT05_KEYS],
            ["0.500 (default)"] + [_f(metrics["at_0_5"].get(k)) for k in _AT05_KEYS],
        ],
    }


def _tables(metrics: dict, labels: list[str], model_info: dict) -> dict:
    """The report's text and tables (everything but the figures)."""
    binary = len(labels) == 2
    return {
        "model_info": [
            (k.replace("_", " ").capitalize(), v)
            for k, v in model_info.items()
            if v is not None and not isinstance(v, dict)
        ],
        "n": metrics.get("n"),
        "labels": labels,
        "binary": binary,
        "task": f"binary (positive class: {labels[1]})" if binary else f"{len(labels)}-class",
        "ci_pct": f"{100 * metrics.get('ci_level', 0.95):g}",
        "n_bootstrap": metrics.get("n_bootstrap"),
        "headline": [
            {
                "name": METRIC_LABELS[k],
                "value": _f(metrics.get(k)),
                "ci": _ci(metrics, k),
                "help": _HELP[k],
            }
            for k in _REPORT_METRICS
        ],
        "threshold_text": _threshold_text(metrics, model_info),
        "at05": _at05_table(metrics, binary),
        "per_class": [
            {"label": lab, **{k: _f(v) for k, v in row.items()}}
            for lab, row in (metrics.get("per_class") or {}).items()
        ],
        "cm": metrics.get("confusion_matrix") or [],
        "subgroups": _subgroup_tables(metrics.get("subgroups") or {}),
    }


_SUBGROUP_COLUMNS = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity")


def _subgroup_tables(subgroups: dict) -> list[dict]:
    """One table per attribute: each group's figures with intervals, the largest gaps."""
    tables = []
    for attr, res in subgroups.items():
        rows = [
            {
                "value": value,
                "n": g["n"],
                "cells": [(_f(g.get(k)), _ci(g, k)) for k in _SUBGROUP_COLUMNS],
                "warning": g["warning"],
                "note": g.get("note"),
            }
            for value, g in res["groups"].items()
        ]
        gaps = [
            f"{METRIC_LABELS[k]} {_f(gap['gap'])} ({gap['highest']} vs {gap['lowest']})"
            for k, gap in res["largest_gap"].items()
        ]
        tables.append(
            {
                "attribute": attr,
                "columns": [METRIC_LABELS[k] for k in _SUBGROUP_COLUMNS],
                "rows": rows,
                "gaps": gaps,
                "unknown": res["unknown"],
            }
        )
    return tables


def write_report(
    out_dir: str | Path,
    metrics: dict,
    y_true: ArrayLike,
    probs: ArrayLike,
    labels: Sequence[str],
    *,
    threshold: float | None,
    history: list[dict] | None = None,
    title: str = "MedLens evaluation",
    model_info: dict | None = None,
) -> Path:
    """Write a self-contained HTML evaluation report (``report.html``).

    Args:
        out_dir: Output folder (created).
        metrics: Output of :func:`medlens.evaluation.metrics.compute_metrics` on the same data.
        y_true: ``(N,)`` integer labels.
        probs: ``(N, K)`` class probabilities.
        labels: Class names.
        threshold: Binary decision threshold used for the figures (``None``: 0.5 / argmax).
        history: Optional training history rows for the training curves.
        title: Report title.
        model_info: Optional facts shown in the header (model name, version, dataset, date,
            split, temperature, ...). ``operating_point`` (the record of
            :func:`~medlens.evaluation.operating_point.choose_operating_point`) or
            ``threshold_method`` explains the threshold.

    Returns:
        Path of ``report.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [str(s) for s in labels]
    model_info = dict(model_info or {})
    captions = _captions(len(labels) == 2)
    named = {n: {n: fig} for n, fig in evaluation_figures(y_true, probs, labels, threshold).items()}
    training = training_figures(history)
    if training:
        named["training"] = training
    blocks = [
        {"name": n, "title": TITLES[n], "caption": captions[n], "figures": figs}
        for n, figs in named.items()
    ]
    context = _tables(metrics, labels, model_info)
    return _render("report.html", out / REPORT_HTML, blocks, title=title, **context)


# --------------------------------------------------------------------------------------
# comparison of runs
# --------------------------------------------------------------------------------------
def _check_runs(runs: list[dict]) -> None:
    if not runs:
        raise ValueError("no runs to compare")
    for r in runs:
        if "name" not in r or "metrics" not in r:
            raise ValueError("each run needs at least 'name' and 'metrics'")


def comparison_table(runs: list[dict], split: str | None = None) -> str:
    """Plain-text, column-aligned comparison of runs for a terminal.

    Args:
        runs: ``[{"name": str, "metrics": dict, ...}]`` (see :func:`write_comparison`).
        split: Which evaluation is compared; the table's first line says so.

    Returns:
        The table: name, n, accuracy [CI], AUC [CI], sensitivity, specificity, F1, ECE.
    """
    _check_runs(runs)
    head = ["name", "n", "accuracy [CI]", "auc [CI]", "sensitivity", "specificity", "f1", "ece"]
    rows = []
    for r in runs:
        m = r["metrics"]
        with_ci = [
            f"{_f(m.get(k))} [{_ci(m, k, ', ')}]" if _ci(m, k) else _f(m.get(k))
            for k in ("accuracy", "auc")
        ]
        rows.append(
            [str(r["name"]), _f(m.get("n"))]
            + with_ci
            + [_f(m.get(k)) for k in ("sensitivity", "specificity", "f1", "ece")]
        )
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    table = [line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    if split in SPLIT_ROLES:
        title, role = SPLIT_ROLES[split]
        table.insert(0, f"{title} of each run ({role}):")
    return "\n".join(table)


def _write_compare_csv(runs: list[dict], path: Path) -> None:
    columns = ["name", "n", "threshold"] + [
        c
        for k in _REPORT_METRICS
        for c in ((k, f"{k}_ci_low", f"{k}_ci_high") if k in CI_METRICS else (k,))
    ]
    rows = []
    for r in runs:
        m = r["metrics"]
        row = {"name": r["name"], "n": m.get("n"), "threshold": m.get("threshold")}
        for k in _REPORT_METRICS:
            row[k] = m.get(k)
            ci = (m.get("ci") or {}).get(k) or [None, None]
            row[f"{k}_ci_low"], row[f"{k}_ci_high"] = ci[0], ci[1]
        rows.append(row)
    write_csv(path, rows, columns)


def _compare_rows(runs: list[dict]) -> list[dict]:
    """compare.html's table: values, intervals, and the best value of each column marked."""
    best = {}
    for key, higher in _COMPARE_COLUMNS:
        finite = [r["metrics"][key] for r in runs if r["metrics"].get(key) is not None]
        if len(finite) > 1:
            best[key] = max(finite) if higher else min(finite)
    return [
        {
            "name": r["name"],
            "n": _f(r["metrics"].get("n")),
            "threshold": _f(r["metrics"].get("threshold")),
            "cells": [
                {
                    "value": _f(r["metrics"].get(k)),
                    "ci": _ci(r["metrics"], k),
                    "best": k in best and r["metrics"].get(k) == best[k],
                }
                for k, _ in _COMPARE_COLUMNS
            ],
        }
        for r in runs
    ]


def write_comparison(runs: list[dict], out_dir: str | Path, split: str | None = None) -> Path:
    """Compare several evaluated runs in ``compare.html`` and ``compare.csv``.

    Args:
        runs: ``[{"name": str, "metrics": dict, "history": list[dict] | None,
            "y_true": array | None, "probs": array | None, "labels": [...]}]``; only
            ``name`` and ``metrics`` are required.
        out_dir: Output folder (created).
        split: Which evaluation of each run is compared (``val`` or ``test``), named in the
            title.

    Returns:
        Path of ``compare.html``. Its figures: ``metrics`` (bars with bootstrap-interval error
        bars), ``training`` (validation curves by epoch, if any history), ``roc`` (if any run
        has ``y_true``/``probs``).
    """
    _check_runs(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_compare_csv(runs, out / COMPARE_CSV)
    figures: dict[str, dict] = {
        "metrics": {"metrics": compare_metrics_figure(runs)},
        "training": compare_curve_figures(runs),
        "roc": {"roc": compare_roc_figure(runs)},
    }
    blocks = [
        {"name": n, "title": t, "caption": c, "figures": {k: f for k, f in figures[n].items() if f}}
        for n, t, c in _COMPARE_FIGURES
    ]
    return _render(
        "compare.html",
        out / COMPARE_HTML,
        [b for b in blocks if b["figures"]],
        title="MedLens run comparison"
        + (f": {SPLIT_ROLES[split][0].lower()} of each run" if split in SPLIT_ROLES else ""),
        columns=[METRIC_LABELS[k] for k, _ in _COMPARE_COLUMNS],
        table=_compare_rows(runs),
        text_table=comparison_table(runs, split),
    )


def write_tune_report(
    path: str | Path, trials: list[dict], params: list[str], result: dict
) -> Path:
    """``tune.html``: every trial's state, validation AUC and settings, and the search history.

    Args:
        path: File to write.
        trials: ``[{"trial", "state", "value", "seconds", <param>: value}]``.
        params: The searched settings (table columns).
        result: ``{"best_trial", "best_value", "best_params"}``.
    """
    fig = tune_history_figure(trials)
    blocks = [{"name": "history", "title": "Search history",
               "caption": "Validation AUC of each finished trial and the best so far.",
               "figures": {"history": fig}}] if fig else []  # fmt: skip
    rows = [[str(t["trial"]), t["state"], _f(t["value"], 4), _f(t["seconds"], 1),
             *(_f(t.get(k), 4) for k in params)] for t in trials]  # fmt: skip
    return _render("tune.html", Path(path), blocks, title="MedLens hyperparameter search",
                   columns=["trial", "state", "validation AUC", "seconds", *params],
                   rows=rows, result=result)  # fmt: skip
