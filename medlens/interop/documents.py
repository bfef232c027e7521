"""One prediction as a document for the hospital's systems: FHIR JSON or DICOM SR bytes.

The REST API (``?format=``), ``medlens predict --format`` and ``medlens pacs`` all render
through :func:`render`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["FORMATS", "Document", "render"]

FORMATS = ("fhir", "dicom-sr")


@dataclass(frozen=True)
class Document:
    """A rendered result: its bytes, media type and a file name that names no patient."""

    content: bytes
    media_type: str
    filename: str
    sop_instance_uid: str | None = None  # an SR's own UID


def render(fmt: str, prediction: Any, model: dict, card: dict, dicom: Any) -> Document:
    """Render one prediction.

    Args:
        fmt: ``fhir`` or ``dicom-sr``.
        prediction: A :class:`medlens.inference.predictor.Prediction`.
        model: ``{"name", "version", "title"}``.
        card: The model card.
        dicom: The image's DICOM header, or None for other images.

    Raises:
        UsageError: ``dicom-sr`` for an image that is not DICOM, or one without the UIDs a
            report references; an unknown ``fmt``.
    """
    from medlens.errors import UsageError

    if fmt == "fhir":
        from medlens.interop.fhir import fhir_report

        report = fhir_report(prediction, model, card, dicom)
        content = json.dumps(report, indent=1).encode()
        return Document(content, "application/fhir+json", f"{report['id']}.fhir.json")
    if fmt == "dicom-sr":
        from medlens.interop.sr import dicom_sr

        sr = dicom_sr(prediction, model, card, dicom)
        buf = io.BytesIO()
        sr.save_as(buf, enforce_file_format=True)
        uid = str(sr.SOPInstanceUID)
        return Document(buf.getvalue(), "application/dicom", f"{uid}.dcm", uid)
    raise UsageError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
