"""Out-of-distribution guard: flag images unlike the ones a model was trained on.

A classifier answers every question it is asked, including "is this throat photo glioma or
meningioma?". The guard MedLens fits, :class:`StageGuard`, reads the per-channel means and
standard deviations of every backbone stage's activations
(:meth:`medlens.modeling.classifier.Classifier.forward_with_stats`, the ONNX graph's ``stats``
output) and keeps one :class:`FeatureGuard` per stage:

* a stage's statistics are centred and projected onto their top ``dim`` principal components,
  whitened;
* its score is the smallest class-conditional Mahalanobis distance in that subspace (Lee et
  al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
  Adversarial Attacks", NeurIPS), divided by ``dim``, plus the squared norm of the part the
  subspace cannot explain, divided by its mean on training data;
* the stages' scores, each divided by its median on validation images, are averaged; the flag
  threshold is a high quantile (default 0.975) of the VALIDATION images' averaged scores, so
  about 2.5% of in-distribution images are flagged by construction.

Runs trained before the per-stage guard kept a single :class:`FeatureGuard` on the penultimate
(pooled) features; :func:`load_guard` still reads those.

The fitted statistics are saved as ``ood.npz`` beside the model (plain arrays, loaded with
``allow_pickle=False``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, Self, TypedDict, runtime_checkable

import numpy as np

from medlens.errors import DataError

__all__ = [
    "Guard",
    "OODVerdict",
    "FeatureGuard",
    "StageGuard",
    "EnsembleGuard",
    "fit_guard",
    "fit_stage_guard",
    "load_guard",
]


class OODVerdict(TypedDict):
    """A guard's verdict on one image."""

    flag: bool | None  # above the flag level; None: the model has no guard
    score: float | None
    ratio: float | None  # the score over the flag level: flagged above 1


@runtime_checkable
class Guard(Protocol):
    """What every out-of-distribution guard offers (:class:`StageGuard`,
    :class:`EnsembleGuard` and the older :class:`FeatureGuard`): the predictor and site
    calibration use guards only through this."""

    input: str  # what the predictor feeds it: "stats" (per-stage statistics) or "features"
    threshold: float  # the flag level of :meth:`score`

    def score(self, inputs: np.ndarray, /) -> np.ndarray:
        """``(N, ...)`` inputs -> ``(N,)`` scores (larger: less like the validation images)."""
        ...

    def at_level(self, inputs: np.ndarray, /) -> Guard:
        """The same guard with its flag level set on a site's own images."""
        ...

    def __call__(self, inputs: np.ndarray, /) -> list[OODVerdict]:
        """One verdict per image."""
        ...

    def save(self, path: str | Path) -> None:
        """Write the guard (``ood.npz``) atomically."""
        ...

    def summary(self, file: str = "") -> dict:
        """What ``model.json`` records about the guard."""
        ...


@dataclass
class FeatureGuard:
    """Fitted guard: ``guard(features) -> [{"flag", "score"}, ...]``."""

    input = "features"  # what the Predictor feeds it: the penultimate features

    center: np.ndarray  # (F,)
    components: np.ndarray  # (d, F) orthonormal rows
    scales: np.ndarray  # (d,) std of each component on training features
    class_means: np.ndarray  # (K, d) whitened class means
    residual_scale: float  # mean squared residual on training features
    threshold: float
    quantile: float

    def score(self, feats: np.ndarray) -> np.ndarray:
        """``(N, F)`` features -> ``(N,)`` scores (about 1-2 in distribution, larger outside)."""
        x = np.asarray(feats, dtype=np.float64) - self.center
        proj = x @ self.components.T  # (N, d)
        resid = ((x - proj @ self.components) ** 2).sum(1) / self.residual_scale
        z = proj / self.scales
        d2 = ((z[:, None, :] - self.class_means[None]) ** 2).sum(-1).min(1)
        return d2 / z.shape[1] + resid

    def at_level(self, inputs: np.ndarray) -> Self:
        """The same guard with its flag level set on ``inputs`` (a site's own images): the
        ``quantile`` of their scores, so that share of them passes."""
        return replace(self, threshold=float(np.quantile(self.score(inputs), self.quantile)))

    def __call__(self, feats: np.ndarray) -> list[OODVerdict]:
        s = self.score(feats)
        return verdicts(s, self.threshold)

    def save(self, path: str | Path) -> None:
        import io

        from medlens.fileio import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(
            buf,
            center=self.center.astype(np.float32),
            components=self.components.astype(np.float32),
            scales=self.scales.astype(np.float32),
            class_means=self.class_means.astype(np.float32),
            residual_scale=np.float64(self.residual_scale),
            threshold=np.float64(self.threshold),
            quantile=np.float64(self.quantile),
        )
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> FeatureGuard:
        with np.load(path, allow_pickle=False) as z:
            return cls(
                center=z["center"].astype(np.float64),
                components=z["components"].astype(np.float64),
                scales=z["scales"].astype(np.float64),
                class_means=z["class_means"].astype(np.float64),
                residual_scale=float(z["residual_scale"]),
                threshold=float(z["threshold"]),
                quantile=float(z["quantile"]),
            )

    def summary(self, file: str = "") -> dict:
        """What ``model.json`` records about the guard; ``file``: where it is saved."""
        return {
            "method": "mahalanobis-pca+residual (Lee et al. 2018)",
            "file": file,
            "dim": int(self.components.shape[0]),
            "threshold": round(self.threshold, 4),
            "quantile": self.quantile,
        }


