"""Experiment tracking with MLflow, only when asked for.

``medlens train|tune|evaluate|calibrate --tracking-uri URI`` (or ``MLFLOW_TRACKING_URI`` in the
environment) logs each command as an MLflow run of the experiment ``--experiment`` (default
``medlens``): its parameters (nested settings flattened with dots), per-epoch metrics (``step``
= the epoch), final metrics with their 95% intervals (``auc``, ``auc_ci_low``,
``auc_ci_high``...) and artifacts (``config.yaml``, ``metrics.json``, ``report.html``, the model
card). ``file:./mlruns`` (a folder, no server) works; ``mlflow ui --backend-store-uri
file:./mlruns`` shows it. Without a URI nothing is tracked and MLflow is not even imported:
:data:`NO_TRACKING` does nothing.

A tracking store that cannot be used (a bad URI, a server that does not answer) is a
:class:`~medlens.errors.UsageError` raised by :func:`start_tracking`, before any work starts.
Logging runs through ``MlflowClient`` with explicit run ids (no global "active run"), so a
command's child runs (``--folds K``: one per fold; ``tune``: one per trial) are plain nested
runs (tag ``mlflow.parentRunId``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from medlens.errors import UsageError

__all__ = [
    "NO_TRACKING",
    "Tracker",
    "flatten",
    "start_tracking",
    "summary_metrics",
    "tracking_uri",
]

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "medlens"
MAX_PARAM_VALUE = 6000  # MLflow's limit on a parameter value's length
MAX_KEY = 250  # MLflow's limit on a parameter or metric name's length
_BATCH = 100  # parameters per log_batch request (MLflow's limit)
_KEY_CHARS = re.compile(r"[^\w\-. /]")  # MLflow: alphanumerics, _ - . space /


def tracking_uri(flag: str | None) -> str | None:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else None (no tracking)."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or None


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested settings -> ``{"augment.zoom": 0.1, ...}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def summary_metrics(m: Mapping, prefix: str = "") -> dict[str, float]:
    """The numbers of a ``metrics.json`` (accuracy, auc, ece, threshold, n...) and the bounds of
    their 95% intervals (``auc_ci_low``, ``auc_ci_high``), named ``prefix + name``."""
    out = {f"{prefix}{k}": v for k, v in m.items() if _number(v)}
    for k, bounds in (m.get("ci") or {}).items():
        if isinstance(bounds, (list, tuple)) and len(bounds) == 2:
            for side, v in zip(("low", "high"), bounds):
                if _number(v):
                    out[f"{prefix}{k}_ci_{side}"] = v
    ood = m.get("ood")
    if isinstance(ood, Mapping) and _number(ood.get("share")):
        out[f"{prefix}ood_share"] = ood["share"]
    return {k: float(v) for k, v in out.items()}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _key(name: str) -> str:
    return _KEY_CHARS.sub("_", str(name))[:MAX_KEY]


def _param_value(v: Any) -> str:
    text = "" if v is None else str(v)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


class Tracker:
    """One MLflow run; the no-op :data:`NO_TRACKING` has the same methods.

    Args:
        client: an ``mlflow.tracking.MlflowClient``.
        run_id: the run logged to.
        experiment_id: its experiment (child runs go there too).
    """

    def __init__(self, client: Any = None, run_id: str | None = None, experiment_id: str = ""):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self._params: set[str] = set()

    @property
    def active(self) -> bool:
        """Whether anything is logged."""
        return self.run_id is not None

    def log_params(self, params: Mapping) -> None:
        """Parameters, flattened (``augment.zoom``); one already logged is not logged again
        (MLflow refuses to change a parameter's value)."""
        if not self.active:
            return
        from mlflow.entities import Param

        flat = {_key(k): _param_value(v) for k, v in flatten(params).items()}
        new = [Param(k, v) for k, v in flat.items() if k not in self._params]
        for i in range(0, len(new), _BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + _BATCH])
        self._params |= {p.key for p in new}

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Finite numbers only (None, NaN and text are left out)."""
        if not self.active:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(_key(k), float(v), now, int(step or 0)) for k, v in metrics.items() if _number(v)
        ]
        for i in range(0, len(batch), _BATCH * 10):
            self.client.log_batch(self.run_id, metrics=batch[i : i + _BATCH * 10])

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """One ``training_metrics.csv`` row: its numbers at ``step`` = the epoch."""
        values = {k: v for k, v in row.items() if k not in ("epoch", "stage")}
        if "seconds" in values:
            values["epoch_seconds"] = values.pop("seconds")
        self.log_metrics(values, step=int(row["epoch"]))

    def log_artifacts(self, folder: str | os.PathLike, names: list[str]) -> None:
        """The files ``names`` (relative to ``folder``; missing ones skipped), each under its
        relative folder."""
        if not self.active:
            return
        for name in names:
            path = Path(folder) / name
            if path.is_file():
                parent = Path(name).parent.as_posix()
                self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, _key(k), _param_value(v))

    @contextlib.contextmanager
    def child(self, name: str) -> Iterator[Tracker]:
        """A nested run (a fold, a trial); finished FAILED when the block raises."""
        if not self.active:
            yield self
            return
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.run_id}
        )
        with _finishing(self.client, run.info.run_id):
            yield Tracker(self.client, run.info.run_id, self.experiment_id)


NO_TRACKING = Tracker()
"""Tracking not asked for: every method does nothing."""


@contextlib.contextmanager
def _finishing(client: Any, run_id: str) -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


@contextlib.contextmanager
def start_tracking(
    uri: str | None,
    experiment: str | None = None,
    *,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[Tracker]:
    """A run of ``experiment`` in the store ``uri``, ended when the block ends (FINISHED, or
    FAILED/KILLED when it raises); :data:`NO_TRACKING` when ``uri`` is None.

    Raises:
        UsageError: MLflow is not installed, or the store cannot be reached or written (raised
            before the block runs).
    """
    if not uri:
        yield NO_TRACKING
        return
    experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    client, experiment_id, run_id = _open(uri, experiment, run_name, dict(tags or {}))
    log.info("tracking: MLflow run %s of experiment %r in %s", run_id, experiment, uri)
    with _finishing(client, run_id):
        yield Tracker(client, run_id, experiment_id)


def _open(uri: str, experiment: str, run_name: str | None, tags: dict) -> tuple[Any, str, str]:
    """Client, experiment id and a new run's id; every failure is one UsageError."""
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UsageError(
            "--tracking-uri needs MLflow: pip install 'medlens[tracking]' (or unset "
            "MLFLOW_TRACKING_URI)"
        ) from None
    for name in ("mlflow", "alembic", "urllib3.connectionpool"):
        logging.getLogger(name).setLevel(logging.WARNING)  # MLflow's own notices
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses the folder store unless asked; it is the one that needs no server.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        with _fail_fast():
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else client.create_experiment(experiment)
            if found is not None and found.lifecycle_stage == "deleted":
                raise UsageError(
                    f"--experiment {experiment}: deleted in {uri}; restore it or choose another"
                )
            run = client.create_run(exp_id, run_name=run_name, tags=tags)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - MlflowException, OSError, connection errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UsageError(
            f"--tracking-uri {uri}: the MLflow tracking store cannot be used ({first}); check "
            "the URI (file:./mlruns needs no server) or that the server is running"
        ) from None
    return client, exp_id, run.info.run_id


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    """While checking the store: a server that does not answer fails in seconds (MLflow
    otherwise retries for minutes); later logging keeps MLflow's retries."""
    saved = {k: os.environ.get(k) for k in _QUICK}
    os.environ.update({k: v for k, v in _QUICK.items() if saved[k] is None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
