"""Prometheus metrics for a served fleet: ``GET /metrics`` in the text exposition format.

Series (``prometheus-client``; nothing in them identifies a patient or an image):

* ``medlens_http_requests_total{method, route, status}`` and
  ``medlens_http_request_duration_seconds{method, route}`` (a histogram): every request, by the
  route's template (``/api/v1/models/{name}/predict``), so paths never become labels, and by
  method, where a method outside the standard ones (:data:`METHODS`) is ``other``, so a client
  inventing methods cannot create series;
* ``medlens_predictions_total{model, label}``: predictions by predicted class;
* ``medlens_ood_total{model, verdict}``: the out-of-distribution guard's verdicts (``flagged``,
  ``passed``, ``no_guard``), whose ratio is the flag rate;
* ``medlens_ood_ratio{model}``: a histogram of the guard's score over its flag level (flagged
  above 1), whose quantiles show input drift before the flag rate moves.

With several server processes (``medlens serve --workers N``) prometheus-client's multiprocess
mode aggregates them: ``PROMETHEUS_MULTIPROC_DIR`` names a folder of counters (numbers only)
that ``medlens serve`` creates and removes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

__all__ = ["ServeMetrics", "CONTENT_TYPE_LATEST"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
"""The methods that are their own ``method`` label; any other is ``other``."""


class ServeMetrics:
    """The app's metrics, in a registry of its own (one per app: tests build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "medlens_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "medlens_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "medlens_predictions", "predictions by predicted class", ["model", "label"], registry=r
        )
        self.ood = Counter(
            "medlens_ood", "out-of-distribution verdicts", ["model", "verdict"], registry=r
        )
        self.ood_ratio = Histogram(
            "medlens_ood_ratio",
            "out-of-distribution score over the flag level (flagged above 1)",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )

    def observe_prediction(self, model: str, label: str, ood: dict) -> None:
        self.predictions.labels(model, label).inc()
        flag = ood.get("flag")
        verdict = "no_guard" if flag is None else "flagged" if flag else "passed"
        self.ood.labels(model, verdict).inc()
        if ood.get("ratio") is not None:
            self.ood_ratio.labels(model).observe(float(ood["ratio"]))

    def exposition(self) -> bytes:
        """The text format: this process's registry, or every worker's in multiprocess mode."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)


def _route(scope: dict) -> str:
    """The matched route's template, or ``other`` (unknown paths never become labels)."""
    route = scope.get("route")
    return getattr(route, "path", None) or (
        "/static" if scope["path"].startswith("/static/") else "other"
    )


def _method(scope: dict) -> str:
    """The request's method as a label: a standard one (:data:`METHODS`), else ``other``."""
    method = scope["method"]
    return method if method in METHODS else "other"


class MetricsMiddleware:
    """ASGI middleware that counts and times every HTTP request."""

    def __init__(self, app: Callable, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route, method = _route(scope), _method(scope)
            self.metrics.requests.labels(method, route, str(status[0])).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - t0)
