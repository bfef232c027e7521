import csv

import numpy as np
import pytest
from PIL import Image

from medlens.evaluation.metrics import compute_metrics
from medlens.reporting.report import comparison_table, plot_figures, write_comparison, write_report

IMG = '<img src="data:image/png;base64,'
BASE_PLOTS = {"roc", "pr", "confusion", "density", "reliability"}


def _task(k, n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += 1.5
    return y, np.exp(z) / np.exp(z).sum(1, keepdims=True)


def _history(n=8, with_auc=True):
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
        rows.append(row)
    return rows


def _check_pngs(folder, names):
    for name in names:
        with Image.open(folder / f"{name}.png") as im:
            im.verify()
            assert im.format == "PNG"


@pytest.mark.parametrize("k,history", [(2, _history()), (3, None), (3, _history(5, False))])
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
    names = BASE_PLOTS | ({"training"} if history else set())
    assert html.count(IMG) == len(names)
    for name in names:
        assert f'id="plot-{name}"' in html
    _check_pngs(tmp_path / "out" / "plots", names)
    assert not (tmp_path / "out" / "plots" / "training.png").exists() or history
    for key in ("accuracy", "auc", "sensitivity", "specificity", "f1", "ece", "brier"):
        assert f"{m[key]:.3f}" in html, key
    lo, hi = m["ci"]["accuracy"]
    assert f"{lo:.3f} – {hi:.3f}" in html
    assert "resnet18" in html and "demo-xray" in html and "Demo &lt;eval&gt;" in html
    assert "<script" not in html and "http" not in html  # self-contained
    for lab in labels:
        assert lab in html
    if k == 2:
        assert "Youden" in html and "0.500 (default)" in html
    else:
        assert "argmax" in html


def test_plot_figures_names():
    y, p = _task(2)
    assert set(plot_figures(y, p, ["a", "b"], 0.5, None)) == BASE_PLOTS
    assert set(plot_figures(y, p, ["a", "b"], 0.5, [])) == BASE_PLOTS
    partial = [{"epoch": 1, "train_loss": 0.7}, {"epoch": 2, "train_loss": 0.5, "val_loss": None}]
    assert "training" in plot_figures(y, p, ["a", "b"], None, partial)
    assert "training" not in plot_figures(y, p, ["a", "b"], None, [{"epoch": 1}])


def test_report_one_class(tmp_path):
    y = np.zeros(20, int)
    p = np.column_stack([np.linspace(0.9, 0.2, 20), np.linspace(0.1, 0.8, 20)])
    m = compute_metrics(y, p, ["neg", "pos"], n_bootstrap=20)
    html = write_report(tmp_path, m, y, p, ["neg", "pos"], threshold=0.5).read_text()
    assert html.count(IMG) == len(BASE_PLOTS) and "default 0.5" in html


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
    assert "resnet18" in html and "&lt;effnet&gt;" in html and "<effnet>" not in html
    assert html.count(IMG) == 3
    _check_pngs(tmp_path / "cmp" / "plots", ["compare_metrics", "compare_training", "compare_roc"])
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