def fit_guard(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    val_feats: np.ndarray,
    *,
    dim: int = 256,
    quantile: float = 0.975,
) -> FeatureGuard:
    """Fit the guard on training features; set its threshold on validation features.

    Args:
        train_feats: ``(N, F)`` penultimate features of the training images.
        train_labels: ``(N,)`` class indices.
        val_feats: ``(M, F)`` features of validation images (the threshold's data).
        dim: principal components kept (capped by the data).
        quantile: share of validation images left unflagged.
    """
    x = np.asarray(train_feats, dtype=np.float64)
    y = np.asarray(train_labels)
    if len(x) < 4 or len(val_feats) < 2:
        raise DataError("the OOD guard needs at least 4 training and 2 validation images")
    center = x.mean(0)
    xc = x - center
    _, sv, vt = np.linalg.svd(xc, full_matrices=False)
    # Keep at least one direction outside the subspace, so the residual term means something.
    d = int(max(1, min(dim, len(x) - 1, x.shape[1] - 1, (sv > sv[0] * 1e-6).sum() - 1)))
    components = vt[:d]
    proj = xc @ components.T
    scales = np.maximum(proj.std(0), 1e-6)
    resid = ((xc - proj @ components) ** 2).sum(1)
    residual_scale = float(max(resid.mean(), 1e-12))
    z = proj / scales
    class_means = np.stack([z[y == k].mean(0) for k in np.unique(y)])
    guard = FeatureGuard(center, components, scales, class_means, residual_scale, 0.0, quantile)
    guard.threshold = float(np.quantile(guard.score(val_feats), quantile))
    return guard


BORDERLINE = 1.5
"""A flagged image scoring up to this many times the flag level is *borderline*."""


def ood_text(ratio: float | None, flag: bool | None) -> str:
    """The guard's verdict for a person, with the ratio to the flag level, so that 1.03x and
    4.4x do not read the same: typical (<= 0.9x), near the flag level (0.9-1x),
    out-of-distribution borderline (1-1.5x), out-of-distribution (above). Empty without a
    guard."""
    if ratio is None or flag is None:
        return ""
    if not flag:
        kind = "typical" if ratio <= 0.9 else "near the flag level"
        return f"ood {ratio:.2f}x: {kind}"
    kind = "borderline, " if ratio <= BORDERLINE else ""
    return (
        f"OUT-OF-DISTRIBUTION ({kind}{ratio:.2f}x the flag level): unlike this model's training "
        "images; do not trust the label"
    )


def verdicts(scores: np.ndarray, threshold: float) -> list[OODVerdict]:
    """Per image: ``flag`` (score above the threshold), ``score``, and ``ratio``, the score
    over the threshold (a scale a person can read: flagged above 1)."""
    return [
        {
            "flag": bool(v > threshold),
            "score": round(float(v), 4),
            "ratio": round(float(v) / threshold, 2) if threshold > 0 else None,
        }
        for v in scores
    ]


