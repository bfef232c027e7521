"""Bring labelled images in whatever layout people have, and split them honestly.

:func:`load_dataset` accepts

* ``<root>/<class>/<image>`` ("class_folders"): split into train/val/test here;
* ``<root>/{train,val,test}/<class>/<image>`` ("split_folders"; "validation" and "valid"
  also name the val split): the given splits are kept, val is carved from train if absent;
* a CSV manifest ``path,label[,patient_id][,split]`` ("csv");
* a MedMNIST ``.npz`` file ("npz"): its official train/val/test splits are kept.

Every split made here is stratified by class and grouped by patient, so several images of
one patient never straddle train and validation/test (that inflates validation figures).
Patient ids come from a ``patient_id`` CSV column or from file names via a regex
(:data:`KERMANY_PATIENT_REGEX` by default). Images whose patient is unknown are their own
group, and the dataset notes say how many there were.

The layout value "files" is reserved for callers that build a :class:`Dataset` from an
explicit list of files; :func:`load_dataset` never returns it.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medlens.data import imaging
from medlens.data.splits import (
    SPLITS,
    compile_patient_regex,
    patient_id,
    split_all,
    use_given_splits,
)
from medlens.errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}


# Folder names (lower-cased) accepted for each split.
_SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "validation": "val",
    "valid": "val",
    "test": "test",
}


_LAYOUT_HINT = "expected <root>/<class>/<image> or <root>/{train,val,test}/<class>/<image>"


# Opened MedMNIST arrays, keyed by npz path then array name: np.load decompresses a whole
# array on every key access, so without this loading N samples would decompress N times.
_NPZ_CACHE: dict[str, dict[str, np.ndarray]] = {}


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Attributes:
        source: File path, or ``"npz:<file>#<split>/<index>"`` for an image in a MedMNIST npz.
        label: Index into :attr:`Dataset.classes`.
        patient: Patient (group) id; None when unknown, then the sample is its own group.
    """

    source: str
    label: int
    patient: str | None = None

    def load(self, target_size: int | None = None) -> np.ndarray:
        """Decode the image.

        Args:
            target_size: the side the caller resizes to next (the model's input): a large
                JPEG is then decoded at reduced scale, as the web app does with uploads
                (see :func:`medlens.data.imaging.read_image`).

        Returns:
            uint8 array, (H, W) or (H, W, 3).

        Raises:
            imaging.ImageReadError: The file cannot be decoded.
        """
        if self.source.startswith("npz:"):
            file, _, where = self.source[4:].rpartition("#")
            split, _, index = where.partition("/")
            # A copy: callers may modify pixels in place, and the cached array is shared.
            return _npz_array(file, f"{split}_images")[int(index)].copy()
        return imaging.read_image(
            self.source, target_size=target_size, hint="remove it or pass --skip-bad-images"
        ).pixels


@dataclass
class Dataset:
    """Labelled samples in named splits, plus notes on how they were formed.

    Attributes:
        root: The folder, CSV or npz the data came from.
        layout: "class_folders", "split_folders", "csv", "npz" or "files".
        classes: Class names; :attr:`Sample.label` indexes this list.
        splits: Split name ("train", "val", "test" or "all") to samples.
        notes: What was done, in words, for reports and logs.
    """

    root: str
    layout: str
    classes: list[str]
    splits: dict[str, list[Sample]]
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class (classes with no images count 0)."""
        out = {}
        for split, samples in self.splits.items():
            c = Counter(s.label for s in samples)
            out[split] = {name: c.get(i, 0) for i, name in enumerate(self.classes)}
        return out

    def summary(self) -> str:
        """Multi-line human-readable summary: layout, classes, counts, patients, notes."""
        counts = self.counts()
        width = max([len(c) for c in self.classes] + [6])
        lines = [
            f"data: {self.root} (layout: {self.layout})",
            f"classes: {', '.join(self.classes)}",
            "  "
            + "split".ljust(6)
            + "".join(f"{c:>{width + 2}}" for c in [*self.classes, "images"])
            + "  patients",
        ]
        for split, samples in self.splits.items():
            known = {s.patient for s in samples if s.patient is not None}
            unknown = sum(s.patient is None for s in samples)
            cells = [*counts[split].values(), len(samples)]
            lines.append(
                "  "
                + split.ljust(6)
                + "".join(f"{n:>{width + 2}}" for n in cells)
                + f"  {len(known)}"
                + (f" (+{unknown} images without id)" if unknown else "")
            )
        lines += ["notes:"] + [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


def list_images(path: str | Path) -> list[str]:
    """Image files under ``path``, recursively, sorted.

    Extensions are matched case-insensitively against :data:`IMAGE_EXTENSIONS`; hidden files
    and folders (``.DS_Store``, ``.ipynb_checkpoints``) and macOS ``__MACOSX`` folders are
    skipped. Symlinked folders are followed, since datasets are often assembled from links, but
    each folder and file once, by its resolved path: a link loop ends, and an image reachable
    through two links is listed once.

    Args:
        path: A folder (or a single file, returned if it is an image).

    Raises:
        DataError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path")
    if path.is_file():
        return [str(path)] if _is_image(path.name) else []
    found, seen_dirs, seen_files = [], {os.path.realpath(path)}, set()
    for folder, dirs, files in os.walk(path, followlinks=True):
        # Links are followed once: a folder (or file) reached again through another link, or a
        # link that loops back to a parent, is not walked (listed) twice.
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(folder, d))
            if not _hidden(d) and real not in seen_dirs:
                seen_dirs.add(real)
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            full = os.path.join(folder, f)
            real = os.path.realpath(full)
            if not _hidden(f) and _is_image(f) and real not in seen_files:
                seen_files.add(real)
                found.append(full)
    return sorted(found)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not _hidden(p.name))


