"""Shortcut audit building blocks: what a data set and a model can decide without the anatomy.

Public medical data often draw each class from another source (another hospital, a paper's
figures, an anonymisation box stamped on one class only); a network can then score well by
recognising the source. Three measurements say how far that happened:

* :func:`image_features` / :func:`baseline_auc`: a *no-anatomy baseline*, a gradient-boosted
  classifier (scikit-learn's ``HistGradientBoostingClassifier``, cross-validated) on features
  that carry no disease: size, aspect ratio, bit depth and format, colour tint, intensity
  percentiles, border and corner statistics, saturated pixels, solid rectangles and fine
  text-like marks near the border. Its AUC says how far the labels can be predicted without
  looking at the body.
* :func:`mask_centre` / :func:`mask_border`: occlusion of prepared model inputs, for the model's
  AUC with the central anatomy hidden and with the border hidden.
* :func:`centre_share`: the share of a Grad-CAM map's mass inside the central region.

:func:`verdict` turns the figures into plain words.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "FEATURE_NAMES",
    "CENTRE",
    "BORDER",
    "image_features",
    "baseline_auc",
    "mask_centre",
    "mask_border",
    "centre_share",
    "verdict",
    "UNIFORM_CENTRE_SHARE",
]

BORDER = 0.15
"""The border band is the outer 15% of each side (51% of the area), where burnt-in text,
anonymisation boxes, rulers and collimation edges sit."""
CENTRE = BORDER
"""The central region is the rest: the box from 15% to 85% of each side (49% of the area)."""
UNIFORM_CENTRE_SHARE = (1 - 2 * CENTRE) ** 2
"""The central share of a map spread evenly over the image."""
_FORMATS = ("PNG", "JPEG", "DICOM", "TIFF", "BMP")
FEATURE_NAMES = (
    "height", "width", "aspect_ratio", "format_code", "high_bit_depth", "colour_tint",
    "p01", "p05", "p50", "p95", "p99", "mean", "std",
    "border_mean", "border_std", "corner_tl", "corner_tr", "corner_bl", "corner_br",
    "saturated_white", "saturated_black",
    "solid_bright_cells", "solid_bright_bottom", "solid_dark_cells",
    "edge_density_border", "edge_density_centre",
)  # fmt: skip
"""The no-anatomy features, in the order :func:`image_features` returns them."""


def _grey(pixels: np.ndarray) -> np.ndarray:
    x = pixels.astype(np.float32) / 255.0
    return x.mean(axis=2) if x.ndim == 3 else x


def _solid_cells(g: np.ndarray, cells: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per cell of a ``cells x cells`` grid: (uniform and bright, uniform and dark)."""
    h, w = g.shape
    ys, xs = np.linspace(0, h, cells + 1).astype(int), np.linspace(0, w, cells + 1).astype(int)
    bright = np.zeros((cells, cells), bool)
    dark = np.zeros((cells, cells), bool)
    for i in range(cells):
        for j in range(cells):
            c = g[ys[i] : max(ys[i + 1], ys[i] + 1), xs[j] : max(xs[j + 1], xs[j] + 1)]
            if c.std() < 0.02:
                bright[i, j] = c.mean() > 0.9
                dark[i, j] = c.mean() < 0.05
    return bright, dark


