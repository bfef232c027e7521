"""A run's data: the splits loaded, checked and decoded before the run folder is touched."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medlens.config import TrainConfig, merge_settings
from medlens.data.cache import prepare_samples, refuse_unreadable
from medlens.data.datasets import Dataset, load_dataset
from medlens.data.duplicates import thumbnails, twins
from medlens.data.preprocess import Preprocess
from medlens.data.splits import fold_split
from medlens.errors import TrainError
from medlens.fileio import read_yaml
from medlens.modeling.registry import ModelInfo
from medlens.training.resolve import InputPlan, resolve_input

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """The decoded splits of a run.

    Attributes:
        dataset: the loaded dataset (classes, layout, notes).
        prepared: split -> (uint8 images ``(N, C, S, S)``, labels ``(N,)``).
        sources: split -> the source of each decoded image.
        bad: (source, reason) of the images that could not be decoded.
        plan: the run's input as resolved before decoding (:mod:`medlens.training.resolve`).
    """

    dataset: Dataset
    prepared: dict[str, tuple[np.ndarray, torch.Tensor]]
    sources: dict[str, list[str]]
    bad: list[tuple[str, str]]
    plan: InputPlan

    @property
    def image_size(self) -> int:
        """The input side, in pixels."""
        return self.plan.geometry.image_size

    @property
    def channels(self) -> int:
        """The input channels."""
        return self.plan.geometry.channels

    def preprocess(self) -> Preprocess:
        """The run's preprocessing: the plan completed with its statistics (the training
        split's, when they are computed)."""
        return self.plan.preprocess(self.prepared["train"][0])

    @property
    def classes(self) -> list[str]:
        """Class names; labels index this list."""
        return self.dataset.classes

    @property
    def binary(self) -> bool:
        """Two classes: one logit, a threshold."""
        return len(self.dataset.classes) == 2

    def split_counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class actually used (after --skip-bad-images)."""
        return {
            split: {c: int((y == i).sum()) for i, c in enumerate(self.classes)}
            for split, (_, y) in self.prepared.items()
        }


def _fold(ds: Dataset, cfg: TrainConfig) -> Dataset:
    """Train and validation pooled, then split into ``cfg.folds`` patient-grouped folds;
    fold ``cfg.fold`` validates. A carved test split stays as it is."""
    assert cfg.fold is not None  # load_training_data folds only with --fold
    pool = ds.splits["train"] + ds.splits.get("val", [])
    train, val = fold_split(pool, cfg.folds, cfg.fold, cfg.seed)
    note = (
        f"fold {cfg.fold} of {cfg.folds}: train+val pooled ({len(pool)} images) and split into "
        f"{cfg.folds} folds stratified by class, grouped by patient, seed {cfg.seed}"
    )
    splits = {**ds.splits, "train": train, "val": val}
    return dataclasses.replace(ds, splits=splits, notes=[*ds.notes, note])


def load_splits(cfg: TrainConfig, classes: list[str] | None = None) -> Dataset:
    """A run's splits, as its settings form them (fractions, seed, patient regex, fold).

    Args:
        cfg: the settings.
        classes: the class names a trained model expects (default: found in the data).
    """
    ds = load_dataset(
        cfg.data,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
        patient_regex=cfg.patient_regex,
        classes=classes or cfg.classes,
    )
    return _fold(ds, cfg) if cfg.fold is not None else ds


def recipe_splits(recipe: str | Path, data: str | Path) -> Dataset:
    """The splits a recipe's run carves from ``data`` (its seed, fractions, patient regex):
    what a model trained with it was validated and tested on."""
    settings = read_yaml(recipe, "the recipe")
    return load_splits(
        merge_settings(settings, {"data": str(data), "out": "-"}, source=str(recipe))
    )


def load_training_data(
    cfg: TrainConfig, info: ModelInfo, pretrained: bool, base: Preprocess | None = None
) -> TrainingData:
    """Load, check and decode a run's data, at the input :func:`resolve_input` resolves.

    Args:
        cfg: the settings (data, fractions, seed, image size, channels, resize, cache).
        info: the backbone (its default image size and fixed channels).
        pretrained: whether the backbone starts from ImageNet weights (3 channels).
        base: the base model's preprocessing (``--init-from``).

    Returns:
        The decoded splits.

    Raises:
        TrainError: no train or validation split, or one without images of a class.
        DataError: unreadable images, unless ``cfg.skip_bad_images``.
    """
    ds = load_splits(cfg)
    _check_splits(cfg, ds)
    plan = resolve_input(cfg, info, pretrained, ds.splits["train"], base)
    data = _decode(cfg, ds, plan)
    refuse_unreadable(data.bad, cfg.skip_bad_images)
    note_copies(data)
    return data


def note_copies(data: TrainingData) -> None:
    """Warn (and note in ``model.json``) when validation or test images have a near-identical
    image in the training split under another name (:mod:`medlens.data.duplicates`)."""
    train = thumbnails(data.prepared["train"][0])
    for split in ("val", "test"):
        if split not in data.prepared:
            continue
        found = twins(thumbnails(data.prepared[split][0]), train)
        hits = np.flatnonzero(found >= 0)
        if not len(hits):
            continue
        first = data.sources[split][hits[0]], data.sources["train"][found[hits[0]]]
        note = (
            f"{len(hits)} of {len(found)} {split} images have a near-identical image in the "
            f"training split under another name (first: {first[0]} ~ {first[1]}): their "
            f"{split} figures are optimistic; remove the copies, or give each copy its "
            "original's patient id (a CSV manifest's patient_id column)"
        )
        log.warning("%s", note)
        data.dataset.notes.append(note)


def _decode(cfg: TrainConfig, ds: Dataset, plan: InputPlan) -> TrainingData:
    """Every split decoded at the plan's geometry (through the cache when there is one)."""
    prepared, sources, bad = {}, {}, []
    for split, samples in ds.splits.items():
        res = prepare_samples(
            samples,
            plan.geometry,
            cache_dir=cfg.cache_dir,
            progress=cfg.progress,
            desc=f"decode {split}",
        )
        prepared[split] = (res.pixels, torch.tensor([samples[i].label for i in res.keep]))
        sources[split] = [samples[i].source for i in res.keep]
        bad += res.errors
    return TrainingData(ds, prepared, sources, bad, plan)


def _check_splits(cfg: TrainConfig, ds: Dataset) -> None:
    """A train and a validation split, each with images of every class."""
    if "train" not in ds.splits or "val" not in ds.splits:
        raise TrainError(f"{cfg.data}: could not form train and validation splits")
    for split in ("train", "val"):
        present = {s.label for s in ds.splits[split]}
        if len(present) < len(ds.classes):
            missing = [ds.classes[i] for i in range(len(ds.classes)) if i not in present]
            raise TrainError(
                f"the {split} split has no images of class(es) {missing}; add "
                "images or lower --val-fraction/--test-fraction"
            )
