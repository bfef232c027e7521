"""Patient ids and patient-grouped, stratified splits.

Several images of one patient never straddle train and validation/test (that inflates
validation figures): every split made here is grouped by patient (scikit-learn's
``StratifiedGroupKFold``) and stratified by class.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from medlens.errors import DataError

# A split works on any items with ``label`` and ``patient`` attributes (datasets.Sample).
Sample = Any

SPLITS = ("train", "val", "test")

#: Default patient-id regex, applied to the file name (not the folder). It reads
#:
#: * Kermany pneumonia images: ``person1234_bacteria_5678.jpeg`` -> ``person1234``;
#: * Kermany normal images, two series numbered independently, so the series prefix is kept:
#:   ``IM-0115-0001.jpeg`` -> ``IM-0115``, ``NORMAL2-IM-0115-0001.jpeg`` -> ``NORMAL2-IM-0115``;
#: * NIH ChestX-ray8 names: ``00001280_004.png`` -> ``00001280`` (patient 1280, image 4).
#:
#: Other names do not match and each such image is its own group.
KERMANY_PATIENT_REGEX = r"^(?P<patient>person\d+(?=_)|(?:NORMAL2-)?IM-\d+(?=-)|\d{8}(?=_\d{3}\.))"


def patient_id(path: str, regex: str | None = None) -> str | None:
    """Patient id read from a file name.

    Args:
        path: Image path; only its base name is matched.
        regex: Regex searched in the base name; the named group ``patient``, else the first
            group, else the whole match is the id. Defaults to :data:`KERMANY_PATIENT_REGEX`.

    Returns:
        The id, or None when the name does not match.

    Raises:
        DataError: ``regex`` does not compile.
    """
    m = compile_patient_regex(regex).search(os.path.basename(path))
    if m is None:
        return None
    if "patient" in m.re.groupindex:
        return m.group("patient")
    return m.group(1) if m.re.groups else m.group(0)


def compile_patient_regex(regex: str | None) -> re.Pattern:
    try:
        return re.compile(KERMANY_PATIENT_REGEX if regex is None else regex)
    except re.error as e:
        raise DataError(
            f"--patient-regex {regex!r} is not a valid regular expression ({e}); fix it"
        ) from None


def split_grouped(
    samples: Sequence[Sample], fraction: float, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Hold out about ``fraction`` of the samples, stratified by class, grouped by patient.

    Samples with a patient id go through scikit-learn's ``StratifiedGroupKFold`` with
    ``round(1 / fraction)`` shuffled folds, and the fold whose size is closest to the target
    is held out, so no patient is on both sides. Samples without an id are each their own
    group; for them that reduces to a per-class random draw, done directly because
    ``StratifiedGroupKFold`` is slow with thousands of one-image groups. Order is preserved.

    Args:
        samples: Samples to split.
        fraction: Share to hold out, 0 < fraction < 1.
        seed: Shuffling seed; the same seed gives the same split.

    Returns:
        ``(rest, held_out)``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    samples = list(samples)
    labels = np.array([s.label for s in samples], dtype=int)
    known = np.array([i for i, s in enumerate(samples) if s.patient is not None], dtype=int)
    held = set(
        _held_groups(known, labels[known], [samples[i].patient for i in known], fraction, seed)
    )
    rng = np.random.default_rng(seed)
    unknown = np.array([i for i, s in enumerate(samples) if s.patient is None], dtype=int)
    for c in np.unique(labels[unknown]):
        members = rng.permutation(unknown[labels[unknown] == c])
        held.update(members[: round(fraction * len(members))].tolist())
    return (
        [s for i, s in enumerate(samples) if i not in held],
        [s for i, s in enumerate(samples) if i in held],
    )


def _held_groups(
    index: np.ndarray, labels: np.ndarray, groups: list[str], fraction: float, seed: int
) -> list[int]:
    """Entries of ``index`` in the StratifiedGroupKFold fold closest to ``fraction``."""
    from sklearn.model_selection import StratifiedGroupKFold  # slow import; only splits need it

    # StratifiedGroupKFold needs n_splits <= number of groups and <= the largest class.
    n_splits = min(
        max(2, round(1 / fraction)), len(set(groups)), int(np.bincount(labels).max(initial=0))
    )
    if n_splits < 2:
        return []  # one patient cannot be split; holding nothing out beats leaking
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits"
        warnings.simplefilter("ignore", UserWarning)
        folds = [test for _, test in cv.split(np.zeros(len(labels)), labels, groups)]
    return index[min(folds, key=lambda f: abs(len(f) - fraction * len(labels)))].tolist()


def _pct(f: float) -> str:
    return f"{100 * f:.0f}%"


def _carve(samples, fraction, seed, what, source_name, notes) -> tuple[list[Sample], list[Sample]]:
    """split_grouped plus a note saying what was carved and how."""
    rest, held = split_grouped(samples, fraction, seed)
    n_patients = len({s.patient for s in held if s.patient is not None})
    grouping = "grouped by patient" if n_patients else "not grouped (no patient ids)"
    notes.append(
        f"{what} carved from {source_name}: {len(held)} images (~{_pct(fraction)} of {len(samples)}; "
        f"{n_patients} patients + {sum(s.patient is None for s in held)} images without id), "
        f"stratified by class, {grouping}, seed {seed}"
    )
    return rest, held


def split_all(
    samples: Sequence[Sample],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    notes: list[str],
) -> dict[str, list[Sample]]:
    """train/val/test from one pool: test first, then val from the rest.

    Both fractions are of the whole pool, so the defaults give about 70/15/15.
    """
    splits = {"train": list(samples)}
    if test_fraction > 0:
        splits["train"], splits["test"] = _carve(
            splits["train"], test_fraction, seed, "test", "all images", notes
        )
    if val_fraction > 0:
        splits["train"], splits["val"] = _carve(
            splits["train"], val_fraction / (1 - test_fraction), seed, "val", "the rest", notes
        )
    return {k: splits[k] for k in SPLITS if k in splits}


def use_given_splits(
    splits: dict[str, list[Sample]],
    val_fraction: float,
    seed: int,
    min_val: int,
    notes: list[str],
    where: str | os.PathLike,
) -> dict[str, list[Sample]]:
    """Keep given splits; carve val from train when it is missing or smaller than min_val."""
    if "train" not in splits:
        raise DataError(
            f"no train split in {where}; add a train folder (or split=train rows) to train a model"
        )
    splits = {k: list(v) for k, v in splits.items()}
    notes.append(
        "given splits kept: " + ", ".join(f"{k} ({len(v)} images)" for k, v in splits.items())
    )
    val = splits.pop("val", [])
    if val and len(val) >= min_val:
        splits["val"] = val
    else:
        if val:
            notes.append(
                f"given val had only {len(val)} images (< min_val={min_val}): merged into train"
            )
            splits["train"] += val
        if val_fraction > 0:
            splits["train"], splits["val"] = _carve(
                splits["train"], val_fraction, seed, "val", "train", notes
            )
    note_overlap(splits, notes)
    return {k: splits[k] for k in SPLITS if k in splits}


def note_overlap(splits: dict[str, list[Sample]], notes: list[str]) -> None:
    # Given splits may share patients; we cannot fix that, but the reader must know.
    seen: dict[str, set[str]] = {}
    for name, samples in splits.items():
        for s in samples:
            if s.patient is not None:
                seen.setdefault(s.patient, set()).add(name)
    shared = sorted(p for p, names in seen.items() if len(names) > 1)
    if shared:
        notes.append(
            f"WARNING: {len(shared)} patients appear in more than one given split "
            f"(e.g. {', '.join(shared[:5])}); validation/test figures may be optimistic"
        )


def fold_split(
    samples: Sequence[Sample], folds: int, fold: int, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Fold ``fold`` of a ``folds``-fold split, stratified by class and grouped by patient.

    Samples with a patient id go through scikit-learn's ``StratifiedGroupKFold``; those without
    (each its own group) through ``StratifiedKFold``, which gives the same folds for one-image
    groups, fast. The same ``seed`` gives the same folds, so the K runs of a cross-validation
    partition the samples.

    Returns:
        ``(train, validation)``, order preserved.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if not 0 <= fold < folds:
        raise DataError(f"--fold must be in 0..{folds - 1}, got {fold}")
    samples = list(samples)
    labels = np.array([s.label for s in samples], dtype=int)
    held: set[int] = set()
    known = np.array([i for i, s in enumerate(samples) if s.patient is not None], dtype=int)
    unknown = np.array([i for i, s in enumerate(samples) if s.patient is None], dtype=int)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits"
        warnings.simplefilter("ignore", UserWarning)
        for index, grouped in ((known, True), (unknown, False)):
            if len(index) < folds:
                continue
            cv = (StratifiedGroupKFold if grouped else StratifiedKFold)(
                n_splits=folds, shuffle=True, random_state=seed
            )
            groups = [samples[i].patient for i in index] if grouped else None
            parts = list(cv.split(np.zeros(len(index)), labels[index], groups))
            held.update(index[parts[fold][1]].tolist())
    return (
        [s for i, s in enumerate(samples) if i not in held],
        [s for i, s in enumerate(samples) if i in held],
    )
