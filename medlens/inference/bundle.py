"""Inference-only model folders: what MedLens ships as its bundled models.

``medlens export --model RUN --bundle DEST [--half | --int8]`` turns a training run into a folder that
holds only what serving needs:

* ``model.json`` - labels, preprocessing, temperature, threshold, card text, and the metrics
  re-measured on the shipped file (below);
* ``model.onnx`` - the graph of :func:`medlens.artifacts.onnx.onnx_bytes` (logits, features and the
  closed-form Grad-CAM maps), with float16 weight storage when ``half`` is set
  (:func:`medlens.artifacts.onnx.halve_weights`), or 8-bit storage with ``int8``
  (:func:`medlens.artifacts.onnx.quantize_weights`, for ensembles within a size budget);
* ``ood.npz`` - the run's out-of-distribution guard;
* ``model_card.json`` / ``model_card.md`` - the card, with the sha256 of ``model.onnx``;
* ``training_metrics.csv`` and ``eval/<split>/{metrics.json,predictions.csv}`` - the training
  curves and the shipped file's results on the run's validation and carved test images (paths
  relative to the data folder), which the dashboard draws.

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
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medlens.artifacts.card import model_card, model_card_markdown
from medlens.artifacts.folders import (
    CARD_JSON,
    CARD_MD,
    HISTORY_CSV,
    MODEL_JSON,
    MODEL_WEIGHTS,
    ONNX_FILE,
    OOD_FILE,
    ModelFolder,
    resolve_model,
    write_split,
)
from medlens.artifacts.model import ModelMeta, load_network, write_meta
from medlens.artifacts.onnx import (
    EnsembleGraph,
    check_onnx,
    halve_weights,
    onnx_bytes,
    quantize_weights,
)
from medlens.data.cache import prepare_samples
from medlens.errors import ModelLoadError, UsageError
from medlens.evaluation.calibration import fit_temperature
from medlens.evaluation.metrics import compute_metrics, headline_metrics
from medlens.evaluation.ood import EnsembleGuard, StageGuard, load_guard
from medlens.evaluation.operating_point import (
    OperatingPoint,
    OperatingPointSpec,
    choose_operating_point,
)
from medlens.fileio import atomic_write_text, replace_folder, sha256_file, write_json
from medlens.inference.predictor import Predictor

__all__ = ["make_bundle", "BUNDLE_FILES"]

log = logging.getLogger(__name__)

BUNDLE_FILES = (MODEL_JSON, ONNX_FILE, OOD_FILE, CARD_JSON, CARD_MD)
"""The files every bundle has (besides ``training_metrics.csv`` and ``eval/``, where the run
had them)."""


def _held_out(runs: list[Path], split: str, labels: list[str]):
    """Samples of ``eval/<split>/predictions.csv`` that every run evaluated, and the run's
    probabilities for them (None for an ensemble), or None when there are none."""
    from medlens.data.datasets import Sample

    read = [ModelFolder(r).read_predictions(split, labels) for r in runs]
    preds = [p for p in read if p is not None]
    if len(preds) < len(read):
        return None
    shared = set(preds[0].paths).intersection(*(p.paths for p in preds[1:]))
    keep = [i for i, path in enumerate(preds[0].paths) if path in shared]
    if not keep:
        return None
    samples = [Sample(preds[0].paths[i], int(preds[0].y_true[i])) for i in keep]
    return samples, (preds[0].probs[keep] if len(runs) == 1 else None)


def _shipped(folder: Path, meta: ModelMeta) -> Predictor:
    """The bundle being assembled in ``folder`` as it stands, with ``meta`` as its
    ``model.json`` would load (written once, at the end of :func:`make_bundle`)."""
    snapshot = ModelMeta.from_dict(json.loads(json.dumps(meta.to_dict(), allow_nan=False)))
    return Predictor(folder, meta=snapshot)


_PIXELS: dict[str, np.ndarray] = {}
"""Prepared images by source, for one :func:`make_bundle` (guard, ensemble calibration and
re-measuring read the same validation images): each is decoded once per export."""


def _decoded(samples: list, meta: ModelMeta, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Prepared ``uint8`` images and labels of ``samples`` (all must still be readable)."""
    missing = list({s.source: s for s in samples if s.source not in _PIXELS}.values())
    if missing:
        res = prepare_samples(missing, meta.preprocess, progress=False, desc=split)
        if res.errors:
            raise ModelLoadError(
                f"{len(res.errors)} {split} image(s) cannot be read any more (first: "
                f"{res.errors[0][0]}); the shipped model cannot be re-measured"
            )
        _PIXELS.update(zip((s.source for s in missing), res.pixels))
    pixels = np.stack([_PIXELS[s.source] for s in samples])
    return pixels, np.array([s.label for s in samples])