def _mean_score(stats: np.ndarray, widths: list[int], parts: list[tuple]) -> np.ndarray:
    """The mean over consecutive column slices of ``stats`` (``widths``) of
    ``score(slice) / divisor``, one ``(score, divisor)`` of ``parts`` per slice."""
    stats = np.asarray(stats)
    if stats.shape[1] != sum(widths):
        raise ValueError(
            f"the OOD guard expects {sum(widths)} activation statistics, "
            f"got {stats.shape[1]}: it belongs to another model"
        )
    total, start = np.zeros(len(stats)), 0
    for (score, divisor), width in zip(parts, widths):
        total += score(stats[:, start : start + width]) / divisor
        start += width
    return total / len(widths)


@dataclass
class StageGuard:
    """The guard MedLens fits: one :class:`FeatureGuard` per backbone stage, on that stage's
    per-channel activation means and standard deviations
    (:meth:`medlens.modeling.classifier.Classifier.forward_with_stats`).

    Each block's score is divided by its median on validation images and the blocks are
    averaged, so every stage has the same say; the flag threshold is the ``quantile`` of the
    validation images' averaged scores. Penultimate features alone are shaped by the task the
    network was fine-tuned for: the Kermany model's features placed 22% of adult chest X-rays
    among its paediatric ones, while the mid-level stages' statistics (texture, contrast,
    anatomy scale) separated all of them (200 images each, 64 components per stage).
    """

    blocks: list  # FeatureGuard per stage (their own thresholds unused)
    widths: list  # length of each stage's slice of the statistics vector
    refs: np.ndarray  # (stages,) median validation score of each block
    threshold: float
    quantile: float

    input = "stats"

    def score(self, stats: np.ndarray) -> np.ndarray:
        return _mean_score(
            stats, self.widths, [(g.score, r) for g, r in zip(self.blocks, self.refs)]
        )

    def at_level(self, inputs: np.ndarray) -> Self:
        """The same guard with its flag level set on ``inputs`` (a site's own images): the
        ``quantile`` of their scores, so that share of them passes."""
        return replace(self, threshold=float(np.quantile(self.score(inputs), self.quantile)))

    def __call__(self, stats: np.ndarray) -> list[OODVerdict]:
        s = self.score(stats)
        return verdicts(s, self.threshold)

    def recalibrated(self, val_stats: np.ndarray) -> StageGuard:
        """The same per-stage fits with each block's scale (its median validation score)
        and the flag threshold (the ``quantile`` of the validation scores) set on
        ``val_stats``: how a guard is fitted, and how an exported one follows its graph
        (weights stored in 16 or 8 bits move the activations it reads)."""
        refs, start = [], 0
        for g, width in zip(self.blocks, self.widths):
            part = val_stats[:, start : start + width]
            refs.append(max(float(np.median(g.score(part))), 1e-12))
            start += width
        guard = StageGuard(self.blocks, list(self.widths), np.asarray(refs), 0.0, self.quantile)
        guard.threshold = float(np.quantile(guard.score(val_stats), self.quantile))
        return guard

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray | np.generic]:
        """The guard as named arrays (``ood.npz``'s content), names prefixed by ``prefix``."""
        arrays: dict[str, np.ndarray | np.generic] = {
            "kind": np.array("stages"),
            "widths": np.asarray(self.widths, np.int64),
            "refs": self.refs.astype(np.float64),
            "threshold": np.float64(self.threshold),
            "quantile": np.float64(self.quantile),
        }
        for i, g in enumerate(self.blocks):
            # float16 components: the bundled models' size budget; scores move by < 1e-3.
            arrays.update(
                {
                    f"b{i}_center": g.center.astype(np.float32),
                    f"b{i}_components": g.components.astype(np.float16),
                    f"b{i}_scales": g.scales.astype(np.float32),
                    f"b{i}_class_means": g.class_means.astype(np.float32),
                    f"b{i}_residual_scale": np.float64(g.residual_scale),
                }
            )
        return {prefix + k: v for k, v in arrays.items()}

    def save(self, path: str | Path) -> None:
        _save_arrays(path, self.to_arrays())

    @classmethod
    def from_npz(cls, z: Mapping[str, np.ndarray], prefix: str = "") -> StageGuard:
        if prefix:
            z = {k.removeprefix(prefix): z[k] for k in z if k.startswith(prefix)}
        widths = [int(w) for w in z["widths"]]
        blocks = [
            FeatureGuard(
                center=z[f"b{i}_center"].astype(np.float64),
                components=z[f"b{i}_components"].astype(np.float64),
                scales=z[f"b{i}_scales"].astype(np.float64),
                class_means=z[f"b{i}_class_means"].astype(np.float64),
                residual_scale=float(z[f"b{i}_residual_scale"]),
                threshold=0.0,
                quantile=float(z["quantile"]),
            )
            for i in range(len(widths))
        ]
        return cls(
            blocks,
            widths,
            z["refs"].astype(np.float64),
            float(z["threshold"]),
            float(z["quantile"]),
        )

    def summary(self, file: str = "") -> dict:
        """What ``model.json`` records about the guard; ``file``: where it is saved."""
        return {
            "method": "per-stage Mahalanobis on channel mean/std (Lee et al. 2018)",
            "file": file,
            "stages": len(self.blocks),
            "dim": int(max(g.components.shape[0] for g in self.blocks)),
            "threshold": round(self.threshold, 4),
            "quantile": self.quantile,
        }


