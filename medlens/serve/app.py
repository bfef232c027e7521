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

import logging
import os
from collections.abc import Iterable
from typing import Any

from anyio import CapacityLimiter
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlens import __version__
from medlens.artifacts.card import DISCLAIMER
from medlens.artifacts.folders import find_models
from medlens.data.imaging import MAX_PIXELS
from medlens.errors import ModelLoadError
from medlens.machine import usable_cores
from medlens.monitoring.store import RecordStore, open_store
from medlens.serve.api import API
from medlens.serve.api import router as api_router
from medlens.serve.logs import quiet_third_party
from medlens.serve.monitoring_api import router as monitoring_router
from medlens.serve.pages import HERE, vendor_files
from medlens.serve.pages import router as pages_router
from medlens.serve.prometheus import MetricsMiddleware, ServeMetrics
from medlens.serve.record import Recorder
from medlens.serve.security import (
    HEADER_TIMEOUT_S,
    Guard,
    InFlightLimit,
    SecurityPolicy,
    allowed_hosts_for,
    header_timeout_protocol,
)
from medlens.serve.served import ServedModel
from medlens.serve.settings import SETTINGS_FILE_ENV, ServeSettings
from medlens.serve.upload import UploadError

__all__ = ["create_app", "ServedModel", "DEFAULT_MAX_UPLOAD_BYTES"]

