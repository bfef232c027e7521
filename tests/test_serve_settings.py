"""``medlens serve``'s settings: declared and validated in one place, and handed to worker
processes in a private file, never through their environment (the real worker processes
are checked in tests/test_prometheus.py, which starts ``--workers 2`` once for both)."""

from __future__ import annotations

import dataclasses
import stat

import pytest

from medlens.errors import UsageError
from medlens.serve.security import SecurityPolicy
from medlens.serve.settings import SETTINGS_FILE_ENV, ServeSettings

KEY = "k3y-" + "x" * 28


def test_settings_round_trip_through_their_private_file(monkeypatch):
    s = ServeSettings(model_dirs=("a", "b"), security=SecurityPolicy(api_key=KEY,
                      allowed_hosts=("localhost",)), record_url="sqlite:///r.db")  # fmt: skip
    path = s.write_private()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        monkeypatch.setenv(SETTINGS_FILE_ENV, str(path))
        assert ServeSettings.from_env() == s
    finally:
        path.unlink()
        path.parent.rmdir()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"keep_days": 0}, "--keep-days must be > 0"),
        ({"max_upload_bytes": 0}, "upload limit"),
        ({"log_level": "loud"}, "log level must be one of"),
        ({"threads": 0}, "threads per process"),
        ({"feedback_images": "/tmp/x"}, "--keep-feedback-images needs a prediction record"),
    ],
)
def test_bad_settings_are_refused_with_what_to_change(change, message):
    with pytest.raises(UsageError, match=message):
        dataclasses.replace(ServeSettings(), **change)
