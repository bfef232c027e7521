"""Run and model folders: every file name, their readers and writers, and the one rule that
finds a model by name.

A *model folder* holds ``model.json`` (the metadata, written last: its presence marks a
complete model) and ``model.pt`` (weights) and/or ``model.onnx`` (the inference graph), with
``ood.npz`` (the out-of-distribution guard) and the model card beside them. A bundled model is
an inference-only model folder (no ``model.pt``).

A *run folder* (``medlens train --out RUN``) is a model folder plus::

    config.yaml             every setting, fully resolved
    training_metrics.csv    one row per epoch (HISTORY_COLUMNS)
    checkpoints/last.pt     for --resume
    eval/<split>/           metrics.json, report.html (figures inline), predictions.csv

Finding a model by name (:func:`find_models`, :func:`resolve_model`): a path to a model folder
is that folder; otherwise the name is looked up among the bundled models and the models in the
``--models`` folders. A model given with ``--models`` shadows a bundled model of the same name
(retraining ``pneumonia`` and serving your own is allowed); two ``--models`` folders holding
models of one name are an error.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from medlens.errors import ModelLoadError
from medlens.evaluation.metrics import predict_labels
from medlens.fileio import csv_text, write_csv, write_json

if TYPE_CHECKING:
    from medlens.evaluation.ood import OODVerdict

log = logging.getLogger(__name__)

MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.pt"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # an int8 graph a model folder may ship beside model.onnx
OOD_FILE = "ood.npz"
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
CONFIG_YAML = "config.yaml"
HISTORY_CSV = "training_metrics.csv"
CHECKPOINT = Path("checkpoints") / "last.pt"
EVAL_DIR = "eval"
METRICS_JSON = "metrics.json"
REPORT_HTML = "report.html"
PREDICTIONS_CSV = "predictions.csv"
COMPARE_HTML = "compare.html"
COMPARE_CSV = "compare.csv"
# A cross-validation folder (OUT/fold-i runs) and a tuning study folder (OUT/trial-N runs).
CV_JSON, CV_CSV = "cv.json", "cv.csv"


def fold_folder(out: str | os.PathLike, fold: int) -> Path:
    """Run folder of fold ``fold`` inside the cross-validation folder ``out``."""
    return Path(out) / f"fold-{fold}"


def cv_members(folder: str | os.PathLike) -> list[Path] | None:
    """The fold runs of a finished cross-validation folder (``medlens train --folds K``), in
    fold order; None when ``folder`` is not one.

    Raises:
        ModelLoadError: a fold named in ``cv.json`` has no finished run.
    """
    cv = Path(folder) / CV_JSON
    if not cv.is_file():
        return None
    folds = int(json.loads(cv.read_text())["folds"])
    runs = [fold_folder(folder, i) for i in range(folds)]
    missing = [str(r) for r in runs if not (r / MODEL_JSON).exists()]
    if missing:
        raise ModelLoadError(
            f"{folder} is a {folds}-fold cross-validation but {', '.join(missing)} has no "
            f"finished run (continue it with `medlens train --folds {folds} --resume`)"
        )
    return runs


STUDY_DB, BEST_YAML, TRIALS_CSV, TUNE_HTML = "study.db", "best.yaml", "trials.csv", "tune.html"

HISTORY_COLUMNS = [
    "epoch",
    "stage",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_auc",
    "lr",
    "seconds",
]
"""Columns of ``training_metrics.csv``, one row per epoch."""


@dataclass(frozen=True)
class ModelFolder:
    """The paths of one model folder (a run folder is one too)."""

    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model_json(self) -> Path:
        return self.path / MODEL_JSON

    @property
    def weights(self) -> Path:
        return self.path / MODEL_WEIGHTS

    @property
    def onnx(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def ood(self) -> Path:
        return self.path / OOD_FILE

    @property
    def card_json(self) -> Path:
        return self.path / CARD_JSON

    @property
    def card_md(self) -> Path:
        return self.path / CARD_MD

    @property
    def is_model(self) -> bool:
        """``model.json`` is there: the model is complete."""
        return self.model_json.exists()

    @property
    def inference_only(self) -> bool:
        """Shipped without ``model.pt`` (a bundled model): it runs on ONNX Runtime alone."""
        return not self.weights.exists()

    # -- run folder ------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / CONFIG_YAML

    @property
    def history(self) -> Path:
        return self.path / HISTORY_CSV

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def eval_dir(self, split: str) -> Path:
        return self.path / EVAL_DIR / split

    def metrics_json(self, split: str) -> Path:
        return self.eval_dir(split) / METRICS_JSON

    def predictions_csv(self, split: str) -> Path:
        return self.eval_dir(split) / PREDICTIONS_CSV

    def read_config(self) -> dict:
        """``config.yaml`` as a dict (settings and the facts training resolved)."""
        return yaml.safe_load(self.config.read_text()) or {}

    def read_history(self) -> list[dict] | None:
        return read_history(self.path)

    def write_history(self, rows: list[dict]) -> None:
        write_csv(self.history, rows, HISTORY_COLUMNS)

    def read_metrics(self, split: str) -> dict | None:
        path = self.metrics_json(split)
        return json.loads(path.read_text()) if path.exists() else None

    def read_predictions(self, split: str, labels: Sequence[str]) -> Predictions | None:
        return read_predictions(self.predictions_csv(split), labels)


# ----------------------------------------------------------------------------- history


def read_history(folder: str | os.PathLike) -> list[dict] | None:
    """Rows of a run's ``training_metrics.csv`` (numbers parsed), or None."""
    path = Path(folder) / HISTORY_CSV
    if not path.exists():
        return None
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, float | str | None] = {}
            for k, v in r.items():
                try:
                    row[k] = float(v) if v not in ("", None) else None
                except ValueError:
                    row[k] = v
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- predictions


