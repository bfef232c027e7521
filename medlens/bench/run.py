"""One ``medlens bench`` run: every figure in one flat dict, the result files, the summary table."""

from __future__ import annotations

import csv
import gc
import io
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from medlens.artifacts.folders import resolve_model
from medlens.artifacts.model import read_meta
from medlens.bench.host import load_average, machine_info
from medlens.bench.inference import bench_inference
from medlens.bench.server import bench_serve
from medlens.bench.train_log import training_figures
from medlens.fileio import atomic_write_text

__all__ = [
    "DEFAULT_OUT",
    "REQUIRED_KEYS",
    "TARGETS",
    "run_bench",
    "summary_table",
    "write_results",
]

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("bench") / "results"
TARGETS = {  # issue 5, for the bundled pneumonia model (EfficientNet-Lite0, 224 px)
    "latency_ms_p50_onnx": ("<=", 10.0),
    "speedup_onnx_vs_torch_p50": (">=", 2.0),
    "serve_rps": (">=", 60.0),
    "serve_errors": ("<=", 0),
}
REQUIRED_KEYS = ("latency_ms_p50_onnx", "latency_ms_p50_torch", "serve_rps", "serve_errors")
# Headline keys present (None when not measured) in every result.
_HEADLINE_KEYS = (
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
)


def _busy_note(notes: list[str], phase: str, share: float | None) -> None:
    if share is not None and share >= 0.05:
        notes.append(
            f"{phase}: other processes used {share:.0%} of the machine's CPU time "
            "during the measurement; these figures are slower than an idle machine's"
        )


