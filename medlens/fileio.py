"""Atomic file writing: a file is either the old one or the complete new one.

Every file MedLens writes (model weights, ``model.json``, reports, CSVs, caches) goes through
:func:`atomic_write_bytes`, so a crash or a full disk never leaves a truncated file behind.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from medlens.errors import UsageError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either the old file or the complete new one.

    A crash mid-write leaves a stray temporary file, never a truncated ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode open() would (0666 less the umask),
        # or a bundled model folder would be unreadable to other users once installed.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None and e.errno is not None:  # a failed write or fsync: name the file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch  # here, so that `medlens --help` never waits for torch to import

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_yaml(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""Text cells starting with one of these are read as formulas by spreadsheets (OWASP, CSV
injection): :func:`csv_cell` prefixes them with an apostrophe."""


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell: None is empty; text that a spreadsheet would run as a formula
    (a file named ``=HYPERLINK(...).png``) starts with ``'``; numbers stay numbers."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_text(cell: str) -> str:
    """The text :func:`csv_cell` wrote (its apostrophe before a formula character removed)."""
    if cell.startswith("'") and cell[1:].startswith(FORMULA_START):
        return cell[1:]
    return cell


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    """A CSV file (atomically): one row per dict, ``columns`` in order, every text cell
    neutralised by :func:`csv_cell`. A row whose text holds a line break (CR or LF, e.g. in a
    file name) is written with every field quoted, so it reads back as one row."""
    buf = io.StringIO()
    plain = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    quoted = csv.DictWriter(
        buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n", quoting=csv.QUOTE_ALL
    )
    plain.writeheader()
    for r in rows:
        cells = {k: csv_cell(r.get(k)) for k in columns}
        broken = any(isinstance(v, str) and ("\r" in v or "\n" in v) for v in cells.values())
        (quoted if broken else plain).writerow(cells)
    atomic_write_text(path, buf.getvalue())


def replace_folder(tmp: str | Path, dest: str | Path) -> None:
    """Move the complete folder ``tmp`` to ``dest`` (an existing ``dest`` is replaced only once
    the new one is in place, so an interruption leaves one of the two whole)."""
    import shutil
    import uuid

    tmp, dest = Path(tmp), Path(dest)
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old)
    else:
        tmp.rename(dest)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content; ``what`` (e.g. ``"--config"``) names the option in errors.

    Raises:
        UsageError: the file is missing, unreadable or not valid YAML.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot be read ({e.strerror})") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UsageError(f"{what} {path}: not valid YAML{line}; fix the file") from None


def read_uri(path: str) -> bytes:
    """A file's bytes, from the local disk or any filesystem pyarrow knows (``s3://`` ...)."""
    if "://" not in path:
        with open(path, "rb") as f:
            return f.read()
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(path)
    with filesystem.open_input_file(inner) as f:
        return f.read()


def read_path_manifest(path: str) -> list[str]:
    """The ``path`` column of a CSV manifest (local or remote); relative entries are relative
    to the manifest's folder, as in a labelled manifest."""
    import posixpath

    import pyarrow.csv as pcsv

    from medlens.errors import DataError

    table = pcsv.read_csv(io.BytesIO(read_uri(path)))
    if "path" not in table.column_names:
        raise DataError(
            f"{path}: a manifest needs a 'path' column (it has: {', '.join(table.column_names)})"
        )
    remote = "://" in path
    base, join = (posixpath.dirname(path), posixpath.join) if remote else (
        os.path.dirname(path), os.path.join)  # fmt: skip
    entries = [csv_text(str(p)) for p in table.column("path").to_pylist()]
    return [p if "://" in p or os.path.isabs(p) else join(base, p) for p in entries]
