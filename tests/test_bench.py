"""Tests for medlens.bench (``medlens bench``) and the serving speed-ups it measures.

Correctness only: the figures' keys and types against a real ``medlens serve``, the load
generator's counting against a local server, the machine and CPU figures, the training figures
read from a run, and what decoding a large JPEG at reduced scale changes. No test asserts a
time.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image
from serve_fixtures import served_models  # noqa: F401 - fixture

from medlens import bench
from medlens.cli import main
from medlens.data.imaging import read_image
from medlens.errors import UsageError
from medlens.inference.predictor import Predictor

# starts outside processes or runs real models on real data (`make test-fast` leaves it out)
pytestmark = pytest.mark.slow

# --------------------------------------------------------------------------- medlens bench


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def bench_log():
    """The messages of the medlens.bench loggers at INFO, whatever handlers the CLI set up."""
    logger, handler = logging.getLogger("medlens.bench"), _Messages()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_bench_cli_json_has_the_figures(trained_run, tmp_path, capsys, bench_log):
    out = tmp_path / "results"
    code = main(
        [
            "bench",
            "--model",
            str(trained_run),
            "--json",
            "--out",
            str(out),
            "--n",
            "3",
            "--duration",
            "1",
            "--warmup",
            "0.5",
            "--concurrency",
            "2",
            "--train-log",
            str(trained_run),
        ]
    )
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    for key in bench.REQUIRED_KEYS:
        assert key in res
    assert isinstance(res["latency_ms_p50_onnx"], float) and res["latency_ms_p50_onnx"] > 0
    assert isinstance(res["latency_ms_p50_torch"], float) and res["latency_ms_p50_torch"] > 0
    assert res["latency_ms_p95_onnx"] >= res["latency_ms_p50_onnx"]
    assert res["throughput_img_s_b32_onnx"] > 0 and res["throughput_img_s_b32_torch"] > 0
    assert res["speedup_onnx_vs_torch_p50"] == pytest.approx(
        res["latency_ms_p50_torch"] / res["latency_ms_p50_onnx"], rel=0.01
    )
    # the ONNX graph computes what the torch network computes
    assert res["inference"]["max_abs_logit_diff_onnx_vs_torch"] < 1e-3
    # no int8 model in the run: that row is skipped, and the notes say so
    assert res["latency_ms_p50_onnx_int8"] is None
    assert any("int8" in n and "not measured" in n for n in res["notes"])
    # the web app answered every request of the load test
    assert isinstance(res["serve_rps"], float) and res["serve_rps"] > 0
    assert res["serve_errors"] == 0 and isinstance(res["serve_errors"], int)
    assert res["serve_requests"] > 0 and res["serve"]["statuses"] == {"200": res["serve_requests"]}
    assert res["serve_latency_ms_p95"] >= res["serve_latency_ms_p50"] > 0
    assert res["serve"]["upload_bytes"] > 50_000  # the 1024x1024 synthetic JPEG
    # the server reported its own time per prediction, and both sides used CPU (psutil)
    assert res["serve"]["server_elapsed_ms_p50"] > 0
    assert res["serve"]["server_cpu_ms_per_request"] > 0
    assert res["serve"]["client_cpu_ms_per_request"] > 0
    assert 0 < res["serve"]["machine_cpu_busy_share"] <= 1
    assert 0 <= res["serve"]["other_processes_cpu_share"] <= 1
    # progress went to the medlens.bench loggers, the figures alone to stdout
    assert any(m.startswith("server ready on port") for m in bench_log)
    assert any(m.startswith(f"web app: {res['serve_rps']} requests/s") for m in bench_log)
    assert "inference engines: torch, onnx" in bench_log
    # training figures from the run's logs
    assert res["train_images"] > 0 and res["train_images_per_s"] > 0
    assert 0.5 <= res["train_best_val_auc"] <= 1
    # the machine is described
    m = res["machine"]
    assert isinstance(m["cores"], int) and m["cores"] >= 1 and isinstance(m["cpu_model"], str)
    assert m["memory_gb"] > 0 and len(m["load_average_start"]) == 3
    assert set(res["targets"]) == set(bench.TARGETS)
    # files: a timestamped JSON/CSV and latest.json/.csv/.md
    assert json.loads((out / "latest.json").read_text()) == res
    assert len(list(out.glob("bench-*.json"))) == 1 and len(list(out.glob("bench-*.csv"))) == 1
    csv_text = (out / "latest.csv").read_text()
    assert csv_text.startswith("metric,value\n") and "\nserve_rps," in csv_text
    md = (out / "latest.md").read_text()
    assert "| engine |" in md and m["cpu_model"] in md and "requests/s" in md


def test_bench_without_model_weights_reports_torch_as_null(trained_run, tmp_path):
    """An inference-only folder (model.json + model.onnx, no model.pt): torch is not measured,
    and the figures say why."""
    from medlens.artifacts.card import export_model
    from medlens.artifacts.folders import MODEL_WEIGHTS
    from medlens.errors import ModelLoadError

    folder = shutil.copytree(
        trained_run, tmp_path / "onnx_only", ignore=shutil.ignore_patterns("checkpoints")
    )
    export_model(folder)
    (folder / MODEL_WEIGHTS).unlink()
    try:
        Predictor(folder, backend="onnx")
    except ModelLoadError:
        pytest.skip("this Predictor cannot load inference-only folders yet")
    res = bench.run_bench(folder, n=2, serve=False)
    assert res["latency_ms_p50_torch"] is None and res["speedup_onnx_vs_torch_p50"] is None
    assert res["latency_ms_p50_onnx"] > 0
    assert any("torch: not measured" in n and "model.pt" in n for n in res["notes"])
    assert res["serve_rps"] is None and res["targets"]["serve_rps"]["met"] is None
    table = bench.summary_table(res)
    assert "ONNX Runtime fp32" in table and "torch eager" not in table
    # --torch-model: the run the folder was exported from times eager torch
    res = bench.run_bench(folder, n=2, serve=False, torch_model=trained_run)
    assert res["latency_ms_p50_torch"] > 0 and res["speedup_onnx_vs_torch_p50"] > 0
    assert any("the weights the ONNX graph was exported from" in n for n in res["notes"])


# --------------------------------------------------------------------------- load generator


class _FlakyHandler(BaseHTTPRequestHandler):
    """Answers 200, 503 or hangs up without answering, in a fixed rotation."""

    protocol_version = "HTTP/1.1"
    counts: dict = {}
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            n = self.counts["n"] = self.counts.get("n", 0) + 1
            kind = "closed" if n % 5 == 0 else "503" if n % 3 == 0 else "200"
            self.counts[kind] = self.counts.get(kind, 0) + 1
        if kind == "closed":
            self.close_connection = True
            return
        body = b'{"elapsed_ms": 1.5}' if kind == "200" else b'{"detail": "busy"}'
        self.send_response(int(kind))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _local_server(handler) -> tuple[ThreadingHTTPServer, int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def test_load_generator_counts_errors():
    _FlakyHandler.counts = {}
    server, port = _local_server(_FlakyHandler)
    try:
        url = bench.predict_url(port, "m")
        res = bench.load_test(
            url, b"\xff\xd8 not really a jpeg", concurrency=3, duration=0.6, warmup=0, timeout=5
        )
    finally:
        server.shutdown()
        server.server_close()
    c = _FlakyHandler.counts
    assert c["n"] >= 5  # every kind of answer happened
    assert res.ok == c.get("200", 0) and res.statuses.get("200", 0) == c.get("200", 0)
    assert res.statuses.get("503", 0) == c.get("503", 0)
    assert res.statuses.get("error", 0) == c.get("closed", 0)  # hung up without answering
    assert res.errors == c.get("503", 0) + c.get("closed", 0)
    assert res.requests == c["n"]
    d = res.to_dict()
    assert d["errors"] == res.errors and d["rps"] == pytest.approx(res.ok / res.elapsed_s, rel=0.01)
    assert d["server_elapsed_ms_p50"] == 1.5
    assert any(e.startswith("HTTP 503") for e in d["error_examples"])
    assert any(e.startswith("RemoteProtocolError") for e in d["error_examples"])


def test_load_generator_counts_refused_connections():
    port = bench.free_port()  # nothing listens there
    res = bench.load_test(
        bench.predict_url(port, "m"), b"x", concurrency=2, duration=0.2, warmup=0, timeout=2
    ).to_dict()
    assert res["ok"] == 0 and res["rps"] == 0.0
    assert res["errors"] >= 2 and res["statuses"] == {"error": res["errors"]}
    assert res["latency_ms_p50"] is None
    assert all(e.startswith("ConnectError") for e in res["error_examples"])


class _RecordingHandler(BaseHTTPRequestHandler):
    """Answers 200 and keeps what it was sent."""

    protocol_version = "HTTP/1.1"
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, self.headers, body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_load_generator_posts_one_multipart_file_over_keep_alive():
    data = bench.synthetic_jpeg(side=64)
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    _RecordingHandler.seen = []
    server, port = _local_server(_RecordingHandler)
    try:
        url = bench.predict_url(port, "chest x")
        res = bench.load_test(url, data, concurrency=2, duration=0.3, warmup=0.1, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert url == f"http://127.0.0.1:{port}/api/v1/models/chest%20x/predict"
    seen = _RecordingHandler.seen
    assert len(seen) == res.requests + res.warmup_requests and res.warmup_requests > 0
    assert res.ok == res.requests > 0 and res.server_ms == []  # no elapsed_ms in "{}"
    path, headers, body = seen[-1]
    assert path == "/api/v1/models/chest%20x/predict"
    assert int(headers["Content-Length"]) == len(body)
    assert headers["Connection"] == "keep-alive" and headers["User-Agent"] == "medlens-bench"
    ctype, _, boundary = headers["Content-Type"].partition("; boundary=")
    assert ctype == "multipart/form-data" and boundary
    head, _, rest = body.partition(b"\r\n\r\n")
    assert head.startswith(f"--{boundary}\r\n".encode())
    assert b'name="file"; filename="bench.jpg"' in head and b"Content-Type: image/jpeg" in head
    assert rest == data + f"\r\n--{boundary}--\r\n".encode()
    assert all(b == body for _, _, b in seen)  # one body, encoded once


def test_load_generator_sends_only_to_loopback():
    for url in ("http://10.0.0.1:8000/x", "http://example.org/x", "http://192.168.1.2/x"):
        with pytest.raises(ValueError, match="loopback"):
            bench.load_test(url, b"x", duration=0.1, warmup=0)
    with pytest.raises(ValueError, match="concurrency"):
        bench.load_test("http://127.0.0.1:1/x", b"x", concurrency=0)


# --------------------------------------------------------------------------- machine, server


def test_machine_figures_come_from_this_machine():
    m = bench.machine_info()
    assert m["cores"] == bench.usable_cores() == len(os.sched_getaffinity(0))
    assert m["logical_cpus"] == os.cpu_count()
    with open("/proc/meminfo") as fh:
        kib = int(next(line for line in fh if line.startswith("MemTotal:")).split()[1])
    assert m["memory_gb"] == round(kib / 2**20, 1)
    assert len(m["load_average_start"]) == 3 and min(m["load_average_start"]) >= 0
    assert m["cpu_model"] == bench.cpu_model() and m["cpu_model"]


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_meter_counts_this_process_and_a_child():
    # the child spends 0.4 s of CPU, then waits to be read
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nend = time.process_time() + 0.4\n"
            "while time.process_time() < end: pass\ntime.sleep(30)",
        ]
    )
    try:
        meter = bench.CpuMeter(child.pid)
        _spin(0.3)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            usage = meter.stop()
            if usage.child_s >= 0.35:
                break
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait()
    assert usage.own_s >= 0.25 and usage.child_s >= 0.35
    assert usage.busy_s >= 0.5 and usage.total_s >= usage.busy_s
    assert 0 < usage.busy_share <= 1 and 0 <= usage.other_share <= 1
    # once the child is gone, its time is unknown, not zero
    assert bench.CpuMeter(child.pid).stop().child_s is None


def test_running_server_reports_why_the_server_did_not_start(tmp_path):
    """No model in the folder: `medlens serve` exits, and the error ends with its last log
    lines."""
    with pytest.raises(RuntimeError, match=r"exited with code [1-9]\d* before it was ready: \S"):
        with bench.running_server(tmp_path, start_timeout=120):
            pass


# --------------------------------------------------------------------------- training figures


def test_training_figures_from_a_run(trained_run):
    import csv

    from medlens.artifacts.folders import ModelFolder

    t = bench.training_figures(trained_run)
    run = ModelFolder(trained_run)
    rows = list(csv.DictReader(run.history.open()))
    meta = json.loads(run.model_json.read_text())
    n_train = sum(meta["training"]["split_counts"]["train"].values())
    assert t["train_images"] == n_train and t["train_epochs"] == len(rows)
    secs = [float(r["seconds"]) for r in rows]
    assert t["train_epoch_seconds"] == pytest.approx(sum(secs), abs=0.01)
    assert t["train_images_per_s"] == pytest.approx(n_train * len(rows) / sum(secs), rel=0.01)
    aucs = [float(r["val_auc"]) for r in rows]
    assert t["train_best_val_auc"] == max(aucs)
    best = aucs.index(max(aucs))
    assert t["train_best_epoch"] == best + 1
    assert t["train_epoch_seconds_to_best_val_auc"] == pytest.approx(
        sum(secs[: best + 1]), abs=0.01
    )
    assert t["train_wall_seconds_to_best_val_auc_max"] <= t["train_wall_seconds"]
    assert sum(s["epochs"] for s in t["train_stages"].values()) == len(rows)
    hit = bench.training_figures(trained_run, target_auc=0.0)
    assert hit["train_epoch_seconds_to_target_val_auc"] == pytest.approx(secs[0], abs=0.01)
    assert (
        bench.training_figures(trained_run, target_auc=1.01)[
            "train_epoch_seconds_to_target_val_auc"
        ]
        is None
    )


def test_training_figures_of_a_run_still_training(trained_run, tmp_path):
    """A run without model.json yet (it is written last): the log's figures, no image count."""
    from medlens.artifacts.folders import HISTORY_CSV

    shutil.copy(trained_run / HISTORY_CSV, tmp_path / HISTORY_CSV)
    t = bench.training_figures(tmp_path)
    assert t["arch"] is None and t["train_images"] is None and t["train_images_per_s"] is None
    assert t["train_epochs"] == bench.training_figures(trained_run)["train_epochs"] > 0


