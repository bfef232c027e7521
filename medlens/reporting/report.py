"""Evaluation reports: figures, a self-contained HTML report, and run comparisons.

The HTML files embed every plot as a ``data:`` URI and inline their CSS, so a report can be
mailed or archived as one file; the plots are also saved as PNGs under ``plots/``.
"""

from __future__ import annotations

import base64
import csv
import io
import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from jinja2 import Environment, PackageLoader, select_autoescape  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from medlens.evaluation.calibration import reliability_curve
from medlens.evaluation.metrics import _validate, expected_calibration_error, predict_labels

__all__ = ["plot_figures", "write_report", "write_comparison", "comparison_table"]

_DPI = 110
_COLORS = plt.get_cmap("tab10").colors

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
TITLES = {
    "roc": "ROC curve",
    "pr": "Precision–recall curve",
    "confusion": "Confusion matrix",
    "density": "Score distributions",
    "reliability": "Reliability diagram",
    "training": "Training curves",
}

# (metrics key, display name)
_HEADLINE = [
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("auc", "AUC (ROC)"),
    ("sensitivity", "Sensitivity (recall)"),
    ("specificity", "Specificity"),
    ("precision", "Precision (PPV)"),
    ("f1", "F1"),
    ("f2", "F2"),
    ("log_loss", "Log loss"),
    ("brier", "Brier score"),
    ("ece", "ECE (15 bins)"),
]
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


# --------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _b64(fig) -> str:
    return base64.b64encode(_png(fig)).decode("ascii")


def _no_data(ax, msg: str) -> None:
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _safe_auc(y_bin: np.ndarray, score: np.ndarray) -> float | None:
    return float(roc_auc_score(y_bin, score)) if 0 < y_bin.sum() < len(y_bin) else None


