"""Site calibration: ``medlens calibrate --model M --data LOCAL --out SITE``.

A model's temperature and threshold were fitted on its training source's validation images; at
another hospital the same network's probabilities can be too sure or too timid and its
threshold in the wrong place. A hospital labels a few hundred of its own images; this module
fits the temperature and the operating point again on them (and, if asked, the OOD guard's
flag level) and writes a new model folder that names its base model, the site's data and the
date. The network itself is not changed.

How much it helps is measured honestly by cross-fitting on the site images: they are cut into
folds (by patient where file names carry ids); each fold is judged by a temperature and
threshold fitted on the other folds, and the pooled decisions make the "after" column, beside
the base model's own decisions on the same images ("before").

Without ``--data`` only the operating point is chosen again, on the validation probabilities
the model folder recorded (``eval/val/predictions.csv``): how a bundled model's decision rule
is restated without its training images.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from medlens.artifacts.card import write_card
from medlens.artifacts.folders import (
    CONFIG_YAML,
    HISTORY_CSV,
    MODEL_JSON,
    MODEL_WEIGHTS,
    ONNX_FILE,
    OOD_FILE,
    ModelFolder,
    write_split,
)
from medlens.artifacts.model import ModelMeta
from medlens.errors import UsageError
from medlens.evaluation.calibration import fit_temperature, logits_to_probs
from medlens.evaluation.metrics import compute_metrics, headline_metrics
from medlens.evaluation.ood import Guard
from medlens.evaluation.operating_point import (
    OperatingPoint,
    OperatingPointSpec,
    choose_operating_point,
)
from medlens.fileio import replace_folder, sha256_file
from medlens.inference.predictor import Predictor

__all__ = ["calibrate_model", "MIN_PER_CLASS", "SITE_SPLIT"]

log = logging.getLogger(__name__)

MIN_PER_CLASS = 25
"""Fewest labelled site images of each class ``calibrate`` accepts by default."""
SITE_SPLIT = "site"
"""The evaluated split of a site-calibrated model: its site images, cross-fitted."""
CROSS_FITTED = (
    "the site's own labelled images, cross-fitted: each judged by a temperature and threshold "
    "fitted on the other folds"
)
_COPIED = (MODEL_WEIGHTS, ONNX_FILE, OOD_FILE, HISTORY_CSV, CONFIG_YAML)


def calibrate_model(
    model: str,
    out: str | Path,
    *,
    data: str | None = None,
    operating_point: OperatingPointSpec = None,
    refit_guard: bool = False,
    min_per_class: int = MIN_PER_CLASS,
    folds: int = 5,
    overwrite: bool = False,
    skip_bad_images: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Write a calibrated copy of ``model`` to ``out``.

    Args:
        model: a run folder, model folder or bundled-model name.
        out: the new model folder (its name is the new model's name).
        data: the site's labelled images (any layout ``medlens evaluate`` reads); None: only
            the operating point is chosen again, on the model's recorded validation
            probabilities.
        operating_point: the decision rule (default: the model's own where it names one, else
            ``balanced``).
        refit_guard: set the OOD guard's flag level on the site images too.
        min_per_class: fewest images of each class accepted.
        folds: cross-fitting folds.

    Returns:
        ``{"folder", "meta", "before", "after"}``: the before/after metrics dicts (``after``
        None without ``data``).

    Raises:
        UsageError: too few images of a class, labels the model does not have, an ``out``
            that exists without ``overwrite``, a rule that does not fit the model.
    """
    predictor = Predictor(model)
    base, meta = predictor.folder, copy.deepcopy(predictor.meta)
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it, or choose another")
    rule = _rule(meta, operating_point)
    guard = None
    if data is None:
        before, after, splits = _restate(base, meta, rule)
        site = None
    else:
        before, after, site, splits, guard = _site(
            predictor, meta, data, rule, refit_guard, min_per_class, folds, skip_bad_images,
            progress, seed,
        )  # fmt: skip
    meta.name = out.name
    meta.extra["site_calibration" if data else "operating_point_restated"] = {
        "base_model": predictor.meta.name or base.name,
        "base_version": predictor.meta.version,
        "base_model_json_sha256": sha256_file(base / MODEL_JSON),
        "date": dt.date.today().isoformat(),
        "operating_point": None if meta.operating_point is None else rule_text(meta),
        **(site or {}),
        "before": headline_metrics(before) if before else None,
        "after": headline_metrics(after) if after else None,
    }
    _write(base, out, meta, splits, guard, data is not None)
    return {"folder": out, "meta": meta, "before": before, "after": after}


