"""Inference-only model folders: what MedLens ships as its bundled models.

``medlens export --model RUN --bundle DEST [--half]`` turns a training run into a folder that
holds only what serving needs:

* ``model.json`` - labels, preprocessing, temperature, threshold, card text, and the metrics
  re-measured on the shipped file (below);
* ``model.onnx`` - the graph of :func:`medlens.artifacts.onnx.onnx_bytes` (logits, features and the
  closed-form Grad-CAM maps), with float16 weight storage when ``half`` is set
  (:func:`medlens.artifacts.onnx.halve_weights`);
* ``ood.npz`` - the run's out-of-distribution guard;
* ``model_card.json`` / ``model_card.md`` - the card, with the sha256 of ``model.onnx``.

There is no ``model.pt``: the folder runs on ONNX Runtime alone (see
:class:`medlens.inference.predictor.Predictor`), which keeps the four bundled models within the package's
size budget. Because storing weights in float16 rounds them, the validation (and carved test)
images listed in the run's ``eval/<split>/predictions.csv`` are predicted again through the
shipped file and its metrics replace the run's; the largest probability change is recorded.

The folder is assembled beside ``DEST`` and moved into place at the end, so an interrupted
export never leaves a half-written bundle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from medlens.artifacts.card import model_card, model_card_markdown
from medlens.artifacts.folders import (
    CARD_JSON,
    CARD_MD,
    MODEL_JSON,
    MODEL_WEIGHTS,
    ONNX_FILE,
    OOD_FILE,
    ModelFolder,
    headline_metrics,
    resolve_model,
)
from medlens.artifacts.model import ModelMeta, load_network
from medlens.artifacts.onnx import check_onnx, halve_weights, onnx_bytes
from medlens.data.cache import prepare_samples
from medlens.errors import ModelLoadError
from medlens.evaluation.metrics import compute_metrics
from medlens.fileio import atomic_write_text, write_json
from medlens.inference.predictor import Predictor

__all__ = ["make_bundle", "BUNDLE_FILES"]

log = logging.getLogger(__name__)

BUNDLE_FILES = (MODEL_JSON, ONNX_FILE, OOD_FILE, CARD_JSON, CARD_MD)


def _held_out(run: Path, split: str, labels: list[str]):
    """Samples of the run's ``eval/<split>/predictions.csv`` and the run's probabilities."""
    from medlens.data.datasets import Sample

    pred = ModelFolder(run).read_predictions(split, labels)
    if pred is None:
        return None
    return [Sample(p, int(y)) for p, y in zip(pred.paths, pred.y_true)], pred.probs


def _measure_split(pred: Predictor, run: Path, split: str, meta: ModelMeta) -> tuple | None:
    """The shipped model's headline metrics on a split the run evaluated, the largest
    probability change against the run, and the share the OOD guard flags (or None)."""
    held = _held_out(run, split, meta.labels)
    if held is None:
        return None
    samples, run_probs = held
    res = prepare_samples(samples, meta.preprocess, progress=False, desc=split)
    if res.errors:
        raise ModelLoadError(
            f"{len(res.errors)} {split} image(s) of {run} cannot be read any more (first: "
            f"{res.errors[0][0]}); the shipped model cannot be re-measured"
        )
    preds = pred.predict_prepared(res.pixels)
    probs = np.array([[p.probabilities[c] for c in meta.labels] for p in preds])
    flagged = [p.ood["flag"] for p in preds if p.ood["flag"] is not None]
    change = float(np.abs(probs - run_probs[res.keep]).max())
    y = np.array([samples[i].label for i in res.keep])
    m = compute_metrics(y, probs, meta.labels, meta.threshold)
    log.info(
        "%s: n %d, accuracy %.4f, auc %.4f (shipped %s)",
        split,
        m["n"],
        m["accuracy"],
        m["auc"],
        ONNX_FILE,
    )
    return headline_metrics(m), change, (float(np.mean(flagged)) if flagged else None)


def _remeasure(folder: Path, run: Path, meta: ModelMeta) -> tuple[dict, float]:
    """Predict the run's validation (and carved test) images again through the shipped
    folder; record the metrics and OOD shares in ``meta``."""
    pred = Predictor(folder)
    metrics, change = {}, 0.0
    for split in ("val", "test"):
        measured = _measure_split(pred, run, split, meta)
        if measured is None:
            continue
        metrics[split], split_change, flagged = measured
        change = max(change, split_change)
        if flagged is not None:
            meta.extra.setdefault("ood", {})[f"flagged_{split}_share"] = round(flagged, 4)
    if metrics:
        meta.extra["metrics"] = metrics
    meta.extra["export"]["max_probability_change"] = round(change, 6)
    return metrics, change


def _move_into_place(tmp: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old)
    else:
        tmp.rename(dest)


def make_bundle(
    run: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    half: bool = True,
    overwrite: bool = False,
    card: dict | None = None,
) -> dict:
    """Write an inference-only model folder ``dest`` from the training run ``run``.

    ``card``: model-card fields that replace the run's (e.g. the ``card:`` section of the
    recipe, edited after training).

    Returns:
        ``{"folder", "onnx_bytes", "metrics": {split: metrics}, "max_prob_change"}``.

    Raises:
        ModelLoadError: ``run`` is not a complete run, or ``dest`` exists without
            ``overwrite``.
    """
    run = resolve_model(run)
    dest = Path(dest)
    if not (run / MODEL_WEIGHTS).exists():
        raise ModelLoadError(f"{run} has no {MODEL_WEIGHTS}: bundle a training run folder")
    if dest.exists() and not overwrite:
        raise ModelLoadError(f"{dest} exists; pass --overwrite to replace it")
    net, meta = load_network(run)
    blob = onnx_bytes(net, meta)
    check_onnx(net, blob, meta)
    if half:
        blob = halve_weights(blob)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        (tmp / ONNX_FILE).write_bytes(blob)
        if (run / OOD_FILE).exists():
            shutil.copyfile(run / OOD_FILE, tmp / OOD_FILE)
        meta.name = dest.name
        if card:
            meta.extra["card"] = {**(meta.extra.get("card") or {}), **card}
        meta.extra["export"] = {
            "from_run": run.name,
            "weights": "float16 storage, float32 compute" if half else "float32",
            "metrics_measured_on": ONNX_FILE,
        }
        write_json(tmp / MODEL_JSON, meta.to_dict())
        metrics, change = _remeasure(tmp, run, meta)
        write_json(tmp / MODEL_JSON, meta.to_dict())
        card = model_card(meta, tmp, onnx_sha256=hashlib.sha256(blob).hexdigest())
        write_json(tmp / CARD_JSON, card)
        atomic_write_text(tmp / CARD_MD, model_card_markdown(card))
        _move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"folder": dest, "onnx_bytes": len(blob), "metrics": metrics, "max_prob_change": change}