def test_training_figures_need_a_run(tmp_path):
    from medlens.artifacts.folders import HISTORY_CSV

    with pytest.raises(FileNotFoundError, match=HISTORY_CSV):
        bench.training_figures(tmp_path)
    (tmp_path / HISTORY_CSV).write_text("epoch,seconds,val_auc\n")
    with pytest.raises(UsageError, match="no epochs"):
        bench.training_figures(tmp_path)


def test_bench_cli_reports_a_run_without_a_training_log(trained_run, tmp_path, capsys):
    out = tmp_path / "results"
    args = ["bench", "--model", str(trained_run), "--no-inference", "--no-serve"]
    code = main([*args, "--out", str(out), "--train-log", str(tmp_path / "nothing")])
    assert code == 2
    assert "training_metrics.csv does not exist" in capsys.readouterr().err
    assert not out.exists()  # nothing measured, nothing written


# --------------------------------------------------------------------------- reduced-scale JPEG


def _jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_target_size_decodes_large_jpegs_at_reduced_scale(image_factory):
    big = np.asarray(
        Image.fromarray(image_factory("bright", seed=3, size=128)).resize(
            (1024, 1024), Image.BICUBIC
        )
    )
    data = _jpeg(big)
    assert read_image(data).pixels.shape == (1024, 1024)
    # 1/4 scale: the largest of 1/2, 1/4, 1/8 that keeps both sides >= 224
    assert read_image(data, target_size=224).pixels.shape == (256, 256)
    assert read_image(data, target_size=32).pixels.shape == (128, 128)  # 1/8 at most
    wide = _jpeg(np.asarray(Image.fromarray(big).resize((1000, 500))))
    assert read_image(wide, target_size=224).pixels.shape == (250, 500)
    # smaller than twice the target, other formats: decoded in full
    assert read_image(_jpeg(big[:400, :400]), target_size=224).pixels.shape == (400, 400)
    png = io.BytesIO()
    Image.fromarray(big).save(png, "PNG")
    assert read_image(png.getvalue(), target_size=224).pixels.shape == (1024, 1024)
    rgb = read_image(_jpeg(np.stack([big] * 3, -1)), target_size=224)
    assert rgb.pixels.shape == (256, 256, 3) and rgb.notes == ()


