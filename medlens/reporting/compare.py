"""``medlens compare``: runs side by side (the seeds' custom CNN vs transfer learning)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from medlens.artifacts.folders import read_history
from medlens.errors import ModelLoadError


def load_run_evaluation(run: str | Path, split: str = "val") -> dict:
    """What :func:`medlens.report.write_comparison` needs from one run folder."""
    run = Path(run)
    mpath = run / "eval" / split / "metrics.json"
    if not mpath.exists():
        raise ModelLoadError(
            f"{run} has no {split} evaluation ({mpath} is missing); is it a "
            "finished `medlens train` run? (--split val or test)"
        )
    metrics = json.loads(mpath.read_text())
    labels = metrics.get("labels") or json.loads((run / "model.json").read_text())["labels"]
    y_true = probs = None
    ppath = run / "eval" / split / "predictions.csv"
    if ppath.exists():
        with open(ppath, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows:
            y_true = np.array([labels.index(r["true"]) for r in rows])
            probs = np.array([[float(r[f"p_{c}"]) for c in labels] for r in rows])
    return {
        "name": run.name,
        "metrics": metrics,
        "history": read_history(run),
        "y_true": y_true,
        "probs": probs,
        "labels": labels,
    }


def compare_runs(runs: list[str], out: str | Path, split: str = "val") -> tuple[str, Path]:
    """Table (text) and ``compare.html`` for several runs. Returns ``(table, html_path)``."""
    from medlens.reporting.report import comparison_table, write_comparison

    loaded = [load_run_evaluation(r, split) for r in runs]
    names = [r["name"] for r in loaded]
    if len(set(names)) != len(names):  # two runs called "run" in different folders
        for r, path in zip(loaded, runs):
            r["name"] = str(path)
    return comparison_table(loaded), write_comparison(loaded, out)