def _check_request(
    mode: str, val_fraction: float, test_fraction: float, patient_regex: str | None
) -> None:
    if mode not in ("train", "all"):
        raise DataError(f"mode must be 'train' or 'all', got {mode!r}")
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise DataError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}"
        )
    compile_patient_regex(patient_regex)  # fail early, before scanning thousands of files


def _patient_note(every: list[Sample], from_column: bool, patient_regex: str | None) -> str:
    where = (
        "the patient_id column"
        if from_column
        else (
            "file names, regex "
            + (repr(patient_regex) if patient_regex else "KERMANY_PATIENT_REGEX (default)")
        )
    )
    unknown = sum(s.patient is None for s in every)
    return (
        f"patient ids from {where}: {len({s.patient for s in every} - {None})} patients; "
        f"{unknown} of {len(every)} images have no id and are their own group"
    )


def load_dataset(
    data: str | Path,
    *,
    mode: str = "train",
    classes: Sequence[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    patient_regex: str | None = None,
    min_val: int = 30,
) -> Dataset:
    """Load labelled images from a folder, a CSV manifest or a MedMNIST npz.

    Args:
        data: ``<root>/<class>/*``, ``<root>/{train,val,test}/<class>/*``, a ``.csv``
            manifest (``path,label[,patient_id][,split]``; paths relative to the CSV's folder
            or absolute) or a MedMNIST ``.npz``.
        mode: "train": splits as described in the module docstring. "all": every image in
            one "all" split, nothing held out (for evaluation); for an npz this is its
            official *test* split only, since its train/val images trained the model.
        classes: Class names a trained model expects; folder names / labels are mapped to
            these indices and unknown ones are an error. Default: sorted folder names or
            CSV labels (numerically if all are integers); "0", "1", ... for an npz.
        val_fraction: Share of images for val (of all images for class folders and
            split-less CSVs; of train when val is carved from a given train split).
        test_fraction: Share of all images for test, for class folders and split-less CSVs.
        seed: Seed for every split made here.
        patient_regex: Regex reading patient ids from file names (see :func:`patient_id`).
        min_val: A given val split smaller than this is merged into train and val is carved.

    Raises:
        DataError: Missing path, unknown layout, no or empty classes, bad manifest or npz.
    """
    _check_request(mode, val_fraction, test_fraction, patient_regex)

    path = Path(data).expanduser().absolute()
    if not path.exists():
        raise DataError(f"data path {path} does not exist; check the path")
    notes: list[str] = []
    if path.is_file() and path.suffix.lower() == ".npz":
        return _load_npz(path, mode, classes, notes)
    if path.is_file() and path.suffix.lower() == ".csv":
        layout, (found, from_column) = "csv", _read_manifest(path, patient_regex)
    elif path.is_dir():
        (layout, found), from_column = _scan_folder(path, patient_regex, notes), False
    else:
        raise DataError(
            f"{path} is neither a folder, a .csv manifest nor a .npz file; {_LAYOUT_HINT}"
        )

    # found: split name ("" = unsplit) -> [(source, class name, patient)]
    names = {c for rows in found.values() for _, c, _ in rows}
    class_list = _resolve_classes(names, classes, path, mode)
    index = {c: i for i, c in enumerate(class_list)}
    given = {k: [Sample(src, index[c], p) for src, c, p in rows] for k, rows in found.items()}
    every = [s for rows in given.values() for s in rows]
    notes.insert(0, f"layout: {layout}; {len(every)} images, {len(class_list)} classes")
    notes.append(_patient_note(every, from_column, patient_regex))

    if mode == "all":
        if set(given) - {""}:
            notes.append(
                "mode=all: merged "
                + ", ".join(k for k in SPLITS if k in given)
                + " into one 'all' split"
            )
        splits = {"all": sorted(every, key=lambda s: s.source)}
    elif "" in given:
        splits = split_all(given[""], val_fraction, test_fraction, seed, notes)
    else:
        splits = use_given_splits(given, val_fraction, seed, min_val, notes, path)
    return Dataset(str(path), layout, class_list, splits, notes)


def _resolve_classes(names: set[str], classes, where: Path, mode: str) -> list[str]:
    if classes is not None:
        classes = [str(c) for c in classes]
        unknown = sorted(names - set(classes))
        if unknown:
            raise DataError(
                f"unknown class names in {where}: {', '.join(unknown)}; expected: {', '.join(classes)}"
            )
        # Evaluating a model on one class's images is legitimate; training on one is not.
        if len(names) >= 2 or mode == "all":
            return classes
    if not names:
        raise DataError(f"no images found under {where}; {_LAYOUT_HINT}")
    if len(names) < 2:
        raise DataError(
            f"only one class ({next(iter(names))}) found in {where}; a classifier needs at least two class folders"
            + _nested_hint(where, next(iter(names)))
        )
    ordered = sorted(names)
    if all(re.fullmatch(r"-?\d+", n) for n in names):  # "10" after "2"
        ordered = sorted(names, key=int)
    return ordered


def _nested_hint(where: Path, name: str) -> str:
    sole = where / name
    if sole.is_dir() and _subdirs(sole):
        return f" (is the data one level down, in {sole}?)"
    return ""


def _scan_folder(
    root: Path, regex, notes
) -> tuple[str, dict[str, list[tuple[str, str, str | None]]]]:
    """Detect class_folders vs split_folders and list (path, class, patient) per split."""
    dirs = _subdirs(root)
    split_dirs = [d for d in dirs if d.name.lower() in _SPLIT_ALIASES]
    if not split_dirs:
        return "class_folders", {"": _scan_classes(root, regex, notes)}
    others = [d.name for d in dirs if d not in split_dirs]
    if others:
        raise DataError(
            f"{root} mixes split folders ({', '.join(d.name for d in split_dirs)}) with other folders "
            f"({', '.join(others)}); move or remove them; {_LAYOUT_HINT}"
        )
    found: dict[str, list] = {}
    for d in split_dirs:
        split = _SPLIT_ALIASES[d.name.lower()]
        if split in found:
            raise DataError(f"{root} has two folders for the {split} split; keep one of them")
        found[split] = _scan_classes(d, regex, notes)
    return "split_folders", found


def _scan_classes(folder: Path, regex, notes) -> list[tuple[str, str, str | None]]:
    class_dirs = _subdirs(folder)
    loose = [
        f for f in folder.iterdir() if f.is_file() and not _hidden(f.name) and _is_image(f.name)
    ]
    if not class_dirs:
        what = (
            f"{len(loose)} images directly in {folder} but no class folders"
            if loose
            else f"no images found under {folder}"
        )
        raise DataError(f"{what}; {_LAYOUT_HINT}")
    if loose:
        notes.append(f"ignored {len(loose)} images directly in {folder} (not in a class folder)")
    rows = []
    for d in class_dirs:
        files = list_images(d)
        if not files:
            raise DataError(f"class folder {d} has no images; remove it or add images")
        rows += [(f, d.name, patient_id(f, regex)) for f in files]
    return rows


def _read_manifest(path: Path, regex) -> tuple[dict[str, list[tuple[str, str, str | None]]], bool]:
    """Rows of a ``path,label[,patient_id][,split]`` CSV grouped by split ("" = none), and
    whether patient ids came from a patient_id column."""
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel writes a BOM
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        for col in ("path", "label"):
            if col not in header:
                raise DataError(
                    f"manifest {path} has no {col!r} column (columns: {', '.join(header) or 'none'}); "
                    "expected header path,label[,patient_id][,split]"
                )
        has_patient, has_split = "patient_id" in header, "split" in header
        found: dict[str, list] = {}
        missing = []
        for row in reader:
            line = reader.line_num
            file, label = (row["path"] or "").strip(), (row["label"] or "").strip()
            if not file and not label:
                continue  # blank line
            if not file or not label:
                raise DataError(
                    f"manifest {path} line {line}: empty {'path' if not file else 'label'}; fill it in"
                )
            split = ""
            if has_split:
                split = _SPLIT_ALIASES.get((row["split"] or "").strip().lower(), "")
                if not split:
                    raise DataError(
                        f"manifest {path} line {line}: split {row['split']!r} is not train, val or test"
                    )
            full = Path(file) if os.path.isabs(file) else path.parent / file
            if not full.is_file():
                missing.append(f"line {line}: {file}")
                continue
            pid = (
                ((row["patient_id"] or "").strip() or None)
                if has_patient
                else patient_id(file, regex)
            )
            found.setdefault(split, []).append((str(full), label, pid))
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(
            f"manifest {path}: {len(missing)} listed files do not exist ({'; '.join(missing[:10])}{more}); "
            f"paths are relative to {path.parent} unless absolute"
        )
    if not found:
        raise DataError(f"manifest {path} lists no images; add rows path,label")
    return found, has_patient


def _npz_array(file: str, key: str) -> np.ndarray:
    arrays = _NPZ_CACHE.setdefault(file, {})
    if key not in arrays:
        with np.load(file, allow_pickle=False) as z:
            arrays[key] = z[key]
    return arrays[key]


def _load_npz(path: Path, mode: str, classes, notes) -> Dataset:
    """MedMNIST npz: official splits; mode="all" uses the test split only."""
    splits = ["test"] if mode == "all" else list(SPLITS)
    with np.load(path, allow_pickle=False) as z:
        present = sorted(z.files)
    needed = [f"{s}_{k}" for s in splits for k in ("images", "labels")]
    absent = [k for k in needed if k not in present]
    if absent:
        raise DataError(
            f"npz {path} lacks arrays {', '.join(absent)} (present: {', '.join(present) or 'none'}); "
            "expected MedMNIST keys train_images, train_labels, val_images, val_labels, test_images, test_labels"
        )
    _NPZ_CACHE.pop(str(path), None)  # the file may have been rewritten since last cached
    labels = {}
    for s in splits:
        images, y = _npz_array(str(path), f"{s}_images"), _npz_array(str(path), f"{s}_labels")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise DataError(
                f"npz {path}: {s}_labels has shape {y.shape}; expected (N,) or (N, 1) class indices"
            )
        if images.ndim not in (3, 4) or len(images) != len(y):
            raise DataError(
                f"npz {path}: {s}_images has shape {images.shape} but {s}_labels has {len(y)} labels; "
                "expected (N, H, W[, 3]) images and N labels"
            )
        labels[s] = y.astype(int)
    top = max(int(y.max(initial=-1)) for y in labels.values())
    if min(int(y.min(initial=0)) for y in labels.values()) < 0:
        raise DataError(f"npz {path}: negative labels; expected class indices 0, 1, ...")
    if classes is None:
        class_list = [str(i) for i in range(top + 1)]
        if len(class_list) < 2:
            raise DataError(
                f"only one class (0) found in {path}; a classifier needs at least two classes"
            )
    else:
        class_list = [str(c) for c in classes]
        if top >= len(class_list):
            raise DataError(
                f"npz {path} has label {top} but only {len(class_list)} classes were given: {', '.join(class_list)}"
            )
    out = {
        ("all" if mode == "all" else s): [
            Sample(f"npz:{path}#{s}/{i}", int(c), None) for i, c in enumerate(y)
        ]
        for s, y in labels.items()
    }
    notes.append(
        "layout: npz (MedMNIST); official splits "
        + ", ".join(f"{s} {len(y)}" for s, y in labels.items())
    )
    if mode == "all":
        notes.append(
            "mode=all: the npz's official test split only (its train/val trained the model)"
        )
    notes.append("no patient ids in the npz; splits are the official MedMNIST ones")
    return Dataset(str(path), "npz", class_list, out, notes)