def test_target_size_changes_predictions_negligibly(trained_run, image_factory):
    """What serving's reduced-scale decode changes: the prepared network input moves by
    rounding-level amounts and the prediction by far less than its own margin."""
    pred = Predictor(trained_run, backend="torch")
    size = pred.pre.image_size
    full, reduced = [], []
    for seed, kind in enumerate(["bright", "dark"] * 4):
        img = np.asarray(
            Image.fromarray(image_factory(kind, seed=seed, size=96)).resize(
                (1024, 1024), Image.BICUBIC
            )
        )
        data = _jpeg(img)
        full.append(pred.pre.prepare(read_image(data).pixels))
        reduced.append(pred.pre.prepare(read_image(data, target_size=size).pixels))
    a, b = np.stack(full).astype(int), np.stack(reduced).astype(int)
    assert np.abs(a - b).mean() < 1.5  # grey levels out of 255
    pa, pb = pred.probs_prepared(np.stack(full)), pred.probs_prepared(np.stack(reduced))
    assert np.abs(pa - pb).max() < 0.05
    assert [p.label for p in pred.predict_prepared(np.stack(full))] == [
        p.label for p in pred.predict_prepared(np.stack(reduced))
    ]


# --------------------------------------------------------------------------- serving set-up


def test_app_serves_with_one_inference_thread_per_worker(served_models):  # noqa: F811
    from medlens.serve import create_app

    app = create_app([served_models], workers=3)
    assert app.state.workers.total_tokens == 3
    for m in app.state.models.values():
        assert m.predictor.backend.startswith("onnx")
        assert m.predictor.session.get_session_options().intra_op_num_threads == 1
    default = create_app([served_models], inference_threads=None)
    assert default.state.workers.total_tokens == bench.usable_cores()