def _measure_split(
    pred: Predictor, ref: Predictor | None, runs: list[Path], split: str, meta: ModelMeta
) -> tuple | None:
    """The shipped model's headline metrics on a split the runs evaluated, the largest
    probability change against the run (an ensemble: against its float32 graph ``ref``), and
    the share the OOD guard flags (or None)."""
    held = _held_out(runs, split, meta.labels)
    if held is None:
        return None
    samples, run_probs = held
    pixels, y = _decoded(samples, meta, split)
    preds = pred.predict_prepared(pixels)
    probs = np.array([[p.probabilities[c] for c in meta.labels] for p in preds])
    flagged = [p.ood["flag"] for p in preds if p.ood["flag"] is not None]
    if run_probs is None:
        assert ref is not None  # an ensemble (no run probabilities) has its float32 graph
        before = ref.probs_prepared(pixels)
    else:
        before = run_probs
    change = float(np.abs(probs - before).max())
    m = compute_metrics(y, probs, meta.labels, meta.threshold)
    log.info(
        "%s: n %d, accuracy %.4f, auc %.4f (shipped %s)",
        split,
        m["n"],
        m["accuracy"],
        m["auc"],
        ONNX_FILE,
    )
    _write_split(pred.folder, split, m, [s.source for s in samples], y, probs)
    return headline_metrics(m), change, (float(np.mean(flagged)) if flagged else None)


def _write_split(folder: Path, split: str, m: dict, sources: list, y, probs) -> None:
    """The bundle's ``eval/<split>`` (metrics and per-image probabilities: what the dashboard
    draws), with image paths relative to the data folder, not the developer's disk."""
    if any(s.startswith("npz:") for s in sources):  # npz:<file>#<split>/<index>
        rel = [f"{Path(s[4:].split('#')[0]).name}#{s.split('#')[-1]}" for s in sources]
    else:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(s)) for s in sources])
        rel = [os.path.relpath(os.path.abspath(s), root) for s in sources]
    write_split(ModelFolder(folder).eval_dir(split), m, rel, y, probs)


OUT_OF_FOLD = (
    "out-of-fold: each validation image predicted by the one fold model that did not train on "
    "it (run probabilities), at the ensemble's threshold; an estimate for one member, not the "
    "ensemble"
)


def _out_of_fold(
    pred: Predictor, ref: Predictor | None, runs: list[Path], meta: ModelMeta
) -> tuple[dict, float] | None:
    """Pooled validation metrics of k-fold members whose validation images are disjoint (the
    cross-validation estimate), and the largest probability change of the shipped graph
    against its float32 one on those images; None when they overlap or were not evaluated."""
    from medlens.data.datasets import Sample

    read = [ModelFolder(r).read_predictions("val", meta.labels) for r in runs]
    preds = [p for p in read if p is not None]
    if len(runs) < 2 or len(preds) < len(read):
        return None
    assert ref is not None  # an ensemble's float32 graph
    paths = [path for p in preds for path in p.paths]
    if len(set(paths)) != len(paths):
        return None
    y = np.concatenate([p.y_true for p in preds])
    probs = np.concatenate([p.probs for p in preds])
    m = compute_metrics(y, probs, meta.labels, meta.threshold)
    log.info("val (out-of-fold, %d members): n %d, auc %.4f", len(runs), m["n"], m["auc"])
    _write_split(pred.folder, "val", {**m, "measured_on": OUT_OF_FOLD}, paths, y, probs)
    pixels, _ = _decoded([Sample(path, int(t)) for path, t in zip(paths, y)], meta, "val")
    change = float(np.abs(pred.probs_prepared(pixels) - ref.probs_prepared(pixels)).max())
    return {**headline_metrics(m), "measured_on": OUT_OF_FOLD}, change


