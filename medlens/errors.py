"""The one exception family of MedLens.

Every error a user can cause (a bad path, an unreadable image, an unknown option value, a
model folder that is incomplete) is a :class:`MedLensError` whose message names the file or
setting and says what to do; ``medlens`` prints it on one line and exits 2. Anything else that
escapes is a bug: ``medlens`` exits 1 with a short hint (the traceback behind ``--debug``).

The subclasses also derive from the built-in exception the condition used to raise
(``ValueError`` mostly), so callers that caught those keep working.
"""

from __future__ import annotations

__all__ = [
    "MedLensError",
    "UsageError",
    "ConfigError",
    "DataError",
    "ImageReadError",
    "ModelLoadError",
    "TrainError",
    "ExportError",
    "InstallError",
    "UploadError",
]


class MedLensError(Exception):
    """Base of every error MedLens reports to a user; the message says what to do."""


class UsageError(MedLensError, ValueError):
    """A command-line option or argument that cannot be used as given."""


class DataError(MedLensError, ValueError):
    """A dataset that cannot be used as given; the message says what to fix."""


class ImageReadError(MedLensError, ValueError):
    """An image that cannot be decoded; the message names the file and the reason."""


class ModelLoadError(MedLensError, ValueError):
    """A model folder or name that cannot be used; the message says what to do."""


class ModelOutputError(MedLensError, RuntimeError):
    """A model answered with non-finite numbers (a damaged or unsuitable model file)."""


class TrainError(MedLensError, ValueError):
    """A training request that cannot go ahead; the message says what to do."""


class ConfigError(UsageError, TrainError):
    """A training setting (flag, recipe or ``config.yaml``) that is unknown or out of range."""


class ExportError(MedLensError, RuntimeError):
    """The ONNX graph does not reproduce the torch network; the message gives the error."""


class InstallError(MedLensError, RuntimeError):
    """A package or packaged file MedLens needs is missing; reinstall (`make install`)."""


class UploadError(MedLensError):
    """A request whose upload cannot be used: HTTP ``status`` and a ``detail`` for the user."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail
