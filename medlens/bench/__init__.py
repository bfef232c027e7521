"""``medlens bench``: training, inference and web-app figures of one model, in one run.

Three measurements, all on this machine and in one process tree, so that they can be compared
with each other (GitHub issue 5):

* **inference** (:func:`bench_inference`, :mod:`medlens.bench.inference`): the network alone
  (a normalised ``float32`` batch in, logits out) through eager torch (fp32), ONNX Runtime fp32
  (the Predictor's session: ``model.onnx``, or exported in memory) and, when the model folder
  ships ``model.int8.onnx``, ONNX Runtime int8. Latency p50/p95 at batch 1 over ``n`` runs
  after a warm-up, the engines interleaved run by run so that a burst of load from another
  process hits them alike; throughput at batch 32.
* **web app under load** (:func:`bench_serve`, :mod:`medlens.bench.server`): the real app
  (``medlens serve``) in a subprocess on 127.0.0.1 and a free port, driven by
  :func:`load_test` (:mod:`medlens.bench.load`, on httpx2) - ``concurrency`` keep-alive
  HTTP/1.1 connections, each posting one multipart upload of a synthetic 1024x1024 JPEG
  (:func:`synthetic_jpeg`; no patient data) as soon as the previous answer arrived, for a
  bounded time after a warm-up. Requests per second (200 answers), client-side latency
  p50/p95 and errors (non-200 answers, refused or broken connections, timeouts), plus the CPU
  time the server and the load generator used (psutil, :mod:`medlens.bench.host`).
* **training** (:func:`training_figures`, ``--train-log RUN``): read from a finished run's
  ``training_metrics.csv`` and ``model.json``; nothing is retrained.

:func:`run_bench` (:mod:`medlens.bench.run`) puts them in one flat dict (the keys of
``medlens bench --json``) and :func:`write_results` writes ``bench-<timestamp>.json``/``.csv``
and ``latest.json``/``.csv``/``.md`` under ``bench/results/``. Progress goes to the
``medlens.bench.*`` loggers at INFO. These are benchmarks, not tests: nothing here asserts a
time. Nothing in the runtime package imports this one.
"""

from __future__ import annotations

from medlens.bench.host import (
    CpuMeter,
    CpuUsage,
    cpu_model,
    load_average,
    machine_info,
    usable_cores,
)
from medlens.bench.inference import INT8_FILE, bench_inference
from medlens.bench.load import LoadResult, load_test, percentiles, predict_url, synthetic_jpeg
from medlens.bench.run import (
    DEFAULT_OUT,
    REQUIRED_KEYS,
    TARGETS,
    run_bench,
    summary_table,
    write_results,
)
from medlens.bench.server import (
    Server,
    bench_serve,
    free_port,
    running_server,
    serve_command,
    stop_server,
    wait_ready,
)
from medlens.bench.train_log import training_figures

__all__ = [
    "DEFAULT_OUT",
    "INT8_FILE",
    "REQUIRED_KEYS",
    "TARGETS",
    "CpuMeter",
    "CpuUsage",
    "LoadResult",
    "Server",
    "bench_inference",
    "bench_serve",
    "cpu_model",
    "free_port",
    "load_average",
    "load_test",
    "machine_info",
    "percentiles",
    "predict_url",
    "run_bench",
    "running_server",
    "serve_command",
    "stop_server",
    "summary_table",
    "synthetic_jpeg",
    "training_figures",
    "usable_cores",
    "wait_ready",
    "write_results",
]