class EnsembleGuard:
    """The guard of an ensemble: each member's :class:`StageGuard` on its own slice of the
    concatenated statistics; the score is the mean of the members' scores, each divided by
    its own threshold, so an image is flagged when on average the members would flag it."""

    input = "stats"
    threshold = 1.0

    def __init__(self, members: list[StageGuard]):
        self.members = members
        self.widths = [sum(m.widths) for m in members]

    def score(self, stats: np.ndarray) -> np.ndarray:
        return _mean_score(stats, self.widths, [(m.score, m.threshold) for m in self.members])

    def at_level(self, stats: np.ndarray) -> EnsembleGuard:
        """The same guard with its level set on ``stats`` (a site's own images): every member's
        threshold scaled so that the members' ``quantile`` of these images' scores pass."""
        level = float(np.quantile(self.score(stats), self.members[0].quantile))
        return EnsembleGuard([replace(m, threshold=m.threshold * level) for m in self.members])

    def __call__(self, stats: np.ndarray) -> list[OODVerdict]:
        s = self.score(stats)
        return verdicts(s, self.threshold)

    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray | np.generic] = {
            "kind": np.array("ensemble"),
            "members": np.int64(len(self.members)),
        }
        for i, m in enumerate(self.members):
            arrays.update(m.to_arrays(prefix=f"m{i}_"))
        _save_arrays(path, arrays)

    def summary(self, file: str = "") -> dict:
        """What ``model.json`` records about the guard; ``file``: where it is saved."""
        return {
            "method": "mean of the members' per-stage Mahalanobis scores, each over its "
            "threshold (Lee et al. 2018)",
            "file": file,
            "members": len(self.members),
            "dim": max(m.summary()["dim"] for m in self.members),
            "threshold": self.threshold,
            "quantile": self.members[0].quantile,
        }


def _save_arrays(path: str | Path, arrays: Mapping[str, np.ndarray | np.generic]) -> None:
    import io

    from medlens.fileio import atomic_write_bytes

    buf = io.BytesIO()
    named: dict[str, Any] = dict(arrays)  # savez(**kwds) also names its allow_pickle flag
    np.savez(buf, **named)
    atomic_write_bytes(path, buf.getvalue())


def load_guard(path: str | Path) -> Guard:
    """:class:`StageGuard`, :class:`EnsembleGuard` or (older runs) :class:`FeatureGuard` from
    ``ood.npz``."""
    with np.load(path, allow_pickle=False) as z:
        kind = str(z["kind"]) if "kind" in z.files else None
        if kind == "stages":
            return StageGuard.from_npz(z)
        if kind == "ensemble":
            arrays = {k: z[k] for k in z.files}
            return EnsembleGuard(
                [StageGuard.from_npz(arrays, f"m{i}_") for i in range(int(z["members"]))]
            )
    return FeatureGuard.load(path)


def fit_stage_guard(
    train_stats: np.ndarray,
    train_labels: np.ndarray,
    val_stats: np.ndarray,
    widths: list[int],
    *,
    dim: int = 64,
    quantile: float = 0.975,
) -> StageGuard:
    """Fit a :class:`StageGuard`: per-stage statistics from training images, block scales
    and the threshold from validation images."""
    blocks, start = [], 0
    for width in widths:
        sl = slice(start, start + width)
        blocks.append(
            fit_guard(
                train_stats[:, sl], train_labels, val_stats[:, sl], dim=dim, quantile=quantile
            )
        )
        start += width
    unscaled = StageGuard(blocks, list(widths), np.ones(len(widths)), 0.0, quantile)
    return unscaled.recalibrated(val_stats)
