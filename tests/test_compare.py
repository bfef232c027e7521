"""Tests for medlens.compare: loading run evaluations and comparing runs side by side."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest

from medlens.errors import ModelLoadError
from medlens.reporting.compare import compare_runs, load_run_evaluation
from medlens.reporting.figures import HEADLINE


@pytest.fixture()
def two_runs(tmp_path, trained_run):
    """The shared run and a copy whose val metrics are edited to differ."""
    a = tmp_path / "baseline"
    b = tmp_path / "challenger"
    for dst in (a, b):
        shutil.copytree(trained_run, dst, ignore=shutil.ignore_patterns("checkpoints", "*.pt"))
    mpath = b / "eval" / "val" / "metrics.json"
    m = json.loads(mpath.read_text())
    m["accuracy"], m["auc"] = 0.8125, 0.875
    mpath.write_text(json.dumps(m))
    return a, b


def test_load_run_evaluation_reads_metrics_predictions_and_history(trained_run):
    r = load_run_evaluation(trained_run)
    assert r["name"] == trained_run.name
    assert r["labels"] == ["NORMAL", "PNEUMONIA"]
    metrics = json.loads((trained_run / "eval" / "val" / "metrics.json").read_text())
    assert r["metrics"] == metrics
    with open(trained_run / "eval" / "val" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert r["y_true"].tolist() == [r["labels"].index(x["true"]) for x in rows]
    assert r["probs"].shape == (len(rows), 2)
    np.testing.assert_allclose(r["probs"].sum(1), 1, atol=1e-5)
    assert len(r["history"]) == 4 and r["history"][0]["epoch"] == 1.0
    test = load_run_evaluation(trained_run, split="test")
    assert (
        test["metrics"]["n"]
        == json.loads((trained_run / "eval" / "test" / "metrics.json").read_text())["n"]
    )


def test_load_run_evaluation_without_evaluation_is_a_clear_error(tmp_path, trained_run):
    with pytest.raises(ModelLoadError) as e:
        load_run_evaluation(tmp_path)
    assert "no val evaluation" in str(e.value) and "medlens train" in str(e.value)
    with pytest.raises(ModelLoadError, match="no train evaluation"):
        load_run_evaluation(trained_run, split="train")


def test_load_run_evaluation_without_predictions_still_works(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(
        trained_run, run, ignore=shutil.ignore_patterns("predictions.csv", "checkpoints")
    )
    r = load_run_evaluation(run)
    assert r["y_true"] is None and r["probs"] is None
    assert r["metrics"]["n"] > 0


def test_compare_runs_table_and_files(tmp_path, two_runs):
    a, b = two_runs
    out = tmp_path / "cmp"
    table, html = compare_runs([str(a), str(b)], out)
    lines = table.splitlines()
    assert lines[0].startswith("Validation split of each run")
    assert lines[1].split()[:2] == ["name", "n"] and "auc" in lines[1]
    row_a = next(line for line in lines if line.startswith("baseline"))
    row_b = next(line for line in lines if line.startswith("challenger"))
    assert "0.812" in row_b or "0.8125" in row_b
    assert "0.875" in row_b
    assert "0.812" not in row_a
    assert html == out / "compare.html" and html.is_file()
    text = html.read_text()
    assert "baseline" in text and "challenger" in text
    with open(out / "compare.csv", newline="") as f:
        rows = list(csv.reader(f))
    names = [r[0] for r in rows[1:]]
    assert names == ["baseline", "challenger"]
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.html"]  # no plots/
    # The figures are drawn from the runs' files: the challenger's edited metrics, the ROC
    # curves from predictions.csv, the validation curves from training_metrics.csv.
    figs = json.loads(
        re.search(r'<script type="application/json" id="figures">(.*?)</script>', text, re.S)[1]
    )
    bars = {b["name"]: b for b in figs["fig-metrics"]["data"]}
    i_acc, i_auc = HEADLINE.index("accuracy"), HEADLINE.index("auc")
    assert bars["challenger"]["y"][i_acc] == 0.8125 and bars["challenger"]["y"][i_auc] == 0.875
    base = load_run_evaluation(a)
    assert bars["baseline"]["y"][i_acc] == pytest.approx(base["metrics"]["accuracy"], abs=1e-4)
    roc = {t["name"].split(" (")[0]: t for t in figs["fig-roc"]["data"]}
    assert set(roc) == {"chance", "baseline", "challenger"}
    assert f"AUC = {base['metrics']['auc']:.3f}" in roc["baseline"]["name"]
    val = {t["name"]: t for t in figs["fig-training-val_acc"]["data"]}
    assert val["baseline"]["y"] == pytest.approx([h["val_acc"] for h in base["history"]], abs=1e-4)


def test_compare_runs_with_the_same_folder_name_uses_paths(tmp_path, trained_run):
    a = tmp_path / "x" / "run"
    b = tmp_path / "y" / "run"
    for dst in (a, b):
        shutil.copytree(trained_run, dst, ignore=shutil.ignore_patterns("checkpoints", "*.pt"))
    table, _ = compare_runs([str(a), str(b)], tmp_path / "cmp")
    assert str(a) in table and str(b) in table


def test_compare_runs_missing_run_names_it(tmp_path, trained_run):
    with pytest.raises(ModelLoadError) as e:
        compare_runs([str(trained_run), str(tmp_path / "ghost")], tmp_path / "cmp")
    assert "ghost" in str(e.value)
    assert not (tmp_path / "cmp").exists()  # nothing written when a run is missing