def rule_text(meta: ModelMeta) -> str:
    op = meta.operating_point
    if op is None:
        raise ValueError(f"{meta.name} has no operating point")
    return op.rule


def _rule(meta: ModelMeta, operating_point) -> OperatingPoint:
    if operating_point is not None:
        op = OperatingPoint.parse(operating_point)
    else:
        try:
            op = OperatingPoint.parse(meta.threshold_method)
        except UsageError:  # older models: "youden" parses, anything else is balanced
            op = OperatingPoint()
    if not meta.binary and op.rule != "balanced":
        raise UsageError(
            f"--operating-point {op}: {meta.name} has {len(meta.labels)} classes and predicts "
            "the most probable one (balanced); other rules apply to two-class models"
        )
    return op


def _restate(
    base: Path, meta: ModelMeta, rule: OperatingPoint
) -> tuple[dict | None, dict | None, dict]:
    """The operating point chosen again on the recorded validation probabilities; every
    recorded split's metrics re-measured at it (probabilities unchanged). Returns the
    validation metrics before and after, and per split ``(metrics, predictions)`` to write."""
    folder = ModelFolder(base)
    val = folder.read_predictions("val", meta.labels)
    if meta.binary:
        if val is None:
            raise UsageError(
                f"{base} recorded no validation predictions (eval/val/predictions.csv) to choose "
                "the operating point on; give --data with labelled images"
            )
        measured = (folder.read_metrics("val") or {}).get("measured_on")
        where = "pooled out-of-fold validation" if measured else "validation"
        meta.set_operating_point(choose_operating_point(val.y_true, val.probs[:, 1], rule,
                                                        split=where))  # fmt: skip
    meta.extra["metrics"] = {}
    splits: dict = {}
    for split in sorted(p.name for p in (base / "eval").glob("*") if p.is_dir()):
        preds = folder.read_predictions(split, meta.labels)
        old = folder.read_metrics(split) or {}
        if preds is None:
            continue
        m = compute_metrics(preds.y_true, preds.probs, meta.labels, meta.threshold)
        if old.get("measured_on"):
            m["measured_on"] = old["measured_on"]
        meta.extra["metrics"][split] = {**headline_metrics(m), **_measured(old)}
        splits[split] = (m, preds)
    after = splits["val"][0] if "val" in splits else None
    return folder.read_metrics("val"), after, splits


def _measured(m: dict) -> dict:
    return {"measured_on": m["measured_on"]} if m.get("measured_on") else {}


