"""Tests for medlens.compare: loading run evaluations and comparing runs side by side."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from medlens.artifacts.folders import bundled_models_dir
from medlens.cli import main
from medlens.errors import ModelLoadError, UsageError
from medlens.reporting.compare import (
    compare_on_data,
    compare_runs,
    load_run_evaluation,
    paired_table,
    promotion_verdict,
)
from medlens.reporting.figures import HEADLINE

CHEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray" / "train"


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


# --------------------------------------------------------------------------- --data: paired tests


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def kermany(tmp_path_factory) -> Path:
    """20 NORMAL and 20 PNEUMONIA Kermany images (symlinks; the data holds no test split)."""
    if not CHEST.is_dir():
        pytest.skip(f"real data not available: {CHEST} is absent (a clone outside the workspace)")
    root = tmp_path_factory.mktemp("kermany")
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir()
        for f in sorted((CHEST / label).iterdir())[:20]:
            (root / label / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def pneumonia_copy(tmp_path_factory) -> Path:
    """A second copy of the bundled pneumonia model: the same network under another name."""
    dst = tmp_path_factory.mktemp("models") / "pneumonia-v2"
    shutil.copytree(bundled_models_dir() / "pneumonia", dst)
    return dst


@pytest.mark.slow
def test_compare_data_identical_models_json(capsys, tmp_path, kermany, pneumonia_copy):
    out = tmp_path / "cmp"
    code, stdout, _ = _cli(
        capsys, "compare", "pneumonia", pneumonia_copy, "--data", kermany, "--json",
        "--promote-if-not-worse", "0.1", "--out", out,
    )  # fmt: skip
    assert code == 0
    res = json.loads(stdout)
    assert res == json.loads((out / "compare.json").read_text())
    assert res["n"] == 40 and res["class_counts"] == {"NORMAL": 20, "PNEUMONIA": 20}
    assert res["labels"] == ["NORMAL", "PNEUMONIA"] and res["reference"] == "pneumonia"
    assert [m["name"] for m in res["models"]] == ["pneumonia", "pneumonia-v2"]
    first, second = res["models"]
    for key in ("accuracy", "accuracy_ci", "auc", "auc_ci", "threshold"):
        assert first[key] == second[key], key
    assert first["accuracy_ci"][0] <= first["accuracy"] <= first["accuracy_ci"][1]
    (cmp,) = res["comparisons"]
    assert (cmp["reference"], cmp["model"]) == ("pneumonia", "pneumonia-v2")
    mc, dl = cmp["mcnemar"], cmp["delong"]
    assert (mc["b"], mc["c"], mc["p"], mc["difference"]) == (0, 0, 1.0, 0.0)
    assert mc["method"] == "exact binomial" and mc["ci"][0] < 0 < mc["ci"][1]
    assert (dl["difference"], dl["p"], dl["ci"]) == (0.0, 1.0, [0.0, 0.0])
    assert dl["auc_a"] == dl["auc_b"] == first["auc"] and "DeLong" in dl["method"]
    v = res["promotion"]
    assert v["promote"] and v["margin"] == 0.1 and v["failed"] == []
    # 40 images cannot show non-inferiority at 2 points, even for the same network: with no
    # discordant pair the accuracy difference's interval is still about +-0.09 wide.
    strict = promotion_verdict(cmp, 0.02)
    assert not strict["promote"] and [f["figure"] for f in strict["failed"]] == ["accuracy"]
    table = paired_table(res)
    assert "pneumonia-v2 vs pneumonia" in table and "McNemar b=0 c=0" in table
    assert "promote: not worse at margin 0.1" in table


@pytest.mark.slow
def test_compare_data_worse_candidate_is_not_promoted(capsys, tmp_path, kermany):
    worse = tmp_path / "pneumonia-strict"
    shutil.copytree(bundled_models_dir() / "pneumonia", worse)
    meta = json.loads((worse / "model.json").read_text())
    meta["threshold"] = 0.999999  # an absurd operating point: almost nothing is PNEUMONIA
    (worse / "model.json").write_text(json.dumps(meta))
    code, stdout, err = _cli(
        capsys, "compare", "pneumonia", worse, "--data", kermany, "--promote-if-not-worse",
        "0.1", "--quiet",
    )  # fmt: skip
    assert code == 1
    assert "pneumonia-strict vs pneumonia" in stdout
    assert "do not promote: accuracy lower 95% bound" in stdout
    assert "auc" not in stdout.splitlines()[-1]  # the same network: its AUC is not worse
    b = int(re.search(r"McNemar b=(\d+) c=0", stdout)[1])
    assert b >= 10  # the PNEUMONIA images the reference gets right and the strict copy misses


def test_compare_data_refuses_models_with_other_labels(capsys, kermany):
    code, _, err = _cli(capsys, "compare", "pneumonia", "brain-tumor", "--data", kermany)
    assert code == 2
    assert "same labels" in err and "pneumonia: NORMAL, PNEUMONIA" in err
    assert "brain-tumor: glioma, meningioma, notumor, pituitary" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pneumonia", "ghost"], "no model 'ghost'"),
        (["pneumonia"], "at least two models"),
        (["pneumonia", "pneumonia", "--promote-if-not-worse", "1"], "must be in [0, 1)"),
        (["pneumonia", "pneumonia", "--promote-if-not-worse", "-0.1"], "must be in [0, 1)"),
        (["pneumonia", "pneumonia", "covid", "--promote-if-not-worse", "0.02"], "exactly two"),
    ],
)
def test_compare_data_bad_input_is_a_usage_error(capsys, tmp_path, args, message):
    data = tmp_path / "images"
    data.mkdir()
    code, _, err = _cli(capsys, "compare", *args, "--data", data)
    assert code == 2 and message in err and "Traceback" not in err
    with pytest.raises(UsageError, match=re.escape(message)):
        compare_on_data(
            [a for a in args if not a.startswith("--") and a not in ("1", "-0.1", "0.02")],
            data,
            margin=float(args[-1]) if "--promote-if-not-worse" in args else None,
        )


def test_compare_data_missing_folder_and_options_without_data(capsys, tmp_path):
    code, _, err = _cli(capsys, "compare", "pneumonia", "pneumonia", "--data", tmp_path / "no")
    assert code == 2 and f"--data {tmp_path / 'no'} does not exist" in err
    code, _, err = _cli(capsys, "compare", tmp_path, tmp_path, "--promote-if-not-worse", "0")
    assert code == 2 and "need --data" in err
    code, _, err = _cli(capsys, "compare", tmp_path, tmp_path, "--json")
    assert code == 2 and "need --data" in err
    code, _, err = _cli(
        capsys, "compare", "pneumonia", "pneumonia", "--data", tmp_path, "--split", "test"
    )
    assert code == 2 and "--split" in err
