"""The prediction record: every served prediction and every clinician's feedback, in a database.

SQLAlchemy talks to the database (an embedded SQLite file by default, PostgreSQL when several
workers or machines share one record); Alembic owns the schema (``migrations/``), and
:func:`open_store` brings any older record up to date before it is used.

What a row holds, and what it never holds: a random ``prediction_id``, the time, the model's
name and version, the upload's sha256, the label, the probabilities, the threshold, the OOD
guard's score/ratio/flag and the latency. Never the image, a file name or a DICOM field. The
feedback table holds the clinician's label and an optional free-text comment (which is theirs
to keep free of identifiers: the page says so).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from medlens.errors import UsageError
from medlens.monitoring import DATA_DIR_ENV

__all__ = [
    "PredictionRecord",
    "RecordStore",
    "default_db_url",
    "open_store",
    "DATA_DIR_ENV",
    "MAX_COMMENT",
]

log = logging.getLogger("medlens.monitoring")
MAX_COMMENT = 2000
PRUNE_EVERY_S = 3600.0

metadata = sa.MetaData()
predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("model", sa.String(200), nullable=False, index=True),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("image_sha256", sa.String(64), nullable=False),
    sa.Column("label", sa.String(200), nullable=False),
    sa.Column("probabilities", sa.JSON, nullable=False),
    sa.Column("threshold", sa.Float, nullable=True),
    sa.Column("ood_score", sa.Float, nullable=True),
    sa.Column("ood_ratio", sa.Float, nullable=True),
    sa.Column("ood_flag", sa.Boolean, nullable=True),
    sa.Column("latency_ms", sa.Float, nullable=False),
)
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "prediction_id",
        sa.String(32),
        sa.ForeignKey("predictions.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("label", sa.String(200), nullable=False),
    sa.Column("agrees", sa.Boolean, nullable=False),
    sa.Column("comment", sa.Text, nullable=True),
    sa.Column("image_kept", sa.Boolean, nullable=False, default=False),
)


def default_db_url() -> str:
    """The embedded record: ``$MEDLENS_DATA_DIR/records.db``, by default
    ``~/.local/share/medlens/records.db`` (the folder must be writable)."""
    import os

    base = os.environ.get(DATA_DIR_ENV) or Path.home() / ".local" / "share" / "medlens"
    return f"sqlite:///{Path(base) / 'records.db'}"


@dataclass(frozen=True)
class PredictionRecord:
    """One prediction as the record keeps it."""

    model: str
    model_version: str
    image_sha256: str
    label: str
    probabilities: dict[str, float]
    threshold: float | None
    ood: dict[str, Any]
    latency_ms: float


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _row(r: Any) -> dict:
    """A result row as a dict, its time in UTC (SQLite hands times back without a zone)."""
    out = dict(r._mapping)
    t = out.get("created_at")
    if isinstance(t, datetime) and t.tzinfo is None:
        out["created_at"] = t.replace(tzinfo=UTC)
    return out


def _engine(url: str) -> sa.Engine:
    """An engine; SQLite gets WAL and a busy timeout so that worker processes share it."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise UsageError(
            f"--db {url!r} is not a database URL; use sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST:PORT/DB"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().resolve().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(
                    f"--db: cannot create the record's folder {folder} ({e.strerror}); give a "
                    f"writable place with --db sqlite:///PATH or {DATA_DIR_ENV}"
                ) from None
        engine = sa.create_engine(parsed, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    try:
        return sa.create_engine(parsed, pool_pre_ping=True)
    except ModuleNotFoundError as e:
        raise UsageError(
            f"--db {parsed.render_as_string(hide_password=True)}: its driver is not installed "
            f"({e.name}); pip install 'psycopg[binary]' for PostgreSQL"
        ) from None


def migrate(engine: sa.Engine) -> None:
    """Bring the record's schema up to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin and context chatter
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class RecordStore:
    """The prediction record of one database (thread-safe; one per process)."""

    def __init__(self, engine: sa.Engine, keep_days: float | None = None) -> None:
        self.engine = engine
        self.keep_days = keep_days
        self._last_prune = 0.0

    @property
    def url(self) -> str:
        """The record's URL for messages and logs (password hidden)."""
        return self.engine.url.render_as_string(hide_password=True)

    def add_prediction(self, rec: PredictionRecord) -> str:
        """Store one prediction; its new random ``prediction_id``."""
        pid = secrets.token_hex(16)
        row = {
            "id": pid,
            "created_at": _utcnow(),
            "model": rec.model,
            "model_version": rec.model_version,
            "image_sha256": rec.image_sha256,
            "label": rec.label,
            "probabilities": {k: float(v) for k, v in rec.probabilities.items()},
            "threshold": rec.threshold,
            "ood_score": rec.ood.get("score"),
            "ood_ratio": rec.ood.get("ratio"),
            "ood_flag": rec.ood.get("flag"),
            "latency_ms": float(rec.latency_ms),
        }
        with self.engine.begin() as conn:
            conn.execute(predictions.insert().values(**row))
        self.prune_if_due()
        return pid

    def prediction(self, prediction_id: str) -> dict | None:
        """The stored prediction, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(predictions).where(predictions.c.id == prediction_id)
            ).first()
        return _row(row) if row is not None else None

    def add_feedback(
        self, prediction_id: str, label: str, agrees: bool, comment: str | None, image_kept: bool
    ) -> int:
        """Store a clinician's label for a prediction; the feedback's id."""
        with self.engine.begin() as conn:
            res = conn.execute(
                feedback.insert().values(
                    prediction_id=prediction_id,
                    created_at=_utcnow(),
                    label=label,
                    agrees=agrees,
                    comment=comment,
                    image_kept=image_kept,
                )
            )
            key = res.inserted_primary_key
            assert key is not None  # an INSERT of one row has its key
            return int(key[0])

    def predictions_since(self, model: str | None, since: datetime) -> list[dict]:
        """Predictions (of ``model``, or all) since ``since``, oldest first."""
        q = sa.select(predictions).where(predictions.c.created_at >= since)
        if model is not None:
            q = q.where(predictions.c.model == model)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(q.order_by(predictions.c.created_at))]

    def feedback_rows(self, model: str | None = None, since: datetime | None = None) -> list[dict]:
        """Feedback joined with its prediction (model, version, predicted label), oldest first."""
        q = sa.select(
            feedback,
            predictions.c.model,
            predictions.c.model_version,
            predictions.c.label.label("predicted"),
        ).join(predictions, feedback.c.prediction_id == predictions.c.id)
        if model is not None:
            q = q.where(predictions.c.model == model)
        if since is not None:
            q = q.where(feedback.c.created_at >= since)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(q.order_by(feedback.c.created_at))]

    def models(self) -> list[str]:
        """The model names that have predictions in the record."""
        with self.engine.connect() as conn:
            return sorted(conn.execute(sa.select(predictions.c.model).distinct()).scalars())

    def prune(self, keep_days: float) -> int:
        """Delete predictions (and their feedback) older than ``keep_days``; how many."""
        cutoff = _utcnow() - timedelta(days=keep_days)
        with self.engine.begin() as conn:
            conn.execute(
                feedback.delete().where(
                    feedback.c.prediction_id.in_(
                        sa.select(predictions.c.id).where(predictions.c.created_at < cutoff)
                    )
                )
            )
            res = conn.execute(predictions.delete().where(predictions.c.created_at < cutoff))
        return int(res.rowcount or 0)

    def prune_if_due(self) -> None:
        """Apply the retention setting at most once an hour (and at start)."""
        if self.keep_days is None or time.monotonic() - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = time.monotonic()
        n = self.prune(self.keep_days)
        if n:
            log.info("prediction record: removed %d predictions older than %g days", n,
                     self.keep_days)  # fmt: skip


def open_store(
    url: str | None = None, keep_days: float | None = None, migrate_schema: bool = True
) -> RecordStore:
    """Open (and, unless ``migrate_schema`` is False, create or upgrade) the record at ``url``
    (default :func:`default_db_url`). A worker process of ``medlens serve --workers N`` opens
    it without migrating: the parent process did that once before starting the workers."""
    engine = _engine(url or default_db_url())
    try:
        if migrate_schema:
            migrate(engine)
        else:
            with engine.connect() as conn:
                conn.execute(sa.select(sa.func.count()).select_from(predictions))
    except sa.exc.OperationalError as e:
        where = engine.url.render_as_string(hide_password=True)
        first = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
        raise UsageError(
            f"--db {where}: the prediction record cannot be opened ({first}); check that the "
            "server runs and the folder or database is writable"
        ) from None
    store = RecordStore(engine, keep_days)
    store.prune_if_due()
    return store
