"""``medlens audit``: a shortcut audit of a model on labelled images.

For the images under ``data`` (at most ``max_images``, drawn stratified by class with a fixed
seed), it measures (see :mod:`medlens.evaluation.shortcuts`):

* the no-anatomy baseline's cross-validated AUC;
* the model's AUC as it is, with the central anatomy masked and with the border masked;
* the share of Grad-CAM mass inside the central region;

and writes ``audit.json`` and ``audit.html`` (a plain section the model card links) into
``out``. Nothing of the images is written: only figures.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np

from medlens.errors import UsageError
from medlens.evaluation import shortcuts
from medlens.fileio import atomic_write_text, write_json

__all__ = ["audit_model", "AUDIT_JSON", "AUDIT_HTML", "audit_summary"]

log = logging.getLogger(__name__)

AUDIT_JSON = "audit.json"
AUDIT_HTML = "audit.html"


def _sample(samples: list, max_images: int, seed: int) -> list:
    """At most ``max_images`` samples, the same share of each class, in a fixed order."""
    if len(samples) <= max_images:
        return list(samples)
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in samples])
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, round(max_images * len(idx) / len(samples)))
        keep += rng.choice(idx, min(n, len(idx)), replace=False).tolist()
    return [samples[i] for i in sorted(keep)]


def _recorded(folder: Path, split: str, data: str, labels: list[str]) -> list:
    """The samples of the model's recorded ``eval/<split>/predictions.csv``, under ``data``."""
    from medlens.artifacts.folders import ModelFolder
    from medlens.data.datasets import Sample

    preds = ModelFolder(folder).read_predictions(split, labels)
    if preds is None:
        raise UsageError(
            f"--split {split}: {folder} recorded no eval/{split}/predictions.csv; give --data "
            "labelled images without --split"
        )
    return [Sample(str(Path(data) / p), int(t)) for p, t in zip(preds.paths, preds.y_true)]


def _features(samples: list, skip_bad: bool) -> tuple[np.ndarray, list[int], list[str]]:
    """No-anatomy features of each readable sample (decoded at full size)."""
    from medlens.data.imaging import read_image
    from medlens.errors import ImageReadError

    rows, keep, bad = [], [], []
    for i, s in enumerate(samples):
        try:
            d = read_image(s.source)
        except (ImageReadError, OSError) as e:
            if not skip_bad:
                raise UsageError(f"{e}; fix or remove it, or pass --skip-bad-images") from None
            bad.append(s.source)
            continue
        rows.append(shortcuts.image_features(d.pixels, d.source_format, d.notes))
        keep.append(i)
    return np.stack(rows), keep, bad


def _model_auc(predictor, x: np.ndarray, y: np.ndarray) -> tuple[float, list[float]]:
    from medlens.evaluation.metrics import compute_metrics

    m = compute_metrics(y, predictor.probs_prepared(x), predictor.labels, n_bootstrap=500)
    return float(m["auc"]), m["ci"]["auc"]


def _attention(predictor, samples: list, n: int) -> tuple[float | None, float | None]:
    """Mean central share of the Grad-CAM maps of ``n`` images, and the share of images with
    most of their map outside the centre. A two-class model's map explains its positive logit,
    so its positive images are used (a negative image's map is empty); None when no image gave
    a map."""
    from medlens.data.imaging import read_image

    if predictor.meta.binary:
        samples = [s for s in samples if s.label == 1]
    measured = []
    for s in samples[:n]:
        cam, _ = predictor.explain(read_image(s.source).pixels)
        measured.append(shortcuts.centre_share(cam))
    shares = np.array([v for v in measured if np.isfinite(v)])
    if not len(shares):
        return None, None
    return float(shares.mean()), float((shares < 0.5).mean())


