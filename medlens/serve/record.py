"""The web app's side of the prediction record: recording predictions, taking feedback, and
(only when the operator opts in with ``--keep-feedback-images DIR``) keeping the images that
clinicians labelled.

With images kept, every recorded upload's decoded pixels wait in ``DIR/pending/`` as a PNG
named by its random prediction id (never the upload's name, never a DICOM header: burnt-in
text stays) for up to :data:`PENDING_HOURS`; feedback moves it to ``DIR/kept/``, and a
pending image nobody gave feedback on is deleted after that time.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from medlens.fileio import atomic_write_bytes
from medlens.monitoring.store import PredictionRecord, RecordStore
from medlens.serve.upload import UploadError

__all__ = ["Recorder", "PENDING_HOURS"]

log = logging.getLogger("medlens.serve")
PENDING_HOURS = 24.0
PENDING, KEPT = "pending", "kept"


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class Recorder:
    """Records predictions in ``store``; keeps labelled images in ``images`` when given."""

    def __init__(self, store: RecordStore, images: str | os.PathLike | None = None) -> None:
        self.store = store
        self.images = Path(images) if images is not None else None
        self._last_sweep = 0.0
        if self.images is not None:
            for sub in (PENDING, KEPT):
                (self.images / sub).mkdir(parents=True, exist_ok=True)

    def record(
        self, model: Any, result: Any, digest: str, latency_ms: float, pixels: np.ndarray
    ) -> str:
        """Store one prediction (and its pixels while feedback may come); its id."""
        pid = self.store.add_prediction(
            PredictionRecord(
                model=model.name,
                model_version=model.info["version"],
                image_sha256=digest,
                label=result.label,
                probabilities=result.probabilities,
                threshold=result.threshold,
                ood=result.ood or {},
                latency_ms=latency_ms,
            )
        )
        if self.images is not None:
            atomic_write_bytes(self.images / PENDING / f"{pid}.png", _png(pixels))
            self._sweep()
        return pid

    def feedback(self, models: dict, prediction_id: str, label: str, comment: str | None) -> dict:
        """Store a clinician's label for a recorded prediction.

        Raises:
            UploadError: 404 for an unknown id; 422 for a label the prediction's model does
                not have (or a model this server no longer serves).
        """
        row = self.store.prediction(prediction_id)
        if row is None:
            raise UploadError(
                404,
                f"no prediction with id {prediction_id!r} in the record (it may be older than "
                "the record keeps); send the prediction_id a predict answer returned",
            )
        served = models.get(row["model"])
        if served is None:
            raise UploadError(
                422, f"the prediction's model {row['model']!r} is not served here any more"
            )
        labels = list(served.predictor.labels)
        if label not in labels:
            raise UploadError(
                422,
                f"label {label!r} is not a label of model {row['model']!r}; use one of: {', '.join(labels)}",
            )
        kept = self._keep(prediction_id)
        agrees = label == row["label"]
        fid = self.store.add_feedback(prediction_id, label, agrees, comment, kept)
        log.info("feedback id=%d model=%s agrees=%s image_kept=%s", fid, row["model"], agrees,
                 kept)  # fmt: skip
        return {"feedback_id": fid, "prediction_id": prediction_id, "label": label,
                "predicted": row["label"], "agrees": agrees, "image_kept": kept}  # fmt: skip

    def _keep(self, pid: str) -> bool:
        """Move a pending image to the kept ones; False when none waits (not opted in, or
        older than :data:`PENDING_HOURS`)."""
        if self.images is None or not pid.isalnum():
            return False
        src = self.images / PENDING / f"{pid}.png"
        try:
            os.replace(src, self.images / KEPT / f"{pid}.png")
        except FileNotFoundError:
            return (self.images / KEPT / f"{pid}.png").exists()
        return True

    def _sweep(self) -> None:
        """Delete pending images older than :data:`PENDING_HOURS` (at most every 10 min)."""
        if self.images is None or time.monotonic() - self._last_sweep < 600:
            return
        self._last_sweep = time.monotonic()
        cutoff = time.time() - PENDING_HOURS * 3600
        for f in (self.images / PENDING).glob("*.png"):
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
            except FileNotFoundError:  # another worker swept it first
                pass