def _site(predictor, meta, data, rule, refit_guard, min_per_class, folds, skip_bad, progress,
          seed):  # fmt: skip
    """Decode the site images, check them, fit temperature, operating point (and guard level)
    on all of them, and measure before/after by cross-fitting."""
    from medlens.data.cache import prepare_samples, refuse_unreadable
    from medlens.data.datasets import load_dataset

    ds = load_dataset(data, mode="all", classes=meta.labels)
    samples = ds.splits["all"]
    _check_counts([s.label for s in samples], meta.labels, min_per_class, folds, data)
    res = prepare_samples(samples, meta.preprocess, progress=progress, desc="decode")
    refuse_unreadable(res.errors, skip_bad)
    kept = [samples[i] for i in res.keep]
    y = np.array([s.label for s in kept])
    _check_counts(y, meta.labels, min_per_class, folds, data)
    guard = predictor.ood_guard
    logits, stats = predictor.forward_prepared(
        res.pixels, features=guard.input if guard is not None else False
    )
    logits = logits.numpy()
    ood = guard(stats) if guard is not None else None  # the base guard's verdicts
    flags_before = [o["flag"] for o in ood] if ood is not None else None
    before = compute_metrics(y, logits_to_probs(logits, meta.temperature), meta.labels,
                             meta.threshold)  # fmt: skip
    groups = [s.patient or s.source for s in kept]
    probs_cf, thr_cf = _cross_fit(logits, y, meta.binary, rule, groups, folds, seed)
    after = compute_metrics(y, probs_cf, meta.labels, thr_cf)
    after["measured_on"] = CROSS_FITTED
    meta.temperature = fit_temperature(logits, y)
    if meta.binary:
        p = logits_to_probs(logits, meta.temperature)[:, 1]
        meta.set_operating_point(choose_operating_point(y, p, rule, split="site"))
    site = {
        "data": {
            "folder": "/".join(Path(data).absolute().parts[-2:]),
            "images": int(len(y)),
            "per_class": {c: int((y == i).sum()) for i, c in enumerate(meta.labels)},
            "unreadable_skipped": len(res.errors),
            "patients": len({s.patient for s in kept if s.patient}) or None,
        },
        "folds": int(_n_folds(y, folds)),
        "ood_flagged_share_before": _share(flags_before),
    }
    new_guard = None
    if refit_guard and guard is not None:
        new_guard = guard.at_level(stats)
        ood = new_guard(stats)
        site["ood_flagged_share_after"] = _share([o["flag"] for o in ood])
    meta.extra["metrics"] = {SITE_SPLIT: {**headline_metrics(after), "measured_on": CROSS_FITTED}}
    root = Path(ds.root)
    root = root if root.is_dir() else root.parent  # a CSV manifest: its folder
    sources = [os.path.relpath(os.path.abspath(s.source), root) for s in kept]
    splits = {SITE_SPLIT: (after, sources, y, probs_cf, thr_cf, ood)}
    return before, after, site, splits, new_guard


def _share(flags) -> float | None:
    return None if flags is None else round(float(np.mean(flags)), 4)


def _check_counts(labels, classes: list[str], minimum: int, folds: int, data: str) -> None:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    need = max(minimum, folds)
    short = [f"{c} {n}" for c, n in zip(classes, counts) if n < need]
    if short:
        raise UsageError(
            f"--data {data}: site calibration needs at least {need} labelled images of each "
            f"class ({', '.join(classes)}); found {', '.join(short)}. Label more of the site's "
            "images (a few hundred in all) or lower --min-per-class"
        )


def _n_folds(y: np.ndarray, folds: int) -> int:
    return int(max(2, min(folds, np.bincount(y).min())))


def _cross_fit(logits, y, binary, rule, groups, folds, seed):
    """Cross-fitted probabilities ``(N, K)`` and, for two classes, each image's threshold
    (fitted on the other folds); None thresholds for multi-class."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = _n_folds(y, folds)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    probs = np.zeros((len(y), logits.shape[1] if logits.ndim == 2 and logits.shape[1] > 1 else 2))
    thresholds = np.full(len(y), np.nan) if binary else None
    for train, test in splitter.split(np.zeros(len(y)), y, groups):
        t = fit_temperature(logits[train], y[train])
        probs[test] = logits_to_probs(logits[test], t)
        if thresholds is not None:  # binary
            p_train = logits_to_probs(logits[train], t)[:, 1]
            thresholds[test] = rule.threshold(y[train], p_train)
    return probs, thresholds


def _write(
    base: Path, out: Path, meta: ModelMeta, splits: dict, guard: Guard | None, site: bool
) -> None:
    """The new model folder, assembled beside ``out`` and moved into place: ``splits`` (the
    evaluated splits to write), ``guard`` (a guard whose level was set on the site's images,
    or None to keep the base's)."""
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for name in _COPIED:
            if (base / name).exists():
                shutil.copyfile(base / name, tmp / name)
        if guard is not None:
            guard.save(tmp / OOD_FILE)
            meta.extra["ood"] = {**guard.summary(OOD_FILE), "sha256": sha256_file(tmp / OOD_FILE),
                                 "level_set_on": "the site's images"}  # fmt: skip
        for split, rec in splits.items():
            if site:
                m, sources, y, probs, thr, ood = rec
                write_split(ModelFolder(tmp).eval_dir(split), m, sources, y, probs,
                            ood=ood, thresholds=thr)  # fmt: skip
            else:
                m, preds = rec
                old = ModelFolder(base).read_metrics(split) or {}
                write_split(ModelFolder(tmp).eval_dir(split), {**m, **_measured(old)},
                            preds.paths, preds.y_true, preds.probs)  # fmt: skip
        write_card(tmp, meta)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
