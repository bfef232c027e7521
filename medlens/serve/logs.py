"""Keep upload contents out of the server's logs: third-party DICOM libraries are silenced.

The server logs one line per request and names an upload by its sha256 only. pydicom and
highdicom log about the dataset they handle: highdicom an INFO line ``copy Patient-related
attributes from dataset "<SOPInstanceUID>"`` for every structured report, pydicom an ERROR
traceback for every frame a decoder rejects and a WARNING quoting every malformed value
(a birth date, a name); both also raise Python warnings quoting values (highdicom's person-name
check quotes the name). In a server these are about patients' files, so none of them is let
through: their loggers are set above CRITICAL and their warnings are ignored.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["THIRD_PARTY", "quiet_third_party"]

THIRD_PARTY = ("pydicom", "highdicom")
_MODULES = r"(pydicom|highdicom)(\.|$)"
_SILENT = logging.CRITICAL + 10


def _filter_first() -> bool:
    """Whether our ignore filter is the first one: a filter before it (a catch-all
    ``always`` or ``error``) would decide first."""
    first = warnings.filters[0] if warnings.filters else None
    return (
        first is not None
        and first[0] == "ignore"
        and (getattr(first[3], "pattern", None) == _MODULES)
    )


def quiet_third_party() -> None:
    """Silence the loggers and warnings of :data:`THIRD_PARTY` in this process (idempotent).

    Called when the app is built and again before each upload is decoded: something else
    (a test framework, ``warnings.catch_warnings``, ``warnings.simplefilter``) may have reset
    the warning filters or put one before ours since.
    """
    import pydicom  # noqa: F401 - its first import sets its logger to WARNING: before ours

    for name in THIRD_PARTY:
        logger = logging.getLogger(name)
        if logger.level != _SILENT:
            logger.setLevel(_SILENT)
    if not _filter_first():
        warnings.filterwarnings("ignore", module=_MODULES)  # moves an existing copy first
