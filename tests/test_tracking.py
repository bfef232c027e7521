"""Experiment tracking with MLflow (``--tracking-uri``): what train, evaluate and calibrate log,
read back with MLflow's own client from a ``file:`` store; no tracking unless asked."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from medlens.cli import main
from medlens.tracking import flatten, summary_metrics, tracking_uri

# starts outside processes or runs real models on real data (`make test-fast` leaves it out)
pytestmark = pytest.mark.slow

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def _no_ambient_tracking(monkeypatch, tmp_path):
    """No MLFLOW_* setting of the caller's shell leaks in; the working folder is empty (an
    ``mlruns`` folder appearing there would be tracking nobody asked for)."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the test's own client
    monkeypatch.chdir(tmp_path)


def _client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"file:{store}")


def _only_run(store, experiment: str):
    client = _client(store)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id])
    return client, runs


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for a in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return found


def test_a_training_run_is_readable_with_mlflows_client(tmp_path, synthetic_data, capsys):
    store, out = tmp_path / "mlruns", tmp_path / "run"
    code = main(["train", "--data", str(synthetic_data), "--out", str(out), "--model", "cnn",
                 "--image-size", "32", "--epochs", "3", "--batch-size", "8", "--threads", "1",
                 "--quiet", "--tracking-uri", f"file:{store}", "--experiment", "tiny"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    client, runs = _only_run(store, "tiny")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["medlens.command"] == "train"
    params = run.data.params
    # the resolved config: settings, nested ones flattened, and what training resolved
    assert params["model"] == "cnn" and params["epochs"] == "3" and params["batch_size"] == "8"
    assert params["image_size"] == "32" and params["augment.zoom"] == "0.1"
    assert (
        params["preprocess.image_size"] == "32" and params["classes"] == "['NORMAL', 'PNEUMONIA']"
    )
    with open(out / "training_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for name in ("val_loss", "train_loss", "val_acc"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == list(range(1, len(rows) + 1)), name
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.value for m in history] == [pytest.approx(float(r["val_loss"])) for r in rows]
    m = run.data.metrics
    assert m["final_val_auc_ci_low"] <= m["final_val_auc"] <= m["final_val_auc_ci_high"]
    assert {"final_val_accuracy", "final_test_accuracy", "final_test_auc"} <= set(m)
    arts = _artifacts(client, run.info.run_id)
    assert {"config.yaml", "model.json", "training_metrics.csv", "eval/val/metrics.json",
            "eval/val/report.html", "eval/test/metrics.json"} <= arts  # fmt: skip
    assert not any(a.endswith((".pt", "predictions.csv")) for a in arts)  # no weights, no paths


def test_no_tracking_unless_asked(tmp_path, trained_run, synthetic_data, capsys):
    assert tracking_uri(None) is None
    code = main(["evaluate", "--model", str(trained_run), "--data", str(synthetic_data),
                 "--out", str(tmp_path / "ev"), "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    # and MLflow is not even imported by the commands' modules
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    probe = ("import sys, medlens.cli, medlens.tracking, medlens.training.trainer, "
             "medlens.training.tune; print('mlflow' in sys.modules)")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert res.stdout.strip() == "False", res.stderr


def test_evaluate_logs_to_the_store_named_in_the_environment(
    tmp_path, monkeypatch, trained_run, synthetic_data, capsys
):
    store = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    out = tmp_path / "ev"
    code = main(["evaluate", "--model", str(trained_run), "--data", str(synthetic_data),
                 "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    client, runs = _only_run(store, "medlens")  # the default experiment
    run = runs[0]
    assert run.data.tags["medlens.command"] == "evaluate"
    assert run.data.params["model_name"] == trained_run.name
    assert run.data.params["data"] == str(synthetic_data)
    m = run.data.metrics
    assert m["n"] == 80 and m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"]
    assert {"accuracy", "sensitivity", "specificity", "ece"} <= set(m)
    assert {"metrics.json", "report.html"} <= _artifacts(client, run.info.run_id)


def test_calibrate_logs_before_and_after(tmp_path, trained_run, synthetic_data, capsys):
    store = tmp_path / "mlruns"
    code = main(["calibrate", "--model", str(trained_run), "--data", str(synthetic_data),
                 "--out", str(tmp_path / "site"), "--min-per-class", "20", "--quiet",
                 "--tracking-uri", f"file:{store}"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    client, runs = _only_run(store, "medlens")
    run = runs[0]
    assert run.data.tags["medlens.command"] == "calibrate"
    assert run.data.params["min_per_class"] == "20"
    m = run.data.metrics
    assert {"before_auc", "after_auc", "after_auc_ci_low", "temperature", "threshold"} <= set(m)
    arts = _artifacts(client, run.info.run_id)
    assert {"model.json", "model_card.json", "model_card.md"} <= arts, arts
    assert any(a.startswith("eval/") and a.endswith("metrics.json") for a in arts), arts


def test_cross_validation_logs_one_nested_run_per_fold(tmp_path, synthetic_data, capsys):
    store, out = tmp_path / "mlruns", tmp_path / "cv"
    code = main(["train", "--data", str(synthetic_data), "--out", str(out), "--model", "cnn",
                 "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--threads", "1",
                 "--folds", "2", "--quiet", "--tracking-uri", f"file:{store}"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    client, runs = _only_run(store, "medlens")
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    folds = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parent) == 1 and sorted(r.info.run_name for r in folds) == ["fold-0", "fold-1"]
    assert {r.data.tags["mlflow.parentRunId"] for r in folds} == {parent[0].info.run_id}
    assert all(r.data.params["fold"] in ("0", "1") for r in folds)
    assert len(client.get_metric_history(folds[0].info.run_id, "val_loss")) == 1
    assert "cv_mean_auc" in parent[0].data.metrics
    assert {"cv.json", "cv.csv"} <= _artifacts(client, parent[0].info.run_id)


def test_an_unusable_store_fails_before_training(tmp_path, synthetic_data, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", str(synthetic_data), "--out", str(out), "--model", "cnn",
                 "--quiet", "--tracking-uri", "http://127.0.0.1:9"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--tracking-uri http://127.0.0.1:9" in err and "server" in err
    assert not out.exists()


def test_flatten_and_summary_metrics():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": [1], "f": {}}) == {
        "a.b": 1, "a.c.d": 2, "e": [1], "f": {}}  # fmt: skip
    m = {"auc": 0.9, "n": 10, "ok": True, "note": "x", "ece": float("nan"),
         "ci": {"auc": [0.8, 0.95]}, "ood": {"share": 0.1}}  # fmt: skip
    assert summary_metrics(m, "val_") == {
        "val_auc": 0.9, "val_n": 10.0, "val_auc_ci_low": 0.8, "val_auc_ci_high": 0.95,
        "val_ood_share": 0.1}  # fmt: skip


def test_tune_logs_the_study_and_one_nested_run_per_trial(tmp_path, synthetic_data, capsys):
    store, out = tmp_path / "mlruns", tmp_path / "study"
    code = main(["tune", "--data", str(synthetic_data), "--out", str(out), "--model", "cnn",
                 "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--threads", "1",
                 "--trials", "2", "--quiet", "--tracking-uri", f"file:{store}"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    client, runs = _only_run(store, "medlens")
    study = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(study) == 1 and sorted(r.info.run_name for r in trials) == ["trial-0", "trial-1"]
    assert study[0].data.tags["medlens.command"] == "tune"
    assert "best_value" in study[0].data.metrics and study[0].data.params["trials"] == "2"
    assert {"best.yaml", "trials.csv", "tune.html"} <= _artifacts(client, study[0].info.run_id)
    for r in trials:  # each trial's own settings and epochs
        assert "lr" in r.data.params
        assert len(client.get_metric_history(r.info.run_id, "val_loss")) == 1
