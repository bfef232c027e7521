"""The run and model folders: every file name, and the one rule that finds a model by name."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from medlens.errors import ModelLoadError


def bundled_models_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "bundled"


def resolve_model(ref: str | os.PathLike, extra_dirs: list[str | os.PathLike] = ()) -> Path:
    """A model reference -> its folder.

    ``ref`` is a model folder (a run of ``medlens train``), or the name of a bundled model
    or of a model folder inside one of ``extra_dirs`` (``--models DIR``).
    """
    p = Path(ref)
    if (p / "model.json").exists():
        return p
    if p.exists():
        raise ModelLoadError(
            f"{p} is not a trained model: model.json is missing (train one with "
            "`medlens train --out RUN`, or wait until the run has finished)"
        )
    name = str(ref)
    for d in [*extra_dirs, bundled_models_dir()]:
        cand = Path(d) / name
        if (cand / "model.json").exists():
            return cand
    known = sorted(available_models(extra_dirs))
    raise ModelLoadError(
        f"no model {name!r}: not a run folder and not a bundled model; "
        f"available: {', '.join(known) if known else 'none'} "
        "(or pass the path of a run folder)"
    )


def available_models(extra_dirs: list[str | os.PathLike] = ()) -> dict[str, Path]:
    """Names of bundled models and of models in ``extra_dirs`` -> folder."""
    found = {}
    for d in [bundled_models_dir(), *extra_dirs]:
        d = Path(d)
        if d.is_dir():
            for sub in sorted(d.iterdir()):
                if (sub / "model.json").exists():
                    found[sub.name] = sub
    return found


def read_history(folder: str | Path) -> list[dict] | None:
    """Rows of a run's ``training_metrics.csv`` (numbers parsed), or None."""
    path = Path(folder) / "training_metrics.csv"
    if not path.exists():
        return None
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v) if v not in ("", None) else None
                except ValueError:
                    row[k] = v
            rows.append(row)
    return rows


def headline_metrics(m: dict) -> dict:
    keys = (
        "n",
        "accuracy",
        "balanced_accuracy",
        "auc",
        "sensitivity",
        "specificity",
        "f1",
        "precision",
        "ece",
        "brier",
        "ci",
        "threshold",
    )
    return {k: m.get(k) for k in keys}