def _add_inference(res: dict, folder: Path, n: int, max_seconds: float, threads, torch_model):
    log.info("inference: %s, %d runs at batch 1, 3 at batch 32", folder.name, n)
    inf = bench_inference(
        folder, n=n, max_seconds=max_seconds, threads=threads, torch_model=torch_model
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


def _add_serve(res: dict, folder: Path, duration: float, concurrency: int, warmup_s, image):
    sv = bench_serve(
        folder, duration=duration, concurrency=concurrency, warmup=warmup_s, image=image
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


def _targets(res: dict) -> dict:
    out = {}
    for k, (op, v) in TARGETS.items():
        value = res.get(k)
        met = None if value is None else (value <= v if op == "<=" else value >= v)
        out[k] = {"target": f"{op} {v:g}", "value": value, "met": met}
    return out


def run_bench(
    model: str | os.PathLike,
    *,
    n: int = 50,
    duration: float = 20.0,
    concurrency: int = 8,
    warmup_s: float = 3.0,
    train_log: str | os.PathLike | None = None,
    target_auc: float | None = None,
    inference: bool = True,
    serve: bool = True,
    image: bytes | None = None,
    max_seconds: float = 120.0,
    threads: int | None = None,
    torch_model: str | os.PathLike | None = None,
) -> dict:
    """Every measurement of ``medlens bench`` in one flat dict (the keys of ``--json``).

    Args:
        model: a model folder or a bundled model's name.
        n: measured batch-1 runs per engine.
        duration: seconds of measured web-app load.
        concurrency: simultaneous connections of the load generator.
        warmup_s: seconds of unmeasured web-app load first.
        train_log: a run folder whose logs give the training figures (nothing is retrained).
        target_auc: with ``train_log``: also the epoch time to this validation AUC.
        inference: measure the inference engines.
        serve: measure the web app under load.
        image: upload this file instead of the synthetic JPEG.
        max_seconds: batch-1 timing stops early after this long.
        threads: intra-op threads of torch and ONNX Runtime for the inference figures.
        torch_model: a run folder whose ``model.pt`` times eager torch.

    Returns:
        The machine, the headline keys (None where not measured), the ``inference``,
        ``serve`` and ``training`` parts, ``notes`` and ``targets``.
    """
    folder = resolve_model(model)
    started = datetime.now(UTC)
    meta = read_meta(folder)
    res: dict = {
        "timestamp": started.isoformat(timespec="seconds"),
        "model": folder.name,
        "model_folder": str(folder),
        "machine": machine_info(),
        "notes": [],
        "model_arch": meta.arch,
        "input_size": meta.preprocess.image_size,
        **dict.fromkeys(_HEADLINE_KEYS),
    }
    if inference:
        _add_inference(res, folder, n, max_seconds, threads, torch_model)
        gc.collect()  # the engines' memory, before the server starts
    else:
        res["notes"].append("inference: skipped (--no-inference)")
    if serve:
        _add_serve(res, folder, duration, concurrency, warmup_s, image)
    else:
        res["notes"].append("web app: skipped (--no-serve)")
    if train_log:
        tr = training_figures(train_log, target_auc)
        res["training"] = tr
        res.update(
            {k: v for k, v in tr.items() if k.startswith("train_") and not isinstance(v, dict)}
        )
    res["targets"] = _targets(res)
    res["targets_for"] = (
        "issue 5's targets, set for the bundled pneumonia model "
        "(EfficientNet-Lite0, 224 px) on the CPU it runs on"
    )
    res["machine"]["load_average_end"] = load_average()
    res["wall_seconds"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    return res


# ----------------------------------------------------------------------------- output


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


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"{v}{unit}"
    if isinstance(v, int) or abs(v) >= 100:
        return f"{v:.0f}{unit}"
    return f"{v:.1f}{unit}" if abs(v) >= 1 else f"{v:.3f}{unit}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _inference_lines(res: dict) -> list[str]:
    rows = [
        [row["engine"], _fmt(row["latency_ms_p50"], " ms"), _fmt(row["latency_ms_p95"], " ms"),
         _fmt(row.get("throughput_img_s_b32"), " img/s")]
        for row in (res.get("inference") or {}).get("rows", {}).values()
    ]  # fmt: skip
    return _md_table(["engine", "batch-1 p50", "batch-1 p95", "batch-32 throughput"], rows)


def _serve_lines(sv: dict) -> list[str]:
    what = (
        f"`POST predict`, {sv['concurrency']} connections, {sv['duration_s']:g} s, "
        f"{sv['upload_bytes'] / 1e3:.0f} KB 1024x1024 JPEG"
    )
    row = [what, _fmt(sv["rps"]), _fmt(sv["latency_ms_p50"], " ms"),
           _fmt(sv["latency_ms_p95"], " ms"), f"{sv['errors']} of {sv['requests']}"]  # fmt: skip
    table = _md_table(["web app", "requests/s", "p50", "p95", "errors"], [row])
    return ["", *table, "", f"Server: {sv['server']}."]


def _training_lines(t: dict) -> list[str]:
    row = [f"`{t['run']}` ({t.get('arch')})", _fmt(t["train_images_per_s"]), str(t["train_epochs"]),
           f"{_fmt(t['train_best_val_auc'])} (epoch {t['train_best_epoch']})",
           _fmt(t["train_epoch_seconds_to_best_val_auc"], " s"),
           _fmt(t["train_wall_seconds"], " s")]  # fmt: skip
    header = ["training", "images/s", "epochs", "best val AUC", "epoch time to it", "wall time"]
    return ["", *_md_table(header, [row])]


def summary_table(res: dict) -> str:
    """The headline figures as Markdown tables, with the machine they were measured on."""
    m = res["machine"]
    lines = [
        f"Model `{res['model']}` ({res.get('model_arch')}, {res.get('input_size')} px), "
        f"{res['timestamp']}; {m['cores']} cores of {m['cpu_model']}, "
        f"{m.get('memory_gb')} GB; torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
        f"load average at start {m.get('load_average_start')}.",
        "",
        *_inference_lines(res),
    ]
    if res.get("serve"):
        lines += _serve_lines(res["serve"])
    if res.get("training"):
        lines += _training_lines(res["training"])
    if res.get("notes"):
        lines += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def write_results(res: dict, out: str | os.PathLike = DEFAULT_OUT) -> dict[str, Path]:
    """Write ``bench-<timestamp>.json``/``.csv`` and ``latest.json``/``.csv``/``.md`` in ``out``.

    Each file is written atomically (the old one or the complete new one).

    Returns:
        ``json``, ``csv``, ``latest_json``, ``latest_csv``, ``latest_md`` -> path.
    """
    out = Path(out)
    stamp = res["timestamp"].replace(":", "").replace("-", "").replace("+0000", "Z")
    text = json.dumps(res, indent=2, default=str) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "value"])
    for k, v in _flat(res).items():
        w.writerow([k, "" if v is None else v])
    contents = {
        "json": (out / f"bench-{stamp}.json", text),
        "csv": (out / f"bench-{stamp}.csv", buf.getvalue()),
        "latest_json": (out / "latest.json", text),
        "latest_csv": (out / "latest.csv", buf.getvalue()),
        "latest_md": (out / "latest.md", summary_table(res)),
    }
    for path, content in contents.values():
        atomic_write_text(path, content)
    return {key: path for key, (path, _) in contents.items()}
