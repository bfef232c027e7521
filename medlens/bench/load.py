"""A closed-loop HTTP load generator (on httpx2), latency percentiles and a synthetic upload.

:func:`load_test` keeps ``concurrency`` keep-alive HTTP/1.1 connections busy, each posting one
multipart upload as soon as its previous answer arrived, for a bounded time after a warm-up,
and counts what came back (:class:`LoadResult`). It only ever sends to a loopback address.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import time
import urllib.parse
from dataclasses import dataclass, field

import httpx2
import numpy as np

__all__ = ["LoadResult", "load_test", "percentiles", "predict_url", "synthetic_jpeg"]

_MAX_EXAMPLES = 5  # error messages kept in LoadResult.error_examples
_RETRY_PAUSE_S = 0.02  # after a failed request: a refusing server should not make a worker spin


def percentiles(ms: list[float]) -> dict:
    """``n``, ``p50``, ``p95`` and ``mean`` of a list of milliseconds (None when it is empty)."""
    if not ms:
        return {"n": 0, "p50": None, "p95": None, "mean": None}
    a = np.asarray(ms, dtype=np.float64)
    return {
        "n": len(a),
        "p50": round(float(np.percentile(a, 50)), 3),
        "p95": round(float(np.percentile(a, 95)), 3),
        "mean": round(float(a.mean()), 3),
    }


def synthetic_jpeg(side: int = 1024, seed: int = 0, quality: int = 90, grain: float = 2.0) -> bytes:
    """A generated chest-film-like greyscale JPEG (no patient data).

    A vertical exposure gradient, a smooth random texture, two bright lung-field ellipses with
    soft edges and fine Gaussian grain (``grain`` grey levels). With the defaults it weighs
    about 1 bit per pixel (~125 KB at 1024x1024, quality 90), like the Kermany chest X-ray
    JPEGs (median 1.0 bit per pixel); heavier grain makes a larger file that takes longer to
    decode.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side] / side
    coarse = rng.normal(0, 1, (max(2, side // 32),) * 2)
    coarse_img = Image.fromarray(np.clip(coarse * 40 + 128, 0, 255).astype(np.uint8))
    texture = (
        np.asarray(coarse_img.resize((side, side), Image.Resampling.BICUBIC), np.float32) - 128
    )
    img = 40 + 30 * yy + 0.5 * texture
    for cx in (0.32, 0.68):
        r2 = ((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.32) ** 2
        img += 110 * np.sqrt(np.clip(1.2 - r2, 0, 1))
    img += rng.normal(0, grain, (side, side))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def predict_url(port: int, model: str, host: str = "127.0.0.1") -> str:
    """The URL of the web app's ``POST /api/v1/models/MODEL/predict`` on ``host:port``."""
    return f"http://{host}:{port}/api/v1/models/{urllib.parse.quote(model, safe='')}/predict"


def _check_loopback(url: str) -> None:
    """Refuse any target but this machine's loopback interface."""
    host = httpx2.URL(url).host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"load_test only sends to a loopback address, not {host!r}")


@dataclass
class LoadResult:
    """What :func:`load_test` measured (requests started inside the measured window)."""

    concurrency: int
    duration_s: float  # the measured window asked for
    elapsed_s: float = 0.0  # window start -> last answer of a measured request
    latencies_ms: list[float] = field(default_factory=list)  # every measured answer
    ok: int = 0  # 200 answers
    errors: int = 0  # non-200 answers + connection errors + timeouts
    statuses: dict[str, int] = field(default_factory=dict)  # "200" / "500" / "error" -> n
    error_examples: list[str] = field(default_factory=list)  # the first few, shortened
    server_ms: list[float] = field(default_factory=list)  # the app's own elapsed_ms
    warmup_requests: int = 0

    @property
    def requests(self) -> int:
        """Measured requests: answered 200, answered otherwise, or failed."""
        return self.ok + self.errors

    def _error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_examples) < _MAX_EXAMPLES:
            self.error_examples.append(what[:200])

    def _count(self, status: str) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def add_answer(self, status: int, body: bytes, latency_ms: float) -> None:
        """Count one measured answer (any status)."""
        self.latencies_ms.append(latency_ms)
        self._count(str(status))
        if status != 200:
            self._error(f"HTTP {status}: {body[:150].decode('utf-8', 'replace')}")
            return
        self.ok += 1
        try:
            self.server_ms.append(float(json.loads(body)["elapsed_ms"]))
        except (ValueError, KeyError, TypeError):
            pass

    def add_failure(self, what: str) -> None:
        """Count one measured request that got no answer (refused, broken, timed out)."""
        self._count("error")
        self._error(what)

    def to_dict(self) -> dict:
        """The figures, rounded (the ``serve`` part of ``medlens bench``'s results)."""
        lat = percentiles(self.latencies_ms)
        return {
            "concurrency": self.concurrency,
            "duration_s": self.duration_s,
            "elapsed_s": round(self.elapsed_s, 3),
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "rps": round(self.ok / self.elapsed_s, 2) if self.elapsed_s > 0 else 0.0,
            "latency_ms_p50": lat["p50"],
            "latency_ms_p95": lat["p95"],
            "latency_ms_mean": lat["mean"],
            "statuses": dict(self.statuses),
            "error_examples": list(self.error_examples),
            "server_elapsed_ms_p50": percentiles(self.server_ms)["p50"],
            "warmup_requests": self.warmup_requests,
        }


@dataclass
class _Window:
    measure_from: float  # perf_counter: requests started from here on are measured
    stop_at: float  # no request starts after this
    timeout: float  # one request, connect to last byte
    last_done: float  # the last measured request's end so far


async def _worker(
    client: httpx2.AsyncClient, url: str, body: bytes, headers: dict, w: _Window, res: LoadResult
) -> None:
    while time.perf_counter() < w.stop_at:
        t0 = time.perf_counter()
        measured = t0 >= w.measure_from
        try:
            r = await asyncio.wait_for(client.post(url, content=body, headers=headers), w.timeout)
        except (TimeoutError, httpx2.HTTPError, OSError) as e:
            if measured:
                res.add_failure(f"{type(e).__name__}: {e}")
                w.last_done = max(w.last_done, time.perf_counter())
            await asyncio.sleep(_RETRY_PAUSE_S)
            continue
        t1 = time.perf_counter()
        if measured:
            w.last_done = max(w.last_done, t1)
            res.add_answer(r.status_code, r.content, (t1 - t0) * 1e3)
        else:
            res.warmup_requests += 1


async def _load(
    url: str,
    body: bytes,
    headers: dict,
    concurrency: int,
    duration: float,
    warmup: float,
    timeout: float,
) -> LoadResult:
    res = LoadResult(concurrency=concurrency, duration_s=duration)
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # trust_env=False: no proxy from the environment stands between the load and the server
    async with httpx2.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        start = time.perf_counter()
        w = _Window(start + warmup, start + warmup + duration, timeout, start + warmup)
        await asyncio.gather(
            *(_worker(client, url, body, headers, w, res) for _ in range(concurrency))
        )
    res.elapsed_s = max(w.last_done - w.measure_from, 1e-9)
    return res


def load_test(
    url: str,
    data: bytes,
    concurrency: int = 8,
    duration: float = 20.0,
    warmup: float = 2.0,
    timeout: float = 30.0,
    *,
    filename: str = "bench.jpg",
    content_type: str = "image/jpeg",
    api_key: str | None = None,
) -> LoadResult:
    """Closed-loop HTTP load on one loopback URL.

    ``concurrency`` keep-alive HTTP/1.1 connections (one httpx2 client, one asyncio thread),
    each posting ``data`` as the multipart file field ``file`` as soon as its previous answer
    arrived. The multipart body is encoded once, by httpx2, and sent as is every time.

    Args:
        url: where to ``POST``, on 127.0.0.0/8, ``localhost`` or ``[::1]`` (see
            :func:`predict_url`).
        data: the uploaded file's bytes.
        concurrency: simultaneous connections.
        duration: seconds of measured load. No request starts after ``warmup + duration``
            seconds; the ones in flight then finish, each bounded by ``timeout``.
        warmup: seconds of unmeasured load first.
        timeout: seconds one request may take, from connecting to the last byte of the answer.
        filename: the file field's file name.
        content_type: the file field's content type.
        api_key: sent as ``Authorization: Bearer`` (a server started with a key).

    Returns:
        The counts and latencies of the requests started in the measured window.

    Raises:
        ValueError: a bad ``concurrency``/``duration``, or a URL not on a loopback address.
    """
    if concurrency < 1 or duration <= 0:
        raise ValueError("concurrency must be >= 1 and duration > 0")
    _check_loopback(url)
    request = httpx2.Request("POST", url, files={"file": (filename, data, content_type)})
    body = request.read()
    headers = {"Content-Type": request.headers["Content-Type"], "User-Agent": "medlens-bench"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return asyncio.run(_load(url, body, headers, concurrency, duration, max(warmup, 0), timeout))
