"""Batch prediction on Ray Data: ``medlens predict --engine ray``.

The inputs (files, possibly listed by a manifest: :func:`medlens.fileio.read_path_manifest`;
local, or on any filesystem pyarrow reads: ``s3://``, ``gs://``, ``hdfs://`` ...) become a Ray dataset of paths;
``map_batches`` sends batches to a pool of actors, each holding one
:class:`~medlens.inference.predictor.Predictor` (one ONNX Runtime session with one thread),
which read and decode their batch's images (so decoding runs in parallel across actors) and
predict them. The rows have the columns of the local engine (``path, label, p_<class>...,
threshold, ood_flag, ood_score, ood_ratio, error``), in input order.

Ray starts a local runtime by default, or joins a running cluster (``--ray-address``). Only
paths travel through Ray's object store, never pixels; the actors print nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medlens.errors import InstallError
from medlens.fileio import read_uri

__all__ = ["predict_on_ray"]


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the part used
    except ImportError:
        raise InstallError(
            "--engine ray needs Ray: pip install 'medlens[ray]' (or pip install 'ray[data]')"
        ) from None
    return ray


class _Predict:
    """A Ray actor: one predictor, reused for every batch it is given."""

    def __init__(self, model: str, tta: bool) -> None:
        from medlens.inference.predictor import Predictor

        self.pred = Predictor(model, backend="onnx", tta=tta, threads=1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from medlens.data.imaging import read_image
        from medlens.errors import ImageReadError

        pred, rows, ok, prepared = self.pred, [], [], []
        for index, path in zip(batch["index"], batch["path"]):
            path = str(path)
            rows.append({"index": int(index), "path": path, "error": None})
            try:  # local files as the local engine reads them (the same error texts)
                source = path if "://" not in path else read_uri(path)
                img = read_image(source, name=path, target_size=pred.pre.image_size)
                prepared.append(pred.pre.prepare(img.pixels))
                ok.append(len(rows) - 1)
            except (ImageReadError, OSError) as e:
                rows[-1]["error"] = str(e)
        if prepared:
            for i, r in zip(ok, pred.predict_prepared(np.stack(prepared))):
                rows[i].update({"label": r.label, "threshold": r.threshold,
                                **{f"p_{c}": v for c, v in r.probabilities.items()},
                                "ood_flag": r.ood["flag"], "ood_score": r.ood["score"],
                                "ood_ratio": r.ood.get("ratio")})  # fmt: skip
        columns = ["index", "path", "label", *(f"p_{c}" for c in pred.labels), "threshold",
                   "ood_flag", "ood_score", "ood_ratio", "error"]  # fmt: skip
        return {c: np.array([r.get(c) for r in rows], dtype=object) for c in columns}


def predict_on_ray(
    model: str,
    paths: list[str],
    *,
    address: str | None = None,
    workers: int = 2,
    batch_size: int = 32,
    tta: bool = False,
) -> list[dict]:
    """Predict ``paths`` on Ray Data with ``workers`` actors.

    Args:
        model: A model folder or bundled model name (each actor loads it).
        paths: Image paths or URIs.
        address: A running Ray cluster (``ray://host:10001`` or ``auto``); None starts a
            local runtime for this call.

    Returns:
        One row per path, in input order, with the local engine's columns.
    """
    ray = _ray()
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, **({} if address else {"num_cpus": max(workers, 1)}))  # fmt: skip
        started = True
    try:
        import logging

        logging.getLogger("ray.data").setLevel(logging.ERROR)  # no per-run chatter on stderr
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(paths)])
        out = ds.map_batches(
            _Predict,
            fn_constructor_kwargs={"model": str(model), "tta": tta},
            batch_size=batch_size,
            concurrency=workers,
            num_cpus=1,
            # Restartable actors whose constructor arguments sit in the object store make Ray
            # log an error-level core_worker line on every normal run; a failed actor fails
            # the batch job instead (its error is reported), as the local engine would.
            max_restarts=0,
        )
        rows = [{k: _plain(v) for k, v in row.items()} for row in out.iter_rows()]
    finally:
        if started:
            ray.shutdown()
    rows.sort(key=lambda r: r.pop("index"))
    return rows


def _plain(v: Any) -> Any:
    """numpy scalars and NaN-as-missing back to Python values for the CSV writer."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and np.isnan(v):
        return None
    return v
