"""Latency of one predict request, end to end, against a real ``medlens serve``.

Starts the app with uvicorn in a subprocess on 127.0.0.1, sends ``-n`` requests with a
generated 1024x1024 JPEG to ``POST /api/v1/models/NAME/predict``, without and then with
``explain=true`` (Grad-CAM), one at a time over one keep-alive connection, and prints p50/p95
of the client-side wall time. Bounded in count (``-n``) and time (``--max-seconds``).

    python bench/latency.py --model runs/pneumonia -n 30

``--model`` is a model folder (a run of ``medlens train``); without it, the first bundled model.
For throughput under concurrent load, and inference and training figures, see ``medlens bench``
(:mod:`medlens.bench`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from medlens.bench import cpu_model as cpu_name
from medlens.bench import (
    free_port,
    multipart_body,
    serve_command,
    stop_server,
    synthetic_jpeg,
    wait_ready,
)


def run(
    port: int,
    name: str,
    body: bytes,
    ctype: str,
    explain: bool,
    n: int,
    deadline: float,
    warmup: int,
) -> tuple[list[float], list[float]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    path = f"/api/v1/models/{name}/predict?explain={'true' if explain else 'false'}"
    wall, server = [], []
    for i in range(warmup + n):
        if time.time() > deadline:
            break
        t0 = time.perf_counter()
        conn.request("POST", path, body=body, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        payload = resp.read()
        dt = (time.perf_counter() - t0) * 1e3
        if resp.status != 200:
            raise SystemExit(f"predict answered {resp.status}: {payload[:300]!r}")
        if i >= warmup:
            wall.append(dt)
            server.append(json.loads(payload)["elapsed_ms"])
    conn.close()
    return wall, server


def main(argv=None) -> int:
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

    from medlens.artifacts.folders import find_models

    if args.model:
        folder = Path(args.model)
    else:
        bundled = find_models()
        if not bundled:
            ap.error("no bundled model: pass --model RUN_FOLDER")
        folder = next(iter(bundled.values()))
    if not (folder / "model.json").exists():
        ap.error(f"{folder} is not a model folder (no model.json)")
    load_before = os.getloadavg()
    port = free_port()
    cmd = serve_command(folder, port, "--log-level", "warning")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(port, proc, timeout=300)
        body, ctype = multipart_body(synthetic_jpeg())
        deadline = time.time() + args.max_seconds
        results = {}
        for explain in (False, True):
            wall, server = run(
                port, folder.name, body, ctype, explain, args.n, deadline, args.warmup
            )
            if wall:
                results[explain] = (wall, server)
    finally:
        stop_server(proc)
    import onnxruntime

    print(f"model {folder.name} ({folder}); 1024x1024 JPEG of {len(body) / 1e3:.0f} KB")
    print(
        f"machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores; onnxruntime "
        f"{onnxruntime.__version__}; load average before: "
        f"{' '.join(f'{x:.2f}' for x in load_before)}"
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
