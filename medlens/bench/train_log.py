"""Training figures of a finished run, read from its logs (nothing is retrained)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medlens.artifacts.folders import HISTORY_CSV, ModelFolder, read_history
from medlens.artifacts.model import read_meta
from medlens.errors import UsageError

__all__ = ["training_figures"]


def _num(row: dict, key: str) -> float | None:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) else None


def _stages(rows: list[dict], secs: list[float], n_train: int | None) -> dict:
    """Per training stage (head, fine-tuning, ...): epochs, seconds, median epoch, images/s."""
    stages: dict[str, dict] = {}
    for r, s in zip(rows, secs):
        st = stages.setdefault(r.get("stage") or "train", {"epochs": 0, "seconds": []})
        st["epochs"] += 1
        st["seconds"].append(s)
    for st in stages.values():
        med = float(np.median(st["seconds"]))
        st["median_epoch_s"] = round(med, 3)
        st["images_per_s"] = round(n_train / med, 1) if n_train and med > 0 else None
        st["seconds"] = round(sum(st.pop("seconds")), 2)
    return stages


def _run_facts(run: Path) -> tuple[str | None, dict]:
    """``(arch, training facts)`` from the run's model.json; nothing while it has none yet."""
    if not ModelFolder(run).is_model:
        return None, {}
    meta = read_meta(run)
    return meta.arch, meta.extra.get("training") or {}


def training_figures(run: str | os.PathLike, target_auc: float | None = None) -> dict:
    """Training speed of a finished run, from its ``training_metrics.csv`` and ``model.json``.

    ``train_images_per_s``: training images per second over every epoch (the images of the
    train split times the epochs, over the epochs' seconds). For pretrained backbones the head
    and fine-tuning stages run on cached activations of the frozen layers, so the per-stage
    figures differ by orders of magnitude; decoding and caching are outside the epochs and
    are counted in the wall times only.

    Wall time to the best validation AUC is not logged directly:
    ``train_wall_seconds_to_best_val_auc_max`` is the run's wall time minus the epochs after
    the best one, an upper bound (it also counts the calibration and evaluation done after
    training).

    Args:
        run: a run folder of ``medlens train``.
        target_auc: also report the epoch time to the first epoch at this validation AUC.

    Raises:
        FileNotFoundError: the folder has no training log.
        UsageError: the log has no epoch yet (a ValueError).
    """
    run = Path(run)
    history = read_history(run)
    if history is None:
        raise FileNotFoundError(
            f"{run / HISTORY_CSV} does not exist; --train-log takes a run folder of `medlens train`"
        )
    rows = [r for r in history if r.get("epoch") is not None]
    if not rows:
        raise UsageError(f"--train-log {run}: {HISTORY_CSV} has no epochs yet")
    arch, training = _run_facts(run)
    n_train = int(sum((training.get("split_counts") or {}).get("train", {}).values())) or None
    secs = [_num(r, "seconds") or 0.0 for r in rows]
    valid = [(i, a) for i, r in enumerate(rows) if (a := _num(r, "val_auc")) is not None]
    best_i, best_auc = max(valid, key=lambda t: t[1]) if valid else (None, None)
    wall = training.get("wall_seconds")
    out = {
        "run": str(run),
        "arch": arch,
        "train_images": n_train,
        "train_epochs": len(rows),
        "train_epoch_seconds": round(sum(secs), 2),
        "train_images_per_s": (
            round(n_train * len(rows) / sum(secs), 1) if n_train and sum(secs) > 0 else None
        ),
        "train_stages": _stages(rows, secs, n_train),
        "train_precision": training.get("precision"),
        "train_wall_seconds": wall,
        "train_best_val_auc": best_auc,
        "train_best_epoch": best_i + 1 if best_i is not None else None,
        "train_epoch_seconds_to_best_val_auc": (
            round(sum(secs[: best_i + 1]), 2) if best_i is not None else None
        ),
        "train_wall_seconds_to_best_val_auc_max": (
            round(wall - sum(secs[best_i + 1 :]), 1)
            if wall is not None and best_i is not None
            else None
        ),
    }
    if target_auc is not None:
        hit = next((i for i, a in valid if a >= target_auc), None)
        out["train_target_val_auc"] = target_auc
        out["train_epoch_seconds_to_target_val_auc"] = (
            round(sum(secs[: hit + 1]), 2) if hit is not None else None
        )
    return out
