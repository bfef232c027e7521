"""One prediction as a document for the hospital's systems: FHIR JSON or DICOM SR bytes.

The REST API (``?format=``), ``medlens predict --format`` and ``medlens pacs`` all render
through :func:`render`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom import Dataset

    from medlens.inference.predictor import Prediction

__all__ = ["FORMATS", "Document", "render"]

FORMATS = ("fhir", "dicom-sr")


@dataclass(frozen=True)
class Document:
    """A rendered result: its bytes, media type and a file name that names no patient."""

    content: bytes
    media_type: str
    filename: str
    sop_instance_uid: str | None = None  # an SR's own UID
    notes: tuple[str, ...] = ()  # what the document leaves out of the image's header, and why


def render(
    fmt: str, prediction: Prediction, model: dict, card: dict, dicom: Dataset | None
) -> Document:
    """Render one prediction.

    Args:
        fmt: ``fhir`` or ``dicom-sr``.
        prediction: A :class:`medlens.inference.predictor.Prediction`.
        model: ``{"name", "version", "title"}``.
        card: The model card.
        dicom: The image's DICOM header, or None for other images.

    Raises:
        UsageError: ``dicom-sr`` for an image that is not DICOM, or one without the UIDs a
            report references; a DICOM header the document cannot be made from (the message
            says what to fix); an unknown ``fmt``.
    """
    from medlens.errors import UsageError

    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    try:
        return _render(fmt, prediction, model, card, dicom)
    except UsageError:
        raise
    except (ValueError, TypeError, LookupError, AttributeError) as e:
        # A header value no check above foresaw (pydicom and highdicom validate as they
        # build): the upload's fault, so a clear refusal rather than a server error.
        if dicom is None:
            raise
        reason = (str(e).splitlines() or [""])[0][:200]
        raise UsageError(
            f"a {fmt} document could not be made from this DICOM image's header "
            f"({type(e).__name__}: {reason}); export the image again from the PACS, or ask for "
            "format=json"
        ) from None


def _render(
    fmt: str, prediction: Prediction, model: dict, card: dict, dicom: Dataset | None
) -> Document:
    if fmt == "fhir":
        from medlens.interop.fhir import fhir_report

        report = fhir_report(prediction, model, card, dicom)
        content = json.dumps(report, indent=1).encode()
        return Document(content, "application/fhir+json", f"{report['id']}.fhir.json")
    from medlens.interop.sr import dicom_sr

    sr = dicom_sr(prediction, model, card, dicom)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    uid = str(sr.SOPInstanceUID)
    notes = tuple(getattr(sr, "notes", ()))
    return Document(buf.getvalue(), "application/dicom", f"{uid}.dcm", uid, notes)
