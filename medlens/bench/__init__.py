"""``medlens bench``: training, inference and web-app figures of one model, in one run.

Three measurements, all on this machine and in one process tree, so that they can be compared
with each other (GitHub issue 5):

* **inference** (:func:`bench_inference`): the network alone (a normalised ``float32`` batch in,
  logits out) through eager torch (fp32, :class:`~medlens.predict.Predictor`'s torch network),
  ONNX Runtime fp32 (the Predictor's session: ``model.onnx``, or exported in memory) and, when
  the model folder ships ``model.int8.onnx``, ONNX Runtime int8. Latency p50/p95 at batch 1
  over ``n`` runs after a warm-up, the engines interleaved run by run so that a burst of
  load from another process hits them alike; throughput at batch 32.
* **web app under load** (:func:`bench_serve`): the real app (``medlens serve``) in a
  subprocess on 127.0.0.1 and a free port, driven by :func:`load_test` - ``concurrency``
  keep-alive HTTP/1.1 connections, each sending a pre-serialised multipart ``POST .../predict``
  of one synthetic 1024x1024 JPEG (:func:`synthetic_jpeg`; no patient data) as soon as the
  previous answer arrived, for a bounded time after a warm-up. Requests per second (200
  answers), client-side latency p50/p95 and errors (non-200 answers, refused or broken
  connections, timeouts), plus the CPU time the server and the load generator used.
* **training** (:func:`training_figures`, ``--train-log RUN``): read from a finished run's
  ``training_metrics.csv`` and ``model.json``; nothing is retrained.

:func:`run_bench` puts them in one flat dict (the keys of ``medlens bench --json``) and
:func:`write_results` writes ``bench-<timestamp>.json``/``.csv`` and ``latest.json``/``.csv``/
``.md`` under ``bench/results/``. These are benchmarks, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import asyncio
import csv
import gc
import http.client
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_OUT",
    "TARGETS",
    "INT8_FILE",
    "machine_info",
    "synthetic_jpeg",
    "multipart_body",
    "predict_request",
    "load_test",
    "LoadResult",
    "bench_inference",
    "bench_serve",
    "training_figures",
    "run_bench",
    "write_results",
    "summary_table",
]

DEFAULT_OUT = Path("bench") / "results"
INT8_FILE = "model.int8.onnx"
TARGETS = {  # issue 5, for the bundled pneumonia model (EfficientNet-Lite0, 224 px)
    "latency_ms_p50_onnx": ("<=", 10.0),
    "speedup_onnx_vs_torch_p50": (">=", 2.0),
    "serve_rps": (">=", 60.0),
    "serve_errors": ("<=", 0),
}
REQUIRED_KEYS = ("latency_ms_p50_onnx", "latency_ms_p50_torch", "serve_rps", "serve_errors")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (or what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [
                    f
                    for f in (
                        "avx2",
                        "avx512f",
                        "avx512_bf16",
                        "avx512_vnni",
                        "amx_bf16",
                        "amx_int8",
                    )
                    if f in have
                ]
    except OSError:
        pass
    return []


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict:
    """What the figures were measured on: CPU model, cores, memory, library versions."""
    import onnxruntime
    import torch

    return {
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "cpu_flags": _cpu_flags(),
        "memory_gb": _memory_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "load_average_start": _load_average(),
    }


class _CpuMeter:
    """Share of the machine's CPU time used during an interval, from ``/proc/stat``."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    def busy_seconds(self) -> tuple[float, float] | None:
        """``(busy, total)`` CPU-seconds of all cores since construction."""
        end = self._read()
        if self.start is None or end is None:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        total, idle = end[0] - self.start[0], end[1] - self.start[1]
        return (total - idle) / tick, total / tick


