"""The REST API: ``/healthz``, ``/readyz``, ``/api/v1/models`` and ``/api/v1/models/{name}/predict``.

Privacy: uploads are parsed in memory (:mod:`medlens.serve.upload`) and dropped after the
response; logs carry one line per prediction with the upload's sha256, never its name, pixels
or DICOM fields.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import time
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from anyio.to_thread import run_sync
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlens.data.imaging import read_image
from medlens.errors import ImageReadError, ModelOutputError, UsageError
from medlens.inference.cam import overlay_cam
from medlens.serve.logs import quiet_third_party
from medlens.serve.served import ServedModel
from medlens.serve.upload import UploadError, read_file_field

API = "/api/v1"
NOTES_HEADER = "X-MedLens-Notes"
router = APIRouter()
log = logging.getLogger("medlens.serve")


class InputSpec(BaseModel):
    modality: str | None = Field(None, description="imaging modality, where the card states it")
    size: int = Field(description="side of the square network input, pixels")


class ModelOut(BaseModel):
    name: str
    title: str
    task: str = Field(description="binary or multiclass")
    labels: list[str]
    input: InputSpec
    version: str = Field(description="first 12 hex digits of the sha256 of model.pt")
    metrics: dict[str, Any] = Field(
        description="headline metrics with 95% bootstrap CIs per evaluated split (val, test)"
    )


class OODOut(BaseModel):
    flag: bool | None = Field(
        None,
        description="true when the image looks unlike the training "
        "data; null when the model has no guard",
    )
    score: float | None = None
    ratio: float | None = Field(
        None, description="the score over the flag threshold: flagged above 1"
    )


class PredictOut(BaseModel):
    prediction_id: str | None = Field(
        None,
        description="the prediction record's random id (send it with feedback to "
        f"POST {API}/feedback); null when the server keeps no record",
    )
    model: str
    version: str
    label: str
    probabilities: dict[str, float] = Field(description="calibrated probability per class")
    threshold: float | None = Field(
        description="binary: probability of labels[1] at or above "
        "which it is predicted; null for multiclass"
    )
    ood: OODOut
    elapsed_ms: float
    notes: list[str] = Field(
        description="conversions applied while decoding (e.g. first frame "
        "of a multi-frame DICOM used)"
    )
    dicom: dict[str, str | int] = Field(
        default_factory=dict,
        description="a DICOM upload's non-identifying header facts (Modality, ViewPosition, "
        "BodyPartExamined, PhotometricInterpretation, BitsStored, Rows, Columns); empty "
        "otherwise. Patient identifiers are never returned here",
    )
    cam_png_base64: str | None = Field(None, description="explain=true: Grad-CAM overlay, PNG")
    image_png_base64: str | None = Field(
        None, description="explain=true: the image at the overlay's size, PNG"
    )


class ErrorOut(BaseModel):
    detail: str = Field(description="what was wrong and what to do")


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in (
        (400, "malformed multipart body"),
        (404, "unknown model"),
        (413, "upload over the size limit"),
        (415, "body is not multipart/form-data"),
        (422, "no `file` field, or the file is not a usable image"),
    )
}


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "the image: PNG, JPEG (any mode, 8 or 16 bit) or DICOM",
                        }
                    },
                }
            }
        },
    }
}


def _png_base64(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _rejected(model: ServedModel, digest: str, t0: float, fmt: str = "json") -> None:
    """The one log line of a refused upload: by its hash only, never its contents."""
    log.info(
        "rejected time=%s model=%s version=%s upload_sha256=%s status=422 format=%s "
        "elapsed_ms=%.1f",
        _now(),
        model.name,
        model.info["version"],
        digest,
        fmt,
        (time.perf_counter() - t0) * 1e3,
    )


def _decode(
    model: ServedModel, data: bytes, max_pixels: int, digest: str, t0: float, fmt: str = "json"
) -> Any:
    """The upload decoded; 422 (logged by its hash only) when it is not a usable image."""
    try:
        # target_size: a large JPEG decodes straight to >= the network's input size.
        return read_image(
            data, name="upload", max_pixels=max_pixels, target_size=model.predictor.pre.image_size
        )
    except ImageReadError as e:
        _rejected(model, digest, t0, fmt)
        raise UploadError(422, str(e)) from None


def _predict(
    model: ServedModel,
    data: bytes,
    explain: bool,
    max_pixels: int,
    fmt: str = "json",
    metrics: Any = None,
    recorder: Any = None,
) -> dict | Response:
    """Decode, predict and (optionally) explain one upload; runs in a worker thread. With
    ``fmt`` ``fhir`` or ``dicom-sr`` the answer is that document instead of the JSON dict."""
    t0 = time.perf_counter()
    quiet_third_party()  # pydicom and highdicom would log the upload's UIDs and values
    digest = hashlib.sha256(data).hexdigest()
    version = model.info["version"]
    img = _decode(model, data, max_pixels, digest, t0, fmt)
    _check_sr_upload(model, img, digest, t0, fmt)
    pred = model.predictor
    try:
        result = pred.predict_pixels([img.pixels])[0]
    except ModelOutputError as e:  # the model's fault, not the upload's: 503, not a 500
        log.error(
            "model %s answered with non-finite numbers (upload_sha256=%s)", model.name, digest
        )
        raise UploadError(503, str(e)) from None
    if metrics is not None:
        metrics.observe_prediction(model.name, result.label, result.ood)
    pid = None
    if recorder is not None:  # the prediction record: numbers and the hash, never the image
        pid = recorder.record(model, result, digest, (time.perf_counter() - t0) * 1e3, img.pixels)
    out = {
        "prediction_id": pid,
        "model": model.name,
        "version": version,
        "label": result.label,
        "probabilities": result.probabilities,
        "threshold": result.threshold,
        "ood": result.ood,
        "elapsed_ms": 0.0,
        "notes": list(img.notes),
        "dicom": img.header_facts(),
    }
    if fmt != "json":
        try:
            document = _document(model, result, img, fmt, pid)
        except UsageError as e:  # a DICOM header a report cannot be made from: says why
            _rejected(model, digest, t0, fmt)
            raise UploadError(422, str(e)) from None
        log.info(
            "prediction time=%s model=%s version=%s upload_sha256=%s label=%s format=%s "
            "elapsed_ms=%.1f",
            _now(),
            model.name,
            version,
            digest,
            result.label,
            fmt,
            (time.perf_counter() - t0) * 1e3,
        )
        return document
    if explain:
        out.update(_cam_images(pred, img.pixels, result.label))
    out["elapsed_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    log.info(
        "prediction time=%s model=%s version=%s upload_sha256=%s label=%s p=%s ood=%s "
        "explain=%s elapsed_ms=%.1f",
        _now(),
        model.name,
        version,
        digest,
        result.label,
        ",".join(f"{v:.4f}" for v in result.probabilities.values()),
        result.ood["flag"],
        explain,
        out["elapsed_ms"],
    )
    return out


def _check_sr_upload(model: ServedModel, img: Any, digest: str, t0: float, fmt: str) -> None:
    """A DICOM SR is made only of a DICOM upload (it references the image's study and SOP
    instance): anything else is a 422 that says which formats fit."""
    if fmt == "dicom-sr" and img.dicom is None:
        _rejected(model, digest, t0, fmt)
        raise UploadError(
            422,
            "format=dicom-sr needs a DICOM upload (the report references the image's study "
            "and SOP instance); this upload is not DICOM: ask for format=json or fhir",
        )


def _cam_images(pred: Any, pixels: Any, label: str) -> dict:
    """The Grad-CAM overlay of the predicted class and the image itself, as PNG base64."""
    idx = None if pred.meta.binary else pred.labels.index(label)
    cam, _ = pred.explain(pixels, idx)
    side = max(pred.pre.image_size, 224)
    return {
        "cam_png_base64": _png_base64(overlay_cam(pixels, cam, size=side)),
        "image_png_base64": _png_base64(overlay_cam(pixels, cam, size=side, alpha=0.0)),
    }


def _document(
    model: ServedModel, result: Any, img: Any, fmt: str, prediction_id: str | None = None
) -> Response:
    """The prediction as a FHIR R4 DiagnosticReport or a DICOM SR (Part 10 bytes)."""
    from medlens.interop.documents import render

    about = {"name": model.name, "version": model.info["version"], "title": model.info["title"]}
    if prediction_id:
        about["prediction_id"] = prediction_id
    doc = render(fmt, result, about, model.card, img.dicom)
    headers = {"Content-Disposition": f'attachment; filename="{doc.filename}"'}
    if doc.notes:  # e.g. which malformed patient/study attributes an SR leaves empty
        headers[NOTES_HEADER] = "; ".join(doc.notes)
    return Response(doc.content, media_type=doc.media_type, headers=headers)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def get_model(request: Request, name: str) -> ServedModel:
    """The loaded model called ``name``; 404 naming the available ones otherwise."""
    models = request.app.state.models
    try:
        return models[name]
    except KeyError:
        known = ", ".join(sorted(models)) or "none are loaded"
        raise StarletteHTTPException(
            404, f"no model named {name!r}; GET {API}/models lists the available ones ({known})"
        ) from None


class HealthOut(BaseModel):
    status: str = Field(description="ok")


class ReadyOut(BaseModel):
    status: str = Field(description="ready, or not ready (then the status code is 503)")
    models: dict[str, str] = Field(description="per loaded model: ok, or what failed")
    refused: dict[str, str] = Field(description="models refused at start-up, and why")


@router.get("/healthz", tags=["service"], response_model=HealthOut)
def healthz() -> dict:
    """Liveness: the process serves requests."""
    return {"status": "ok"}


def _ready(model: ServedModel) -> str:
    """``"ok"`` when the model answers a mid-grey image with finite probabilities."""
    side = model.predictor.pre.image_size
    try:
        model.predictor.predict_pixels([np.full((side, side), 128, np.uint8)])
    except ModelOutputError as e:
        return str(e)
    return "ok"


@router.get(
    "/readyz",
    tags=["service"],
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "a model fails or was refused"}},
)
def readyz(request: Request, response: Response) -> dict:
    """Readiness: one inference per loaded model; 503 naming the models that fail (and those
    refused at start-up because a file was damaged)."""
    state = request.app.state
    models = {name: _ready(m) for name, m in state.models.items()}
    refused = dict(getattr(state, "refused_models", {}))
    ok = all(v == "ok" for v in models.values()) and not refused
    body = {"status": "ready" if ok else "not ready", "models": models, "refused": refused}
    response.status_code = 200 if ok else 503
    return body


@router.get("/metrics", tags=["service"], response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus metrics (text format): requests, latency, predictions by label and the
    out-of-distribution verdicts and score ratios per model; nothing that identifies a
    patient or an image."""
    from medlens.serve.prometheus import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get(f"{API}/models", response_model=list[ModelOut], tags=["models"])
