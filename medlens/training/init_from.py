"""Continued training: ``medlens train --init-from MODEL --data NEW``.

MODEL is a run folder (``model.pt`` and ``config.yaml``) or a bundled model's name (an
inference-only folder: its weights are read back from ``model.onnx``, see
:mod:`medlens.artifacts.onnx_weights`). The new run keeps the base's labels and preprocessing
and starts from its weights and its recipe: the settings are the base's (its ``config.yaml``,
or what ``model.json`` records), then ``--config``, then the flags typed, as always; a setting
that would change the input (image size, channels, resize rule, grey conversion) or the
network is refused. ``model.json`` of the new run records the base (``training.init_from``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medlens.artifacts.folders import MODEL_JSON, ModelFolder, resolve_model
from medlens.artifacts.model import (
    ModelMeta,
    build_network,
    check_onnx_file,
    load_network,
    read_meta,
)
from medlens.artifacts.onnx_weights import load_onnx_weights, reestimate_batch_norm
from medlens.config import RECORDED_FACTS, TrainConfig
from medlens.errors import ConfigError, ModelLoadError
from medlens.fileio import sha256_file
from medlens.modeling.classifier import Classifier
from medlens.training.training_data import load_splits

__all__ = [
    "BaseModel",
    "open_base",
    "layered_recipe",
    "check_settings",
    "check_labels",
    "load_base_weights",
    "load_base_backbone",
    "check_backbone_base",
]

NOT_INHERITED = {"data", "out", "init_from", "weights", "fold", "folds", "name"}
"""Settings of the base's recipe a continued run does not take: the data, where it goes, how
the base itself started, its fold, its name."""

FIXED = ("model", "image_size", "channels", "resize", "grayscale")
"""Settings that must stay the base's: the network and its input."""

BN_IMAGES = 256
"""Training images whose activations set the folded batch norms' statistics (bundled base)."""

_TRANSFER = {("full",): "full", ("head",): "frozen", ("head", "finetune"): "finetune"}


@dataclass
class BaseModel:
    """The model a run starts from.

    Attributes:
        ref: as given (``--init-from``).
        folder: its model folder.
        meta: its ``model.json``.
    """

    ref: str
    folder: Path
    meta: ModelMeta

    @property
    def inference_only(self) -> bool:
        """No ``model.pt``: the weights come from ``model.onnx``."""
        return ModelFolder(self.folder).inference_only

    def provenance(self) -> dict:
        """What ``model.json`` records under ``training.init_from``."""
        return {
            "base_model": self.meta.name or self.folder.name,
            "base_version": self.meta.version,
            "base_model_json_sha256": sha256_file(self.folder / MODEL_JSON),
            "given_as": self.ref,
            "weights_from": "model.onnx" if self.inference_only else "model.pt",
        }


def open_base(ref: str | os.PathLike, flag: str = "--init-from") -> BaseModel:
    """The base model ``ref`` names (a model folder or a bundled model); ``flag``: the option
    that named it, for the messages.

    Raises:
        ModelLoadError: no such model, an ensemble, or a folder without weights.
    """
    folder = resolve_model(ref)
    meta = read_meta(folder)
    ensemble = meta.ensemble
    if ensemble:
        runs = ", ".join(m.run for m in ensemble[:3])
        raise ModelLoadError(
            f"{flag} {ref}: an ensemble of {len(ensemble)} models in one graph ({runs}"
            f"{' ...' if len(ensemble) > 3 else ''}); pass the run folder of one member instead"
        )
    mf = ModelFolder(folder)
    if mf.inference_only and not mf.onnx.exists():
        raise ModelLoadError(f"{flag} {ref}: {folder} has neither model.pt nor model.onnx")
    return BaseModel(str(ref), folder, meta)


