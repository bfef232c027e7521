"""How often a model's out-of-distribution guard flags images: its own task's against other
tasks' (the figures behind the guard table of docs/models.md and ``tests/test_bundled.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medlens.data.cache import prepare_samples
from medlens.data.datasets import Sample, list_images
from medlens.errors import DataError
from medlens.inference.predictor import Predictor

__all__ = ["flag_rate", "sample_files"]


def sample_files(folder: str | Path, n: int, seed: int) -> list[Sample]:
    """``n`` images drawn at random (without replacement) from ``folder`` and its subfolders,
    as samples of label 0 (the label is not read)."""
    files = sorted(list_images(Path(folder)))
    if not files:
        raise DataError(f"{folder}: no images found")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(files), size=min(n, len(files)), replace=False)
    return [Sample(str(files[i]), 0) for i in picks]


def flag_rate(pred: Predictor, samples: list[Sample], workers: int = 2) -> float:
    """The share of ``samples`` the model's guard flags.

    Raises:
        DataError: an image cannot be read (named), or the model has no guard.
    """
    if pred.ood_guard is None:
        raise DataError(f"{pred.folder} has no out-of-distribution guard")
    res = prepare_samples(samples, pred.pre, progress=False, workers=workers)
    if res.errors:
        raise DataError(f"cannot read {res.errors[0][0]}: {res.errors[0][1]}")
    # with a guard every verdict has a flag (never None)
    flags = [bool(p.ood["flag"]) for p in pred.predict_prepared(res.pixels, batch_size=32)]
    return float(np.mean(flags))
