"""``medlens feedback export``: clinicians' feedback as a data set to retrain on.

Writes ``OUT/feedback.csv`` (every feedback answer: ids, time, model, version, the model's
label, the clinician's label, agreement, comment, and the kept image's path when there is one)
and, for the images kept with ``medlens serve --keep-feedback-images DIR``, an image-folder
data set per model, ``OUT/<model>/<label>/<prediction_id>.png``, that ``medlens train
--init-from <model> --data OUT/<model>`` reads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from medlens.errors import UsageError
from medlens.fileio import write_csv
from medlens.monitoring.store import RecordStore

__all__ = ["export_feedback", "FEEDBACK_COLUMNS"]

FEEDBACK_COLUMNS = ["feedback_id", "prediction_id", "time", "model", "model_version",
                    "predicted", "label", "agrees", "comment", "image"]  # fmt: skip


def _safe_part(name: str, what: str) -> str:
    """A model or label name as one folder name (refused when it could leave ``OUT``)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UsageError(f"the record holds a {what} {name!r} that cannot be a folder name")
    return name


def export_feedback(
    store: RecordStore, out: str | os.PathLike, images: str | os.PathLike | None = None
) -> dict:
    """Write the feedback CSV and the kept images; ``{"feedback", "images", "csv"}``."""
    out = Path(out)
    kept_dir = Path(images) / "kept" if images is not None else None
    if kept_dir is not None and not kept_dir.is_dir():
        raise UsageError(
            f"--images {images}: no kept/ folder there; give the folder that `medlens serve "
            "--keep-feedback-images` was started with"
        )
    out.mkdir(parents=True, exist_ok=True)
    rows, copied = [], 0
    for f in store.feedback_rows():
        image = ""
        src = kept_dir / f"{f['prediction_id']}.png" if kept_dir is not None else None
        if src is not None and f["image_kept"] and src.exists():
            rel = Path(_safe_part(f["model"], "model")) / _safe_part(f["label"], "label")
            (out / rel).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / rel / src.name)
            image, copied = str(rel / src.name), copied + 1
        rows.append({"feedback_id": f["id"], "time": f["created_at"].isoformat(), **{
            k: f[k] for k in ("prediction_id", "model", "model_version", "predicted", "label",
                              "agrees", "comment")}, "image": image})  # fmt: skip
    write_csv(out / "feedback.csv", rows, FEEDBACK_COLUMNS)
    return {"feedback": len(rows), "images": copied, "csv": str(out / "feedback.csv")}
