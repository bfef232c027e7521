"""``medlens serve``'s settings: declared and validated in one place, and handed to worker
processes in a private file, never through their environment."""

from __future__ import annotations

import dataclasses
import os
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


@pytest.mark.slow
def test_worker_processes_get_no_key_in_their_environment(tmp_path, trained_run):
    """``--workers 2 --api-key-file F``: the workers answer with the key enforced, but
    neither the key nor the settings are in any worker's environment; the private settings
    file is gone after the server stops."""
    import httpx2
    import psutil

    from medlens.bench import running_server

    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    with running_server(trained_run, "--workers", "2", "--api-key-file", str(key_file),
                        "--log-level", "warning", env=env) as srv:  # fmt: skip
        procs = [psutil.Process(srv.proc.pid), *psutil.Process(srv.proc.pid).children(True)]
        workers = [p for p in procs if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2
        for p in procs:
            environ = p.environ()
            assert not any(KEY in v for v in environ.values()), p.pid
            assert "MEDLENS_SERVE_CONFIG" not in environ
        url = f"http://127.0.0.1:{srv.port}/api/v1/models"
        with httpx2.Client(timeout=30) as c:
            assert c.get(url).status_code == 401
            assert c.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        settings_files = list((tmp_path / "tmp").glob("medlens-serve-*/settings.json"))
        assert len(settings_files) == 1
    assert not list((tmp_path / "tmp").glob("medlens-serve-*"))