def _remeasure(
    folder: Path, runs: list[Path], meta: ModelMeta, full_graph: bytes
) -> tuple[dict, float]:
    """Predict the run's validation (and carved test) images again through the shipped
    folder; record the metrics and OOD shares in ``meta``. ``full_graph``: the graph before
    its weights were rounded for storage (the reference of an ensemble's change)."""
    import copy

    from medlens.artifacts.onnx import ort_session

    pred = _shipped(folder, meta)
    ref = None  # a single run is compared with its own probabilities, an ensemble with this
    if len(runs) > 1:
        ref = copy.copy(pred)  # the same model and guard, through the float32 graph
        ref.session = ort_session(full_graph)
    metrics, change = {}, 0.0
    for split in ("val", "test"):
        measured = _measure_split(pred, ref, runs, split, meta)
        if measured is None:
            continue
        metrics[split], split_change, flagged = measured
        change = max(change, split_change)
        if flagged is not None:
            meta.extra.setdefault("ood", {})[f"flagged_{split}_share"] = round(flagged, 4)
    if "val" not in metrics:
        oof = _out_of_fold(pred, ref, runs, meta)
        if oof is not None:
            metrics = {"val": oof[0], **metrics}
            change = max(change, oof[1])
    if metrics:
        meta.extra["metrics"] = metrics
    meta.extra["export"]["max_probability_change"] = round(change, 6)
    return metrics, change


def _ensemble_meta(runs: list[Path], metas: list[ModelMeta]) -> ModelMeta:
    """The ensemble's metadata: the members must share labels and preprocessing. Its version is
    the sha256 of the members' weight hashes; temperature and threshold start as the members'
    means (refitted on shared validation images by :func:`_calibrate_ensemble`)."""
    first = metas[0]
    for r, m in zip(runs[1:], metas[1:]):
        geometry = [(x.image_size, x.channels, x.resize, x.grayscale)
                    for x in (m.preprocess, first.preprocess)]  # fmt: skip
        if m.labels != first.labels or geometry[0] != geometry[1]:
            raise UsageError(
                f"{r} cannot join an ensemble with {runs[0]}: labels or input geometry differ "
                f"({m.labels}, size/channels/resize/grey {geometry[0]} vs {first.labels}, "
                f"{geometry[1]})"
            )
    archs = sorted({m.arch for m in metas})
    shas = [m.weights_sha256 or "" for m in metas]
    thresholds = [m.threshold for m in metas if m.threshold is not None]
    meta = ModelMeta(
        arch=archs[0] if len(archs) == 1 else "+".join(archs),
        labels=list(first.labels),
        preprocess=first.preprocess,
        temperature=float(np.mean([m.temperature for m in metas])),
        threshold=float(np.mean(thresholds)) if thresholds else None,
        threshold_method=first.threshold_method if thresholds else None,
        dropout=first.dropout,
        extra={k: v for k, v in first.extra.items() if k in ("card", "training")},
    )
    meta.extra["weights_sha256"] = hashlib.sha256("".join(shas).encode()).hexdigest()
    meta.extra["ensemble"] = [
        {"run": r.name, "arch": m.arch, "weights_sha256": sha}
        for r, m, sha in zip(runs, metas, shas)
    ]
    return meta


def _copy_guard(runs: list[Path], dest: Path, meta: ModelMeta) -> None:
    """A single run's ``ood.npz``, or the ensemble's guard over every member's (recorded in
    ``meta``)."""
    paths = [r / OOD_FILE for r in runs]
    if len(runs) == 1:
        if paths[0].exists():
            shutil.copyfile(paths[0], dest)
            if meta.extra.get("ood"):  # runs trained before the hash was recorded get it here
                meta.extra["ood"] = {**meta.extra["ood"], "sha256": sha256_file(dest)}
        return
    guards = [g for p in paths if p.exists() and isinstance(g := load_guard(p), StageGuard)]
    if len(guards) == len(runs):
        guard = EnsembleGuard(guards)
        guard.save(dest)
        meta.extra["ood"] = {**guard.summary(OOD_FILE), "sha256": sha256_file(dest)}