def _process_cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process (all its threads), from ``/proc/PID/stat``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------- payloads


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
    texture = (
        np.asarray(
            Image.fromarray(np.clip(coarse * 40 + 128, 0, 255).astype(np.uint8)).resize(
                (side, side), Image.BICUBIC
            ),
            np.float32,
        )
        - 128
    )
    img = 40 + 30 * yy + 0.5 * texture
    for cx in (0.32, 0.68):
        r2 = ((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.32) ** 2
        img += 110 * np.sqrt(np.clip(1.2 - r2, 0, 1))
    img += rng.normal(0, grain, (side, side))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def multipart_body(
    data: bytes,
    field_name: str = "file",
    filename: str = "bench.jpg",
    content_type: str = "image/jpeg",
) -> tuple[bytes, str]:
    """``(body, Content-Type header)`` of a multipart/form-data form with one file field."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()
    return (
        head + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


def predict_request(host: str, port: int, model: str, data: bytes) -> bytes:
    """A complete, pre-serialised HTTP/1.1 ``POST /api/v1/models/MODEL/predict`` request."""
    body, ctype = multipart_body(data)
    path = f"/api/v1/models/{urllib.parse.quote(model, safe='')}/predict"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: medlens-bench\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


# ----------------------------------------------------------------------------- load generator


@dataclass
class LoadResult:
    """What :func:`load_test` measured (requests started inside the measured window)."""

    concurrency: int
    duration_s: float  # the measured window asked for
    elapsed_s: float = 0.0  # window start -> last answer of a measured request
    latencies_ms: list[float] = field(default_factory=list)  # every measured request
    ok: int = 0  # 200 answers
    errors: int = 0  # non-200 answers + connection errors + timeouts
    statuses: dict[str, int] = field(default_factory=dict)  # "200" / "500" / "error" -> n
    error_examples: list[str] = field(default_factory=list)  # the first few, shortened
    server_ms: list[float] = field(default_factory=list)  # the app's own elapsed_ms
    warmup_requests: int = 0

    @property
    def requests(self) -> int:
        return self.ok + self.errors

    def _error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 5:
            self.error_examples.append(what[:200])

    def to_dict(self) -> dict:
        lat = _percentiles(self.latencies_ms)
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
            "server_elapsed_ms_p50": _percentiles(self.server_ms)["p50"],
            "warmup_requests": self.warmup_requests,
        }


class _BadResponse(Exception):
    pass


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 response: ``(status, body, keep_alive)``."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise _BadResponse(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    keep = parts[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    else:  # delimited by the end of the connection
        body, keep = await reader.read(), False
    return status, body, keep


async def _worker(
    host: str,
    port: int,
    request: bytes,
    measure_from: float,
    stop_at: float,
    timeout: float,
    res: LoadResult,
    last_done: list[float],
) -> None:
    reader = writer = None
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        measured = t0 >= measure_from
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), timeout
                )
            writer.write(request)
            await asyncio.wait_for(writer.drain(), timeout)
            status, body, keep = await asyncio.wait_for(_read_response(reader), timeout)
        except (
            OSError,
            asyncio.TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            _BadResponse,
            ValueError,
        ) as e:
            if measured:
                res._error(f"{type(e).__name__}: {e}")
                res.statuses["error"] = res.statuses.get("error", 0) + 1
                last_done[0] = max(last_done[0], time.perf_counter())
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.02)  # a refusing server should not make this spin
            continue
        t1 = time.perf_counter()
        if measured:
            last_done[0] = max(last_done[0], t1)
            res.latencies_ms.append((t1 - t0) * 1e3)
            res.statuses[str(status)] = res.statuses.get(str(status), 0) + 1
            if status == 200:
                res.ok += 1
                try:
                    res.server_ms.append(float(json.loads(body)["elapsed_ms"]))
                except (ValueError, KeyError, TypeError):
                    pass
            else:
                res._error(f"HTTP {status}: {body[:150].decode('utf-8', 'replace')}")
        else:
            res.warmup_requests += 1
        if not keep:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _load(host, port, request, concurrency, duration, warmup, timeout) -> LoadResult:
    res = LoadResult(concurrency=concurrency, duration_s=duration)
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    last_done = [measure_from]
    await asyncio.gather(
        *(
            _worker(host, port, request, measure_from, stop_at, timeout, res, last_done)
            for _ in range(concurrency)
        )
    )
    res.elapsed_s = max(last_done[0] - measure_from, 1e-9)
    return res


def load_test(
    host: str,
    port: int,
    request: bytes,
    concurrency: int = 8,
    duration: float = 20.0,
    warmup: float = 2.0,
    timeout: float = 30.0,
) -> LoadResult:
    """Closed-loop HTTP load: ``concurrency`` keep-alive connections, each sending ``request``
    (a complete pre-serialised HTTP/1.1 request, see :func:`predict_request`) as soon as its
    previous answer arrived.

    Requests started during the first ``warmup`` seconds are not counted; no request starts
    after ``warmup + duration`` seconds, and the ones in flight then finish (each bounded by
    ``timeout``). One Python thread drives every connection with asyncio, so the generator
    costs little CPU next to the server it loads.
    """
    if concurrency < 1 or duration <= 0:
        raise ValueError("concurrency must be >= 1 and duration > 0")
    return asyncio.run(_load(host, port, request, concurrency, duration, warmup, timeout))


# ----------------------------------------------------------------------------- inference


def _percentiles(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0, "p50": None, "p95": None, "mean": None}
    a = np.asarray(ms, dtype=np.float64)
    return {
        "n": len(a),
        "p50": round(float(np.percentile(a, 50)), 3),
        "p95": round(float(np.percentile(a, 95)), 3),
        "mean": round(float(a.mean()), 3),
    }


def _torch_folder(folder: Path, torch_ref, notes: list[str]) -> Path | None:
    """The folder whose model.pt times eager torch: the model's own, or ``torch_ref`` (the
    training run of an inference-only bundle), checked to be the same network."""
    from medlens.artifacts.folders import MODEL_WEIGHTS, resolve_model
    from medlens.artifacts.model import read_meta

    if torch_ref is None:
        if (folder / MODEL_WEIGHTS).exists():
            return folder
        notes.append(
            f"torch: not measured ({folder} has no {MODEL_WEIGHTS}: an inference-only "
            "model folder; --torch-model RUN times the run it was exported from)"
        )
        return None
    run = resolve_model(torch_ref)
    mine, theirs = read_meta(folder), read_meta(run)
    if (mine.arch, mine.preprocess.image_size, mine.preprocess.channels) != (
        theirs.arch,
        theirs.preprocess.image_size,
        theirs.preprocess.channels,
    ):
        raise ValueError(
            f"--torch-model {run} is a {theirs.arch} at "
            f"{theirs.preprocess.image_size} px, the model a {mine.arch} at "
            f"{mine.preprocess.image_size} px: not the same network"
        )
    a, b = mine.extra.get("weights_sha256"), theirs.extra.get("weights_sha256")
    notes.append(
        f"torch: timed with {run}/{MODEL_WEIGHTS} ("
        + (
            "the weights the ONNX graph was exported from"
            if a and a == b
            else "same architecture and input size; other weights"
        )
        + ")"
    )
    return run


def _engines(
    folder: Path, threads: int | None, log: Log, torch_ref=None
) -> tuple[dict, dict, list[str]]:
    """name -> callable(x: float32 ndarray) -> logits ndarray; name -> description; notes."""
    import torch

    from medlens.artifacts.folders import ONNX_FILE
    from medlens.artifacts.onnx import onnx_bytes, ort_session
    from medlens.inference.predictor import Predictor

    engines, about, notes = {}, {}, []
    if threads:
        torch.set_num_threads(threads)
    torch_folder = _torch_folder(folder, torch_ref, notes)
    if torch_folder is not None:
        try:
            tp = Predictor(torch_folder, backend="torch")
            net = tp.net.float().eval()

            def run_torch(x, net=net):
                with torch.inference_mode():
                    t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
                    return net(t).numpy()

            engines["torch"] = run_torch
            about["torch"] = {
                "engine": "torch eager fp32 (channels-last)",
                "threads": torch.get_num_threads(),
            }
        except Exception as e:  # noqa: BLE001 - report why, measure the rest
            notes.append(f"torch: not measured ({type(e).__name__}: {e})")
    op = Predictor(folder, backend="onnx")
    sess = op.session
    if threads:  # the same thread count as torch: re-open (or re-export) the graph
        sess = ort_session(
            folder / ONNX_FILE if (folder / ONNX_FILE).exists() else onnx_bytes(op.net, op.meta),
            threads=threads,
        )

    def run_onnx(x, sess=sess):
        return sess.run(["logits"], {"input": x})[0]

    engines["onnx"] = run_onnx
    about["onnx"] = {
        "engine": f"ONNX Runtime fp32 ({op.backend})",
        "threads": sess.get_session_options().intra_op_num_threads,
    }
    int8 = folder / INT8_FILE
    if int8.exists():
        s8 = ort_session(int8, threads=threads)
        engines["onnx_int8"] = lambda x, s8=s8: s8.run(["logits"], {"input": x})[0]
        about["onnx_int8"] = {
            "engine": f"ONNX Runtime int8 ({INT8_FILE})",
            "threads": s8.get_session_options().intra_op_num_threads,
        }
    else:
        notes.append(
            f"onnx_int8: not measured (no {INT8_FILE} in {folder}; no int8 model is shipped)"
        )
    log(f"inference engines: {', '.join(engines)}")
    return engines, {"pre": op.pre, **about}, notes


def bench_inference(
    ref,
    n: int = 50,
    warmup: int = 5,
    batch: int = 32,
    batch_runs: int = 3,
    max_seconds: float = 120.0,
    threads: int | None = None,
    torch_model=None,
    log: Log = _stderr,
) -> dict:
    """Network latency at batch 1 and throughput at batch ``batch`` per engine.

    The input is a normalised ``float32`` batch of random images of the model's input size
    (what :meth:`Preprocess.normalize` hands the network); preprocessing is not timed here (the
    web app figures include it). The engines run interleaved (torch, onnx, int8, torch, ...),
    ``warmup`` unmeasured rounds first; measuring stops early after ``max_seconds``.
    ``threads``: intra-op threads of torch and of every ONNX Runtime session (default: each
    library's own, every core). ``torch_model``: a run folder whose ``model.pt`` times eager
    torch when ``ref`` is an inference-only folder (a bundle exported from that run).

    Returns:
        ``{"rows": {engine: {...}}, "notes": [...], "max_abs_logit_diff_onnx_vs_torch": ...}``
    """
    import torch

    from medlens.artifacts.folders import resolve_model

    folder = resolve_model(ref)
    engines, about, notes = _engines(folder, threads, log, torch_model)
    pre = about.pop("pre")
    meter, own0 = _CpuMeter(), time.process_time()
    rng = np.random.default_rng(0)
    shape = (pre.channels, pre.image_size, pre.image_size)
    x32 = pre.normalize(
        torch.from_numpy(rng.integers(0, 256, (batch, *shape), dtype=np.uint8))
    ).numpy()
    x1 = np.ascontiguousarray(x32[:1])
    outs = {name: np.asarray(fn(x1)) for name, fn in engines.items()}  # also a first warm-up
    diff = float(np.abs(outs["onnx"] - outs["torch"]).max()) if "torch" in outs else None
    times: dict[str, list[float]] = {k: [] for k in engines}
    deadline = time.perf_counter() + max_seconds
    for i in range(warmup + n):
        for name, fn in engines.items():
            t0 = time.perf_counter()
            fn(x1)
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > deadline and i >= warmup + 2:
            notes.append(
                f"batch-1 latency: stopped after {i + 1 - warmup} runs "
                f"(--max-seconds {max_seconds:g})"
            )
            break
    log(f"batch 1: {len(times['onnx'])} runs per engine")
    btimes: dict[str, list[float]] = {k: [] for k in engines}
    for fn in engines.values():
        fn(x32)  # warm-up at this batch size (memory arenas, kernel choice)
    for _ in range(batch_runs):
        for name, fn in engines.items():
            t0 = time.perf_counter()
            fn(x32)
            btimes[name].append(time.perf_counter() - t0)
    busy, own = meter.busy_seconds(), time.process_time() - own0
    rows = {}
    for name in engines:
        lat = _percentiles(times[name])
        rows[name] = {
            **about[name],
            "batch1_runs": lat["n"],
            "latency_ms_p50": lat["p50"],
            "latency_ms_p95": lat["p95"],
            "latency_ms_mean": lat["mean"],
            f"throughput_img_s_b{batch}": round(batch * len(btimes[name]) / sum(btimes[name]), 1),
        }
    log(
        "batch "
        + str(batch)
        + ": "
        + ", ".join(f"{k} {v[f'throughput_img_s_b{batch}']} img/s" for k, v in rows.items())
    )
    other = (
        round(max(0.0, busy[0] - own) / busy[1], 3) if busy is not None and busy[1] > 0 else None
    )
    return {
        "rows": rows,
        "notes": notes,
        "input_size": pre.image_size,
        "batch": batch,
        "max_abs_logit_diff_onnx_vs_torch": diff,
        "other_processes_cpu_share": other,
    }


# ----------------------------------------------------------------------------- web app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Poll ``GET /healthz`` until it answers 200."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


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


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate a server subprocess; kill it if it has not exited after 20 s."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _server_config() -> str:
    """How `medlens serve` computes predictions (create_app's defaults) on this machine."""
    import inspect

    from medlens.serve.app import create_app

    params = inspect.signature(create_app).parameters
    workers = params["workers"].default or usable_cores()
    threads = params["inference_threads"].default or usable_cores()
    return (
        f"medlens serve: one uvicorn process, up to {workers} predictions at once (worker "
        f"threads), {threads} ONNX Runtime intra-op thread(s) per session"
    )


def bench_serve(
    ref,
    duration: float = 20.0,
    concurrency: int = 8,
    warmup: float = 3.0,
    image: bytes | None = None,
    start_timeout: float = 300.0,
    request_timeout: float = 30.0,
    log: Log = _stderr,
) -> dict:
    """The web app under load: ``medlens serve`` in a subprocess, :func:`load_test` against
    its predict endpoint with one 1024x1024 JPEG (:func:`synthetic_jpeg` unless ``image``)."""
    from medlens.artifacts.folders import resolve_model

    folder = resolve_model(ref)
    data = image if image is not None else synthetic_jpeg()
    port = free_port()
    # `medlens serve` as a user starts it (default log level: one line per request), its log
    # kept in an anonymous temporary file for the error message should it fail to start.
    cmd = serve_command(folder, port)
    errlog = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errlog)
    t_start = time.perf_counter()
    try:
        try:
            wait_ready(port, proc, start_timeout)
        except RuntimeError as e:
            errlog.seek(0)
            tail = errlog.read().decode("utf-8", "replace").strip().splitlines()[-5:]
            raise RuntimeError(f"{e}: {' | '.join(tail)}") from None
        startup = time.perf_counter() - t_start
        log(
            f"server ready on port {port} after {startup:.1f} s; {concurrency} connections, "
            f"{warmup:g} s warm-up + {duration:g} s"
        )
        request = predict_request("127.0.0.1", port, folder.name, data)
        load_before = _load_average()
        meter = _CpuMeter()
        srv0, cli0 = _process_cpu_seconds(proc.pid), time.process_time()
        res = load_test("127.0.0.1", port, request, concurrency, duration, warmup, request_timeout)
        srv1, cli1 = _process_cpu_seconds(proc.pid), time.process_time()
        busy = meter.busy_seconds()
    finally:
        stop_server(proc)
        errlog.close()
    out = res.to_dict()
    window = warmup + duration
    n_all = res.requests + res.warmup_requests
    out.update(
        {
            "model": folder.name,
            "upload_bytes": len(data),
            "server": _server_config(),
            "upload": "synthetic 1024x1024 greyscale JPEG" if image is None else "given image",
            "server_startup_s": round(startup, 2),
            "load_average_before": load_before,
            # CPU used over warm-up + measured window, per request answered in it
            "server_cpu_ms_per_request": (
                round((srv1 - srv0) * 1e3 / n_all, 2)
                if srv0 is not None and srv1 is not None and n_all
                else None
            ),
            "client_cpu_ms_per_request": round((cli1 - cli0) * 1e3 / n_all, 2) if n_all else None,
        }
    )
    if busy is not None and busy[1] > 0:
        ours = (srv1 - srv0 if srv0 is not None and srv1 is not None else 0) + (cli1 - cli0)
        out["machine_cpu_busy_share"] = round(busy[0] / busy[1], 3)
        # CPU time of other processes (e.g. a training run) as a share of all cores
        out["other_processes_cpu_share"] = round(max(0.0, busy[0] - ours) / busy[1], 3)
    log(
        f"web app: {out['rps']} requests/s, p50 {out['latency_ms_p50']} ms, p95 "
        f"{out['latency_ms_p95']} ms, {out['errors']} errors over {window:g} s"
    )
    return out


# ----------------------------------------------------------------------------- training


def training_figures(run: str | os.PathLike, target_auc: float | None = None) -> dict:
    """Training speed of a finished run, from its ``training_metrics.csv`` and ``model.json``.

    ``train_images_per_s``: training images per second over every epoch (the images of the
    train split times the epochs, over the epochs' seconds). For pretrained backbones the head
    and fine-tuning stages run on cached activations of the frozen layers, so the per-stage
    figures differ by orders of magnitude; decoding and caching are outside the epochs and
    are counted in the wall times only.

    Wall time to the best validation AUC is not logged directly: ``train_wall_seconds_to_best_
    val_auc_max`` is the run's wall time minus the epochs after the best one, an upper bound
    (it also counts the calibration and evaluation done after training).
    """
    run = Path(run)
    path = run / "training_metrics.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; --train-log takes a run folder of `medlens train`"
        )
    with path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("epoch")]
    if not rows:
        raise ValueError(f"{path} has no epochs yet")
    meta = json.loads((run / "model.json").read_text()) if (run / "model.json").exists() else {}
    training = meta.get("training") or {}
    n_train = sum((training.get("split_counts") or {}).get("train", {}).values()) or None

    def num(r, k):
        try:
            return float(r[k])
        except (KeyError, TypeError, ValueError):
            return None

    secs = [num(r, "seconds") or 0.0 for r in rows]
    aucs = [num(r, "val_auc") for r in rows]
    stages = {}
    for r, s in zip(rows, secs):
        st = stages.setdefault(r.get("stage") or "train", {"epochs": 0, "seconds": []})
        st["epochs"] += 1
        st["seconds"].append(s)
    for st in stages.values():
        med = float(np.median(st["seconds"]))
        st["median_epoch_s"] = round(med, 3)
        st["images_per_s"] = round(n_train / med, 1) if n_train and med > 0 else None
        st["seconds"] = round(sum(st.pop("seconds")), 2)
    valid = [(i, a) for i, a in enumerate(aucs) if a is not None]
    best_i, best_auc = max(valid, key=lambda t: t[1]) if valid else (None, None)
    wall = training.get("wall_seconds")
    out = {
        "run": str(run),
        "arch": meta.get("arch"),
        "train_images": n_train,
        "train_epochs": len(rows),
        "train_epoch_seconds": round(sum(secs), 2),
        "train_images_per_s": (
            round(n_train * len(rows) / sum(secs), 1) if n_train and sum(secs) > 0 else None
        ),
        "train_stages": stages,
        "train_precision": training.get("precision"),
        "train_wall_seconds": wall,
        "train_best_val_auc": best_auc,
        "train_best_epoch": best_i + 1 if best_i is not None else None,
        "train_epoch_seconds_to_best_val_auc": (
            round(sum(secs[: best_i + 1]), 2) if best_i is not None else None
        ),
        "train_wall_seconds_to_best_val_auc_max": (
            round(wall - sum(secs[best_i + 1 :]), 1)
            if wall is not None and best_i is not None
            else None
        ),
    }
    if target_auc is not None:
        hit = next((i for i, a in valid if a >= target_auc), None)
        out["train_target_val_auc"] = target_auc
        out["train_epoch_seconds_to_target_val_auc"] = (
            round(sum(secs[: hit + 1]), 2) if hit is not None else None
        )
    return out