def list_models(request: Request) -> list[dict]:
    """The loaded models: labels, input, version and validation metrics."""
    return [m.info for m in request.app.state.models.values()]


@router.post(
    f"{API}/models/{{name}}/predict",
    tags=["models"],
    openapi_extra=_UPLOAD_BODY,
    # The JSON answer goes through PredictOut (validated and serialised by FastAPI), so the
    # schema in /docs is the answer; fhir and dicom-sr answers are documents (a Response).
    response_model=PredictOut,
    responses={
        200: {
            "description": "format=json: the prediction (this schema); format=fhir: a FHIR R4 "
            "DiagnosticReport (application/fhir+json); format=dicom-sr: a DICOM SR "
            "(application/dicom)",
            "content": {"application/fhir+json": {}, "application/dicom": {}},
        },
        **_ERRORS,
    },
)
async def predict(
    request: Request,
    name: str,
    explain: bool = Query(False, description="add a Grad-CAM overlay (cam_png_base64)"),
    format: Literal["json", "fhir", "dicom-sr"] = Query(  # noqa: A002 - the API's own word
        "json",
        description="json (this schema); fhir: an HL7 FHIR R4 DiagnosticReport with contained "
        "Observations (application/fhir+json); dicom-sr: a DICOM Structured Report about a "
        "DICOM upload (application/dicom; 422 for other images, or a DICOM whose UIDs are "
        "missing; patient/study attributes that are absent or malformed are left empty, as "
        "the standard allows, and named in the X-MedLens-Notes header)",
    ),
) -> dict | Response:  # the dict is validated and serialised as PredictOut (response_model)
    """Diagnose one image sent as multipart field `file` (PNG, JPEG or DICOM).

    The upload is processed in memory and never stored.
    """
    state = request.app.state
    model = get_model(request, name)  # before reading the body: unknown models cost nothing
    data = await read_file_field(request, "file", state.max_upload_bytes)
    result = await run_sync(
        _predict,
        model,
        data,
        explain,
        state.max_pixels,
        format,
        getattr(state, "metrics", None),
        getattr(state, "recorder", None),
        limiter=state.workers,
    )
    return result
