"""The web pages: the diagnose page, the training dashboard, the API docs and their vendored assets.

Every script and style is served by the app itself (no CDN is reachable).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlens.artifacts.card import DISCLAIMER, DISCLAIMER_HEAD
from medlens.errors import InstallError
from medlens.evaluation.metrics import likelihood_ratios, split_views

HERE = Path(__file__).parent
router = APIRouter(include_in_schema=False)
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
TEMPLATES.env.globals.update(
    disclaimer_head=DISCLAIMER_HEAD,
    disclaimer_body=DISCLAIMER.removeprefix(DISCLAIMER_HEAD).strip(),
)


def vendor_files() -> dict[str, Path]:
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


def _model_info(card: dict) -> dict:
    """What the page's script needs beyond the card's text: the likelihood ratios of a
    binary model's results (for the pre-test to post-test probability) and its clinical
    score form, if its card names one."""
    binary = len(card["labels"]) == 2
    return {
        "labels": card["labels"],
        "lr": likelihood_ratios(card.get("metrics") or {}) if binary else None,
        "clinical_score": card.get("clinical_score"),
    }


@router.get("/", response_class=HTMLResponse)
def diagnose_page(request: Request, model: str | None = None) -> HTMLResponse:
    """The diagnose page; ``?model=NAME`` preselects a model (none is chosen otherwise)."""
    models = request.app.state.models
    return TEMPLATES.TemplateResponse(
        request,
        "diagnose.html",
        {
            "models": [
                m.card
                | {
                    "name": m.name,
                    "version": m.info["version"],
                    "views": split_views(m.card.get("metrics") or {}),
                }
                for m in models.values()
            ],
            "model_info": {name: _model_info(m.card) for name, m in models.items()},
            "preselect": model if model in models else None,
            "max_upload_mb": round(request.app.state.max_upload_bytes / 2**20, 1),
            "keeps_images": getattr(getattr(request.app.state, "recorder", None), "images", None)
            is not None,
            "page": "diagnose",
        },
    )


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard_page(request: Request) -> HTMLResponse:
    from medlens.serve.dashboard import HEADLINE_LABELS, comparison, run_results

    runs = [run_results(m.name, m.folder) for m in request.app.state.models.values()]
    figures = {}
    for i, run in enumerate(runs):
        for fig in run["figures"]:
            fig["dom"] = f"m{i}-{fig['id']}"
            figures[fig["dom"]] = {"data": fig["data"], "layout": fig["layout"]}
    compare = comparison(runs) if len(runs) > 1 else []
    for fig in compare:
        fig["dom"] = fig["id"]
        figures[fig["dom"]] = {"data": fig["data"], "layout": fig["layout"]}
    return TEMPLATES.TemplateResponse(
        request,
        "dashboard.html",
        {
            "runs": runs,
            "compare": compare,
            "figures": figures,
            "columns": HEADLINE_LABELS,
            "page": "dashboard",
        },
    )


@router.get("/monitoring", response_class=HTMLResponse)
def monitoring_page(request: Request, days: int = 7) -> HTMLResponse:
    """Every served model's last ``days`` days from the prediction record, alerts first."""
    from medlens.monitoring.signals import monitoring_report

    recorder = getattr(request.app.state, "recorder", None)
    days = min(max(int(days), 1), 3650)
    reports = []
    if recorder is not None:
        reports = [monitoring_report(recorder.store, m.name, m.folder, days)
                   for m in request.app.state.models.values()]  # fmt: skip
    return TEMPLATES.TemplateResponse(
        request,
        "monitoring.html",
        {
            "reports": reports,
            "recording": recorder is not None,
            "days": days,
            "page": "monitoring",
        },  # fmt: skip
    )


DOCS_NAV = (
    '<nav class="medlens-nav" aria-label="MedLens"><a href="/">&larr; MedLens: diagnose</a> '
    '&middot; <a href="/dashboard">training results</a></nav>'
)
"""The way back from the API docs to the app (Swagger UI has none of its own)."""


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title="MedLens API",
        swagger_js_url="/vendor/swagger-ui-bundle.js",
        swagger_css_url="/vendor/swagger-ui.css",
        swagger_favicon_url="/vendor/favicon.png",
    )
    html = bytes(page.body).decode().replace("<body>", f"<body>\n{DOCS_NAV}", 1)
    return HTMLResponse(html)


@router.get("/vendor/{asset}")
def vendor_asset(request: Request, asset: str) -> FileResponse:
    vendor = request.app.state.vendor
    if asset not in vendor:  # a fixed list: the request names a key, never a path
        raise StarletteHTTPException(404, f"no vendored asset {asset!r}")
    return FileResponse(vendor[asset], headers={"Cache-Control": "public, max-age=86400"})
