"""Latency of one predict request, end to end, against a real ``medlens serve``.

Starts the app in a subprocess on 127.0.0.1, sends ``-n`` requests with a generated 1024x1024
JPEG to ``POST /api/v1/models/NAME/predict``, without and then with ``explain=true``
(Grad-CAM), one at a time over one keep-alive connection, and prints p50/p95 of the
client-side wall time. Bounded in count (``-n``) and time (``--max-seconds``).

    python bench/latency.py --model runs/pneumonia -n 30

``--model`` is a model folder (a run of ``medlens train``); without it, the first bundled model.
For throughput under concurrent load, and inference and training figures, see ``medlens bench``
(:mod:`medlens.bench`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx2
import numpy as np

from medlens.artifacts.folders import ModelFolder, find_models
from medlens.bench import (
    Server,
    cpu_model,
    load_average,
    running_server,
    synthetic_jpeg,
    usable_cores,
)


def run(
    client: httpx2.Client,
    url: str,
    data: bytes,
    explain: bool,
    n: int,
    deadline: float,
    warmup: int,
) -> tuple[list[float], list[float]]:
    """``warmup`` unmeasured then up to ``n`` measured requests (none after ``deadline``):
    client-side and server-side (``elapsed_ms``) milliseconds."""
    wall, server = [], []
    params = {"explain": "true" if explain else "false"}
    for i in range(warmup + n):
        if time.time() > deadline:
            break
        t0 = time.perf_counter()
        resp = client.post(url, params=params, files={"file": ("bench.jpg", data, "image/jpeg")})
        dt = (time.perf_counter() - t0) * 1e3
        if resp.status_code != 200:
            raise SystemExit(f"predict answered {resp.status_code}: {resp.content[:300]!r}")
        if i >= warmup:
            wall.append(dt)
            server.append(resp.json()["elapsed_ms"])
    return wall, server


def _measure(srv: Server, folder: Path, data: bytes, args) -> dict[bool, tuple[list, list]]:
    deadline = time.time() + args.max_seconds
    results = {}
    # one keep-alive connection; trust_env=False: no proxy between this and 127.0.0.1
    with httpx2.Client(timeout=120, trust_env=False) as client:
        for explain in (False, True):
            wall, server = run(
                client, srv.url(folder.name), data, explain, args.n, deadline, args.warmup
            )
            if wall:
                results[explain] = (wall, server)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: first bundled model)")
    ap.add_argument("-n", type=int, default=30, help="measured requests per mode (default 30)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured requests first")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=300,
        help="stop measuring after this long (default 300)",
    )
    args = ap.parse_args(argv)

    if args.model:
        folder = Path(args.model)
    else:
        bundled = find_models()
        if not bundled:
            ap.error("no bundled model: pass --model RUN_FOLDER")
        folder = next(iter(bundled.values()))
    if not ModelFolder(folder).is_model:
        ap.error(f"{folder} is not a model folder (no {ModelFolder(folder).model_json.name})")
    load_before = load_average()
    data = synthetic_jpeg()
    with running_server(folder, "--log-level", "warning", "--rate-limit", "off") as srv:
        results = _measure(srv, folder, data, args)
    import onnxruntime

    print(f"model {folder.name} ({folder}); 1024x1024 JPEG of {len(data) / 1e3:.0f} KB")
    print(
        f"machine: {cpu_model()}, {usable_cores()} cores; onnxruntime "
        f"{onnxruntime.__version__}; load average before: "
        f"{' '.join(f'{x:.2f}' for x in load_before or [])}"
    )
    print(f"{'request':<22}{'n':>4}{'p50 ms':>10}{'p95 ms':>10}{'server p50 ms':>15}")
    for explain, (wall, server) in results.items():
        label = "predict, explain=true" if explain else "predict"
        print(
            f"{label:<22}{len(wall):>4}{np.percentile(wall, 50):>10.1f}"
            f"{np.percentile(wall, 95):>10.1f}{np.percentile(server, 50):>15.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