# ----------------------------------------------------------------------------- the run


def run_bench(
    model,
    *,
    n: int = 50,
    duration: float = 20.0,
    concurrency: int = 8,
    warmup_s: float = 3.0,
    train_log=None,
    target_auc: float | None = None,
    inference: bool = True,
    serve: bool = True,
    image: bytes | None = None,
    max_seconds: float = 120.0,
    threads: int | None = None,
    torch_model=None,
    log: Log = _stderr,
) -> dict:
    """Every measurement of ``medlens bench`` in one flat dict (see the module docstring)."""
    from medlens.artifacts.folders import resolve_model

    folder = resolve_model(model)
    started = datetime.now(timezone.utc)
    res: dict = {
        "timestamp": started.isoformat(timespec="seconds"),
        "model": folder.name,
        "model_folder": str(folder),
        "machine": machine_info(),
        "notes": [],
    }
    meta = json.loads((folder / "model.json").read_text())
    res["model_arch"] = meta.get("arch")
    res["input_size"] = (meta.get("preprocess") or {}).get("image_size")
    for k in (
        "latency_ms_p50_torch",
        "latency_ms_p95_torch",
        "latency_ms_p50_onnx",
        "latency_ms_p95_onnx",
        "latency_ms_p50_onnx_int8",
        "latency_ms_p95_onnx_int8",
        "throughput_img_s_b32_torch",
        "throughput_img_s_b32_onnx",
        "throughput_img_s_b32_onnx_int8",
        "speedup_onnx_vs_torch_p50",
        "serve_rps",
        "serve_latency_ms_p50",
        "serve_latency_ms_p95",
        "serve_errors",
        "serve_requests",
    ):
        res[k] = None
    if inference:
        log(f"inference: {folder.name}, {n} runs at batch 1, 3 at batch 32")
        inf = bench_inference(
            folder, n=n, max_seconds=max_seconds, threads=threads, torch_model=torch_model, log=log
        )
        res["inference"] = inf
        res["notes"] += inf["notes"]
        for name, row in inf["rows"].items():
            res[f"latency_ms_p50_{name}"] = row["latency_ms_p50"]
            res[f"latency_ms_p95_{name}"] = row["latency_ms_p95"]
            res[f"throughput_img_s_b32_{name}"] = row.get("throughput_img_s_b32")
        if res["latency_ms_p50_torch"] and res["latency_ms_p50_onnx"]:
            res["speedup_onnx_vs_torch_p50"] = round(
                res["latency_ms_p50_torch"] / res["latency_ms_p50_onnx"], 2
            )
        _busy_note(res["notes"], "inference", inf.get("other_processes_cpu_share"))
        del inf
        gc.collect()
    else:
        res["notes"].append("inference: skipped (--no-inference)")
    if serve:
        sv = bench_serve(
            folder,
            duration=duration,
            concurrency=concurrency,
            warmup=warmup_s,
            image=image,
            log=log,
        )
        res["serve"] = sv
        _busy_note(res["notes"], "web app", sv.get("other_processes_cpu_share"))
        res.update(
            {
                "serve_rps": sv["rps"],
                "serve_latency_ms_p50": sv["latency_ms_p50"],
                "serve_latency_ms_p95": sv["latency_ms_p95"],
                "serve_errors": sv["errors"],
                "serve_requests": sv["requests"],
                "serve_concurrency": concurrency,
                "serve_duration_s": duration,
                "serve_upload_bytes": sv["upload_bytes"],
            }
        )
    else:
        res["notes"].append("web app: skipped (--no-serve)")
    if train_log:
        tr = training_figures(train_log, target_auc)
        res["training"] = tr
        res.update(
            {k: v for k, v in tr.items() if k.startswith("train_") and not isinstance(v, dict)}
        )
    res["targets"] = {
        k: {
            "target": f"{op} {v:g}",
            "value": res.get(k),
            "met": None if res.get(k) is None else (res[k] <= v if op == "<=" else res[k] >= v),
        }
        for k, (op, v) in TARGETS.items()
    }
    res["targets_for"] = (
        "issue 5's targets, set for the bundled pneumonia model "
        "(EfficientNet-Lite0, 224 px) on the CPU it runs on"
    )
    res["machine"]["load_average_end"] = _load_average()
    res["wall_seconds"] = round((datetime.now(timezone.utc) - started).total_seconds(), 1)
    return res


