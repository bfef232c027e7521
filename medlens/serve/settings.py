"""``medlens serve``'s settings, declared and validated in one place (as training's are in
:mod:`medlens.config`), and how worker processes receive them.

``medlens serve --workers N`` starts N processes that build the app from these settings. They
reach the workers through a file readable only by this user, in a private temporary folder
that is removed when the server stops; the workers' environment holds only that file's path,
never the API key or the database password (a child's environment is readable by every
process of the same user, e.g. ``/proc/PID/environ``, and is inherited by anything it runs).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medlens.errors import UsageError
from medlens.serve.security import SecurityPolicy

__all__ = ["ServeSettings", "SETTINGS_FILE_ENV", "LOG_LEVELS"]

SETTINGS_FILE_ENV = "MEDLENS_SERVE_SETTINGS_FILE"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class ServeSettings:
    """What one serving process needs to build the app (:func:`~medlens.serve.app.create_app`).

    Attributes:
        model_dirs: ``--models`` folders.
        max_upload_bytes: uploads above this are refused (413).
        bundled: also serve the bundled models.
        tta: test-time augmentation.
        log_level: uvicorn's and MedLens's log level.
        threads: predictions computed at once per process (None: the cores it may use).
        max_in_flight: prediction requests in a process at once; more get a 503.
        security: host allow-list, API key, rate limit (None: :func:`~medlens.serve.app.serve`
            applies the loopback policy of its host).
        record_url: the prediction record's database URL (None: no record).
        keep_days: the record's retention.
        feedback_images: where images that receive feedback are kept (None: never).
    """

    model_dirs: tuple[str, ...] = ()
    max_upload_bytes: int = 20 * 1024 * 1024
    bundled: bool = True
    tta: bool = False
    log_level: str = "info"
    threads: int | None = None
    max_in_flight: int = 64
    security: SecurityPolicy | None = None
    record_url: str | None = None
    keep_days: float = 365.0
    feedback_images: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_upload_bytes < 1:
            problems.append("the upload limit must be > 0 bytes (--max-upload-mb)")
        if self.log_level not in LOG_LEVELS:
            problems.append(f"log level must be one of {', '.join(LOG_LEVELS)}")
        if self.threads is not None and self.threads < 1:
            problems.append("threads per process must be >= 1")
        if self.max_in_flight < 1:
            problems.append("--max-connections must be >= 1")
        if self.keep_days <= 0:
            problems.append("--keep-days must be > 0 (days of predictions the record keeps)")
        if self.feedback_images is not None and self.record_url is None:
            problems.append(
                "--keep-feedback-images needs a prediction record (leave out --no-record)"
            )
        if problems:
            raise UsageError("; ".join(problems))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeSettings:
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise UsageError(f"serve settings: unknown fields {sorted(unknown)}")
        sec = raw.pop("security", None)
        security = (
            None
            if sec is None
            else SecurityPolicy(**{**sec, "allowed_hosts": tuple(sec["allowed_hosts"])})
        )
        return cls(**{**raw, "model_dirs": tuple(raw.get("model_dirs", ())), "security": security})

    def write_private(self) -> Path:
        """Write the settings to a new file only this user can read (in a new private
        folder); its path. The caller removes the folder when the server stops."""
        folder = Path(tempfile.mkdtemp(prefix="medlens-serve-"))  # mode 0700
        path = folder / "settings.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        return path

    @classmethod
    def from_env(cls) -> ServeSettings:
        """The settings of a worker process: the file :data:`SETTINGS_FILE_ENV` names."""
        return cls.from_json(Path(os.environ[SETTINGS_FILE_ENV]).read_text())
