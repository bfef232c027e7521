"""A real PostgreSQL server for the prediction-record tests (never a mock).

Debian's ``postgresql`` (installed by ``make test``) is started on a temporary folder, a free
port and a private socket folder, with a ``medlens`` database; it is stopped and its folder
removed afterwards. PostgreSQL refuses to run as root: as root, the server runs as the
``postgres`` user that the Debian package creates. Outside CI a missing PostgreSQL skips the
tests that need it, saying why; in CI it is an error.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def pg_bin() -> Path | None:
    """The folder of initdb/pg_ctl (Debian: /usr/lib/postgresql/<version>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], **kw) -> None:
    subprocess.run(_as_owner(cmd), check=True, capture_output=True, timeout=120, **kw)


def start_postgres() -> tuple[str, callable]:
    """Start a server in a new temporary folder; ``(SQLAlchemy URL, stop)``; ``stop`` also
    removes the folder (the database and its log)."""
    import tempfile

    bindir = pg_bin()
    # Directly in the temporary directory (pytest's own folders are private to root, and
    # the server's user must reach its data folder).
    root = Path(tempfile.mkdtemp(prefix="medlens-postgres-"))
    data, sock = root / "pgdata", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        for p in (root, sock):
            shutil.chown(p, "postgres")
    _run([str(bindir / "initdb"), "-D", str(data), "-U", "medlens", "--auth=trust", "-E", "UTF8"])
    port = _free_port()
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    _run([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "pg.log"),
          "-w", "-t", "60", "start"])  # fmt: skip
    _run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "medlens",
          "medlens"])  # fmt: skip

    def stop() -> None:
        subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                                  "stop"]), capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)

    return f"postgresql+psycopg://medlens@127.0.0.1:{port}/medlens", stop


def pg_dump(url: str) -> str:
    """The whole database as SQL text (what a grep for private data reads)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    out = subprocess.run(
        _as_owner([str(pg_bin() / "pg_dump"), "-h", u.host, "-p", str(u.port), "-U", u.username,
                   u.database]), check=True, capture_output=True, text=True, timeout=60)  # fmt: skip
    return out.stdout


@pytest.fixture(scope="session")
def postgres_url():
    """A running PostgreSQL server's URL (a fresh ``medlens`` database)."""
    if pg_bin() is None:
        if os.environ.get("CI"):
            raise RuntimeError("PostgreSQL is missing: `make test` installs Debian's postgresql")
        pytest.skip("PostgreSQL is not installed: `make test` installs Debian's postgresql")
    url, stop = start_postgres()
    deadline = time.time() + 30
    import sqlalchemy as sa

    while True:
        try:
            with sa.create_engine(url).connect():
                break
        except sa.exc.OperationalError:
            if time.time() > deadline:
                raise
            time.sleep(0.3)
    yield url
    stop()