def _busy_note(notes: list[str], phase: str, share: float | None) -> None:
    if share is not None and share >= 0.05:
        notes.append(
            f"{phase}: other processes used {share:.0%} of the machine's CPU time "
            "during the measurement; these figures are slower than an idle machine's"
        )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def summary_table(res: dict) -> str:
    """The headline figures as a Markdown table, with the machine they were measured on."""
    m = res["machine"]

    def f(v, unit=""):
        if v is None:
            return "n/a"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"{v}{unit}"
        if isinstance(v, int) or abs(v) >= 100:
            return f"{v:.0f}{unit}"
        return f"{v:.1f}{unit}" if abs(v) >= 1 else f"{v:.3f}{unit}"

    lines = [
        f"Model `{res['model']}` ({res.get('model_arch')}, {res.get('input_size')} px), "
        f"{res['timestamp']}; {m['cores']} cores of {m['cpu_model']}, "
        f"{m.get('memory_gb')} GB; torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
        f"load average at start {m.get('load_average_start')}.",
        "",
        "| engine | batch-1 p50 | batch-1 p95 | batch-32 throughput |",
        "|---|---|---|---|",
    ]
    for _name, row in (res.get("inference") or {}).get("rows", {}).items():
        lines.append(
            f"| {row['engine']} | {f(row['latency_ms_p50'], ' ms')} | "
            f"{f(row['latency_ms_p95'], ' ms')} | "
            f"{f(row.get('throughput_img_s_b32'), ' img/s')} |"
        )
    sv = res.get("serve")
    if sv:
        lines += [
            "",
            "| web app | requests/s | p50 | p95 | errors |",
            "|---|---|---|---|---|",
            f"| `POST predict`, {sv['concurrency']} connections, {sv['duration_s']:g} s, "
            f"{sv['upload_bytes'] / 1e3:.0f} KB 1024x1024 JPEG | {f(sv['rps'])} | "
            f"{f(sv['latency_ms_p50'], ' ms')} | {f(sv['latency_ms_p95'], ' ms')} | "
            f"{sv['errors']} of {sv['requests']} |",
            "",
            f"Server: {sv['server']}.",
        ]
    if res.get("training"):
        t = res["training"]
        lines += [
            "",
            "| training | images/s | epochs | best val AUC | epoch time to it | wall time |",
            "|---|---|---|---|---|---|",
            f"| `{t['run']}` ({t.get('arch')}) | {f(t['train_images_per_s'])} | "
            f"{t['train_epochs']} | {f(t['train_best_val_auc'])} (epoch "
            f"{t['train_best_epoch']}) | {f(t['train_epoch_seconds_to_best_val_auc'], ' s')}"
            f" | {f(t['train_wall_seconds'], ' s')} |",
        ]
    if res.get("notes"):
        lines += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def write_results(res: dict, out: str | os.PathLike = DEFAULT_OUT) -> dict[str, Path]:
    """``bench-<timestamp>.json``/``.csv`` and ``latest.json``/``.csv``/``.md`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = res["timestamp"].replace(":", "").replace("-", "").replace("+0000", "Z")
    text = json.dumps(res, indent=2, default=str) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "value"])
    for k, v in _flat(res).items():
        w.writerow([k, "" if v is None else v])
    paths = {
        "json": out / f"bench-{stamp}.json",
        "csv": out / f"bench-{stamp}.csv",
        "latest_json": out / "latest.json",
        "latest_csv": out / "latest.csv",
        "latest_md": out / "latest.md",
    }
    for key, content in (
        ("json", text),
        ("latest_json", text),
        ("csv", buf.getvalue()),
        ("latest_csv", buf.getvalue()),
        ("latest_md", summary_table(res)),
    ):
        tmp = paths[key].with_suffix(paths[key].suffix + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, paths[key])
    return paths
