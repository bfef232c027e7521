"""The MedLens web app: diagnose page, training dashboard and the REST API (FastAPI).

Models are loaded once, at :func:`create_app`; predictions are stateless, so any number of
replicas can run behind a load balancer. Requests never choose a file: model names are looked
up in the dict of loaded models, and the only files served are the package's own static files
and a fixed list of vendored assets (plotly.js, Swagger UI).

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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from anyio import CapacityLimiter
from anyio.to_thread import run_sync
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlens import __version__
from medlens.artifacts.card import DISCLAIMER, model_card, model_version
from medlens.artifacts.folders import ONNX_FILE, find_models
from medlens.artifacts.onnx import onnx_bytes, ort_session
from medlens.data.imaging import MAX_PIXELS, read_image
from medlens.errors import ImageReadError, InstallError
from medlens.inference.cam import overlay_cam
from medlens.inference.predictor import Predictor
from medlens.machine import usable_cores
from medlens.serve.upload import UploadError, read_file_field

__all__ = ["create_app", "ServedModel", "DEFAULT_MAX_UPLOAD_BYTES"]

log = logging.getLogger("medlens.serve")
HERE = Path(__file__).parent
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
API = "/api/v1"


# ----------------------------------------------------------------------------- models


@dataclass
class ServedModel:
    """A model loaded for serving: its predictor, API description and model card."""

    name: str
    folder: Path
    predictor: Predictor
    info: dict
    card: dict

    @classmethod
    def load(
        cls, name: str, folder: Path, backend: str = "onnx", threads: int | None = None
    ) -> ServedModel:
        """Load a model folder; ``threads``: ONNX Runtime intra-op threads of its session
        (None: the Predictor's default, every core)."""
        pred = _serving_predictor(folder, backend, threads)
        meta = pred.meta
        card = model_card(meta, folder)
        info = {
            "name": name,
            "title": card["title"],
            "task": card["task"],
            "labels": list(meta.labels),
            "input": {"modality": card["input"]["modality"], "size": meta.preprocess.image_size},
            "version": model_version(meta, folder),
            "metrics": card["metrics"],
        }
        return cls(name, folder, pred, info, card)


def _serving_predictor(folder: Path, backend: str, threads: int | None) -> Predictor:
    """A :class:`Predictor` whose ONNX Runtime session has ``threads`` intra-op threads.

    The app computes several predictions at once, one per worker (see :func:`create_app`):
    a session per request that spreads over every core would make the concurrent runs fight
    for the same cores, so serving sessions default to one thread each.
    """
    in_memory = backend == "onnx" and not (folder / ONNX_FILE).exists()
    if threads is None and not in_memory:
        return Predictor(folder, backend=backend)
    # Export in memory here (once) rather than letting the Predictor do it with its default
    # threads and doing it again; a folder with model.onnx is opened by the Predictor (which
    # checks that it matches model.pt) and re-opened with the serving thread count.
    pred = Predictor(folder, backend="torch" if in_memory else backend)
    if in_memory:
        pred.session = ort_session(onnx_bytes(pred.net, pred.meta), threads=threads)
        pred.backend = "onnx (exported in memory)"
    elif pred.session is not None:
        pred.session = ort_session(folder / ONNX_FILE, threads=threads)
    return pred


# ----------------------------------------------------------------------------- API schema


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


class PredictOut(BaseModel):
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
    cam_png_base64: str | None = Field(None, description="explain=true: Grad-CAM overlay, PNG")
    image_png_base64: str | None = Field(
        None, description="explain=true: the image at the overlay's size, PNG"
    )


class ErrorOut(BaseModel):
    detail: str = Field(description="what was wrong and what to do")


_ERRORS = {
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


# ----------------------------------------------------------------------------- helpers


def _png_base64(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _vendor_files() -> dict[str, Path]:
    """Third-party browser assets shipped inside installed Python packages."""
    import fastapi_offline
    import plotly

    swagger = Path(fastapi_offline.__file__).parent / "static"
    files = {
        "plotly.min.js": Path(plotly.__file__).parent / "package_data" / "plotly.min.js",
        "swagger-ui-bundle.js": swagger / "swagger-ui-bundle.js",
        "swagger-ui.css": swagger / "swagger-ui.css",
        "favicon.png": swagger / "favicon.png",
    }
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise InstallError(
            f"browser assets missing: {', '.join(missing)}; reinstall MedLens (`make install`)"
        )
    return files


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        where = (
            f"query parameter `{loc[1]}`"
            if loc[:1] == ["query"] and len(loc) > 1
            else f"form field `{loc[-1]}`"
            if loc[:1] == ["body"] and len(loc) > 1
            else f"path parameter `{loc[1]}`"
            if loc[:1] == ["path"] and len(loc) > 1
            else " / ".join(loc) or "request"
        )
        msg = err.get("msg", "invalid")
        if loc[:1] == ["query"] and loc[-1:] == ["explain"]:
            msg += "; use explain=true or explain=false"
        elif err.get("type") == "missing" and loc[:1] == ["body"]:
            msg = (
                f"is missing; send the image as multipart/form-data field `{loc[-1]}`, "
                f"e.g. `curl -F {loc[-1]}=@image.png`"
            )
        parts.append(f"{where}: {msg}")
    return "; ".join(parts) + " (see /docs)"


# ----------------------------------------------------------------------------- the app


def create_app(
    model_dirs=(),
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    backend: str = "onnx",
    workers: int | None = None,
    inference_threads: int | None = 1,
    bundled: bool = True,
) -> FastAPI:
    """Build the web app and load its models.

    Args:
        model_dirs: model folders, or folders of model folders (``--models DIR``).
        bundled: also serve the bundled models (``medlens/bundled/``); ``medlens serve
            --no-bundled`` turns them off.
        max_upload_bytes: uploads above this are refused with 413 while being read.
        max_pixels: decompression-bomb guard (width * height), checked before decoding.
        backend: see :class:`~medlens.predict.Predictor`; ``"onnx"`` (default) serves every
            model through ONNX Runtime, exporting in memory models without ``model.onnx``.
        workers: how many uploads are decoded and predicted at once, each in a worker
            thread (default: the cores this process may use); further requests wait their
            turn after their upload has been read.
        inference_threads: ONNX Runtime intra-op threads per model session (default 1: the
            workers already keep the cores busy; None: every core, for one request at a time).
    """
    app = FastAPI(
        title="MedLens",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        description="Calibrated, explainable medical image classifiers. " + DISCLAIMER,
    )
    models = {
        name: ServedModel.load(name, folder, backend, inference_threads)
        for name, folder in find_models(model_dirs, bundled=bundled).items()
    }
    for m in models.values():
        log.info(
            "loaded model %s version %s (%s) from %s",
            m.name,
            m.info["version"],
            m.predictor.backend,
            m.folder,
        )
    app.state.models = models
    app.state.max_upload_bytes = max_upload_bytes
    # Decoding, preprocessing and inference release the GIL: `workers` threads keep that many
    # cores busy. Bounding them (anyio's default pool is 40 threads) keeps a burst of uploads
    # from time-slicing the cores between dozens of half-done predictions.
    app.state.workers = CapacityLimiter(workers or usable_cores())
    vendor = _vendor_files()
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # -- errors: always {"detail": "<what was wrong and what to do>"} -----------------
    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = (
                f"there is no page or endpoint at {request.url.path}; the pages are / and "
                f"/dashboard, the API is under {API} (see /docs)"
            )
        elif exc.status_code == 405:
            detail = (
                f"{request.method} is not allowed on {request.url.path}; see /docs for "
                "the methods each endpoint takes"
            )
        return JSONResponse(
            {"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    def get_model(name: str) -> ServedModel:
        try:
            return models[name]
        except KeyError:
            known = ", ".join(sorted(models)) or "none are loaded"
            raise StarletteHTTPException(
                404, f"no model named {name!r}; GET {API}/models lists the available ones ({known})"
            ) from None

    # -- API -------------------------------------------------------------------------
    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        """Liveness: the process serves requests."""
        return {"status": "ok"}

    @app.get(f"{API}/models", response_model=list[ModelOut], tags=["models"])
    def list_models() -> list[dict]:
        """The loaded models: labels, input, version and validation metrics."""
        return [m.info for m in models.values()]

    @app.post(
        f"{API}/models/{{name}}/predict",
        tags=["models"],
        openapi_extra=_UPLOAD_BODY,
        responses={200: {"model": PredictOut}, **_ERRORS},
    )
    async def predict(
        request: Request,
        name: str,
        explain: bool = Query(False, description="add a Grad-CAM overlay (cam_png_base64)"),
    ):
        """Diagnose one image sent as multipart field `file` (PNG, JPEG or DICOM).

        The upload is processed in memory and never stored.
        """
        model = get_model(name)  # before reading the body: unknown models cost nothing
        data = await read_file_field(request, "file", request.app.state.max_upload_bytes)
        result = await run_sync(
            _predict, model, data, explain, max_pixels, limiter=request.app.state.workers
        )
        return JSONResponse(result)

    # -- pages -----------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def diagnose_page(request: Request):
        return templates.TemplateResponse(
            request,
            "diagnose.html",
            {
                "models": [
                    m.card | {"name": m.name, "version": m.info["version"]} for m in models.values()
                ],
                "max_upload_mb": round(app.state.max_upload_bytes / 2**20, 1),
                "disclaimer": DISCLAIMER,
                "page": "diagnose",
            },
        )

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    def dashboard_page(request: Request):
        from medlens.serve.dashboard import HEADLINE_LABELS, comparison, run_results

        runs = [run_results(m.name, m.folder) for m in models.values()]
        figures = {}
        for i, run in enumerate(runs):
            for fig in run["figures"]:
                fig["dom"] = f"m{i}-{fig['id']}"
                figures[fig["dom"]] = {"data": fig["data"], "layout": fig["layout"]}
        compare = comparison(runs) if len(runs) > 1 else []
        for fig in compare:
            fig["dom"] = fig["id"]
            figures[fig["dom"]] = {"data": fig["data"], "layout": fig["layout"]}
        return templates.TemplateResponse(
            request,
            "dashboard.html",
            {
                "runs": runs,
                "compare": compare,
                "figures": figures,
                "columns": HEADLINE_LABELS,
                "disclaimer": DISCLAIMER,
                "page": "dashboard",
            },
        )

    @app.get("/docs", include_in_schema=False)
    def swagger_ui():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="MedLens API",
            swagger_js_url="/vendor/swagger-ui-bundle.js",
            swagger_css_url="/vendor/swagger-ui.css",
            swagger_favicon_url="/vendor/favicon.png",
        )

    @app.get("/vendor/{asset}", include_in_schema=False)
    def vendor_asset(asset: str):
        if asset not in vendor:  # a fixed list: the request names a key, never a path
            raise StarletteHTTPException(404, f"no vendored asset {asset!r}")
        return FileResponse(vendor[asset], headers={"Cache-Control": "public, max-age=86400"})

    return app


def _predict(model: ServedModel, data: bytes, explain: bool, max_pixels: int) -> dict:
    """Decode, predict and (optionally) explain one upload; runs in a worker thread."""
    t0 = time.perf_counter()
    digest = hashlib.sha256(data).hexdigest()
    version = model.info["version"]
    try:
        # target_size: a large JPEG decodes straight to >= the network's input size.
        img = read_image(
            data, name="upload", max_pixels=max_pixels, target_size=model.predictor.pre.image_size
        )
    except ImageReadError as e:
        log.info(
            "rejected time=%s model=%s version=%s upload_sha256=%s status=422 elapsed_ms=%.1f",
            _now(),
            model.name,
            version,
            digest,
            (time.perf_counter() - t0) * 1e3,
        )
        raise UploadError(422, str(e)) from None
    pred = model.predictor
    result = pred.predict_pixels([img.pixels])[0]
    out = {
        "model": model.name,
        "version": version,
        "label": result.label,
        "probabilities": result.probabilities,
        "threshold": result.threshold,
        "ood": result.ood,
        "elapsed_ms": 0.0,
        "notes": list(img.notes),
    }
    if explain:
        idx = None if pred.meta.binary else pred.labels.index(result.label)
        cam, _ = pred.explain(img.pixels, idx)
        side = max(pred.pre.image_size, 224)
        out["cam_png_base64"] = _png_base64(overlay_cam(img.pixels, cam, size=side))
        out["image_png_base64"] = _png_base64(overlay_cam(img.pixels, cam, size=side, alpha=0.0))
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    model_dirs=(),
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    log_level: str = "info",
    bundled: bool = True,
) -> None:
    """``medlens serve``: run the app with uvicorn (blocks)."""
    import uvicorn

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import torch

    # One torch thread per request (preprocessing, Grad-CAM): the app runs one prediction per
    # core at once (create_app's workers), and torch's OpenMP threads spreading one request over
    # cores that are busy make it far slower, not faster (Grad-CAM measured 0.22 s with one
    # thread, 5-9 s with two, while another process kept one of two cores busy).
    torch.set_num_threads(1)
    app = create_app(model_dirs, max_upload_bytes, bundled=bundled)
    if not app.state.models:
        log.warning(
            "no models loaded: pass --models DIR (a run folder of `medlens train` or a "
            "folder of them)"
        )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