def _fig_roc(y, p, labels, threshold):
    fig, ax = plt.subplots(figsize=(5.6, 5))
    k = p.shape[1]
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1, label="chance")
    if k == 2:
        if len(np.unique(y)) < 2:
            _no_data(ax, "ROC undefined: only one class present")
            return fig
        fpr, tpr, _ = roc_curve(y, p[:, 1])
        ax.plot(
            fpr,
            tpr,
            c=_COLORS[0],
            lw=2,
            label=f"{labels[1]} (AUC = {roc_auc_score(y, p[:, 1]):.3f})",
        )
        marks = [(threshold, "o", _COLORS[3])] + ([(0.5, "s", "0.4")] if threshold != 0.5 else [])
        for t, marker, color in marks:
            pred = p[:, 1] >= t
            sens, spec = pred[y == 1].mean(), (~pred[y == 0]).mean()
            ax.plot(
                1 - spec,
                sens,
                marker,
                ms=9,
                c=color,
                mfc=color if marker == "o" else "none",
                label=f"threshold {t:.3f}: sens {sens:.2f}, spec {spec:.2f}",
            )
    else:
        onehot = np.eye(k)[y]
        grid, tprs, aucs = np.linspace(0, 1, 201), [], []
        for c in range(k):
            a = _safe_auc(onehot[:, c], p[:, c])
            if a is None:
                continue
            fpr, tpr, _ = roc_curve(onehot[:, c], p[:, c])
            tprs.append(np.interp(grid, fpr, tpr))
            aucs.append(a)
            ax.plot(fpr, tpr, lw=1.3, c=_COLORS[c % 10], label=f"{labels[c]} (AUC = {a:.3f})")
        if not tprs:
            _no_data(ax, "ROC undefined: only one class present")
            return fig
        fpr, tpr, _ = roc_curve(onehot.ravel(), p.ravel())
        ax.plot(
            fpr,
            tpr,
            c="k",
            lw=2,
            ls=":",
            label=f"micro-average (AUC = {roc_auc_score(onehot.ravel(), p.ravel()):.3f})",
        )
        ax.plot(
            grid,
            np.mean(tprs, axis=0),
            c="k",
            lw=2,
            label=f"macro-average (AUC = {np.mean(aucs):.3f})",
        )
    ax.set(
        xlabel="1 − specificity (false-positive rate)",
        ylabel="sensitivity (true-positive rate)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _fig_pr(y, p, labels, threshold):
    fig, ax = plt.subplots(figsize=(5.6, 5))
    k = p.shape[1]
    classes = [1] if k == 2 else list(range(k))
    drawn = False
    for c in classes:
        yc = (y == c).astype(int)
        if yc.sum() == 0:
            continue
        prec, rec, _ = precision_recall_curve(yc, p[:, c])
        color = _COLORS[(0 if k == 2 else c) % 10]
        ax.plot(
            rec,
            prec,
            lw=2 if k == 2 else 1.3,
            c=color,
            label=f"{labels[c]} (AP = {average_precision_score(yc, p[:, c]):.3f})",
        )
        ax.axhline(yc.mean(), ls="--", lw=1, c=color, alpha=0.6)
        drawn = True
    if not drawn:
        _no_data(ax, "no positive cases: precision-recall undefined")
        return fig
    if k == 2 and (y == 1).any():
        pred = p[:, 1] >= threshold
        if pred.any():
            ax.plot(
                pred[y == 1].mean(),
                (y[pred] == 1).mean(),
                "o",
                ms=9,
                c=_COLORS[3],
                label=f"threshold {threshold:.3f}",
            )
    ax.set(
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _fig_confusion(y, p, labels, threshold):
    k = p.shape[1]
    cm = confusion_matrix(y, predict_labels(p, threshold), labels=list(range(k)))
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    size = 3.2 + 0.75 * k
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{100 * norm[i, j]:.1f}%",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(k), labels, rotation=30 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), labels)
    ax.set(xlabel="predicted class", ylabel="true class")
    if k == 2:
        ax.set_title(f"threshold {threshold:.3f}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    return fig


def _fig_density(y, p, labels, threshold):
    bins = np.linspace(0, 1, 31)
    k = p.shape[1]
    if k == 2:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        axes, specs = [ax], [(ax, 1)]
    else:
        ncols = min(k, 3)
        nrows = -(-k // ncols)
        fig, axs = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
        axes = list(axs.ravel())
        specs = [(axes[c], c) for c in range(k)]
        for ax in axes[k:]:
            ax.set_visible(False)
    for ax, c in specs:
        if k == 2:
            groups = [
                (y == 0, f"true {labels[0]}", _COLORS[0]),
                (y == 1, f"true {labels[1]}", _COLORS[3]),
            ]
        else:
            groups = [
                (y != c, "other classes", "0.5"),
                (y == c, f"true {labels[c]}", _COLORS[c % 10]),
            ]
        for mask, name, color in groups:
            if mask.any():
                ax.hist(
                    p[mask, c],
                    bins=bins,
                    density=True,
                    alpha=0.45,
                    color=color,
                    label=f"{name} (n={int(mask.sum())})",
                )
                ax.hist(p[mask, c], bins=bins, density=True, histtype="step", color=color, lw=1.3)
        if k == 2:
            ax.axvline(threshold, c="k", ls="--", lw=1.2, label=f"threshold {threshold:.3f}")
        ax.set(xlabel=f"predicted p({labels[c]})", ylabel="density", xlim=(0, 1))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _fig_reliability(y, p, labels, threshold):
    fig, (ax, axh) = plt.subplots(
        2, 1, figsize=(5.6, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    mean_pred, frac_pos, _ = reliability_curve(y, p, n_bins=10)
    binary = p.shape[1] == 2
    score = p[:, 1] if binary else p.max(axis=1)
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1, label="perfectly calibrated")
    ax.plot(mean_pred, frac_pos, "o-", c=_COLORS[0], lw=2, label="model")
    ax.set(
        ylabel=f"observed fraction {labels[1]}" if binary else "observed accuracy",
        xlim=(0, 1),
        ylim=(-0.01, 1.01),
        title=f"ECE = {expected_calibration_error(y, p):.3f} (top-class confidence, 15 bins)",
    )
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    axh.hist(score, bins=np.linspace(0, 1, 21), color=_COLORS[0], alpha=0.7)
    axh.set(
        xlabel=f"predicted p({labels[1]})" if binary else "confidence (top-class probability)",
        ylabel="images",
    )
    fig.tight_layout()
    return fig


def _series(history: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in history])


def _fig_training(history: list[dict]):
    epochs = np.array(
        [
            r.get("epoch", i + 1) if r.get("epoch") is not None else i + 1
            for i, r in enumerate(history)
        ],
        dtype=float,
    )
    panels = [
        ("loss", [("train_loss", "train"), ("val_loss", "validation")]),
        (
            "accuracy / AUC",
            [("train_acc", "train accuracy"), ("val_acc", "val accuracy"), ("val_auc", "val AUC")],
        ),
    ]
    lr = _series(history, "lr")
    if np.isfinite(lr).any():
        panels.append(("learning rate", [("lr", "lr")]))
    panels = [(t, [(k, n, _series(history, k)) for k, n in s]) for t, s in panels]
    panels = [(t, [s for s in ss if np.isfinite(s[2]).any()]) for t, ss in panels]
    panels = [(t, ss) for t, ss in panels if ss]
    if not panels:
        return None
    best = None
    for key, pick in (
        ("val_auc", np.nanargmax),
        ("val_loss", np.nanargmin),
        ("val_acc", np.nanargmax),
    ):
        s = _series(history, key)
        if np.isfinite(s).any():
            best = (epochs[pick(s)], f"best {key} (epoch {epochs[pick(s)]:g})")
            break
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for i, (key, name, s) in enumerate(series):
            ok = np.isfinite(s)
            ax.plot(
                epochs[ok],
                s[ok],
                "o-" if ok.sum() < 30 else "-",
                ms=3,
                lw=1.6,
                c=_COLORS[i],
                ls="--" if key.startswith("train") else "-",
                label=name,
            )
        if title == "learning rate":
            ax.set_yscale("log")
        elif best is not None:
            ax.axvline(best[0], c="0.5", ls=":", lw=1, label=best[1])
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_figures(
    y_true, probs, labels: Sequence[str], threshold: float | None, history: list[dict] | None = None
) -> dict[str, str]:
    """Render the evaluation figures.

    Args:
        y_true: ``(N,)`` integer labels.
        probs: ``(N, K)`` class probabilities.
        labels: Class names.
        threshold: Binary decision threshold (0.5 if ``None``); ignored for multi-class.
        history: Training history rows (``epoch, train_loss, train_acc, val_loss, val_acc,
            val_auc, lr``; missing keys allowed). The ``training`` plot is skipped if empty.

    Returns:
        Mapping of plot name (``roc, pr, confusion, density, reliability[, training]``) to a
        base64-encoded PNG.
    """
    y, p = _validate(y_true, probs, labels)
    labels = [str(s) for s in labels]
    if p.shape[1] == 2:
        threshold = 0.5 if threshold is None else float(threshold)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in (
            ("roc", _fig_roc),
            ("pr", _fig_pr),
            ("confusion", _fig_confusion),
            ("density", _fig_density),
            ("reliability", _fig_reliability),
        ):
            out[name] = _b64(fn(y, p, labels, threshold))
        fig = _fig_training(history) if history else None
        if fig is not None:
            out["training"] = _b64(fig)
    return out


# --------------------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------------------
def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "—"
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
    method = model_info.get("threshold_method")
    if method == "youden":
        how = "chosen on validation data by maximising Youden's J (sensitivity + specificity − 1)"
    elif method == "target_sensitivity":
        target = model_info.get("target_sensitivity")
        how = (
            "chosen on validation data as the highest threshold with sensitivity ≥ "
            f"{_f(target, 2) if target is not None else 'the target'}"
        )
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


def _save_plots(figs: dict[str, str], plot_dir: Path, prefix: str = "") -> None:
    plot_dir.mkdir(parents=True, exist_ok=True)
    for name, b64 in figs.items():
        (plot_dir / f"{prefix}{name}.png").write_bytes(base64.b64decode(b64))


# --------------------------------------------------------------------------------------
# single report
# --------------------------------------------------------------------------------------
def write_report(
    out_dir,
    metrics: dict,
    y_true,
    probs,
    labels: Sequence[str],
    *,
    threshold: float | None,
    history: list[dict] | None = None,
    title: str = "MedLens evaluation",
    model_info: dict | None = None,
) -> Path:
    """Write a self-contained HTML evaluation report and its plots.

    Args:
        out_dir: Output folder (created); receives ``report.html`` and ``plots/<name>.png``.
        metrics: Output of :func:`medlens.metrics.compute_metrics` on the same data.
        y_true: ``(N,)`` integer labels.
        probs: ``(N, K)`` class probabilities.
        labels: Class names.
        threshold: Binary decision threshold used for the plots (``None``: 0.5 / argmax).
        history: Optional training history rows for the training-curve plot.
        title: Report title.
        model_info: Optional facts shown in the header (model name, version, dataset, date,
            split, temperature, ...). ``threshold_method`` (``"youden"`` or
            ``"target_sensitivity"``, with ``target_sensitivity``) explains the threshold.

    Returns:
        Path of ``report.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [str(s) for s in labels]
    model_info = dict(model_info or {})
    figs = plot_figures(y_true, probs, labels, threshold, history)
    _save_plots(figs, out / "plots")

    binary = len(labels) == 2
    headline = [
        {"name": name, "value": _f(metrics.get(key)), "ci": _ci(metrics, key), "help": _HELP[key]}
        for key, name in _HEADLINE
    ]
    at05 = None
    if binary and metrics.get("at_0_5"):
        keys = [
            "accuracy",
            "balanced_accuracy",
            "sensitivity",
            "specificity",
            "precision",
            "f1",
            "f2",
        ]
        at05 = {
            "keys": [
                "Threshold",
                "Accuracy",
                "Balanced acc.",
                "Sensitivity",
                "Specificity",
                "Precision",
                "F1",
                "F2",
            ],
            "rows": [
                [f"{_f(metrics.get('threshold'))} (operating)"]
                + [_f(metrics.get(k)) for k in keys],
                ["0.500 (default)"] + [_f(metrics["at_0_5"].get(k)) for k in keys],
            ],
        }
    per_class = [
        {"label": lab, **{k: _f(v) for k, v in row.items()}}
        for lab, row in (metrics.get("per_class") or {}).items()
    ]
    cm = metrics.get("confusion_matrix") or []
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
    plots = [
        {"name": n, "title": TITLES[n], "caption": captions[n], "b64": b64}
        for n, b64 in figs.items()
    ]

    html = (
        _env()
        .get_template("report.html")
        .render(
            title=title,
            generated=datetime.now().strftime("%Y-%m-%d %H:%M"),
            model_info=[
                (k.replace("_", " ").capitalize(), v)
                for k, v in model_info.items()
                if v is not None
            ],
            n=metrics.get("n"),
            labels=labels,
            binary=binary,
            task=(f"binary (positive class: {labels[1]})" if binary else f"{len(labels)}-class"),
            ci_pct=f"{100 * metrics.get('ci_level', 0.95):g}",
            n_bootstrap=metrics.get("n_bootstrap"),
            headline=headline,
            threshold_text=_threshold_text(metrics, model_info),
            at05=at05,
            per_class=per_class,
            cm=cm,
            plots=plots,
        )
    )
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------
# comparison of runs
# --------------------------------------------------------------------------------------
_BAR_METRICS = [
    ("accuracy", "Accuracy"),
    ("auc", "AUC"),
    ("f1", "F1"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
]
_CSV_METRICS = [
    "accuracy",
    "balanced_accuracy",
    "auc",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "f2",
    "log_loss",
    "brier",
    "ece",
]
_CSV_CI = _CSV_METRICS[:8]  # metrics that have bootstrap intervals


def _fig_compare_bars(runs):
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.5, 4.0 * len(runs))), 4.2))
    width = 0.8 / len(runs)
    x = np.arange(len(_BAR_METRICS))
    for i, run in enumerate(runs):
        m = run["metrics"]
        vals = np.array([np.nan if m.get(k) is None else m[k] for k, _ in _BAR_METRICS], float)
        err = np.zeros((2, len(vals)))
        for j, (k, _) in enumerate(_BAR_METRICS):
            ci = (m.get("ci") or {}).get(k)
            if ci and np.isfinite(vals[j]):
                err[:, j] = [max(vals[j] - ci[0], 0), max(ci[1] - vals[j], 0)]
        ax.bar(
            x + (i - (len(runs) - 1) / 2) * width,
            vals,
            width,
            yerr=err,
            capsize=3,
            color=_COLORS[i % 10],
            label=run["name"],
        )
    ax.set_xticks(x, [n for _, n in _BAR_METRICS])
    ax.set(ylim=(0, 1.05), ylabel="value (error bars: bootstrap CI)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def _fig_compare_training(runs):
    keys = [
        k
        for k in ("val_auc", "val_acc", "val_loss")
        if any(r.get("history") and np.isfinite(_series(r["history"], k)).any() for r in runs)
    ]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    names = {
        "val_auc": "validation AUC",
        "val_acc": "validation accuracy",
        "val_loss": "validation loss",
    }
    for ax, key in zip(axes[0], keys):
        for i, run in enumerate(runs):
            h = run.get("history") or []
            s = _series(h, key) if h else np.array([])
            if not np.isfinite(s).any():
                continue
            ep = np.array(
                [r.get("epoch") if r.get("epoch") is not None else j + 1 for j, r in enumerate(h)],
                float,
            )
            ok = np.isfinite(s)
            ax.plot(ep[ok], s[ok], "-", lw=1.6, c=_COLORS[i % 10], label=run["name"])
        ax.set(title=names[key], xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _fig_compare_roc(runs):
    fig, ax = plt.subplots(figsize=(5.6, 5))
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1, label="chance")
    drawn = False
    for i, run in enumerate(runs):
        if run.get("y_true") is None or run.get("probs") is None:
            continue
        y, p = _validate(run["y_true"], run["probs"])
        if len(np.unique(y)) < 2:
            continue
        if p.shape[1] == 2:
            yb, s, tag = (y == 1).astype(int), p[:, 1], ""
        else:
            yb, s, tag = np.eye(p.shape[1])[y].ravel(), p.ravel(), " micro-avg"
        fpr, tpr, _ = roc_curve(yb, s)
        ax.plot(
            fpr,
            tpr,
            lw=1.8,
            c=_COLORS[i % 10],
            label=f"{run['name']}{tag} (AUC = {roc_auc_score(yb, s):.3f})",
        )
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _check_runs(runs: list[dict]) -> None:
    if not runs:
        raise ValueError("no runs to compare")
    for r in runs:
        if "name" not in r or "metrics" not in r:
            raise ValueError("each run needs at least 'name' and 'metrics'")


def comparison_table(runs: list[dict]) -> str:
    """Plain-text, column-aligned comparison of runs for a terminal.

    Args:
        runs: ``[{"name": str, "metrics": dict, ...}]`` (see :func:`write_comparison`).

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

    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def write_comparison(runs: list[dict], out_dir) -> Path:
    """Compare several evaluated runs in ``compare.html``, ``compare.csv`` and plots.

    Args:
        runs: ``[{"name": str, "metrics": dict, "history": list[dict] | None,
            "y_true": array | None, "probs": array | None, "labels": [...]}]``; only
            ``name`` and ``metrics`` are required.
        out_dir: Output folder (created).

    Returns:
        Path of ``compare.html``. Plots are saved as ``plots/compare_<name>.png``: ``metrics``
        (bar chart with CI error bars), ``training`` (validation curves by epoch, if any
        history), ``roc`` (if any run has ``y_true``/``probs``).
    """
    _check_runs(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in (
            ("metrics", _fig_compare_bars),
            ("training", _fig_compare_training),
            ("roc", _fig_compare_roc),
        ):
            fig = fn(runs)
            if fig is not None:
                figs[name] = _b64(fig)
    _save_plots(figs, out / "plots", prefix="compare_")

    with open(out / "compare.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["name", "n", "threshold"]
            + [
                c
                for k in _CSV_METRICS
                for c in ((k, f"{k}_ci_low", f"{k}_ci_high") if k in _CSV_CI else (k,))
            ]
        )
        for r in runs:
            m = r["metrics"]
            row = [r["name"], m.get("n"), m.get("threshold")]
            for k in _CSV_METRICS:
                ci = (m.get("ci") or {}).get(k) or [None, None]
                row += [m.get(k), ci[0], ci[1]] if k in _CSV_CI else [m.get(k)]
            w.writerow(["" if v is None else v for v in row])

    cols = [
        ("accuracy", "Accuracy", True),
        ("balanced_accuracy", "Bal. acc.", True),
        ("auc", "AUC", True),
        ("sensitivity", "Sensitivity", True),
        ("specificity", "Specificity", True),
        ("f1", "F1", True),
        ("ece", "ECE", False),
        ("brier", "Brier", False),
    ]
    best = {}
    for key, _, higher in cols:
        vals = [r["metrics"].get(key) for r in runs]
        finite = [v for v in vals if v is not None]
        if len(finite) > 1:
            best[key] = max(finite) if higher else min(finite)
    table = [
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
                for k, _, _ in cols
            ],
        }
        for r in runs
    ]
    captions = {
        "metrics": "Headline metrics per run; error bars are bootstrap confidence "
        "intervals. Overlapping intervals mean the difference may be noise.",
        "training": "Validation metrics per epoch for each run.",
        "roc": "ROC curves of the runs (multi-class runs: micro-average).",
    }
    html = (
        _env()
        .get_template("compare.html")
        .render(
            title="MedLens run comparison",
            generated=datetime.now().strftime("%Y-%m-%d %H:%M"),
            columns=[c[1] for c in cols],
            table=table,
            plots=[
                {"name": n, "title": n.capitalize(), "caption": captions[n], "b64": b}
                for n, b in figs.items()
            ],
            text_table=comparison_table(runs),
        )
    )
    path = out / "compare.html"
    path.write_text(html, encoding="utf-8")
    return path
