"""Data-parallel training under torchrun: 2 CPU processes with gloo (issue #16).

``torchrun --standalone --nproc-per-node=2 -m medlens train ...`` must write a complete run
folder whose ``config.yaml`` says ``world_size: 2``; and with a deterministic setting (a
linear head on cached features: no augmentation, no dropout, no class weights, the same
global batch) the weights after training equal a one-process run's within 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medlens.cli import main

# starts outside processes or runs real models on real data (`make test-fast` leaves it out)
pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*TORCHRUN, "-m", "medlens", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_torchrun_two_processes_write_one_complete_run(tmp_path, synthetic_data):
    out = tmp_path / "ddp"
    r = _torchrun(["train", "--data", str(synthetic_data), "--out", str(out), "--model", "cnn",
                   "--epochs", "3", "--image-size", "32", "--batch-size", "16", "--quiet"],
                  tmp_path)  # fmt: skip
    for name in ("model.pt", "model.json", "config.yaml", "training_metrics.csv", "ood.npz",
                 "eval/val/metrics.json", "eval/test/metrics.json", "checkpoints/last.pt"):  # fmt: skip
        assert (out / name).is_file(), name
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["world_size"] == 2 and cfg["global_batch_size"] == 16
    assert cfg["batch_size_per_process"] == 8
    rows = (out / "training_metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # one row per epoch, written once (by rank 0)
    assert "distributed: 2 processes (gloo)" in r.stderr
    # Validation was gathered whole: the run's val metrics count every validation image.
    val = yaml.safe_load((out / "eval" / "val" / "metrics.json").read_text())
    assert val["n"] == sum(cfg["split_counts"]["val"].values())


TOLERANCE = 1e-5  # absolute, on the head's weights (|w| ~ 0.05) after 2 epochs


def test_two_processes_train_the_same_weights_as_one(tmp_path, synthetic_data):
    """Same global batch, same order, gradients averaged by DDP, batch norm over the global
    batch: the weights match a one-process run to within TOLERANCE (float summation order);
    a one-process run with another seed, the control, lands far further away."""
    common = ["train", "--data", str(synthetic_data), "--model", "efficientnet-lite0",
              "--transfer", "frozen", "--head-epochs", "2", "--image-size", "64",
              "--batch-size", "16", "--no-augment", "--no-class-weights", "--dropout", "0",
              "--patience", "50", "--precision", "fp32", "--quiet"]  # fmt: skip
    one, two, other = tmp_path / "one", tmp_path / "two", tmp_path / "seed1"
    assert main([*common, "--out", str(one), "--threads", "1"]) == 0
    assert main([*common, "--out", str(other), "--threads", "1", "--seed", "1"]) == 0
    _torchrun([*common, "--out", str(two)], tmp_path)
    a, b, c = (torch.load(d / "model.pt", weights_only=True) for d in (one, two, other))
    for k in ("head.fc.weight", "head.fc.bias", "head.norm.weight", "head.norm.bias"):
        ddp, control = float((a[k] - b[k]).abs().max()), float((a[k] - c[k]).abs().max())
        assert ddp <= TOLERANCE and ddp <= control / 3, (k, ddp, control)


def test_folds_and_tune_refuse_under_torchrun(monkeypatch, capsys, synthetic_data, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--data", str(synthetic_data), "--out", str(tmp_path / "f"),
                 "--folds", "2"]) == 2  # fmt: skip
    assert "under torchrun, train one fold per command with --fold I" in capsys.readouterr().err
    assert main(["tune", "--data", str(synthetic_data), "--out", str(tmp_path / "t")]) == 2
    assert "medlens tune runs its trials in one process" in capsys.readouterr().err
    assert not (tmp_path / "f").exists() and not (tmp_path / "t").exists()


@pytest.fixture(autouse=True)
def _no_leak():
    yield
    assert not torch.distributed.is_initialized()  # the tests' own process never joins a group
