"""The web app under load: a real ``medlens serve`` subprocess on 127.0.0.1 and a free port.

:func:`running_server` starts the app as a user starts it and stops it afterwards;
:func:`bench_serve` drives its predict endpoint with :func:`~medlens.bench.load.load_test` and
measures the CPU time the server and the load generator used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2

from medlens.artifacts.folders import resolve_model
from medlens.bench.host import CpuMeter, load_average, usable_cores
from medlens.bench.load import load_test, predict_url, synthetic_jpeg
from medlens.errors import MedLensError

__all__ = [
    "Server",
    "bench_serve",
    "free_port",
    "running_server",
    "serve_command",
    "stop_server",
    "wait_ready",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # the only address the server listens on and the load is sent to
_POLL_S = 0.25  # readiness polling interval


class BenchError(MedLensError, RuntimeError):
    """The server under test did not start or answer; the message ends with its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def serve_command(folder: Path, port: int, *extra: str) -> list[str]:
    """``medlens serve`` of one model folder (the bundled models are not loaded beside it)."""
    return [
        sys.executable,
        "-m",
        "medlens.cli",
        "serve",
        "--models",
        str(folder),
        "--no-bundled",
        "--port",
        str(port),
        *extra,
    ]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Poll ``GET /healthz`` on 127.0.0.1 until it answers 200.

    Raises:
        BenchError: the server exited, or did not answer 200 within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    with httpx2.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(
                    f"the server exited with code {proc.returncode} before it was ready"
                )
            try:
                if client.get(f"http://{HOST}:{port}/healthz").status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(_POLL_S)
    raise BenchError(f"the server was not ready after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate a server subprocess; kill it if it has not exited after 20 s."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class Server:
    """A started ``medlens serve`` (see :func:`running_server`)."""

    proc: subprocess.Popen
    port: int
    startup_s: float  # from starting the process to the first 200 of /healthz

    def url(self, model: str) -> str:
        """The predict URL of one of its models."""
        return predict_url(self.port, model, HOST)


@contextlib.contextmanager
def running_server(
    folder: Path,
    *extra: str,
    start_timeout: float = 300.0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[Server]:
    """``medlens serve`` of ``folder`` on 127.0.0.1 and a free port, ready, stopped on exit.

    Args:
        folder: the model folder to serve.
        *extra: more ``medlens serve`` options (e.g. ``"--log-level", "warning"``).
        start_timeout: seconds to wait for ``/healthz``.
        env, cwd: the server process's environment and working folder (default: this one's).

    Raises:
        BenchError: the server did not become ready; the message ends with its last log
            lines.
    """
    port = free_port()
    # Its log goes to an anonymous temporary file, for the error message should it not start;
    # its prediction record to a temporary SQLite file (measured like a deployment's, never
    # mixed into the user's own record), unless ``extra`` says otherwise.
    with tempfile.TemporaryFile() as errlog, tempfile.TemporaryDirectory() as records:
        if "--db" not in extra and "--no-record" not in extra:
            extra = (*extra, "--db", f"sqlite:///{Path(records) / 'records.db'}")
        proc = subprocess.Popen(
            serve_command(folder, port, *extra),
            stdout=subprocess.DEVNULL,
            stderr=errlog,
            env=env,
            cwd=cwd,
        )
        t0 = time.perf_counter()
        try:
            try:
                wait_ready(port, proc, start_timeout)
            except BenchError as e:
                errlog.seek(0)
                tail = errlog.read().decode("utf-8", "replace").strip().splitlines()[-5:]
                raise BenchError(f"{e}: {' | '.join(tail)}") from None
            yield Server(proc, port, time.perf_counter() - t0)
        finally:
            stop_server(proc)


def server_config() -> str:
    """How ``medlens serve`` computes predictions (create_app's defaults) on this machine."""
    import inspect

    from medlens.serve.app import create_app

    params = inspect.signature(create_app).parameters
    workers = params["workers"].default or usable_cores()
    threads = params["inference_threads"].default or usable_cores()
    return (
        f"medlens serve: one uvicorn process, up to {workers} predictions at once (worker "
        f"threads), {threads} ONNX Runtime intra-op thread(s) per session"
    )


@contextlib.contextmanager
def _authenticated_server(folder: Path, start_timeout: float) -> Iterator[tuple[Server, str]]:
    """:func:`running_server` as a deployment runs it: authentication on (a random key, in a
    private temporary file); the per-client rate limit off, since all the load is one client."""
    key = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "api-key"
        path.touch(mode=0o600)
        path.write_text(key)
        with running_server(
            folder, "--api-key-file", str(path), "--rate-limit", "off", start_timeout=start_timeout
        ) as srv:
            yield srv, key


def bench_serve(
    ref: str | os.PathLike,
    duration: float = 20.0,
    concurrency: int = 8,
    warmup: float = 3.0,
    image: bytes | None = None,
    start_timeout: float = 300.0,
    request_timeout: float = 30.0,
) -> dict:
    """The web app under load: :func:`load_test` against a real ``medlens serve``.

    ``medlens serve`` runs as a user starts it (default log level: one line per request) in a
    subprocess; the load posts one upload to its predict endpoint.

    Args:
        ref: a model folder or a bundled model's name.
        duration: seconds of measured load.
        concurrency: simultaneous keep-alive connections.
        warmup: seconds of unmeasured load first.
        image: the uploaded file (default: a 1024x1024 :func:`synthetic_jpeg`).
        start_timeout: seconds the server may take to become ready.
        request_timeout: seconds one request may take.

    Returns:
        :meth:`LoadResult.to_dict` plus the model, upload size, server set-up and start-up
        time, load average, CPU time per request of the server and the load generator, and the
        machine's busy share and other processes' share of its CPU time.
    """
    folder = resolve_model(ref)
    data = image if image is not None else synthetic_jpeg()
    with _authenticated_server(folder, start_timeout) as (srv, key):
        log.info(
            "server ready on port %d after %.1f s; %d connections, %g s warm-up + %g s",
            srv.port,
            srv.startup_s,
            concurrency,
            warmup,
            duration,
        )
        load_before = load_average()
        meter = CpuMeter(srv.proc.pid)
        res = load_test(
            srv.url(folder.name), data, concurrency, duration, warmup, request_timeout,
            api_key=key,
        )  # fmt: skip
        usage = meter.stop()
    out = res.to_dict()
    n_all = res.requests + res.warmup_requests  # CPU is measured over warm-up + window
    out.update(
        {
            "model": folder.name,
            "upload_bytes": len(data),
            "server": server_config() + "; API key required (Bearer), rate limit off",
            "upload": "synthetic 1024x1024 greyscale JPEG" if image is None else "given image",
            "server_startup_s": round(srv.startup_s, 2),
            "load_average_before": load_before,
            "server_cpu_ms_per_request": (
                round(usage.child_s * 1e3 / n_all, 2)
                if usage.child_s is not None and n_all
                else None
            ),
            "client_cpu_ms_per_request": round(usage.own_s * 1e3 / n_all, 2) if n_all else None,
        }
    )
    if usage.total_s > 0:
        out["machine_cpu_busy_share"] = usage.busy_share
        # CPU time of other processes (e.g. a training run) as a share of all cores
        out["other_processes_cpu_share"] = usage.other_share
    log.info(
        "web app: %s requests/s, p50 %s ms, p95 %s ms, %d errors over %g s",
        out["rps"],
        out["latency_ms_p50"],
        out["latency_ms_p95"],
        out["errors"],
        warmup + duration,
    )
    return out
