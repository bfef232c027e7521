"""What the prediction record says about a served model, per day: volume, OOD flags, feedback,
the predicted-label mix and drift signals against the model's own validation split, with
alerts when a signal passes its level (:class:`AlertLevels`).

Every signal is computed from what the record holds (probabilities, guard verdicts, feedback);
none needs the images. The reference is what the model folder recorded at training time: its
validation predictions (``eval/val/predictions.csv``), its training prevalence and its guard's
quantile (the share of validation images it leaves unflagged).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from medlens.artifacts.folders import ModelFolder
from medlens.artifacts.model import read_meta
from medlens.evaluation.drift import em_prevalence, excess_rate, ks, psi
from medlens.monitoring.store import RecordStore

__all__ = ["AlertLevels", "Reference", "monitoring_report"]

PSI_BINS = 10


@dataclass(frozen=True)
class AlertLevels:
    """When a signal raises an alert (all need ``min_predictions`` predictions, feedback
    ``min_feedback`` answers).

    * ``ood_rate``: the guard flags more than this share AND more than ``ood_factor`` times
      the share it was set to flag on validation images, with a one-sided binomial p-value
      below ``p_value``;
    * ``psi``: a class probability's population stability index above this level plus the
      index's own sampling noise, ``(bins - 1) * (1/n + 1/n_val)``;
    * ``p_value``: the Kolmogorov-Smirnov test against validation rejects at this level;
    * ``prevalence_shift``: the EM-estimated prevalence of a class differs from the training
      prevalence by more than this (absolute);
    * ``agreement``: clinicians agree with the model less often than this.
    """

    ood_rate: float = 0.10
    ood_factor: float = 3.0
    psi: float = 0.25
    p_value: float = 0.001
    prevalence_shift: float = 0.20
    agreement: float = 0.80
    min_predictions: int = 30
    min_feedback: int = 20


@dataclass
class Reference:
    """What the model was validated on (any part may be missing: its signal is then None)."""

    labels: list[str]
    train_prior: np.ndarray | None
    val_probs: np.ndarray | None
    expected_ood_rate: float | None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> Reference:
        meta = read_meta(folder)
        labels = list(meta.labels)
        training = meta.training
        counts = ((training.split_counts if training else None) or {}).get("train")
        prior = None
        if counts and all(counts.get(c) for c in labels):
            prior = np.array([counts[c] for c in labels], float)
            prior /= prior.sum()
        val = ModelFolder(folder).read_predictions("val", labels)
        ood = meta.ood
        expected = round(1.0 - ood.quantile, 6) if ood and ood.quantile is not None else None
        return cls(labels, prior, None if val is None else val.probs, expected)


def _alert(signal: str, value: float, level: float, message: str) -> dict:
    return {"signal": signal, "value": round(float(value), 4), "level": round(level, 4),
            "message": message}  # fmt: skip


def _ood_signal(rows: list[dict], ref: Reference, lv: AlertLevels) -> tuple[dict, list[dict]]:
    judged = [r for r in rows if r["ood_flag"] is not None]
    flagged = sum(bool(r["ood_flag"]) for r in judged)
    rate = flagged / len(judged) if judged else None
    out = {"ood_flagged": flagged, "ood_rate": rate, "ood_expected_rate": ref.expected_ood_rate}
    alerts = []
    if rate is not None and len(judged) >= lv.min_predictions:
        expected = ref.expected_ood_rate or 0.025
        p = excess_rate(flagged, len(judged), expected)
        out["ood_p_value"] = p
        level = max(lv.ood_rate, lv.ood_factor * expected)
        if rate > level and p < lv.p_value:
            alerts.append(_alert("ood_rate", rate, level,
                f"the guard flags {flagged} of {len(judged)} images ({rate:.0%}) as unlike the "
                f"training data; it was set to flag {expected:.1%} of validation images"))  # fmt: skip
    return out, alerts


def _drift_signal(probs: np.ndarray, ref: Reference, lv: AlertLevels) -> tuple[dict, list[dict]]:
    if ref.val_probs is None or len(probs) == 0:
        return {"psi": None, "ks": None}, []
    classes = ref.labels[1:] if len(ref.labels) == 2 else ref.labels
    out_psi, out_ks, alerts = {}, {}, []
    noise = (PSI_BINS - 1) * (1 / len(probs) + 1 / len(ref.val_probs))
    for c in classes:
        k = ref.labels.index(c)
        out_psi[c] = psi(ref.val_probs[:, k], probs[:, k], PSI_BINS)
        stat, p = ks(ref.val_probs[:, k], probs[:, k])
        out_ks[c] = {"statistic": stat, "p_value": p}
        if len(probs) < lv.min_predictions:
            continue
        if out_psi[c] > lv.psi + noise:
            alerts.append(_alert("psi", out_psi[c], lv.psi + noise,
                f"p({c}) is distributed unlike on the validation split (PSI {out_psi[c]:.2f})"))  # fmt: skip
        if p < lv.p_value:
            alerts.append(_alert("ks", p, lv.p_value,
                f"p({c}): Kolmogorov-Smirnov against validation, D = {stat:.2f}, "
                f"p = {p:.1e}"))  # fmt: skip
    return {"psi": out_psi, "psi_noise": noise, "ks": out_ks}, alerts


def _prevalence_signal(
    probs: np.ndarray, ref: Reference, lv: AlertLevels
) -> tuple[dict, list[dict]]:
    mix = {c: float(np.mean(probs.argmax(1) == k)) if len(probs) else None
           for k, c in enumerate(ref.labels)}  # fmt: skip
    out = {"label_mix": mix, "training_prevalence": None, "em_prevalence": None}
    if ref.train_prior is None or len(probs) == 0:
        return out, []
    est = em_prevalence(probs, ref.train_prior)
    out["training_prevalence"] = dict(zip(ref.labels, map(float, ref.train_prior)))
    out["em_prevalence"] = dict(zip(ref.labels, map(float, est)))
    shift = np.abs(est - ref.train_prior)
    k = int(shift.argmax())
    if len(probs) >= lv.min_predictions and shift[k] > lv.prevalence_shift:
        c = ref.labels[k]
        return out, [_alert("prevalence", shift[k], lv.prevalence_shift,
            f"estimated prevalence of {c} is {est[k]:.0%}, {ref.train_prior[k]:.0%} in "
            "training: the case mix has changed (or the inputs have)")]  # fmt: skip
    return out, []


def _feedback_signal(fb: list[dict], lv: AlertLevels) -> tuple[dict, list[dict]]:
    agree = sum(bool(f["agrees"]) for f in fb)
    rate = agree / len(fb) if fb else None
    out = {"feedback": len(fb), "feedback_agreement": rate}
    if rate is not None and len(fb) >= lv.min_feedback and rate < lv.agreement:
        return out, [_alert("agreement", rate, lv.agreement,
            f"clinicians agreed with {agree} of {len(fb)} predictions ({rate:.0%})")]  # fmt: skip
    return out, []


def summarize(rows: list[dict], fb: list[dict], ref: Reference, lv: AlertLevels) -> dict:
    """The signals of one set of predictions and its feedback, with their alerts."""
    probs = np.array([[r["probabilities"].get(c, 0.0) for c in ref.labels] for r in rows])
    probs = probs.reshape(len(rows), len(ref.labels))
    out: dict = {"predictions": len(rows)}
    alerts: list[dict] = []
    for part, found in (
        _ood_signal(rows, ref, lv),
        _feedback_signal(fb, lv),
        _prevalence_signal(probs, ref, lv),
        _drift_signal(probs, ref, lv),
    ):
        out.update(part)
        alerts += found
    out["alerts"] = alerts
    return out


def monitoring_report(
    store: RecordStore,
    model: str,
    folder: str | os.PathLike,
    days: int = 7,
    levels: AlertLevels | None = None,
    now: datetime | None = None,
) -> dict:
    """The model's last ``days`` days: the whole window's signals and alerts (top level), and
    the same per day (``per_day``, oldest first, days without predictions left out)."""
    lv = levels or AlertLevels()
    ref = Reference.from_folder(folder)
    now = now or datetime.now(UTC)
    since = (now - timedelta(days=days)).replace(hour=0, minute=0, second=0, microsecond=0)
    rows = store.predictions_since(model, since)
    fb = store.feedback_rows(model, since)
    day = lambda r: r["created_at"].astimezone(UTC).date().isoformat()  # noqa: E731
    per_day = [
        {
            "day": d,
            **summarize([r for r in rows if day(r) == d], [f for f in fb if day(f) == d], ref, lv),
        }  # fmt: skip
        for d in sorted({day(r) for r in rows})
    ]
    return {
        "model": model,
        "since": since.isoformat(),
        "days": days,
        **summarize(rows, fb, ref, lv),
        "per_day": per_day,
        "levels": asdict(lv),
    }
