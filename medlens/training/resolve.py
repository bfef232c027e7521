"""The one resolve step of a run's input: image size, channels, mean/std and learning rate.

Every one of these values is decided here, once, from the settings, the base model of
``--init-from`` and the backbone's defaults (as timm's ``resolve_data_config`` does). The
step has two phases, because a from-scratch run standardises with the statistics of its
decoded training images:

1. :func:`resolve_input`, before any image is decoded: the :class:`Geometry` the images are
   decoded with, the learning rate, and where the mean/std will come from
   (an :class:`InputPlan`).
2. :meth:`InputPlan.preprocess`, after decoding: the run's :class:`Preprocess` (the plan's
   geometry with its statistics), built once.

Precedence, first that applies:

* image size: ``--image-size`` > the base model's > the backbone's default
  (:attr:`ModelInfo.default_image_size`).
* channels: ``--channels`` > the base model's > 3 for a pretrained backbone or one that takes
  3 channels only > 3 when sampled training images are in colour > 1.
* resize, grayscale: the settings (``--init-from`` refuses values other than the base's).
* mean/std: the base model's > ImageNet's for a pretrained backbone (averaged over the
  channels for a 1-channel input) > the training split's (:func:`compute_mean_std`).
* learning rate: ``--lr`` > :data:`DEFAULT_LR` (fine-tuning scales it by
  ``--finetune-lr-scale``).

``--init-from`` refuses an image size or channels other than the base's
(:func:`medlens.training.init_from.check_settings`), so where both are given they agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medlens.config import TrainConfig
from medlens.data.cache import is_colour
from medlens.data.datasets import Sample
from medlens.data.preprocess import Geometry, Preprocess, compute_mean_std
from medlens.errors import ImageReadError
from medlens.modeling.registry import IMAGENET_MEAN, IMAGENET_STD, ModelInfo

__all__ = [
    "DEFAULT_LR",
    "STATS_SOURCES",
    "InputPlan",
    "imagenet_stats",
    "resolve_input",
    "resolve_lr",
]

DEFAULT_LR = 1e-3
"""Learning rate of the head / full stage when ``--lr`` is not given."""

STATS_SOURCES = ("base", "imagenet", "train")
"""Where a run's mean/std come from: the base model, ImageNet, or the training split."""

COLOUR_PROBE = 64
"""Training images sampled (evenly over the split) to decide 1 or 3 channels."""


@dataclass(frozen=True)
class InputPlan:
    """A run's input as resolved before decoding (phase 1 of the resolve step).

    Attributes:
        geometry: what the images are decoded with (size, channels, resize, grayscale).
        lr: the learning rate of the head / full stage.
        stats: where the mean/std come from, one of :data:`STATS_SOURCES`.
        base: the base model's preprocessing (``--init-from``), else None.
    """

    geometry: Geometry
    lr: float
    stats: str
    base: Preprocess | None = None

    def __post_init__(self):
        if self.stats not in STATS_SOURCES:
            raise ValueError(f"stats must be one of {STATS_SOURCES}, got {self.stats!r}")
        if (self.stats == "base") != (self.base is not None):
            raise ValueError("stats 'base' goes with a base preprocessing, and only it")

    def preprocess(self, train_pixels: np.ndarray | torch.Tensor | None = None) -> Preprocess:
        """Phase 2: the run's preprocessing, the geometry with its mean/std.

        Args:
            train_pixels: the decoded training images ``uint8 (N, C, S, S)``; needed only when
                the statistics are the training split's (``stats == "train"``).

        Raises:
            ValueError: training statistics without ``train_pixels``.
        """
        mean: Sequence[float]
        std: Sequence[float]
        if self.base is not None:
            mean, std = self.base.mean, self.base.std
        elif self.stats == "imagenet":
            mean, std = imagenet_stats(self.geometry.channels)
        else:
            if train_pixels is None:
                raise ValueError("the training split's statistics need its decoded images")
            mean, std = compute_mean_std(train_pixels)
        return Preprocess.from_geometry(self.geometry, mean, std)


def resolve_lr(cfg: TrainConfig) -> float:
    """The head / full stage learning rate: ``--lr``, else :data:`DEFAULT_LR`."""
    return cfg.lr or DEFAULT_LR


def imagenet_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean and std; for one channel, each averaged over the three."""
    if channels == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    return IMAGENET_MEAN, IMAGENET_STD


def resolve_input(
    cfg: TrainConfig,
    info: ModelInfo,
    pretrained: bool,
    train: Sequence[Sample],
    base: Preprocess | None = None,
) -> InputPlan:
    """Phase 1 of the resolve step: everything but the statistics' values (module docstring
    for the precedence).

    Args:
        cfg: the settings (image size, channels, resize, grayscale, lr).
        info: the backbone (its default image size and fixed channels).
        pretrained: whether the backbone starts from ImageNet weights.
        train: the training split; a sample of it is decoded only when the channels are
            left to the colour of the images.
        base: the base model's preprocessing (``--init-from``).

    Returns:
        The plan; :meth:`InputPlan.preprocess` completes it.
    """
    size = cfg.image_size or (base.image_size if base is not None else info.default_image_size)
    if cfg.channels is not None:
        channels = cfg.channels
    elif base is not None:
        channels = base.channels
    else:
        channels = _auto_channels(train, info, pretrained)
    geometry = Geometry(size, channels, cfg.resize, cfg.grayscale)
    stats = "base" if base is not None else "imagenet" if pretrained else "train"
    return InputPlan(geometry, resolve_lr(cfg), stats, base)


def _auto_channels(train: Sequence[Sample], info: ModelInfo, pretrained: bool) -> int:
    """3 for pretrained or 3-channel backbones, else 3 only when sampled images are colour."""
    if pretrained or info.fixed_in_channels == 3:
        return 3
    probe = list(train)[:: max(1, len(train) // COLOUR_PROBE)][:COLOUR_PROBE]
    return 3 if any(_probe_colour(s) for s in probe) else 1


def _probe_colour(sample: Sample) -> bool:
    """Colour check for channel auto-detection; unreadable files are reported later."""
    try:
        return is_colour(sample.load())
    except (ImageReadError, OSError, ValueError):
        return False
