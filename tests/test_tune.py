"""Tests for medlens tune (Optuna search over training settings)."""

from __future__ import annotations

import csv

import pytest
import yaml

from medlens.cli import main
from medlens.config import merge_settings
from medlens.training.trainer import train


def _argv(data, out, *extra):
    return ["tune", "--data", str(data), "--out", str(out), "--model", "cnn", "--image-size",
            "32", "--epochs", "2", "--batch-size", "8", "--threads", "1", "--quiet", *extra]  # fmt: skip


@pytest.mark.slow
def test_tune_runs_trials_keeps_the_study_and_writes_the_best_recipe(
    tmp_path, synthetic_data, capsys
):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                     "resize": {"choices": ["stretch", "pad"]}}))  # fmt: skip
    out = tmp_path / "study"
    assert main(_argv(synthetic_data, out, "--trials", "2", "--space", str(space))) == 0
    assert "best: trial" in capsys.readouterr().out
    assert (out / "study.db").exists() and (out / "trial-0" / "model.json").exists()
    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["0", "1"] and {r["state"] for r in rows} == {"complete"}
    best = max(rows, key=lambda r: float(r["value"]))
    recipe = yaml.safe_load((out / "best.yaml").read_text())
    assert recipe["lr"] == pytest.approx(float(best["lr"])) and recipe["resize"] == best["resize"]
    assert recipe["model"] == "cnn" and recipe["epochs"] == 2 and "out" not in recipe
    assert merge_settings({**recipe, "data": "d"}, {"out": "o"}).lr == recipe["lr"]  # a recipe
    assert '"fig-history"' in (out / "tune.html").read_text()
    # The study continues: two more trials make four.
    assert main(_argv(synthetic_data, out, "--trials", "4", "--space", str(space))) == 0
    with open(out / "trials.csv", newline="") as f:
        assert [r["trial"] for r in csv.DictReader(f)] == ["0", "1", "2", "3"]


def test_a_space_naming_no_setting_is_exit_2(tmp_path, synthetic_data, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: {low: 0.001, high: 0.01}\n")
    assert main(_argv(synthetic_data, tmp_path / "s", "--space", str(space))) == 2
    assert "'learning_rate' is not a training setting" in capsys.readouterr().err


def test_on_epoch_sees_every_row_and_can_stop_a_run(tmp_path, synthetic_data, train_config):
    seen = []

    class Stop(Exception):
        pass

    def hook(row):
        seen.append(row["epoch"])
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        train(train_config(synthetic_data, tmp_path / "r", epochs=5), on_epoch=hook)
    assert seen == [1, 2] and not (tmp_path / "r" / "model.json").exists()
