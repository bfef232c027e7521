"""Scale-out figures on this machine (issue #16): training images/s under torchrun with 1 and
2 processes, batch-prediction images/s with the local engine and Ray with 1 and 2 actors, and
serving requests/s with 1 and 2 server processes.

    python bench/scale_out.py --data ../shared/data/chest_xray/train [--images 400]

Run it on an idle machine: every figure shares the same cores. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from medlens.bench import running_server
from medlens.bench.load import load_test, predict_url, synthetic_jpeg


def _subset(data: Path, n: int, dest: Path) -> Path:
    """``n`` images of ``data`` (class folders), linked into ``dest``, classes in turn."""
    classes = sorted(p for p in data.iterdir() if p.is_dir())
    files = {c: sorted(c.glob("*"))[: n // len(classes)] for c in classes}
    for c, fs in files.items():
        (dest / c.name).mkdir(parents=True)
        for f in fs:
            os.symlink(f.resolve(), dest / c.name / f.name)
    return dest


def _train(data: Path, out: Path, procs: int, epochs: int) -> float:
    """Training images/s of the last epoch (full fine-tuning of EfficientNet-Lite0 at 224 px,
    no augmentation, one epoch of validation included)."""
    cmd = ["-m", "medlens", "train", "--data", str(data), "--out", str(out), "--transfer",
           "full", "--epochs", str(epochs), "--no-augment", "--quiet"]  # fmt: skip
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    subprocess.run([*launcher, *cmd], check=True, capture_output=True)
    with open(out / "training_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    n_train = sum(cfg["split_counts"]["train"].values())
    return n_train / float(rows[-1]["seconds"])


def _predict(data: Path, out: Path, engine: str, workers: int = 1) -> float:
    n = sum(1 for _ in data.rglob("*") if _.is_file())
    cmd = [sys.executable, "-m", "medlens", "predict", "--model", "pneumonia", str(data),
           "--out", str(out), "--quiet", "--engine", engine]  # fmt: skip
    if engine == "ray":
        cmd += ["--ray-workers", str(workers)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return n / (time.perf_counter() - t0)


def _serve(processes: int, duration: float) -> float:
    from medlens.artifacts.folders import resolve_model

    folder = resolve_model("pneumonia")
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        shutil.copytree(folder, models / "pneumonia")
        extra = ["--log-level", "warning", "--rate-limit", "off", "--workers", str(processes)]
        with running_server(models, *extra) as srv:
            res = load_test(predict_url(srv.port, "pneumonia"), synthetic_jpeg(), 8, duration, 3)
    return res.requests / duration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="a class-folder dataset")
    ap.add_argument("--images", type=int, default=400, help="images used (default 400)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of serving load")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = _subset(a.data, a.images, tmp / "data")
        rows = []
        for procs in (1, 2):
            ips = _train(data, tmp / f"train{procs}", procs, a.epochs)
            rows.append((f"training, torchrun {procs} process(es)", f"{ips:.1f} images/s"))
        rows.append(("batch prediction, local engine",
                     f"{_predict(data, tmp / 'local.csv', 'local'):.1f} images/s"))  # fmt: skip
        for w in (1, 2):
            ips = _predict(data, tmp / f"ray{w}.csv", "ray", w)
            rows.append((f"batch prediction, Ray {w} actor(s) (start-up included)",
                         f"{ips:.1f} images/s"))  # fmt: skip
        for p in (1, 2):
            rows.append((f"serving, {p} process(es), 8 connections",
                         f"{_serve(p, a.duration):.1f} requests/s"))  # fmt: skip
    print("| what | figure |\n|---|---|")
    for what, fig in rows:
        print(f"| {what} | {fig} |")


if __name__ == "__main__":
    main()
