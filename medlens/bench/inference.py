"""Network latency and throughput per inference engine (eager torch, ONNX Runtime fp32/int8).

The input is a normalised ``float32`` batch of random images of the model's input size (what
``Preprocess.normalize`` hands the network), logits out; decoding and preprocessing are not
timed here (the web-app figures include them). The engines run interleaved (torch, onnx, int8,
torch, ...) so that a burst of load from another process hits them alike.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medlens.artifacts.folders import INT8_FILE, MODEL_WEIGHTS, ModelFolder, resolve_model
from medlens.artifacts.model import read_meta
from medlens.bench.host import CpuMeter
from medlens.bench.load import percentiles
from medlens.errors import UsageError

if TYPE_CHECKING:
    from medlens.data.preprocess import Preprocess

__all__ = ["INT8_FILE", "bench_inference"]

log = logging.getLogger(__name__)


Engine = Callable[[np.ndarray], np.ndarray]  # float32 batch -> logits


@dataclass
class _Engines:
    run: dict[str, Engine] = field(default_factory=dict)  # name -> engine, in timing order
    about: dict[str, dict] = field(default_factory=dict)  # name -> engine, threads
    notes: list[str] = field(default_factory=list)
    pre: Preprocess | None = None  # the model's, set by _add_onnx


def _torch_folder(folder: Path, torch_ref, notes: list[str]) -> Path | None:
    """The folder whose model.pt times eager torch: the model's own, or ``torch_ref`` (the
    training run of an inference-only bundle), checked to be the same network.

    Raises:
        UsageError: ``torch_ref`` is another network (architecture or input size).
    """
    if torch_ref is None:
        if not ModelFolder(folder).inference_only:
            return folder
        notes.append(
            f"torch: not measured ({folder} has no {MODEL_WEIGHTS}: an inference-only "
            "model folder; --torch-model RUN times the run it was exported from)"
        )
        return None
    run = resolve_model(torch_ref)
    mine, theirs = read_meta(folder), read_meta(run)
    shape = (mine.arch, mine.preprocess.image_size, mine.preprocess.channels)
    if shape != (theirs.arch, theirs.preprocess.image_size, theirs.preprocess.channels):
        raise UsageError(
            f"--torch-model {run} is a {theirs.arch} at "
            f"{theirs.preprocess.image_size} px, the model a {mine.arch} at "
            f"{mine.preprocess.image_size} px: not the same network"
        )
    a, b = mine.weights_sha256, theirs.weights_sha256
    same = "the weights the ONNX graph was exported from" if a and a == b else None
    notes.append(
        f"torch: timed with {run}/{MODEL_WEIGHTS} ("
        + (same or "same architecture and input size; other weights")
        + ")"
    )
    return run


def _add_torch(eng: _Engines, folder: Path, torch_ref) -> None:
    import torch

    from medlens.inference.predictor import Predictor

    torch_folder = _torch_folder(folder, torch_ref, eng.notes)
    if torch_folder is None:
        return
    try:
        loaded = Predictor(torch_folder, backend="torch").net
        assert loaded is not None  # the torch backend loads model.pt
        net = loaded.float().eval()
    except Exception as e:  # noqa: BLE001 - report why, measure the rest
        eng.notes.append(f"torch: not measured ({type(e).__name__}: {e})")
        return

    def run_torch(x: np.ndarray, net=net) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            return net(t).numpy()

    eng.run["torch"] = run_torch
    eng.about["torch"] = {
        "engine": "torch eager fp32 (channels-last)",
        "threads": torch.get_num_threads(),
    }


def _add_onnx(eng: _Engines, folder: Path, threads: int | None) -> None:
    from medlens.artifacts.onnx import onnx_bytes, ort_session
    from medlens.inference.predictor import Predictor

    op = Predictor(folder, backend="onnx")
    eng.pre = op.pre
    sess = op.session
    if threads:  # the same thread count as torch: re-open (or re-export) the graph
        onnx = ModelFolder(folder).onnx
        if onnx.exists():
            sess = ort_session(onnx, threads=threads)
        else:
            assert op.net is not None  # no model.onnx: the predictor loaded model.pt
            sess = ort_session(onnx_bytes(op.net, op.meta), threads=threads)
    assert sess is not None  # backend="onnx" always opens a session
    eng.run["onnx"] = lambda x: sess.run(["logits"], {"input": x})[0]
    eng.about["onnx"] = {
        "engine": f"ONNX Runtime fp32 ({op.backend})",
        "threads": sess.get_session_options().intra_op_num_threads,
    }
    int8 = folder / INT8_FILE
    if not int8.exists():
        eng.notes.append(
            f"onnx_int8: not measured (no {INT8_FILE} in {folder}; no int8 model is shipped)"
        )
        return
    s8 = ort_session(int8, threads=threads)
    eng.run["onnx_int8"] = lambda x: s8.run(["logits"], {"input": x})[0]
    eng.about["onnx_int8"] = {
        "engine": f"ONNX Runtime int8 ({INT8_FILE})",
        "threads": s8.get_session_options().intra_op_num_threads,
    }


def _engines(folder: Path, threads: int | None, torch_ref=None) -> _Engines:
    """Every engine that can run this model here, torch first."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    eng = _Engines()
    _add_torch(eng, folder, torch_ref)
    _add_onnx(eng, folder, threads)
    log.info("inference engines: %s", ", ".join(eng.run))
    return eng


