"""Tests for medlens.reporting.figures and the HTML reports that draw its figure dicts."""

import ast
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from medlens.evaluation.calibration import reliability_curve
from medlens.evaluation.metrics import compute_metrics
from medlens.evaluation.operating_point import choose_operating_point
from medlens.reporting import figures
from medlens.reporting.report import comparison_table, write_comparison, write_report

BASE_PLOTS = {"roc", "pr", "confusion", "density", "reliability"}


def _plotly_head() -> str:
    import plotly

    js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    return js.read_text("utf-8")[:400]


def _task(k, n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += 1.5
    return y, np.exp(z) / np.exp(z).sum(1, keepdims=True)


def _history(n=8, with_auc=True, stages=False):
    rows = []
    for e in range(1, n + 1):
        row = {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1.1 / e,
            "train_acc": 1 - 0.4 / e,
            "val_acc": 0.9 - 0.4 / e,
            "lr": 1e-3,
        }
        row["val_auc"] = 0.95 - 0.3 / e if with_auc else None
        if stages:
            row["stage"] = "head" if e <= 3 else "finetune"
        rows.append(row)
    return rows


def _figure_json(html: str) -> dict:
    """The figure dicts a report draws (strict JSON: NaN would fail ``JSON.parse``)."""
    blob = re.search(r'<script type="application/json" id="figures">(.*?)</script>', html, re.S)

    def no_nan(name):
        raise AssertionError(f"{name} in the figure JSON")

    return json.loads(blob.group(1), parse_constant=no_nan)


def _trace(fig: dict, name_start: str) -> dict:
    return next(t for t in fig["data"] if t.get("name", "").startswith(name_start))


def _area(trace: dict) -> float:
    return float(np.trapezoid(trace["y"], trace["x"]))


# --------------------------------------------------------------------------------------
# the figure dicts
# --------------------------------------------------------------------------------------
def test_binary_figures_match_the_metrics():
    y, p = _task(2)
    m = compute_metrics(y, p, ["neg", "pos"], 0.4, n_bootstrap=20)
    figs = figures.evaluation_figures(y, p, ["neg", "pos"], 0.4)
    assert set(figs) == BASE_PLOTS
    # ROC: the drawn curve's area is the AUC; the operating point is the metrics' sens/spec.
    curve = _trace(figs["roc"], "pos (AUC")
    assert _area(curve) == pytest.approx(m["auc"], abs=1e-3)
    assert f"AUC = {m['auc']:.3f}" in curve["name"]
    op = _trace(figs["roc"], "threshold 0.400")
    assert op["x"][0] == pytest.approx(1 - m["specificity"], abs=1e-4)
    assert op["y"][0] == pytest.approx(m["sensitivity"], abs=1e-4)
    at05 = _trace(figs["roc"], "threshold 0.500")
    assert at05["y"][0] == pytest.approx(m["at_0_5"]["sensitivity"], abs=1e-4)
    # PR: AP in the legend, prevalence line, operating point = (sensitivity, precision).
    pr = _trace(figs["pr"], "pos (AP")
    assert f"AP = {average_precision_score(y, p[:, 1]):.3f}" in pr["name"]
    assert _trace(figs["pr"], "prevalence")["y"] == [pytest.approx(y.mean(), abs=1e-4)] * 2
    pr_op = _trace(figs["pr"], "threshold 0.400")
    assert (pr_op["x"][0], pr_op["y"][0]) == (
        pytest.approx(m["sensitivity"], abs=1e-4),
        pytest.approx(m["precision"], abs=1e-4),
    )
    # Confusion matrix: the counts of the metrics at the same threshold, row percentages.
    heat = figs["confusion"]["data"][0]
    assert heat["customdata"] == m["confusion_matrix"]
    cm = np.array(m["confusion_matrix"])
    np.testing.assert_allclose(heat["z"], 100 * cm / cm.sum(1, keepdims=True), atol=1e-2)
    assert "threshold 0.400" in figs["confusion"]["layout"]["title"]["text"]
    # Densities: one histogram per true class, each integrating to 1; the threshold line.
    bars = [t for t in figs["density"]["data"] if t["type"] == "bar"]
    assert [b["name"] for b in bars] == [
        f"true neg (n={(y == 0).sum()})",
        f"true pos (n={(y == 1).sum()})",
    ]
    for b in bars:
        assert sum(b["y"]) * b["width"] == pytest.approx(1, abs=1e-3)
    assert _trace(figs["density"], "threshold")["x"] == [0.4, 0.4]
    # Reliability: the curve of medlens.evaluation, the counts of all images, the ECE.
    mean_pred, frac_pos, _ = reliability_curve(y, p, n_bins=10)
    model = _trace(figs["reliability"], "model")
    np.testing.assert_allclose(model["x"], mean_pred, atol=1e-4)
    np.testing.assert_allclose(model["y"], frac_pos, atol=1e-4)
    assert sum(_trace(figs["reliability"], "images per bin")["y"]) == len(y)
    assert f"ECE = {m['ece']:.3f}" in figs["reliability"]["layout"]["title"]["subtitle"]["text"]


def test_multiclass_figures_match_the_metrics():
    labels = ["a", "b", "c"]
    y, p = _task(3, seed=1)
    m = compute_metrics(y, p, labels, n_bootstrap=20)
    figs = figures.evaluation_figures(y, p, labels, None)
    for lab in labels:
        curve = _trace(figs["roc"], f"{lab} (AUC")
        assert _area(curve) == pytest.approx(m["per_class"][lab]["auc"], abs=1e-3)
    macro = _trace(figs["roc"], "macro-average")
    mean_auc = np.mean([m["per_class"][c]["auc"] for c in labels])
    assert macro["name"] == f"macro-average (AUC = {mean_auc:.3f})"
    assert _area(macro) == pytest.approx(m["auc"], abs=1e-2)
    assert _trace(figs["roc"], "micro-average")["line"]["dash"] == "dot"
    assert figs["confusion"]["data"][0]["customdata"] == m["confusion_matrix"]
    # One density panel per class, on its own axes.
    bars = [t for t in figs["density"]["data"] if t["type"] == "bar"]
    assert {b["xaxis"] for b in bars} == {"x", "x2", "x3"}
    assert "xaxis3" in figs["density"]["layout"]
    assert len(figs["pr"]["data"]) == 2 * len(labels)  # curve + prevalence per class


def test_one_class_present_roc_is_a_note():
    y = np.zeros(20, int)
    p = np.column_stack([np.linspace(0.9, 0.2, 20), np.linspace(0.1, 0.8, 20)])
    figs = figures.evaluation_figures(y, p, ["neg", "pos"], None)
    assert [t["name"] for t in figs["roc"]["data"]] == ["chance"]
    assert "only one class" in figs["roc"]["layout"]["annotations"][0]["text"]
    assert "no positive cases" in figs["pr"]["layout"]["annotations"][0]["text"]


def test_training_figures():
    assert figures.training_figures(None) == {} and figures.training_figures([]) == {}
    assert figures.training_figures([{"epoch": 1}]) == {}
    h = _history(6, stages=True)
    figs = figures.training_figures(h)
    assert set(figs) == {"acc", "loss", "lr"}
    acc = figs["acc"]
    assert [t["name"] for t in acc["data"]] == ["train", "validation", "validation AUC"]
    assert acc["data"][0]["line"]["dash"] == "dash" and acc["data"][1]["line"]["dash"] == "solid"
    assert acc["data"][1]["x"] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(acc["data"][1]["y"], [r["val_acc"] for r in h], atol=1e-4)
    shapes = acc["layout"]["shapes"]
    stage = [s for s in shapes if s["line"]["dash"] == "dashdot"]
    assert [s["x0"] for s in stage] == [3.5]  # head -> finetune between epochs 3 and 4
    assert acc["layout"]["annotations"][0]["text"] == "finetune"
    best = next(s for s in shapes if s["line"]["dash"] == "dot")
    assert best["x0"] == 6 and best["name"] == "best val_auc (epoch 6)"
    assert figs["lr"]["layout"]["yaxis"]["type"] == "log"
    partial = [{"epoch": 1, "train_loss": 0.7}, {"epoch": 2, "train_loss": 0.5, "val_loss": None}]
    only = figures.training_figures(partial)
    assert set(only) == {"loss"} and [t["name"] for t in only["loss"]["data"]] == ["train"]


def test_figures_are_plain_rounded_json():
    y, p = _task(2)
    fig = figures.roc_figure(y, p + 1e-9, ["a", "b"], 0.5)
    text = json.dumps(fig, allow_nan=False)  # only JSON types, no NaN
    values = [v for t in json.loads(text)["data"] for v in t["x"] + t["y"]]
    assert all(isinstance(v, (int, float)) and float(f"{v:.5g}") == v for v in values)
    assert figures.figure([{"y": [np.nan, np.float32(0.123456789), np.int64(3)]}], {}) == {
        "data": [{"y": [None, 0.12346, 3]}],
        "layout": {},
    }


def test_one_colour_table_and_layout():
    assert len(figures.COLORS) == 10 and figures.HEADLINE_LABELS[0] == "Accuracy"
    lay = figures.layout("T", "x", "y", xaxis={"range": [0, 1]})
    assert lay["xaxis"]["title"]["text"] == "x" and lay["xaxis"]["range"] == [0, 1]
    assert lay["colorway"] == figures.COLORS


def test_reporting_does_not_import_matplotlib():
    folder = Path(figures.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "matplotlib" for n in names), path


# --------------------------------------------------------------------------------------
# report.html
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "k,history", [(2, _history(stages=True)), (3, None), (3, _history(5, False))]
)
def test_write_report(tmp_path, k, history):
    labels = ["normal", "pneumonia", "covid"][:k]
    y, p = _task(k)
    threshold = 0.4 if k == 2 else None
    m = compute_metrics(y, p, labels, threshold, n_bootstrap=100)
    info = {
        "model": "resnet18",
        "version": "1.2",
        "dataset": "demo-xray",
        "threshold_method": "youden",
        "operating_point": choose_operating_point(y, p[:, 1], "youden", n_boot=50)
        if k == 2
        else None,
    }
    path = write_report(
        tmp_path / "out",
        m,
        y,
        p,
        labels,
        threshold=threshold,
        history=history,
        model_info=info,
        title="Demo <eval>",
    )
    html = path.read_text()
    assert path.name == "report.html"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html"]  # no plots/
    # plotly.js inline, exactly once; nothing loaded from elsewhere.
    assert html.count(_plotly_head()) == 1
    assert not re.search(r"<(script|img|link)[^>]*\s(src|href)=", html)
    # One div per figure, each with its dict in the JSON.
    figs = _figure_json(html)
    train = {f"fig-training-{n}" for n in (("acc", "loss", "lr") if history else ())}
    assert set(figs) == {f"fig-{n}" for n in BASE_PLOTS} | train
    for dom in figs:
        assert html.count(f'<div class="plot" id="{dom}"></div>') == 1
    for name in BASE_PLOTS | ({"training"} if history else set()):
        assert f'<figure id="plot-{name}"' in html
    assert figs["fig-confusion"]["data"][0]["customdata"] == m["confusion_matrix"]
    if k == 2:
        assert _area(_trace(figs["fig-roc"], "pneumonia (AUC")) == pytest.approx(m["auc"], abs=1e-3)
        assert "dot marks the operating threshold" in html
    if history:
        val = _trace(figs["fig-training-loss"], "validation")
        np.testing.assert_allclose(val["y"], [r["val_loss"] for r in history], atol=1e-4)
    # Tables, captions, model info and the decision rule as before.
    for key in ("accuracy", "auc", "sensitivity", "specificity", "f1", "ece", "brier"):
        assert f"{m[key]:.3f}" in html, key
    lo, hi = m["ci"]["accuracy"]
    assert f"{lo:.3f} – {hi:.3f}" in html
    assert "<b>Reliability diagram.</b> Calibration: observed frequency" in html
    assert "resnet18" in html and "demo-xray" in html and "Demo &lt;eval&gt;" in html
    for lab in labels:
        assert lab in html
    if k == 2:
        assert "Youden" in html and "0.500 (default)" in html
    else:
        assert "argmax" in html and "One panel per class" in html