def base_settings(base: BaseModel) -> dict:
    """The base's recipe: its run's ``config.yaml``, else what ``model.json`` records (the
    network, labels, preprocessing, seed, the transfer its stages imply, its operating point
    and card)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    mf = ModelFolder(base.folder)
    if mf.config.exists():
        saved = mf.read_config()
        settings = {k: v for k, v in saved.items() if k in names and k not in RECORDED_FACTS}
    else:
        settings = _recorded_settings(base.meta)
    settings = {k: v for k, v in settings.items() if k not in NOT_INHERITED}
    pre = base.meta.preprocess
    # The base's own input and labels, whatever its recipe said.
    settings.update(model=base.meta.arch, image_size=pre.image_size, channels=pre.channels,
                    resize=pre.resize, grayscale=pre.grayscale, classes=list(base.meta.labels))  # fmt: skip
    return settings


def _recorded_settings(meta: ModelMeta) -> dict:
    training, op = meta.training, meta.operating_point
    settings: dict = {"dropout": meta.dropout}
    if training and "seed" in training.model_fields_set:
        settings["seed"] = training.seed
    transfer = _TRANSFER.get(tuple((training.stages if training else None) or ()))
    if transfer:
        settings["transfer"] = transfer
    if meta.binary and op and op.rule:
        settings["operating_point"] = op.rule
    if meta.card:  # the recipe's card as written (its order and fields)
        settings["card"] = dict(meta.extra["card"])
    return settings


def layered_recipe(recipe: dict, given: dict) -> dict:
    """``recipe`` (``--config``) over the base's settings when ``--init-from`` (typed, or in
    the recipe) names one; ``augment`` merged field by field. Without a base: ``recipe``."""
    ref = given.get("init_from") or recipe.get("init_from")
    if not ref:
        return recipe
    base = base_settings(open_base(ref))
    augment = {**(base.get("augment") or {}), **(recipe.get("augment") or {})}
    return {**base, **recipe, "augment": augment}


def check_settings(cfg: TrainConfig, base: BaseModel) -> TrainConfig:
    """``cfg`` with the base's labels; a setting that changes the network, its input or its
    labels is refused. An image size or channels left open (None) stay so: the resolve step
    (:mod:`medlens.training.resolve`) takes the base's.

    Raises:
        ConfigError: naming the flag and the base's value.
    """
    pre = base.meta.preprocess
    want: dict[str, Any] = {"model": base.meta.arch, "image_size": pre.image_size, "channels": pre.channels,
            "resize": pre.resize, "grayscale": pre.grayscale}  # fmt: skip
    for name in FIXED:
        open_ = name in ("image_size", "channels") and getattr(cfg, name) is None
        if not open_ and getattr(cfg, name) != want[name]:
            raise ConfigError(
                f"--{name.replace('_', '-')} {getattr(cfg, name)}: --init-from {base.ref} keeps "
                f"the base model's network and input ({name} {want[name]}); its preprocessing "
                "(image size, channels, resize, grayscale, mean/std) cannot change"
            )
    if cfg.weights:
        raise ConfigError("--weights and --init-from both set the starting weights; pass one")
    if cfg.classes is not None and [str(c) for c in cfg.classes] != list(base.meta.labels):
        raise ConfigError(_label_message(base, cfg.classes, "the recipe's `classes:`"))
    return dataclasses.replace(cfg, classes=list(base.meta.labels))


def check_labels(cfg: TrainConfig, base: BaseModel) -> None:
    """The new data's classes are the base's labels (any order; an ``.npz``, whose labels
    are indices, has as many).

    Raises:
        ConfigError: one line naming both label sets.
    """
    ds = load_splits(dataclasses.replace(cfg, classes=None, fold=None))
    labels = list(base.meta.labels)
    same = len(ds.classes) == len(labels) if ds.layout == "npz" else set(ds.classes) == set(labels)
    if not same:
        raise ConfigError(_label_message(base, ds.classes, f"--data {cfg.data}"))


def _label_message(base: BaseModel, classes: Iterable, where: str) -> str:
    return (
        f"--init-from {base.ref}: the base model's labels [{', '.join(base.meta.labels)}] differ "
        f"from the classes of {where} [{', '.join(str(c) for c in classes)}]; continued "
        "training keeps the labels (train without --init-from for other classes)"
    )


def load_base_weights(
    net: Classifier, base: BaseModel, batches: Callable[[int], Iterable[torch.Tensor]]
) -> dict:
    """Set ``net``'s weights to the base's (shapes must agree); a bundled base's folded batch
    norms are given statistics measured on ``batches(BN_IMAGES)`` (network inputs).

    Returns:
        What was loaded (recorded in ``model.json``).

    Raises:
        ModelLoadError: the base's weights do not fit the network.
    """
    report = base.provenance()
    if not base.inference_only:
        src, _ = load_network(base.folder, base.meta)
        try:
            net.load_state_dict(src.state_dict(), strict=True)
        except RuntimeError as e:
            raise ModelLoadError(
                f"--init-from {base.ref}: its weights do not fit the network "
                f"({str(e).splitlines()[0]})"
            ) from None
        return {**report, "tensors": len(src.state_dict())}
    check_onnx_file(base.folder)
    loaded = load_onnx_weights(net, ModelFolder(base.folder).onnx, base.meta.preprocess.image_size)
    seen = reestimate_batch_norm(net, loaded.folded, batches(BN_IMAGES))
    return {**report, "tensors": loaded.tensors, "weights_storage": loaded.storage,
            "batch_norm_statistics": f"{len(loaded.folded)} batch norms folded into their "
            f"convolutions at export, re-estimated on {seen} training images"}  # fmt: skip


def check_backbone_base(arch: str, base: BaseModel) -> None:
    """``--backbone-from``: the base must be the network this run trains (``arch``).

    Raises:
        ConfigError: naming both networks.
    """
    if base.meta.arch != arch:
        raise ConfigError(
            f"--backbone-from {base.ref}: a {base.meta.arch} model; this run trains "
            f"{arch} (--model {base.meta.arch} to take its backbone)"
        )


def load_base_backbone(
    net: Classifier, base: BaseModel, batches: Callable[[int], Iterable[torch.Tensor]]
) -> dict:
    """Set ``net``'s backbone to the base's (``--backbone-from``: another task's model of the
    same network, see :func:`check_backbone_base`); ``net``'s head keeps its fresh
    initialisation. A bundled base's folded batch norms get statistics measured on
    ``batches(BN_IMAGES)`` (this run's inputs).

    Returns:
        What was loaded (recorded in ``model.json`` under ``training.backbone_from``).
    """
    source = build_network(base.meta, pretrained=False)
    report = load_base_weights(source, base, batches)
    state = {k: v for k, v in source.state_dict().items() if k.startswith("backbone.")}
    net.load_state_dict(state, strict=False)
    return {**report, "tensors": len(state), "base_labels": list(base.meta.labels)}