@dataclass
class Predictions:
    """The rows of an ``eval/<split>/predictions.csv``."""

    paths: list[str]
    y_true: np.ndarray  # int (N,)
    probs: np.ndarray  # float (N, K)


def write_predictions(
    path: str | os.PathLike,
    sources: Iterable[str],
    y_true: np.ndarray,
    pred: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    ood: Sequence[OODVerdict] | None = None,
) -> None:
    """``path,true,pred,p_<class>...``: one row per evaluated image; with ``ood`` (the guard's
    verdict per image) also ``ood_score,ood_ratio,ood_flag``."""
    rows = [
        {
            "path": s,
            "true": labels[t],
            "pred": labels[p],
            **{f"p_{c}": round(float(v), 6) for c, v in zip(labels, pr)},
        }
        for s, t, p, pr in zip(sources, y_true, pred, probs)
    ]
    columns = ["path", "true", "pred"] + [f"p_{c}" for c in labels]
    if ood is not None:
        for row, o in zip(rows, ood):
            row.update({f"ood_{k}": o.get(k) for k in OOD_COLUMNS})
        columns += [f"ood_{k}" for k in OOD_COLUMNS]
    write_csv(path, rows, columns)


OOD_COLUMNS = ("score", "ratio", "flag")
"""The guard's verdict per image in ``predictions.csv`` (``ood_score``, ...)."""


def write_split(
    out_dir: str | os.PathLike,
    metrics: dict,
    sources: Sequence[str] | None = None,
    y_true: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    *,
    ood: Sequence[OODVerdict] | None = None,
    thresholds: np.ndarray | None = None,
) -> None:
    """One evaluated split: ``metrics.json`` and, given the images, ``predictions.csv`` (the
    predicted class at ``metrics``' threshold, or at each image's own ``thresholds`` when
    decisions were cross-fitted; the guard's verdicts with ``ood``) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / METRICS_JSON, metrics)
    if sources is not None:
        assert y_true is not None and probs is not None  # given with the images
        pred = predict_labels(probs, metrics.get("threshold") if thresholds is None else thresholds)
        write_predictions(
            out_dir / PREDICTIONS_CSV, sources, y_true, pred, probs, metrics["labels"], ood
        )


def read_predictions(path: str | os.PathLike, labels: Sequence[str]) -> Predictions | None:
    """Read :func:`write_predictions`' file; None when it is missing or empty."""
    path = Path(path)
    if not path.exists():
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    labels = list(labels)
    return Predictions(
        [csv_text(r["path"]) for r in rows],
        np.array([labels.index(r["true"]) for r in rows]),
        np.array([[float(r[f"p_{c}"]) for c in labels] for r in rows]),
    )


# ----------------------------------------------------------------------------- finding models


def bundled_models_dir() -> Path:
    """Where the package keeps its bundled (inference-only) model folders."""
    return Path(__file__).resolve().parent.parent / "bundled"


def _models_in(folder: Path, given: bool) -> list[Path]:
    if (folder / MODEL_JSON).exists():
        return [folder]
    if folder.is_dir():
        found = [s for s in sorted(folder.iterdir()) if (s / MODEL_JSON).exists()]
        if given and not found:
            raise ModelLoadError(
                f"--models {folder}: no model folders in it (a model folder holds "
                f"{MODEL_JSON}; pass a run folder of `medlens train` or a folder of them)"
            )
        return found
    if given:
        raise ModelLoadError(f"--models {folder}: no such folder")
    return []


def find_models(
    model_dirs: Iterable[str | os.PathLike] = (), *, bundled: bool = True
) -> dict[str, Path]:
    """Model name -> folder: the bundled models (unless ``bundled`` is false) and ``model_dirs``.

    Each entry of ``model_dirs`` (``--models DIR``) is a model folder itself or a folder whose
    subfolders are model folders; a model's name is its folder's name. A model given there
    shadows a bundled one of the same name; two given models of one name are an error.
    """
    given: dict[str, Path] = {}
    for d in model_dirs:
        for f in _models_in(Path(d), True):
            if f.name in given and given[f.name] != f:
                raise ModelLoadError(
                    f"two models are named {f.name!r} ({given[f.name]} and {f}); rename one "
                    "of the folders"
                )
            given[f.name] = f
    found = {f.name: f for f in _models_in(bundled_models_dir(), False)} if bundled else {}
    for name in sorted(set(found) & set(given)):
        log.info("--models %s shadows the bundled model of that name", given[name])
    found.update(given)
    return found


def resolve_model(
    ref: str | os.PathLike,
    model_dirs: Iterable[str | os.PathLike] = (),
    *,
    bundled: bool = True,
) -> Path:
    """A model reference -> its folder.

    ``ref`` is a model folder (a run of ``medlens train``), or a name that
    :func:`find_models` knows (``--models`` folders first, then the bundled models).
    """
    p = Path(ref)
    if (p / MODEL_JSON).exists():
        return p
    if p.exists():
        raise ModelLoadError(
            f"{p} is not a trained model: {MODEL_JSON} is missing (train one with "
            "`medlens train --out RUN`, or wait until the run has finished)"
        )
    known = find_models(model_dirs, bundled=bundled)
    if str(ref) in known:
        return known[str(ref)]
    raise ModelLoadError(
        f"no model {str(ref)!r}: not a run folder and not a bundled model; "
        f"available: {', '.join(sorted(known)) if known else 'none'} "
        "(or pass the path of a run folder)"
    )