def test_report_one_class(tmp_path):
    y = np.zeros(20, int)
    p = np.column_stack([np.linspace(0.9, 0.2, 20), np.linspace(0.1, 0.8, 20)])
    m = compute_metrics(y, p, ["neg", "pos"], n_bootstrap=20)
    html = write_report(tmp_path, m, y, p, ["neg", "pos"], threshold=0.5).read_text()
    assert set(_figure_json(html)) == {f"fig-{n}" for n in BASE_PLOTS} and "default 0.5" in html


# --------------------------------------------------------------------------------------
# compare.html
# --------------------------------------------------------------------------------------
def test_write_comparison(tmp_path):
    runs = []
    for i, (k, name) in enumerate([(2, "resnet18"), (2, "<effnet>"), (3, "three-class")]):
        y, p = _task(k, seed=i)
        m = compute_metrics(y, p, [str(c) for c in range(k)], n_bootstrap=50)
        runs.append(
            {
                "name": name,
                "metrics": m,
                "history": _history(4 + i) if i < 2 else None,
                "y_true": y if i else None,
                "probs": p if i else None,
                "labels": [str(c) for c in range(k)],
            }
        )
    path = write_comparison(runs, tmp_path / "cmp")
    html = path.read_text()
    assert path.name == "compare.html"
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["compare.csv", "compare.html"]
    assert "resnet18" in html and "&lt;effnet&gt;" in html and "<effnet>" not in html
    assert html.count(_plotly_head()) == 1
    figs = _figure_json(html)
    assert set(figs) == {
        "fig-metrics",
        "fig-training-val_acc",
        "fig-training-val_auc",
        "fig-training-val_loss",
        "fig-roc",
    }
    for dom in figs:
        assert html.count(f'id="{dom}"') == 1
    # Bars: one trace per run, the headline metrics with their bootstrap intervals.
    bars = figs["fig-metrics"]["data"]
    assert [b["name"] for b in bars] == [r["name"] for r in runs]
    assert bars[0]["x"] == figures.HEADLINE_LABELS
    m0 = runs[0]["metrics"]
    i_auc = figures.HEADLINE.index("auc")
    assert bars[0]["y"][i_auc] == pytest.approx(m0["auc"], abs=1e-4)
    assert bars[0]["error_y"]["arrayminus"][i_auc] == pytest.approx(
        m0["auc"] - m0["ci"]["auc"][0], abs=1e-4
    )
    assert [b["marker"]["color"] for b in bars] == figures.COLORS[:3]
    # ROC overlay: runs with predictions, in the colour of their bar.
    rocs = [t for t in figs["fig-roc"]["data"] if t["name"] != "chance"]
    assert [t["name"].split(" (")[0] for t in rocs] == ["<effnet>", "three-class micro-average"]
    assert rocs[0]["line"]["color"] == figures.COLORS[1]
    assert _area(rocs[0]) == pytest.approx(runs[1]["metrics"]["auc"], abs=1e-3)
    val = figs["fig-training-val_acc"]["data"]
    assert [t["name"] for t in val] == ["resnet18", "<effnet>"] and val[1]["x"] == [1, 2, 3, 4, 5]
    assert "<b>Metrics.</b> Headline metrics per run" in html
    with open(tmp_path / "cmp" / "compare.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["resnet18", "<effnet>", "three-class"]
    assert float(rows[0]["accuracy"]) == pytest.approx(runs[0]["metrics"]["accuracy"])
    assert float(rows[0]["auc_ci_low"]) == pytest.approx(runs[0]["metrics"]["ci"]["auc"][0])


def test_comparison_table():
    y, p = _task(2)
    m = compute_metrics(y, p, ["a", "b"], n_bootstrap=50)
    text = comparison_table([{"name": "model-a", "metrics": m}, {"name": "b", "metrics": m}])
    lines = text.splitlines()
    assert len(lines) == 4 and "model-a" in text and lines[0].startswith("name")
    lo, hi = m["ci"]["accuracy"]
    assert f"{m['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]" in text
    assert len(lines[2]) == len(lines[3])  # aligned columns
    with pytest.raises(ValueError):
        comparison_table([])