log = logging.getLogger("medlens.serve")
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IN_FLIGHT = 64


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


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answer is ``{"detail": "<what was wrong and what to do>"}``."""

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
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


def create_app(
    model_dirs: Iterable[str | os.PathLike] = (),
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    backend: str = "onnx",
    workers: int | None = None,
    inference_threads: int | None = 1,
    bundled: bool = True,
    tta: bool = False,
    security: SecurityPolicy | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    record: RecordStore | None = None,
    feedback_images: str | os.PathLike | None = None,
) -> FastAPI:
    """Build the web app and load its models.

    Args:
        model_dirs: model folders, or folders of model folders (``--models DIR``).
        bundled: also serve the bundled models (``medlens/bundled/``); ``medlens serve
            --no-bundled`` turns them off.
        max_upload_bytes: uploads above this are refused with 413 while being read.
        max_pixels: decompression-bomb guard (width * height), checked before decoding.
        backend: see :class:`~medlens.inference.predictor.Predictor`; ``"onnx"`` (default) serves every
            model through ONNX Runtime, exporting in memory models without ``model.onnx``.
        workers: how many uploads are decoded and predicted at once, each in a worker
            thread (default: the cores this process may use); further requests wait their
            turn after their upload has been read.
        tta: average each prediction with its mirror image's (see the Predictor).
        inference_threads: ONNX Runtime intra-op threads per model session (default 1: the
            workers already keep the cores busy; None: every core, for one request at a time).
        security: host allow-list, API key, origin check, rate limit and security headers
            (:mod:`medlens.serve.security`); None: none (``medlens serve`` always sets one).
        max_in_flight: prediction requests in the app at once (reading, decoding or
            predicting their upload); more get a 503 with ``Retry-After`` at once
            (:class:`~medlens.serve.security.InFlightLimit`). Other requests are not counted.
        record: the prediction record (:mod:`medlens.monitoring.store`): every prediction is
            stored there (numbers and the upload's hash, never the image) and feedback and
            monitoring are answered from it; None: no record (feedback and monitoring 409).
        feedback_images: keep the decoded images that receive feedback in this folder
            (:mod:`medlens.serve.record`); needs ``record``.

    pydicom's and highdicom's logs and warnings are silenced in this process: they quote the
    uploads' UIDs and values (:mod:`medlens.serve.logs`).
    """
    quiet_third_party()
    app = FastAPI(
        title="MedLens",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        description="Calibrated, explainable medical image classifiers. " + DISCLAIMER,
    )
    models, refused = _load_models(model_dirs, bundled, backend, inference_threads, tta)
    app.state.models = models
    app.state.refused_models = refused
    app.state.max_upload_bytes = max_upload_bytes
    app.state.max_pixels = max_pixels
    # Decoding, preprocessing and inference release the GIL: `workers` threads keep that many
    # cores busy. Bounding them (anyio's default pool is 40 threads) keeps a burst of uploads
    # from time-slicing the cores between dozens of half-done predictions.
    app.state.workers = CapacityLimiter(workers or usable_cores())
    app.state.vendor = vendor_files()
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    _add_error_handlers(app)
    app.state.recorder = Recorder(record, feedback_images) if record is not None else None
    app.include_router(api_router)
    app.include_router(monitoring_router)
    app.include_router(pages_router)
    app.state.metrics = ServeMetrics()
    # Innermost: a prediction counts once it is past the guard (host, rate, key).
    app.add_middleware(InFlightLimit, limit=max_in_flight)
    # Added last, so it runs first: refused requests (host, rate, key) are counted too.
    if security is not None:
        app.add_middleware(Guard, policy=security)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app


def _load_models(
    model_dirs: Iterable[str | os.PathLike],
    bundled: bool,
    backend: str,
    inference_threads: int | None,
    tta: bool,
) -> tuple[dict, dict]:
    """Every model found, loaded once: ``(served, refused)``; a damaged model is refused (its
    error kept for /readyz) and the others are served; none loadable is an error."""
    models, refused = {}, {}
    for name, folder in find_models(model_dirs, bundled=bundled).items():
        try:
            models[name] = ServedModel.load(name, folder, backend, inference_threads, tta)
        except ModelLoadError as e:
            refused[name] = str(e)
            log.error("model %s refused: %s", name, e)
    if refused and not models:
        raise ModelLoadError("no model could be loaded: " + "; ".join(refused.values()))
    for m in models.values():
        log.info("loaded model %s version %s (%s) from %s", m.name, m.info["version"],
                 m.predictor.backend, m.folder)  # fmt: skip
    return models, refused


def _quiet_torch() -> None:
    import torch

    # One torch thread per request (preprocessing, Grad-CAM): the app runs one prediction per
    # core at once (create_app's workers), and torch's OpenMP threads spreading one request over
    # cores that are busy make it far slower, not faster (Grad-CAM measured 0.22 s with one
    # thread, 5-9 s with two, while another process kept one of two cores busy).
    torch.set_num_threads(1)


def app_from_settings(settings: ServeSettings, store: RecordStore | None = None) -> FastAPI:
    """The app these settings describe; ``store``: the record already opened (and migrated),
    else it is opened here without migrating (the serving process migrated it once)."""
    if store is None and settings.record_url is not None:
        store = open_store(settings.record_url, settings.keep_days, migrate_schema=False)
    return create_app(
        settings.model_dirs,
        settings.max_upload_bytes,
        bundled=settings.bundled,
        tta=settings.tta,
        security=settings.security,
        workers=settings.threads,
        max_in_flight=settings.max_in_flight,
        record=store,
        feedback_images=settings.feedback_images,
    )


def app_from_env() -> FastAPI:
    """The app of one worker process of ``medlens serve --workers N`` (a uvicorn factory):
    its settings come from the private file that :func:`serve` wrote
    (:meth:`ServeSettings.from_env`)."""
    settings = ServeSettings.from_env()
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    _quiet_torch()
    return app_from_settings(settings)


def _open_record(settings: ServeSettings) -> RecordStore | None:
    """Open (create or migrate) the prediction record once, in the serving process."""
    if settings.record_url is None:
        return None
    store = open_store(settings.record_url, settings.keep_days)
    log.info(
        "prediction record: %s (keeps %g days)%s",
        store.url,
        settings.keep_days,
        f"; PRIVACY: images that receive feedback are kept in {settings.feedback_images}"
        if settings.feedback_images
        else "",
    )
    return store


def _run_workers(
    processes: int, settings: ServeSettings, header_timeout: float, uvicorn_kwargs: dict
) -> None:
    """Several uvicorn worker processes, each loading the models once; their settings reach
    them in a private file (never the environment), their Prometheus counters meet in a
    temporary folder (numbers only); both are removed at exit."""
    import shutil
    import tempfile

    import uvicorn

    from medlens.serve.security import HEADER_TIMEOUT_ENV

    metrics_dir = tempfile.mkdtemp(prefix="medlens-metrics-")
    settings_file = settings.write_private()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ[SETTINGS_FILE_ENV] = str(settings_file)
    os.environ.pop("MEDLENS_API_KEY", None)  # read already; the workers get it from the file
    os.environ[HEADER_TIMEOUT_ENV] = str(header_timeout)
    try:
        uvicorn.run(
            "medlens.serve.app:app_from_env",
            factory=True,
            workers=processes,
            http="medlens.serve.security:EnvHeaderTimeoutH11Protocol",
            **uvicorn_kwargs,
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        shutil.rmtree(settings_file.parent, ignore_errors=True)


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    header_timeout: float = HEADER_TIMEOUT_S,
    processes: int = 1,
) -> None:
    """``medlens serve``: run the app with uvicorn (blocks).

    ``settings`` (:class:`ServeSettings`): their security defaults to the loopback policy
    (this machine's host names, no key, the default rate limit). uvicorn runs without its
    server banner and closes connections whose request headers take longer than
    ``header_timeout`` seconds. Past ``max_in_flight`` prediction requests at once (per
    process) a further prediction gets a 503; health checks, pages and other requests are
    always answered, and connections are not counted (uvicorn's ``limit_concurrency`` counted
    half-sent ones: 64 sockets that never finished their headers turned every request into a
    503). ``processes`` > 1 runs that many worker processes on one port (``--workers``), each
    with the models loaded once and a share of the cores for its predictions. The prediction
    record is created or migrated here, once, before any worker opens it.
    """
    import dataclasses

    import uvicorn

    settings = settings or ServeSettings()
    if settings.security is None:
        policy = SecurityPolicy(allowed_hosts=allowed_hosts_for(host))
        settings = dataclasses.replace(settings, security=policy)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    security = settings.security
    assert security is not None
    log.info(
        "access: %s; hosts %s; rate limit %s%s",
        "API key required" if security.api_key else "no authentication",
        ", ".join(security.allowed_hosts),
        security.rate_limit or "off",
        f" per process ({processes} processes)" if processes > 1 and security.rate_limit else "",
    )
    uvicorn_kwargs: dict[str, Any] = dict(host=host, port=port, log_level=settings.log_level,
                          server_header=False, timeout_keep_alive=5)  # fmt: skip
    store = _open_record(settings)
    if processes > 1:
        threads = max(1, usable_cores() // processes)
        _run_workers(processes, dataclasses.replace(settings, threads=threads), header_timeout,
                     uvicorn_kwargs)  # fmt: skip
        return
    _quiet_torch()
    app = app_from_settings(settings, store)
    if not app.state.models:
        log.warning(
            "no models loaded: pass --models DIR (a run folder of `medlens train` or a "
            "folder of them)"
        )
    uvicorn.run(app, http=header_timeout_protocol(header_timeout), **uvicorn_kwargs)
