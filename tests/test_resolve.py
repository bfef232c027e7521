"""The resolve step of a run's input (medlens.training.resolve): image size, channels,
mean/std and learning rate, with their precedence. The expected values are those training
gave before the step was gathered into one module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlens.config import TrainConfig
from medlens.data.datasets import Sample
from medlens.data.preprocess import Geometry, Preprocess, compute_mean_std
from medlens.modeling.registry import IMAGENET_MEAN, IMAGENET_STD, model_info
from medlens.training.resolve import (
    DEFAULT_LR,
    InputPlan,
    imagenet_stats,
    resolve_input,
    resolve_lr,
)


def _cfg(**settings) -> TrainConfig:
    return TrainConfig(**{"data": "-", "out": "-", **settings}).validate()


def _plan(train: list[Sample] | None = None, base: Preprocess | None = None, **settings):
    cfg = _cfg(**settings)
    info = model_info(cfg.model)
    return resolve_input(cfg, info, cfg.pretrained and info.pretrained, train or [], base)


@pytest.fixture
def grey_samples(tmp_path: Path, image_factory) -> list[Sample]:
    out = []
    for i, kind in enumerate(["dark", "bright"] * 3):
        path = tmp_path / f"grey{i}.png"
        Image.fromarray(image_factory(kind, seed=i)).save(path)
        out.append(Sample(str(path), i % 2))
    return out


@pytest.fixture
def colour_samples(tmp_path: Path, grey_samples: list[Sample]) -> list[Sample]:
    a = np.array(Image.open(grey_samples[0].source))
    path = tmp_path / "colour.png"
    Image.fromarray(np.stack([a, a // 2, a], -1)).save(path)
    return [*grey_samples, Sample(str(path), 0)]


def test_pretrained_efficientnet_lite_takes_imagenet_statistics():
    plan = _plan(model="efficientnet-lite0")
    assert plan.geometry == Geometry(224, 3, "stretch", False)
    assert plan.stats == "imagenet" and plan.base is None and plan.lr == 1e-3
    pre = plan.preprocess()
    assert pre == Preprocess(224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize(("model", "size"), [("efficientnet-lite1", 240),
                                             ("efficientnet-lite2", 260), ("inceptionv3", 299),
                                             ("cnn", 224), ("resnet18", 224)])  # fmt: skip
def test_image_size_defaults_to_the_backbones(model, size, grey_samples):
    assert _plan(grey_samples, model=model).geometry.image_size == size


def test_explicit_image_size_wins():
    assert _plan(model="efficientnet-lite0", image_size=32).geometry.image_size == 32
    assert _plan(model="inceptionv3", image_size=96, channels=1).geometry.image_size == 96


def test_one_channel_on_a_pretrained_backbone_averages_imagenet():
    pre = _plan(model="efficientnet-lite0", channels=1).preprocess()
    assert pre.channels == 1
    assert pre.mean == (sum(IMAGENET_MEAN) / 3,) == pytest.approx((0.449,))
    assert pre.std == (sum(IMAGENET_STD) / 3,) == pytest.approx((0.226,))
    assert imagenet_stats(3) == (IMAGENET_MEAN, IMAGENET_STD)


def test_from_scratch_cnn_computes_the_training_statistics(grey_samples):
    plan = _plan(grey_samples, model="cnn", image_size=32)
    assert plan.geometry == Geometry(32, 1, "stretch", False) and plan.stats == "train"
    x = np.stack([plan.geometry.prepare(s.load()) for s in grey_samples])
    pre = plan.preprocess(x)
    mean, std = compute_mean_std(x)
    assert pre == Preprocess(32, 1, tuple(mean), tuple(std))
    with pytest.raises(ValueError, match="decoded images"):
        plan.preprocess()


def test_grey_data_on_a_three_channel_backbone_gets_three_channels(grey_samples):
    # EfficientNet-Lite takes 3 channels even from scratch; its statistics are the data's.
    plan = _plan(grey_samples, model="efficientnet-lite0", pretrained=False, image_size=32)
    assert plan.geometry.channels == 3 and plan.stats == "train"
    x = np.stack([plan.geometry.prepare(s.load()) for s in grey_samples])
    pre = plan.preprocess(x)
    assert len(set(pre.mean)) == 1 and len(set(pre.std)) == 1  # three equal channels
    # Pretrained: 3 channels and ImageNet's statistics, whatever the images.
    assert _plan(grey_samples, model="efficientnet-lite0").geometry.channels == 3


def test_channels_follow_the_images_colour_without_a_setting(grey_samples, colour_samples):
    assert _plan(grey_samples, model="cnn", image_size=32).geometry.channels == 1
    assert _plan(colour_samples, model="cnn", image_size=32).geometry.channels == 3
    assert _plan(grey_samples, model="cnn", image_size=32, channels=3).geometry.channels == 3


def test_resize_and_grayscale_come_from_the_settings():
    plan = _plan(model="cnn", image_size=32, channels=3, resize="pad", grayscale=True)
    assert plan.geometry == Geometry(32, 3, "pad", True)


def test_base_model_input_comes_before_the_backbone_defaults():
    base = Preprocess(64, 1, (0.3,), (0.2,), resize="pad", grayscale=True)
    plan = _plan(base=base, model="cnn", resize="pad", grayscale=True)
    assert plan.geometry == base.geometry and plan.stats == "base"
    assert plan.preprocess() == base
    # A pretrained backbone too: the base's statistics, not ImageNet's.
    base3 = Preprocess(224, 3, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert _plan(base=base3, model="efficientnet-lite0").preprocess() == base3
    # An explicit setting comes first (a run refuses one that differs from the base's).
    assert _plan(base=base, model="cnn", image_size=48).geometry.image_size == 48


@pytest.mark.parametrize(("lr", "expected"), [(None, 1e-3), (0.01, 0.01), (3e-4, 3e-4)])
def test_learning_rate(lr, expected):
    cfg = _cfg(model="cnn", lr=lr)
    assert resolve_lr(cfg) == expected
    assert _plan(model="cnn", image_size=32, channels=1, lr=lr).lr == expected
    assert DEFAULT_LR == 1e-3


def test_plan_checks_its_statistics_source():
    geometry = Geometry(32, 1)
    with pytest.raises(ValueError, match="stats must be"):
        InputPlan(geometry, 1e-3, "median")
    with pytest.raises(ValueError, match="base"):
        InputPlan(geometry, 1e-3, "base")


def test_geometry_is_the_preprocessings_first_step(image_factory):
    pre = Preprocess(32, 1, (0.5,), (0.25,))
    pixels = image_factory("bright")
    np.testing.assert_array_equal(pre.prepare(pixels), pre.geometry.prepare(pixels))
    assert Preprocess.from_geometry(pre.geometry, pre.mean, pre.std) == pre
    # The prepared-pixel cache keys are those of before Geometry existed.
    assert pre.geometry_key() == pre.geometry.geometry_key() == "7bbb801461b6d11a"
    big = Preprocess(image_size=260, resize="pad", grayscale=True)
    assert big.geometry_key() == "3e7a630bad9b19c6"
    with pytest.raises(ValueError, match="preprocess.resize"):
        Geometry(32, 1, "squash")