def image_features(
    pixels: np.ndarray, source_format: str = "", notes: Sequence[str] = ()
) -> np.ndarray:
    """The :data:`FEATURE_NAMES` of one decoded image (``uint8 (H, W)`` or ``(H, W, 3)``).

    Nothing here looks at the anatomy: only the file's geometry and format, global intensity
    statistics, the border band and corners, uniform (solid) rectangles and fine structure
    (edges) near the border versus the centre, where burnt-in text and markers sit.
    """
    h, w = pixels.shape[:2]
    g = _grey(pixels)
    tint = 0.0
    if pixels.ndim == 3:
        c = pixels.astype(np.float32) / 255.0
        tint = float(np.abs(c[..., 0] - c[..., 1]).mean() + np.abs(c[..., 1] - c[..., 2]).mean())
    fmt = source_format.upper()
    bh, bw = max(1, int(h * BORDER)), max(1, int(w * BORDER))
    band = np.ones_like(g, bool)
    band[bh : h - bh, bw : w - bw] = False
    ch, cw = max(1, int(h * 0.08)), max(1, int(w * 0.08))
    corners = [g[:ch, :cw], g[:ch, -cw:], g[-ch:, :cw], g[-ch:, -cw:]]
    bright, dark = _solid_cells(g)
    gy, gx = np.gradient(g)
    edges = np.hypot(gx, gy) > 0.15
    centre = np.zeros_like(g, bool)
    centre[int(h * CENTRE) : int(h * (1 - CENTRE)), int(w * CENTRE) : int(w * (1 - CENTRE))] = True
    values = [
        h, w, w / h, _FORMATS.index(fmt) if fmt in _FORMATS else len(_FORMATS),
        float(any("16" in str(n) for n in notes)), tint,
        *np.percentile(g, [1, 5, 50, 95, 99]), g.mean(), g.std(),
        g[band].mean(), g[band].std(), *(c.mean() for c in corners),
        (g >= 0.98).mean(), (g <= 0.02).mean(),
        bright.mean(), bright[-3:].mean(), dark.mean(),
        edges[band].mean(), edges[centre].mean(),
    ]  # fmt: skip
    return np.asarray(values, dtype=np.float64)


