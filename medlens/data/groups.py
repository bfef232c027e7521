"""Subgroup attributes of evaluated images, read from a CSV (``medlens evaluate --groups``).

The file has a ``path`` column (an image's path relative to the evaluated folder, or its file
name when names are unique) and one column per attribute (sex, age band, site, scanner...).
An empty cell means the value is unknown for that image.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from medlens.errors import DataError

__all__ = ["read_groups"]


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    if not path.is_file():
        raise DataError(f"{path}: no such groups file (a CSV with a 'path' column)")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = [c.strip() for c in reader.fieldnames or []]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable UTF-8 CSV file ({e})") from None
    if "path" not in columns:
        raise DataError(
            f"{path}: no 'path' column (columns: {', '.join(columns) or 'none'}); the first "
            "row must name the columns, e.g. path,sex,age_band"
        )
    attrs = [c for c in columns if c != "path"]
    if not attrs:
        raise DataError(f"{path}: no attribute column beside 'path' (e.g. sex, age_band, site)")
    if len(set(columns)) != len(columns):
        raise DataError(f"{path}: a column name appears twice ({', '.join(columns)})")
    rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in rows]
    return attrs, rows


def _keys(sources: Sequence[str], root: Path) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Each image's path relative to ``root`` (posix) and, per file name, its images."""
    rel: dict[str, int] = {}
    names: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        rel[Path(os.path.relpath(s, root)).as_posix()] = i
        names.setdefault(Path(s).name, []).append(i)
    return rel, names


def read_groups(
    path: str | os.PathLike, sources: Sequence[str], root: str | os.PathLike
) -> tuple[dict[str, list[str | None]], list[str]]:
    """Attribute values of each evaluated image.

    Args:
        path: The groups CSV.
        sources: The evaluated images' paths, in evaluation order.
        root: The evaluated folder (paths in the CSV are relative to it).

    Returns:
        ``({attribute: [value of sources[i] or None]}, notes)``; notes count rows that name no
        evaluated image and images the file does not list.

    Raises:
        DataError: no such file, no ``path`` or attribute column, a path listed twice, a
            file name shared by several images, or no row naming any evaluated image.
    """
    path = Path(path)
    attrs, rows = _rows(path)
    rel, names = _keys(sources, Path(root))
    values: dict[str, list[str | None]] = {a: [None] * len(sources) for a in attrs}
    seen: dict[int, int] = {}
    unmatched: list[str] = []
    for line, row in enumerate(rows, start=2):
        key = (row.get("path") or "").replace("\\", "/").removeprefix("./")
        i = rel.get(key)
        if i is None and "/" not in key and len(names.get(key, [])) > 1:
            raise DataError(
                f"{path}, line {line}: {key!r} names {len(names[key])} images; give its path "
                "relative to --data instead"
            )
        if i is None and len(names.get(key, [])) == 1:
            i = names[key][0]
        if i is None:
            unmatched.append(key)
            continue
        if i in seen:
            raise DataError(
                f"{path}, line {line}: {key!r} is listed twice (first on line {seen[i]})"
            )
        seen[i] = line
        for a in attrs:
            values[a][i] = row.get(a) or None
    if not seen:
        raise DataError(
            f"{path}: none of its {len(rows)} rows names an evaluated image (first: "
            f"{unmatched[0] if unmatched else 'no rows'!r}); paths are relative to --data"
        )
    notes = []
    if unmatched:
        notes.append(
            f"{len(unmatched)} row(s) of {path.name} name no evaluated image (first: "
            f"{unmatched[0]!r})"
        )
    if len(seen) < len(sources):
        notes.append(f"{len(sources) - len(seen)} evaluated image(s) are not in {path.name}")
    return values, notes
