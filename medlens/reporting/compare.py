"""``medlens compare``: runs side by side (the seeds' custom CNN vs transfer learning)."""

from __future__ import annotations

from pathlib import Path

from medlens.artifacts.folders import ModelFolder
from medlens.artifacts.model import read_meta
from medlens.errors import ModelLoadError


def load_run_evaluation(run: str | Path, split: str = "val") -> dict:
    """What :func:`medlens.reporting.report.write_comparison` needs from one run folder."""
    folder = ModelFolder(run)
    metrics = folder.read_metrics(split)
    if metrics is None:
        raise ModelLoadError(
            f"{folder.path} has no {split} evaluation ({folder.metrics_json(split)} is "
            "missing); is it a finished `medlens train` run? (--split val or test)"
        )
    labels = metrics.get("labels") or read_meta(folder.path).labels
    pred = folder.read_predictions(split, labels)
    return {
        "name": folder.name,
        "metrics": metrics,
        "history": folder.read_history(),
        "y_true": None if pred is None else pred.y_true,
        "probs": None if pred is None else pred.probs,
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
    return comparison_table(loaded, split), write_comparison(loaded, out, split)
