"""Decode and resize every image once.

:func:`prepare_samples` turns a list of samples into one ``uint8 (N, C, S, S)`` array with
:meth:`Preprocess.prepare` - the same function that serving uses - decoding in parallel
processes. Training epochs then index that array and never decode a JPEG again.

By default the array lives in memory only. With ``cache_dir`` (``--cache-dir``) it is also
stored as ``.npy`` keyed by the file list (paths, sizes, modification times) and the
preprocessing geometry, and later runs memory-map it. That copy holds patient images, so it
is written only when the user asks for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from medlens.errors import DataError

if TYPE_CHECKING:
    from medlens.data.datasets import Sample


import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlens.data.preprocess import Geometry, Preprocess
from medlens.machine import usable_cores

__all__ = ["PreparedImages", "prepare_samples", "is_colour"]


@dataclass
class PreparedImages:
    """Prepared pixels of the samples that decoded, and the failures of those that did not."""

    pixels: np.ndarray  # uint8 (N_ok, C, S, S)
    keep: list[int]  # indices into the input list of the decoded samples
    errors: list[tuple[str, str]]  # (source, reason) of the samples that failed


def refuse_unreadable(errors: list[tuple[str, str]], skip: bool) -> None:
    """Stop on unreadable images (one line each) unless ``skip`` (``--skip-bad-images``).

    Raises:
        DataError: ``errors`` is not empty and ``skip`` is false.
    """
    if errors and not skip:
        lines = "\n".join(f"  {src}: {why}" for src, why in errors)
        raise DataError(
            f"{len(errors)} unreadable image(s); fix or remove them, or pass "
            f"--skip-bad-images:\n{lines}"
        )


def _prepare_one(args):
    sample, pre = args
    try:
        # target_size: the decode that serving uses (reduced-scale JPEG decoding), so a model
        # sees the same pixels in training and in the web app.
        return pre.prepare(sample.load(target_size=pre.image_size)), None
    except Exception as e:  # noqa: BLE001 - every decode failure is reported by file
        return None, f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)


def _cache_key(samples, pre: Geometry | Preprocess) -> str:
    h = hashlib.sha256(pre.geometry_key().encode())
    for s in samples:
        path = s.source.split("#", 1)[0].removeprefix("npz:")
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{s.source}|{stamp}\n".encode())
    return h.hexdigest()[:24]


def prepare_samples(
    samples: Sequence[Sample],
    pre: Geometry | Preprocess,
    *,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "decode",
) -> PreparedImages:
    """Decode and prepare ``samples`` (objects with ``.source`` and ``.load()``).

    Args:
        samples: sequence of :class:`medlens.data.Sample`.
        pre: the preprocessing spec (or its :class:`Geometry` alone) whose ``prepare`` is
            applied.
        workers: decoding processes (default: all cores).
        cache_dir: where to keep a reusable copy; ``None`` keeps everything in memory.
        progress: show a progress bar.

    Returns:
        :class:`PreparedImages`; failures are reported, not raised.
    """
    samples = list(samples)
    shape = (pre.channels, pre.image_size, pre.image_size)
    if cache_dir is not None:
        key = _cache_key(samples, pre)
        npy = Path(cache_dir) / f"{key}.npy"
        meta = Path(cache_dir) / f"{key}.json"
        if npy.exists() and meta.exists():
            info = json.loads(meta.read_text())
            # Copy-on-write: writable for torch.from_numpy/as_tensor (a read-only map makes
            # torch warn on every batch), while writes never reach the cache file.
            return PreparedImages(
                np.load(npy, mmap_mode="c"), info["keep"], [tuple(e) for e in info["errors"]]
            )
    out = np.empty((len(samples),) + shape, dtype=np.uint8)
    keep: list[int] = []
    errors: list[tuple[str, str]] = []
    workers = workers or usable_cores()
    jobs = [(s, pre) for s in samples]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(samples), desc=desc, unit="img", leave=False)

    def consume(results):
        for i, (arr, err) in enumerate(results):
            if err is None:
                out[len(keep)] = arr
                keep.append(i)
            else:
                errors.append((samples[i].source, err))
            if bar is not None:
                bar.update(1)

    if workers > 1 and len(samples) >= 64:
        with ProcessPoolExecutor(workers) as pool:
            consume(pool.map(_prepare_one, jobs, chunksize=32))
    else:
        consume(map(_prepare_one, jobs))
    if bar is not None:
        bar.close()
    pixels = out[: len(keep)]
    if cache_dir is not None:
        import io

        from medlens.fileio import atomic_write_bytes, atomic_write_text

        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, pixels)
        atomic_write_bytes(npy, buf.getvalue())
        atomic_write_text(meta, json.dumps({"keep": keep, "errors": errors}))
    return PreparedImages(pixels, keep, errors)


def is_colour(pixels: np.ndarray, tolerance: float = 3.0) -> bool:
    """True when an ``(H, W, 3)`` image is really in colour (not grey stored as RGB)."""
    if pixels.ndim == 2:
        return False
    p = pixels.astype(np.int16)
    return (
        float(np.abs(p[..., 0] - p[..., 1]).mean() + np.abs(p[..., 1] - p[..., 2]).mean())
        > tolerance
    )