def _recalibrate_guard(folder: Path, runs: list[Path], meta: ModelMeta) -> None:
    """Set the guard's scales and threshold again on the statistics the shipped graph gives
    for each member's own validation images (its weights stored in 16 or 8 bits move the
    activations the guard reads: 8-bit storage made a quarter of the models' own validation
    images look out of distribution); its per-stage fits from training images are kept."""
    path = folder / OOD_FILE
    if not path.exists():
        return
    guard = load_guard(path)
    members = guard.members if isinstance(guard, EnsembleGuard) else [guard]
    stage_guards = [m for m in members if isinstance(m, StageGuard)]
    if len(stage_guards) < len(members):
        return
    pred = _shipped(folder, meta)
    fresh: list[StageGuard] = []
    start = 0
    for run, member in zip(runs, stage_guards):
        held = _held_out([run], "val", meta.labels)
        width = sum(member.widths)
        if held is None:  # no validation images to set it on: kept as trained
            fresh.append(member)
        else:
            pixels, _ = _decoded(held[0], meta, "val")
            _, stats = pred.forward_prepared(pixels, features="stats")
            fresh.append(member.recalibrated(np.asarray(stats)[:, start : start + width]))
        start += width
    new = EnsembleGuard(fresh) if isinstance(guard, EnsembleGuard) else fresh[0]
    new.save(path)
    meta.extra["ood"] = {**new.summary(OOD_FILE), "sha256": sha256_file(path),
                         "recalibrated_on": "the shipped graph's validation statistics"}  # fmt: skip


def _copy_curves(runs: list[Path], dest: Path) -> str | None:
    """The training curves (``training_metrics.csv``) for the dashboard: the run's, or an
    ensemble's first member's. Returns whose they are, or None when there are none."""
    src = runs[0] / HISTORY_CSV
    if not src.exists():
        return None
    shutil.copyfile(src, dest / HISTORY_CSV)
    if len(runs) == 1:
        return f"run {runs[0].name}"
    return f"member {runs[0].name}, the first of {len(runs)} (the others trained alike)"


def _calibrate_ensemble(folder: Path, runs: list[Path], meta: ModelMeta) -> None:
    """Temperature of the averaged logits, fitted on the validation images every member shares
    (members trained on the same split with other seeds or backbones). Members of a k-fold
    cross-validation share none: the members' mean is kept, and the card says so."""
    held = _held_out(runs, "val", meta.labels)
    if held is None:
        meta.extra["ensemble_calibration"] = (
            "the members' mean temperature (they share no validation images)"
        )
        return
    pixels, y = _decoded(held[0], meta, "val")
    meta.temperature = fit_temperature(_shipped(folder, meta).logits_prepared(pixels).numpy(), y)
    meta.extra["ensemble_calibration"] = (
        f"temperature fitted on the {len(y)} validation images the members share"
    )


def _choose_operating_point(folder: Path, runs: list[Path], meta: ModelMeta, rule) -> None:
    """A two-class model's operating point ``rule`` (default: the run's own rule where it
    names one, else ``balanced``), chosen on the shipped graph's probabilities of the
    validation images the runs share, or on k-fold members' pooled out-of-fold ones."""
    if not meta.binary:
        return
    if rule is None:
        try:
            rule = OperatingPoint.parse(meta.threshold_method)
        except UsageError:  # runs of older MedLens ("youden", "mean of the members'")
            rule = OperatingPoint("youden" if meta.threshold_method == "youden" else "balanced")
    held = _held_out(runs, "val", meta.labels)
    if held is not None:
        pixels, y = _decoded(held[0], meta, "val")
        p, where = _shipped(folder, meta).probs_prepared(pixels)[:, 1], "validation"
    else:
        read = [ModelFolder(r).read_predictions("val", meta.labels) for r in runs]
        preds = [x for x in read if x is not None]
        if len(preds) < len(read):
            raise UsageError(
                "the runs recorded no validation predictions to choose the operating point on; "
                "train them again with this MedLens"
            )
        y = np.concatenate([x.y_true for x in preds])
        p = np.concatenate([x.probs[:, 1] for x in preds])
        where = "pooled out-of-fold validation"
    meta.set_operating_point(choose_operating_point(y, p, rule, split=where))


