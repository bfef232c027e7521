"""Grouped k-fold cross-validation: ``medlens train --folds K``.

Train and validation are pooled and split into K folds, stratified by class and grouped by
patient (:func:`medlens.data.splits.fold_split`); run ``i`` (``OUT/fold-i``, a complete run
folder) validates on fold ``i``, calibrates on it and reports on the carved test split as any
run does. ``OUT/cv.json`` and ``OUT/cv.csv`` then hold each fold's validation metrics, their
mean, standard deviation and range, and the AUC of the pooled out-of-fold predictions.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import SupportsFloat

import numpy as np

from medlens.artifacts.folders import CV_CSV, CV_JSON, ModelFolder, fold_folder
from medlens.artifacts.model import read_meta
from medlens.config import TrainConfig
from medlens.evaluation.metrics import compute_metrics
from medlens.fileio import write_csv, write_json
from medlens.tracking import NO_TRACKING, Tracker
from medlens.training.trainer import train

__all__ = ["train_folds", "summarise_folds", "CV_METRICS"]

log = logging.getLogger(__name__)

CV_METRICS = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "f1", "ece")


def train_folds(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    command: str | None = None,
    tracker: Tracker = NO_TRACKING,
) -> Path:
    """Train every fold of ``cfg.folds`` (each a run folder under ``cfg.out``) and summarise.

    A fold whose run is complete is kept with ``resume`` (an interrupted cross-validation goes
    on where it stopped). With a ``tracker``, each fold trained is a nested MLflow run
    (``fold-i``) and the parent run gets the summary (``cv_mean_auc``, ``cv_sd_auc``...,
    ``cv.json``, ``cv.csv``).

    Returns:
        ``cfg.out``, holding ``fold-0`` ... ``fold-K-1``, ``cv.json`` and ``cv.csv``.
    """
    out = Path(cfg.out)
    for fold in range(cfg.folds):
        folder = fold_folder(out, fold)
        if resume and ModelFolder(folder).is_model:
            log.info("fold %d: complete in %s, kept", fold, folder)
            continue
        log.info("fold %d of %d", fold, cfg.folds)
        fold_cfg = dataclasses.replace(cfg, fold=fold, out=str(folder))
        fold_resume = resume and ModelFolder(folder).checkpoint.exists()
        with tracker.child(f"fold-{fold}") as fold_tracker:
            train(fold_cfg, resume=fold_resume, overwrite=overwrite, command=command,
                  tracker=fold_tracker)  # fmt: skip
    summary = summarise_folds(out, cfg.folds)
    log.info(_table(summary))
    if tracker.active:
        tracker.log_params(cfg.to_dict())
        for name in ("mean", "sd", "min", "max"):
            tracker.log_metrics({f"cv_{name}_{k}": v for k, v in summary[name].items()})
        pooled = summary["pooled_out_of_fold"] or {}
        tracker.log_metrics({"cv_pooled_out_of_fold_auc": pooled.get("auc")})
        tracker.log_artifacts(out, [CV_JSON, CV_CSV])
    return out


def summarise_folds(out: str | Path, folds: int) -> dict:
    """Validation metrics per fold, their mean/sd/min/max and the pooled out-of-fold AUC;
    written to ``cv.json`` and ``cv.csv`` in ``out``."""
    per_fold: list[dict[str, float | None]] = []
    ys: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    labels: list[str] | None = None
    for fold in range(folds):
        folder = ModelFolder(fold_folder(out, fold))
        metrics = folder.read_metrics("val") or {}
        per_fold.append({k: metrics.get(k) for k in ("n", *CV_METRICS)})
        labels = labels or read_meta(folder.path).labels
        pred = folder.read_predictions("val", labels)
        if pred is not None:
            ys.append(pred.y_true)
            ps.append(pred.probs)
    stats: dict[str, dict[str, float]] = {}
    for name, fn in (("mean", np.mean), ("sd", np.std), ("min", np.min), ("max", np.max)):
        stats[name] = {
            k: _round(fn([v for f in per_fold if (v := f[k]) is not None]))
            for k in CV_METRICS
            if any(f[k] is not None for f in per_fold)
        }
    pooled = None
    if ys:
        assert labels is not None  # read with the first fold's predictions
        pooled = compute_metrics(np.concatenate(ys), np.concatenate(ps), labels, n_bootstrap=0)
    summary = {"folds": folds, "labels": labels, "per_fold": per_fold, **stats,
               "pooled_out_of_fold": {"n": pooled["n"], "auc": pooled["auc"]} if pooled else None}  # fmt: skip
    write_json(Path(out) / CV_JSON, summary)
    rows: list[dict] = [{"fold": i, **f} for i, f in enumerate(per_fold)]
    rows += [{"fold": name, **stats[name]} for name in ("mean", "sd", "min", "max")]
    write_csv(Path(out) / CV_CSV, rows, ["fold", "n", *CV_METRICS])
    return summary


def _round(v: SupportsFloat) -> float:
    return round(float(v), 4)


def _table(summary: dict) -> str:
    keys = [k for k in CV_METRICS if k in summary["mean"]]
    lines = [f"cross-validation over {summary['folds']} folds (validation fold of each run):"]
    lines += [f"  {k:<18} {summary['mean'][k]:.4f} ± {summary['sd'][k]:.4f} "
              f"[{summary['min'][k]:.4f}, {summary['max'][k]:.4f}]" for k in keys]  # fmt: skip
    pooled = summary["pooled_out_of_fold"]
    if pooled and pooled["auc"] is not None:
        lines.append(f"  pooled out-of-fold AUC {pooled['auc']:.4f} (n {pooled['n']})")
    return "\n".join(lines)
