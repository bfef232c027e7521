"""Tests for grouped k-fold cross-validation (medlens train --folds K)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medlens.cli import main
from medlens.data.datasets import Sample
from medlens.data.splits import fold_split
from medlens.errors import DataError


def _samples(n_patients: int = 30, per_patient: int = 2, unknown: int = 12) -> list[Sample]:
    out = [Sample(f"p{p}_{m}.png", p % 2, f"p{p}") for p in range(n_patients)
           for m in range(per_patient)]  # fmt: skip
    out += [Sample(f"u{i}.png", i % 2, None) for i in range(unknown)]
    return out


def test_folds_partition_the_samples_by_patient_and_class():
    samples = _samples()
    vals = [fold_split(samples, 3, f, seed=1)[1] for f in range(3)]
    sources = [s.source for v in vals for s in v]
    assert sorted(sources) == sorted(s.source for s in samples)  # every sample validates once
    for f, val in enumerate(vals):
        train = fold_split(samples, 3, f, seed=1)[0]
        assert not {s.patient for s in train if s.patient} & {s.patient for s in val if s.patient}
        share = np.mean([s.label for s in val])
        assert 0.3 < share < 0.7  # stratified
    assert fold_split(samples, 3, 0, seed=1) == fold_split(samples, 3, 0, seed=1)
    with pytest.raises(DataError, match="--fold must be in 0..2"):
        fold_split(samples, 3, 3)


@pytest.mark.slow
def test_train_folds_writes_every_run_and_the_summary(tmp_path, synthetic_data, capsys):
    out = tmp_path / "cv"
    argv = ["train", "--data", str(synthetic_data), "--model", "cnn", "--image-size", "32",
            "--epochs", "1", "--batch-size", "8", "--threads", "1", "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(out), "--folds", "3"]) == 0
    summary = json.loads((out / "cv.json").read_text())
    assert summary["folds"] == 3 and len(summary["per_fold"]) == 3
    accs = [f["accuracy"] for f in summary["per_fold"]]
    assert summary["mean"]["accuracy"] == pytest.approx(np.mean(accs), abs=1e-4)
    assert summary["sd"]["accuracy"] == pytest.approx(np.std(accs), abs=1e-4)
    val_paths, test_paths = [], []
    for f in range(3):
        run = out / f"fold-{f}"
        assert (run / "model.json").exists()
        with open(run / "eval" / "val" / "predictions.csv", newline="") as fh:
            val_paths.append({r["path"] for r in csv.DictReader(fh)})
        with open(run / "eval" / "test" / "predictions.csv", newline="") as fh:
            test_paths.append({r["path"] for r in csv.DictReader(fh)})
    assert not (val_paths[0] & val_paths[1]) and not (val_paths[1] & val_paths[2])
    assert test_paths[0] == test_paths[1] == test_paths[2]  # the carved test split stays aside
    assert sum(summary["per_fold"][f]["n"] for f in range(3)) == len(set().union(*val_paths))
    assert summary["pooled_out_of_fold"]["n"] == len(set().union(*val_paths))
    with open(out / "cv.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["fold"] for r in rows] == ["0", "1", "2", "mean", "sd", "min", "max"]
    assert "cross-validation over 3 folds" in capsys.readouterr().err
    # The cross-validation folder exports as one ensemble of its folds.
    dest = tmp_path / "cv-bundle"
    assert main(["export", "--model", str(out), "--bundle", str(dest)]) == 0
    meta = json.loads((dest / "model.json").read_text())
    assert [m["run"] for m in meta["ensemble"]] == ["fold-0", "fold-1", "fold-2"]
    assert main(["export", "--model", str(out)]) == 2
    assert "cross-validation folder's folds) make an ensemble" in capsys.readouterr().err
    (out / "fold-2" / "model.json").unlink()
    assert main(["export", "--model", str(out), "--bundle", str(tmp_path / "b2")]) == 2
    err = capsys.readouterr().err
    assert "3-fold cross-validation but" in err and "fold-2 has no finished run" in err
    assert not (tmp_path / "b2").exists()
    # One fold alone, e.g. on another machine.
    assert main([*argv, "--out", str(tmp_path / "one"), "--folds", "3", "--fold", "1"]) == 0
    with open(tmp_path / "one" / "eval" / "val" / "predictions.csv", newline="") as fh:
        assert {r["path"] for r in csv.DictReader(fh)} == val_paths[1]


def test_a_fold_outside_the_folds_is_exit_2(tmp_path, synthetic_data, capsys):
    code = main(["train", "--data", str(synthetic_data), "--out", str(tmp_path / "o"),
                 "--folds", "3", "--fold", "3"])  # fmt: skip
    assert code == 2 and "--fold 3 needs --folds K with K > 3" in capsys.readouterr().err
    code = main(["train", "--data", str(synthetic_data), "--out", str(tmp_path / "o"),
                 "--folds", "1"])  # fmt: skip
    assert code == 2 and "--folds must be 0 or >= 2" in capsys.readouterr().err