def _export_record(runs: list[Path], half: bool, int8: bool, curves: str | None) -> dict:
    """What ``model.json`` records about the export: the runs, the weight storage, where the
    metrics were measured, whose training curves ship."""
    weights = (
        "int8 storage (a scale per output channel), float32 compute"
        if int8
        else "float16 storage, float32 compute"
        if half
        else "float32"
    )
    return {
        "from_run": "+".join(r.name for r in runs),
        "weights": weights,
        "metrics_measured_on": ONNX_FILE,
        **({"curves": curves} if curves else {}),
    }


def make_bundle(
    run: str | os.PathLike | Sequence[str | os.PathLike],
    dest: str | os.PathLike,
    *,
    half: bool = True,
    int8: bool = False,
    overwrite: bool = False,
    card: dict | None = None,
    operating_point: OperatingPointSpec = None,
) -> dict:
    """Write an inference-only model folder ``dest`` from the training run ``run``, or from
    several runs as one ensemble (see :func:`_ensemble_meta`).

    ``operating_point``: a two-class model's decision rule
    (:class:`~medlens.evaluation.operating_point.OperatingPoint`), chosen again on the
    shipped graph's validation probabilities (default: the run's rule).

    ``half`` stores the weights as float16, ``int8`` as 8-bit integers (it wins over
    ``half``); either way the metrics are re-measured on the shipped file.
    ``card``: model-card fields that replace the run's (e.g. the ``card:`` section of the
    recipe, edited after training).

    Returns:
        ``{"folder", "onnx_bytes", "metrics": {split: metrics}, "max_prob_change"}``.

    Raises:
        ModelLoadError: ``run`` is not a complete run, or ``dest`` exists without
            ``overwrite``.
    """
    runs = [resolve_model(r) for r in ([run] if isinstance(run, (str, os.PathLike)) else run)]
    dest = Path(dest)
    for r in runs:
        if not (r / MODEL_WEIGHTS).exists():
            raise ModelLoadError(f"{r} has no {MODEL_WEIGHTS}: bundle a training run folder")
    if dest.exists() and not overwrite:
        raise ModelLoadError(f"{dest} exists; pass --overwrite to replace it")
    nets, metas = zip(*(load_network(r) for r in runs))
    meta = metas[0] if len(runs) == 1 else _ensemble_meta(runs, list(metas))
    pres = [m.preprocess for m in metas]
    members = nets[0] if len(runs) == 1 else EnsembleGraph(list(nets), pres)
    blob = full_graph = onnx_bytes(members, meta)
    check_onnx(members, blob, meta)
    if int8:
        blob = quantize_weights(blob)
    elif half:
        blob = halve_weights(blob)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        (tmp / ONNX_FILE).write_bytes(blob)
        _copy_guard(runs, tmp / OOD_FILE, meta)
        curves = _copy_curves(runs, tmp)
        meta.name = dest.name
        if card:
            meta.extra["card"] = {**(meta.extra.get("card") or {}), **card}
        meta.extra["export"] = _export_record(runs, half, int8, curves)
        if len(runs) > 1:
            _calibrate_ensemble(tmp, runs, meta)
        _choose_operating_point(tmp, runs, meta, operating_point)
        _recalibrate_guard(tmp, runs, meta)
        metrics, change = _remeasure(tmp, runs, meta, full_graph)
        write_meta(tmp, meta)  # once, complete: every step above predicted through `meta`
        card = model_card(meta, tmp, onnx_sha256=hashlib.sha256(blob).hexdigest())
        write_json(tmp / CARD_JSON, card)
        atomic_write_text(tmp / CARD_MD, model_card_markdown(card))
        replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _PIXELS.clear()
    return {"folder": dest, "onnx_bytes": len(blob), "metrics": metrics, "max_prob_change": change}