def _batch1_ms(
    engines: dict[str, Engine], x1: np.ndarray, n: int, warmup: int, max_seconds: float, notes
) -> dict[str, list[float]]:
    """Milliseconds per engine at batch 1: ``warmup`` rounds, then up to ``n`` measured ones
    (fewer once ``max_seconds`` have passed), the engines interleaved."""
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
    log.info("batch 1: %d runs per engine", len(times["onnx"]))
    return times


def _throughput(engines: dict[str, Engine], xb: np.ndarray, runs: int) -> dict[str, float]:
    """Images per second per engine at the batch size of ``xb``, over ``runs`` runs each."""
    secs: dict[str, list[float]] = {k: [] for k in engines}
    for fn in engines.values():
        fn(xb)  # warm-up at this batch size (memory arenas, kernel choice)
    for _ in range(runs):
        for name, fn in engines.items():
            t0 = time.perf_counter()
            fn(xb)
            secs[name].append(time.perf_counter() - t0)
    return {k: round(len(xb) * len(v) / sum(v), 1) for k, v in secs.items()}


def bench_inference(
    ref: str | os.PathLike,
    n: int = 50,
    warmup: int = 5,
    batch: int = 32,
    batch_runs: int = 3,
    max_seconds: float = 120.0,
    threads: int | None = None,
    torch_model: str | os.PathLike | None = None,
) -> dict:
    """Network latency at batch 1 and throughput at batch ``batch`` per engine.

    Args:
        ref: a model folder or a bundled model's name.
        n: measured batch-1 runs per engine.
        warmup: unmeasured batch-1 rounds first.
        batch: the batch size of the throughput figure.
        batch_runs: timed runs per engine at that batch size.
        max_seconds: measuring batch 1 stops early after this long.
        threads: intra-op threads of torch and of every ONNX Runtime session (default: each
            library's own, every core).
        torch_model: a run folder whose ``model.pt`` times eager torch when ``ref`` is an
            inference-only folder (a bundle exported from that run).

    Returns:
        ``{"rows": {engine: {...}}, "notes": [...], "input_size", "batch",
        "max_abs_logit_diff_onnx_vs_torch", "other_processes_cpu_share"}``.
    """
    import torch

    eng = _engines(resolve_model(ref), threads, torch_model)
    pre = eng.pre
    assert pre is not None  # _engines always adds ONNX Runtime, which sets it
    meter = CpuMeter()
    shape = (pre.channels, pre.image_size, pre.image_size)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, *shape), dtype=np.uint8)
    xb = pre.normalize(torch.from_numpy(pixels)).numpy()
    x1 = np.ascontiguousarray(xb[:1])
    outs = {name: np.asarray(fn(x1)) for name, fn in eng.run.items()}  # also a first warm-up
    diff = float(np.abs(outs["onnx"] - outs["torch"]).max()) if "torch" in outs else None
    times = _batch1_ms(eng.run, x1, n, warmup, max_seconds, eng.notes)
    img_s = _throughput(eng.run, xb, batch_runs)
    usage = meter.stop()
    rows = {}
    for name in eng.run:
        lat = percentiles(times[name])
        rows[name] = {
            **eng.about[name],
            "batch1_runs": lat["n"],
            "latency_ms_p50": lat["p50"],
            "latency_ms_p95": lat["p95"],
            "latency_ms_mean": lat["mean"],
            f"throughput_img_s_b{batch}": img_s[name],
        }
    log.info("batch %d: %s", batch, ", ".join(f"{k} {v} img/s" for k, v in img_s.items()))
    return {
        "rows": rows,
        "notes": eng.notes,
        "input_size": pre.image_size,
        "batch": batch,
        "max_abs_logit_diff_onnx_vs_torch": diff,
        "other_processes_cpu_share": usage.other_share,
    }