def audit_model(
    model: str,
    data: str,
    out: str | Path | None = None,
    *,
    max_images: int = 400,
    cam_images: int = 100,
    seed: int = 0,
    skip_bad_images: bool = False,
    progress: bool = True,
    split: str | None = None,
) -> dict:
    """Audit ``model`` on ``data`` (any layout ``evaluate`` reads; every split counts); write
    ``audit.json``/``audit.html`` into ``out`` (default: the model folder). With ``split``
    (``test``, ``val``), only the images the model recorded for that split
    (``eval/<split>/predictions.csv``, paths relative to ``data``): the images it held out.

    Returns:
        The audit record (what ``audit.json`` holds).
    """
    from medlens.data.cache import prepare_samples, refuse_unreadable
    from medlens.data.datasets import load_dataset
    from medlens.inference.predictor import Predictor

    predictor = Predictor(model)
    meta = predictor.meta
    if split:
        every = _recorded(predictor.folder, split, data, meta.labels)
    else:
        every = load_dataset(data, mode="all", classes=meta.labels).splits["all"]
    samples = _sample(every, max_images, seed)
    if len({s.label for s in samples}) < 2:
        raise UsageError(f"--data {data}: the audit needs images of at least two classes")
    feats, keep, bad = _features(samples, skip_bad_images)
    samples = [samples[i] for i in keep]
    y = np.array([s.label for s in samples])
    res = prepare_samples(samples, meta.preprocess, progress=progress, desc="audit")
    refuse_unreadable(res.errors, skip_bad_images)
    groups = [s.patient or s.source for s in samples]
    baseline = shortcuts.baseline_auc(feats, y, groups, seed=seed)
    x = res.pixels
    auc, auc_ci = _model_auc(predictor, x, y)
    centre, centre_ci = _model_auc(predictor, shortcuts.mask_centre(x), y)
    border, border_ci = _model_auc(predictor, shortcuts.mask_border(x), y)
    attention, outside = _attention(predictor, samples, cam_images)
    level, words = shortcuts.verdict(baseline["auc"], auc, centre, border, attention)
    record = {
        "model": meta.name,
        "version": meta.version,
        "data": "/".join(Path(data).absolute().parts[-2:]) + (f" ({split} split)" if split else ""),
        "n": int(len(y)),
        "per_class": {c: int((y == i).sum()) for i, c in enumerate(meta.labels)},
        "unreadable_skipped": len(bad),
        "baseline": baseline,
        "occlusion": {
            "auc": auc,
            "auc_ci": auc_ci,
            "centre_masked_auc": centre,
            "centre_masked_auc_ci": centre_ci,
            "border_masked_auc": border,
            "border_masked_auc_ci": border_ci,
            "centre": f"{shortcuts.CENTRE:.0%}-{1 - shortcuts.CENTRE:.0%} of each side",
            "border": f"outer {shortcuts.BORDER:.0%} of each side",
        },  # fmt: skip
        "attention": {
            "centre_share": attention,
            "images_mostly_outside": outside,
            "images": int(min(cam_images, len(samples))),
            "which": "images of the positive class" if meta.binary else "all classes",
        },
        "verdict": {"level": level, "text": words},
    }
    folder = Path(out) if out else predictor.folder
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / AUDIT_JSON, record)
    atomic_write_text(folder / AUDIT_HTML, audit_html(record))
    return record


def audit_summary(record: dict) -> dict:
    """The figures a model card carries (``model.json`` ``audit``)."""
    occ = record["occlusion"]
    return {
        "level": record["verdict"]["level"],
        "verdict": record["verdict"]["text"],
        "baseline_auc": round(record["baseline"]["auc"], 4),
        "model_auc": round(occ["auc"], 4),
        "centre_masked_auc": round(occ["centre_masked_auc"], 4),
        "border_masked_auc": round(occ["border_masked_auc"], 4),
        "cam_centre_share": record["attention"]["centre_share"],
        "n": record["n"],
        "data": record["data"],
        "file": AUDIT_HTML,
    }


def _ci(v: float, ci) -> str:
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def audit_html(r: dict) -> str:
    """A self-contained HTML section with the audit's figures and verdict."""
    occ, att, base = r["occlusion"], r["attention"], r["baseline"]
    rows = [
        ("No-anatomy baseline AUC (cross-validated)", _ci(base["auc"], base["auc_ci"])),
        ("Model AUC", _ci(occ["auc"], occ["auc_ci"])),
        ("Model AUC, central anatomy masked", _ci(occ["centre_masked_auc"], occ["centre_masked_auc_ci"])),
        ("Model AUC, border masked", _ci(occ["border_masked_auc"], occ["border_masked_auc_ci"])),
        (f"Grad-CAM mass in the central region ({shortcuts.UNIFORM_CENTRE_SHARE:.0%} of the area)",
         "n/a" if att["centre_share"] is None else f"{att['centre_share']:.1%}"),
        ("Images with most of their map outside the centre",
         "n/a" if att["images_mostly_outside"] is None else f"{att['images_mostly_outside']:.1%}"),
    ]  # fmt: skip
    feats = "".join(
        f"<li>{html.escape(f['feature'])}: AUC {f['auc']:.3f}</li>" for f in base["top_features"]
    )
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    counts = ", ".join(f"{html.escape(c)} {n}" for c, n in r["per_class"].items())
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Shortcut audit: {html.escape(str(r['model']))}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;"
        "padding:0 1rem}table{border-collapse:collapse}th,td{border:1px solid #ccc;"
        "padding:.3rem .6rem;text-align:left}.verdict{font-size:1.1rem}</style></head><body>"
        f'<section id="shortcut-audit"><h1>Shortcut audit: {html.escape(str(r["model"]))}</h1>'
        f'<p class="verdict"><b>{html.escape(r["verdict"]["text"])}</b></p>'
        f"<p>{r['n']} images ({counts}) from <code>{html.escape(r['data'])}</code>; 95% "
        "bootstrap intervals. The border band is the outer 15% of each side, the central "
        "region the box inside it. Masked regions are filled with each image's median.</p>"
        f"<table>{body}</table>"
        + (
            f"<p>Single features that separate the classes best:</p><ul>{feats}</ul>"
            if feats
            else ""
        )
        + "</section></body></html>\n"
    )
