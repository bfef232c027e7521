"""Evaluation: metrics with bootstrap intervals, plots and an HTML report for a model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np

from medlens.artifacts.folders import METRICS_JSON, read_history, write_split
from medlens.artifacts.model import ModelMeta
from medlens.errors import UsageError
from medlens.evaluation.ood import OODVerdict

__all__ = ["evaluate", "write_evaluation", "ood_counts"]

log = logging.getLogger(__name__)


def _model_info(meta: ModelMeta) -> dict:
    return {
        "model": meta.name,
        "architecture": meta.arch,
        "version": meta.version,
        "labels": ", ".join(meta.labels),
        "temperature": round(meta.temperature, 4),
        "threshold": meta.threshold,
        "threshold_method": meta.threshold_method,
        "operating_point": meta.extra.get("operating_point"),
        "image_size": meta.preprocess.image_size,
    }


def write_evaluation(
    out_dir: str | Path,
    meta: ModelMeta,
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    history: list[dict] | None = None,
    title: str = "MedLens evaluation",
    sources: list[str] | None = None,
    attributes: dict[str, list[str | None]] | None = None,
    ood: list[OODVerdict] | None = None,
) -> dict:
    """Metrics at the stored threshold (and 0.5), ``metrics.json``, ``report.html``; with
    ``attributes`` (``{attribute: value per image}``), each subgroup's metrics too; with
    ``ood`` (the guard's verdict per image), how many it flagged (``ood`` in metrics.json)
    and its score, ratio and flag per image in predictions.csv."""
    from medlens.evaluation.metrics import compute_metrics
    from medlens.reporting.report import write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = compute_metrics(y_true, probs, meta.labels, meta.threshold)
    if attributes:
        from medlens.evaluation.subgroups import subgroup_metrics

        metrics["subgroups"] = subgroup_metrics(
            y_true, probs, meta.labels, meta.threshold, attributes
        )
    if ood is not None and any(o.get("flag") is not None for o in ood):
        metrics["ood"] = ood_counts(ood)
    write_split(out_dir, metrics, sources, y_true, probs, ood=ood if "ood" in metrics else None)
    write_report(
        out_dir,
        metrics,
        y_true,
        probs,
        meta.labels,
        threshold=meta.threshold,
        history=history,
        title=title,
        model_info=_model_info(meta),
    )
    return metrics


class OODCounts(TypedDict):
    """``metrics.json``'s ``ood``: how many images the guard flagged."""

    flagged: int
    n: int
    share: float | None
    note: str


def ood_counts(ood: Sequence[OODVerdict]) -> OODCounts:
    """How many images the guard flagged, of how many, and the share."""
    flags = [bool(o["flag"]) for o in ood if o.get("flag") is not None]
    n = len(flags)
    return {
        "flagged": int(sum(flags)),
        "n": n,
        "share": round(sum(flags) / n, 4) if n else None,
        "note": "images the out-of-distribution guard flagged are counted in every metric "
        "above; a flagged image is one the model should not be trusted on",
    }


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for metrics.json and report.html")
    if (out / METRICS_JSON).exists() and not overwrite:
        raise UsageError(
            f"{out} already holds an evaluation ({METRICS_JSON}); pass --overwrite to replace "
            "it, or choose another --out"
        )


def evaluate(
    model_ref: str,
    data: str,
    out: str,
    *,
    skip_bad_images: bool = False,
    progress: bool = True,
    groups: str | None = None,
    overwrite: bool = False,
) -> dict:
    """``medlens evaluate``: every image under ``data`` is evaluated; nothing is split off.
    ``groups``: a CSV of subgroup attributes per image (:func:`medlens.data.groups.read_groups`),
    read before any image is decoded, like the check that ``out`` holds no evaluation yet
    (unless ``overwrite``)."""
    from medlens.data.cache import prepare_samples, refuse_unreadable
    from medlens.data.datasets import load_dataset
    from medlens.inference.predictor import Predictor

    _check_out(Path(out), overwrite)  # before anything is decoded
    predictor = Predictor(model_ref)
    meta = predictor.meta
    ds = load_dataset(data, mode="all", classes=meta.labels)
    samples = ds.splits["all"]
    if groups:  # a bad groups file fails before the images are decoded
        from medlens.data.groups import read_groups

        read_groups(groups, [s.source for s in samples], data)
    res = prepare_samples(samples, meta.preprocess, progress=progress, desc="decode")
    refuse_unreadable(res.errors, skip_bad_images)
    kept = [samples[i] for i in res.keep]
    attributes = None
    if groups:
        attributes, notes = read_groups(groups, [s.source for s in kept], data)
        for note in notes:
            log.warning("%s", note)
    y = np.array([s.label for s in kept])
    probs, ood = predictor.probs_and_ood_prepared(res.pixels)
    history = read_history(predictor.folder) if predictor.folder else None
    metrics = write_evaluation(
        out,
        meta,
        y,
        probs,
        history=history,
        title=f"{meta.name}: evaluation on {data}",
        sources=[s.source for s in kept],
        attributes=attributes,
        ood=ood,
    )
    if res.errors:
        log.warning("skipped %d unreadable image(s)", len(res.errors))
    return metrics