def _auc(y: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if scores.ndim == 2 and scores.shape[1] == 2:
        scores = scores[:, 1]
    if scores.ndim == 1:
        return float(roc_auc_score(y, scores))
    return float(roc_auc_score(y, scores, multi_class="ovr", average="macro"))


def baseline_auc(
    features: ArrayLike,
    y: ArrayLike,
    groups: ArrayLike | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
    n_boot: int = 500,
) -> dict:
    """Cross-validated AUC of a no-anatomy classifier on ``features`` (see module docstring).

    Folds are stratified and, with ``groups`` (patients), grouped. Each image's score comes
    from the fold model that did not see it; the AUC (macro one-vs-rest for more than two
    classes) of those pooled scores has a 95% bootstrap interval. Each feature's own AUC
    (one feature as the score, the better direction) shows what carries the signal.

    Returns:
        ``{"auc", "auc_ci", "n", "folds", "top_features": [{"feature", "auc"}, ...]}``.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedGroupKFold

    from medlens.evaluation.metrics import compute_metrics

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    k = int(max(2, min(folds, np.bincount(y)[np.bincount(y) > 0].min())))
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    n_classes = int(y.max()) + 1
    scores = np.zeros((len(y), n_classes))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for train, test in splitter.split(x, y, groups):
        clf = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.1, random_state=seed)
        clf.fit(x[train], y[train])
        proba = np.zeros((len(test), n_classes))
        proba[:, clf.classes_] = clf.predict_proba(x[test])
        scores[test] = proba
    # the AUC and its percentile bootstrap interval, as every other MedLens figure has them
    m = compute_metrics(y, scores, [str(c) for c in range(n_classes)], n_bootstrap=n_boot,
                        seed=seed)  # fmt: skip
    single: list[dict[str, str | float]] = []
    if n_classes == 2:
        for i, name in enumerate(FEATURE_NAMES[: x.shape[1]]):
            a = _auc(y, x[:, i]) if np.ptp(x[:, i]) > 0 else 0.5
            single.append({"feature": name, "auc": round(max(a, 1 - a), 4)})
        single.sort(key=lambda d: -float(d["auc"]))
    return {
        "auc": float(m["auc"]),
        "auc_ci": m["ci"]["auc"],
        "n": int(len(y)),
        "folds": k,
        "top_features": single[:5],
    }


def mask_centre(x: np.ndarray) -> np.ndarray:
    """Prepared images ``(N, C, S, S)`` with the central region filled by each image's median."""
    out = np.array(x, copy=True)
    s = out.shape[-1]
    lo, hi = int(s * CENTRE), int(s * (1 - CENTRE))
    med = np.median(out.reshape(len(out), -1), axis=1).astype(out.dtype)
    out[..., lo:hi, lo:hi] = med[:, None, None, None]
    return out


def mask_border(x: np.ndarray) -> np.ndarray:
    """Prepared images ``(N, C, S, S)`` with the border band filled by each image's median."""
    out = np.array(x, copy=True)
    s = out.shape[-1]
    b = int(s * BORDER)
    med = np.median(out.reshape(len(out), -1), axis=1).astype(out.dtype)[:, None, None, None]
    keep = out[..., b : s - b, b : s - b].copy()
    out[...] = med
    out[..., b : s - b, b : s - b] = keep
    return out


def centre_share(cam: np.ndarray) -> float:
    """The share of a non-negative map's mass inside the central region (an even map:
    :data:`UNIFORM_CENTRE_SHARE`)."""
    cam = np.clip(np.asarray(cam, dtype=np.float64), 0, None)
    total = cam.sum()
    if total <= 0:
        return float("nan")
    h, w = cam.shape
    inner = cam[int(h * CENTRE) : int(h * (1 - CENTRE)), int(w * CENTRE) : int(w * (1 - CENTRE))]
    return float(inner.sum() / total)


def verdict(baseline: float, auc: float, centre_masked: float, border_masked: float,
            attention: float | None) -> tuple[str, str]:  # fmt: skip
    """``(level, words)``: ``"low"``, ``"moderate"`` or ``"high"`` shortcut risk, in plain words
    with the figures that decided it.

    High: the model collapses when the border is hidden (it decides from outside the anatomy),
    or the data carry a strong source signal (baseline AUC >= 0.9) and the model shows any sign
    of using it. Moderate: any one sign (a baseline AUC >= 0.75; the border band alone still
    decides, AUC with the centre hidden keeping 80% of its margin over chance; less Grad-CAM
    mass in the centre than an even map would put there). Low: none.
    """
    margin = max(auc - 0.5, 1e-6)
    collapse = (auc - border_masked) / margin >= 0.5
    data, model = [], []
    if baseline >= 0.75:
        data.append(
            f"image-level features that do not look at the anatomy (size, format, intensity "
            f"statistics, borders, solid boxes, marks) predict the labels with AUC {baseline:.2f}"
            + (": the classes differ in their source or acquisition" if baseline >= 0.9 else "")
        )
    if collapse:
        model.append(
            f"hiding the border drops the model's AUC from {auc:.2f} to {border_masked:.2f}: it "
            "relies on what lies outside the central anatomy"
        )
    if centre_masked >= 0.5 + 0.8 * margin:
        model.append(
            f"with the central region hidden the model still reaches AUC {centre_masked:.2f} "
            "from the border band"
        )
    if attention is not None and attention < UNIFORM_CENTRE_SHARE:
        model.append(
            f"only {attention:.0%} of its Grad-CAM mass falls in the central region "
            f"({UNIFORM_CENTRE_SHARE:.0%} of the area)"
        )
    if collapse or (baseline >= 0.9 and model):
        level = "high"
    elif data or model:
        level = "moderate"
    else:
        return "low", (
            f"Low shortcut risk: image-level features reach AUC {baseline:.2f}, the model needs "
            f"the centre (AUC {auc:.2f}; {centre_masked:.2f} with it hidden, {border_masked:.2f} "
            f"with the border hidden)"
            + ("" if attention is None else f" and puts {attention:.0%} of its Grad-CAM mass there")
            + "."
        )
    return level, f"{level.capitalize()} shortcut risk: " + "; ".join(data + model) + "."
