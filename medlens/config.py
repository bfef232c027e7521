"""Every training setting, declared once.

Each field of :class:`TrainConfig` (and of its nested :class:`AugmentSpec`) carries its type,
default, help text and constraint. From that one declaration come:

* the options of ``medlens train`` (:func:`add_options`): ``--image-size`` for
  ``image_size``, ``--no-X`` for a setting that is on by default, ``--X`` for one that is off;
* the merge of a YAML recipe (or a run's saved ``config.yaml``) with the flags given on the
  command line (:func:`merge_settings`): defaults, then the file, then the flags the user typed;
* validation (:meth:`TrainConfig.validate`), whose messages name the flag;
* ``config.yaml`` (:meth:`TrainConfig.to_dict`), which re-runs to the same configuration.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any

from medlens.errors import ConfigError

__all__ = [
    "AugmentSpec",
    "TrainConfig",
    "RECORDED_FACTS",
    "add_options",
    "given_settings",
    "merge_settings",
]

Check = Callable[[Any], str | None]
"""A constraint: the value -> None when it is allowed, else what it must be."""


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    check: Check | None = None,
    choices: Sequence[Any] | None = None,
    flag: str | None = None,
    cli: bool = True,
    required: bool = False,
) -> Any:
    """Declare a setting: a dataclass field whose metadata the CLI and validation read.

    Args:
        default: the value when neither a recipe nor a flag sets it (none: required).
        help: one sentence for ``--help``.
        factory: a default factory instead of ``default`` (mutable defaults).
        check: a constraint (see :data:`Check`).
        choices: the allowed values.
        flag: the option name when it is not ``--name-with-dashes`` (booleans on by default
            get ``--no-name``).
        cli: false for settings only a recipe sets (the model-card text).
        required: the option must be given on the command line (``--out``).
    """
    meta = {
        "help": help,
        "check": check,
        "choices": choices,
        "flag": flag,
        "cli": cli,
        "required": required,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def at_least(lo: float) -> Check:
    return lambda v: None if v is None or v >= lo else f"be >= {lo:g}"


def above(lo: float) -> Check:
    return lambda v: None if v is None or v > lo else f"be > {lo:g}"


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    """``[lo, hi]`` with either end open."""

    def check(v: Any) -> str | None:
        if v is None:
            return None
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        if ok_lo and ok_hi:
            return None
        return f"be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    return check


@dataclass(frozen=True)
class AugmentSpec:
    """Random geometric and intensity augmentation, as in the seed projects."""

    rotation: float = setting(10.0, "maximum rotation, degrees", check=at_least(0))
    shift: float = setting(0.08, "maximum shift, fraction of the side", check=in_range(0, 1))
    zoom: float = setting(0.1, "maximum zoom, fraction", check=in_range(0, 1, hi_open=True))
    hflip: bool = setting(
        True,
        "flip images horizontally at random (turn off where laterality matters)",
        flag="--no-hflip",
    )
    brightness: float = setting(0.1, "maximum relative brightness change", check=at_least(0))
    contrast: float = setting(0.1, "maximum relative contrast change", check=at_least(0))
    # Acquisition shift (another scanner, exposure, resolution), with kornia.augmentation;
    # all off by default.
    crop_scale: float = setting(
        0.0,
        "random resized crop keeping this much less of the area at most (0.3: 70-100%%), "
        "aspect ratio 3/4 to 4/3",
        check=in_range(0, 1, hi_open=True),
    )
    gamma: float = setting(
        0.0,
        "maximum gamma change: gamma drawn in [1 - g, 1 + g]",
        check=in_range(0, 1, hi_open=True),
    )
    blur: float = setting(
        0.0, "probability of a Gaussian blur (sigma 0.1 to 1.5 px)", check=in_range(0, 1)
    )
    sharpen: float = setting(0.0, "probability of sharpening", check=in_range(0, 1))
    stamp: float = setting(
        0.0,
        "probability of stamping a solid white rectangle near the top or bottom edge, on images "
        "of every class: an anonymisation box that one source carries then says nothing about "
        "the label",
        check=in_range(0, 1),
    )
    downscale: float = setting(
        0.0,
        "probability of a resolution change: the image shrunk to 35-90%% of its side (area "
        "averaging) and enlarged back, as when a scan of another resolution is resized",
        check=in_range(0, 1),
    )
    noise: float = setting(
        0.0, "standard deviation of Gaussian noise added to half the images", check=at_least(0)
    )
    clahe: float = setting(
        0.0,
        "probability of contrast-limited adaptive histogram equalisation (CLAHE, clip 2)",
        check=in_range(0, 1),
    )
    enabled: bool = setting(True, "augment the training images", flag="--no-augment")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> AugmentSpec:
        _refuse_unknown(cls, d or {}, "augment")
        return cls(**(d or {}))


@dataclass
class TrainConfig:
    """Every setting of a training run; saved fully resolved as ``config.yaml``."""

    data: str = setting(help="image folder, CSV manifest or .npz file")
    out: str = setting(
        help="run folder to create (model, config.yaml, training_metrics.csv, checkpoints, "
        "evaluation reports)",
        required=True,
    )
    model: str = setting("efficientnet-lite0", "backbone from the registry (`medlens models`)")
    epochs: int = setting(
        15,
        "maximum epochs of the main stage (fine-tuning or full training); early stopping may "
        "end sooner",
        check=at_least(0),
    )
    head_epochs: int = setting(
        40, "maximum epochs of the frozen-backbone head stage", check=at_least(0)
    )
    image_size: int | None = setting(
        None, "square input side in pixels (default: the backbone's, 224)", check=at_least(8)
    )
    batch_size: int = setting(32, "images per training step", check=at_least(2))
    lr: float | None = setting(
        None,
        "learning rate of the head / full stage (default 1e-3); fine-tuning uses lr x "
        "--finetune-lr-scale",
        check=above(0),
    )
    finetune_lr_scale: float = setting(
        0.1, "fine-tuning learning rate as a fraction of --lr", check=above(0)
    )
    optimizer: str = setting("adamw", "optimizer", choices=("adam", "adamw"))
    weight_decay: float = setting(1e-4, "weight decay", check=at_least(0))
    seed: int = setting(0, "seed for splits, init and augmentation")
    transfer: str = setting(
        "finetune",
        "pretrained backbones: frozen = train only a new head on frozen features; finetune = "
        "then unfreeze the top --unfreeze stages at a lower LR; full = train everything",
        choices=("frozen", "finetune", "full"),
    )
    unfreeze: int = setting(
        2, "backbone stages to fine-tune (counted from the top)", check=at_least(0)
    )
    aug_copies: int = setting(
        4, "augmented copies of the training set cached for fine-tuning", check=at_least(1)
    )
    mix_copies: bool = setting(
        False,
        "fine-tuning on cached activations: each epoch draws every image's copy at random "
        "(a batch mixes clean and augmented copies) instead of going through one whole copy "
        "per epoch (the loss then swings from copy to copy)",
    )
    augment: AugmentSpec = setting(factory=AugmentSpec)
    patience: int = setting(5, "early stopping: epochs without improvement", check=at_least(1))
    monitor: str = setting(
        "val_auc",
        "what early stopping and best-checkpoint selection watch",
        choices=("val_auc", "val_loss"),
    )
    class_weights: bool = setting(True, "weight the loss by inverse class frequency")
    channels: int | None = setting(
        None,
        "input channels; default 3 for pretrained backbones, else 1 unless the images are in "
        "colour",
        choices=(1, 3),
    )
    resize: str = setting(
        "stretch",
        "stretch to a square; pad (letterbox) keeping the aspect ratio; or crop the centre "
        "square (no distortion, no bars)",
        choices=("stretch", "pad", "crop"),
    )
    grayscale: bool = setting(
        False,
        "convert every image to grey first (grey modalities stored partly as RGB files, so the "
        "file's colour mode is no cue)",
    )
    dropout: float = setting(0.3, "head dropout", check=in_range(0, 1, hi_open=True))
    label_smoothing: float = setting(
        0.0, "label smoothing of the training loss", check=in_range(0, 0.5, hi_open=True)
    )
    mixup: float = setting(
        0.0, "mixup: alpha of the Beta(alpha, alpha) mixing weight (0.2 is usual; 0: off)",
        check=at_least(0),
    )  # fmt: skip
    ema: float = setting(
        0.0,
        "keep an exponential moving average of the weights with this decay (e.g. 0.999; 0: "
        "off); validation and the saved model use the average",
        check=in_range(0, 1, hi_open=True),
    )
    bn_momentum: float | None = setting(
        None,
        "batch-norm momentum while training (default: the backbone's own; MONAI's "
        "EfficientNets use 0.01, slow to adapt when every layer fine-tunes on a small dataset; "
        "0.1 is PyTorch's default)",
        check=in_range(0, 1, lo_open=True),
    )
    warmup_epochs: int = setting(
        0,
        "the learning rate of the fine-tuning (or full) stage rises linearly from 0 over this "
        "many epochs: Adam's first steps move every weight by about the full rate, which "
        "otherwise undoes much of what the pretrained layers and the fitted head agree on",
        check=at_least(0),
    )
    freeze_bn: bool = setting(
        False,
        "keep batch-norm layers in inference mode while the backbone trains: their statistics "
        "stay the pretrained ones the head was fitted on, and training normalises as "
        "inference does (no batch-statistics mismatch on small datasets)",
    )
    val_fraction: float = setting(
        0.15,
        "fraction of patients carved out for validation when needed",
        check=in_range(0, 1, hi_open=True),
    )
    test_fraction: float = setting(
        0.15,
        "fraction of patients held out for testing (class-folder layouts)",
        check=in_range(0, 1, hi_open=True),
    )
    folds: int = setting(
        0,
        "grouped k-fold cross-validation: train K runs (OUT/fold-0 ...), each validated on one "
        "patient-grouped fold of train+val, and write their mean and spread (cv.json, cv.csv); "
        "0: one run",
        check=lambda v: (
            None if v in (0, None) or (isinstance(v, int) and v >= 2) else "be 0 or >= 2"
        ),
    )
    fold: int | None = setting(
        None, "with --folds K: train only this fold (0..K-1) into --out", check=at_least(0)
    )
    patient_regex: str | None = setting(
        None,
        "regex whose first group (or group 'patient') reads a patient id from a file name; "
        "default reads Kermany names (person1234_..., IM-0115-...)",
    )
    operating_point: str = setting(
        "balanced",
        "two-class models: the decision rule, a stated clinical intent: balanced (p >= 0.5 on "
        "the calibrated probability: equal error costs), cost_ratio=R (a missed case costs R "
        "false alarms), sensitivity=S (screening), specificity=S (confirmation) or youden; "
        "chosen on validation with bootstrap intervals",
    )
    skip_bad_images: bool = setting(
        False, "skip unreadable images (they are counted) instead of stopping"
    )
    precision: str = setting(
        "auto",
        "bf16 autocast for frozen passes where the CPU supports it (auto), or force one",
        choices=("auto", "fp32", "bf16"),
    )
    device: str = setting(
        "auto",
        "where training runs: auto (a CUDA GPU when torch sees one, else the CPU), cpu, or "
        "cuda[:N]; prediction and serving always use the CPU",
    )
    threads: int | None = setting(None, "torch CPU threads", check=at_least(1))
    workers: int = setting(
        0,
        "processes that decode-scale-augment the next training batches while the network trains "
        "(full training; 0: in the training process, as before)",
        check=at_least(0),
    )
    cache_dir: str | None = setting(
        None,
        "keep decoded, resized images here for later runs (holds patient images: off unless asked)",
    )
    pretrained: bool = setting(True, "start from ImageNet weights where the backbone has them")
    weights: str | None = setting(
        None,
        "initialise the backbone from this state_dict file (.pt/.pth: ImageNet or chest X-ray "
        "weights downloaded elsewhere); tensors are matched by name (else by order when every "
        "shape agrees) and what was loaded, missing or unexpected is reported",
    )
    init_from: str | None = setting(
        None,
        "continue training MODEL (a run folder or a bundled model's name) on new data: its "
        "weights, labels and preprocessing, its recipe as the starting point (--config and "
        "flags override it; image size, channels, resize and grayscale stay its own)",
        flag="--init-from",
    )
    backbone_from: str | None = setting(
        None,
        "initialise the backbone (not the head) from another MedLens model of the same "
        "network (a run folder or a bundled model's name), e.g. the bundled pneumonia model "
        "for another chest X-ray task; labels, preprocessing and recipe stay this run's",
        flag="--backbone-from",
    )
    name: str | None = setting(None, "model name (default: the run folder's name)")
    progress: bool = setting(True, "show progress bars", flag="--quiet")
    card: dict | None = setting(
        None, "model-card text (title, intended use, citation, ...)", cli=False
    )
    classes: list | None = setting(
        None,
        "class names in output order (a recipe's `classes: [non_covid, covid]`); the last is "
        "the positive class of a two-class model; default: the folder names sorted",
        cli=False,
    )

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Settings -> config; unknown names are an error that lists the known ones."""
        _refuse_unknown(cls, d, "training")
        d = dict(d)
        if isinstance(d.get("operating_point"), dict):  # a recipe's {sensitivity: 0.95}
            d["operating_point"] = ",".join(f"{k}={v}" for k, v in d["operating_point"].items())
        if not isinstance(d.get("augment", AugmentSpec()), AugmentSpec):
            d["augment"] = AugmentSpec.from_dict(d["augment"])
        return cls(**d)

    @classmethod
    def from_saved(cls, saved: dict) -> TrainConfig:
        """The settings of a run's ``config.yaml`` (the recorded facts are left out)."""
        names = {f.name for f in fields(cls)}
        return cls.from_dict({k: v for k, v in saved.items() if k in names})

    def to_dict(self) -> dict:
        """Every setting, as ``config.yaml`` stores it."""
        return asdict(self)

    def validate(self) -> TrainConfig:
        """Check every declared constraint; the error names the flag.

        Raises:
            ConfigError: a value is out of range or not one of the choices.
        """
        for obj in (self, self.augment):
            for f in fields(obj):
                problem = _problem(f, getattr(obj, f.name), _scalar_type(type(obj), f.name))
                if problem:
                    raise ConfigError(f"{_flag(f)} must {problem}")
        if self.fold is not None and not self.fold < self.folds:
            raise ConfigError(
                f"--fold {self.fold} needs --folds K with K > {self.fold} (folds are 0..K-1)"
            )
        return self


RECORDED_FACTS = (
    "precision_resolved",
    "device_resolved",
    "preprocess",
    "split_counts",
    "data_notes",
    "torch_threads",
    "world_size",
    "global_batch_size",
    "batch_size_per_process",
)
"""What ``config.yaml`` records beside the settings (what training resolved); reading the file
back as a recipe skips them."""


def _refuse_unknown(cls: type, d: dict, what: str) -> None:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {what} setting(s) {unknown}; known: {sorted(names)}")


def _problem(f: Any, value: Any, kind: type) -> str | None:
    meta = f.metadata
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is not None and kind is int and not (number and value == int(value)):
        return f"be a whole number, got {value!r}"
    if value is not None and kind is float and not number:
        return f"be a number, got {value!r}"
    if value is not None and kind is bool and not isinstance(value, bool):
        return f"be true or false, got {value!r}"
    if meta.get("choices") and value is not None and value not in meta["choices"]:
        allowed = [str(c) for c in meta["choices"]]
        return f"be {', '.join(allowed[:-1])} or {allowed[-1]}, got {value!r}"
    check = meta.get("check")
    try:
        problem = check(value) if check else None
    except TypeError:
        problem = "be a number"
    return f"{problem}, got {value!r}" if problem else None


def _flag(f: Any) -> str:
    """The command-line option of a setting."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


# ----------------------------------------------------------------------------- the CLI


def _scalar_type(cls: type, name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _add_one(parser: argparse.ArgumentParser, cls: type, f: Any, dest: str) -> None:
    meta = f.metadata
    kind = _scalar_type(cls, f.name)
    help_text = meta["help"]
    if kind is bool:
        # The help says what the flag does: a --no-X flag turns the setting off.
        if f.default is True:
            help_text = f"do not {help_text[0].lower()}{help_text[1:]} (on by default)"
        parser.add_argument(
            _flag(f),
            dest=dest,
            action="store_const",
            const=not f.default,
            default=argparse.SUPPRESS,
            help=help_text,
        )
        return
    if f.default not in (MISSING, None):
        help_text += f"; default {f.default}"
    kwargs = {"choices": meta["choices"]} if meta.get("choices") else {}
    if meta.get("required"):
        kwargs["required"] = True
    parser.add_argument(
        _flag(f),
        dest=dest,
        type=kind,
        default=argparse.SUPPRESS,
        metavar=f.name.upper(),
        help=help_text,
        **kwargs,
    )


def add_options(parser: argparse.ArgumentParser, cls: type = TrainConfig, prefix: str = "") -> None:
    """Add one option per declared setting (nested dataclasses flattened).

    Options default to ``argparse.SUPPRESS``: only the flags the user typed reach the namespace
    (:func:`given_settings`), so a recipe's value gives way only to a flag actually given.
    """
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        if f.default_factory is not MISSING and is_dataclass(f.default_factory):
            add_options(parser, f.default_factory, prefix=f"{prefix}{f.name}.")
            continue
        _add_one(parser, cls, f, prefix + f.name)


def given_settings(namespace: argparse.Namespace) -> dict:
    """The settings the user typed, nested (``{"augment": {"zoom": 0.2}, "epochs": 3}``)."""
    out: dict = {}
    known = {f.name for f in fields(TrainConfig)}
    for key, value in vars(namespace).items():
        head, _, rest = key.partition(".")
        if head not in known:
            continue
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[key] = value
    return out


def merge_settings(recipe: dict, given: dict, *, source: str = "the recipe") -> TrainConfig:
    """Defaults, then ``recipe`` (a YAML recipe or a saved ``config.yaml``), then ``given``.

    Args:
        recipe: settings read from a file; the facts a saved ``config.yaml`` records
            (:data:`RECORDED_FACTS`) are skipped, and ``out`` is always the command line's.
        given: the flags typed (:func:`given_settings`); they win, field by field (also
            inside ``augment``).
        source: the file, for error messages.

    Raises:
        ConfigError: an unknown setting, a value out of range, or no ``data``.
    """
    if not isinstance(recipe, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(recipe).__name__}")
    settings = {k: v for k, v in recipe.items() if k not in RECORDED_FACTS and k != "out"}
    augment = {**(settings.pop("augment", None) or {}), **given.get("augment", {})}
    settings.update({k: v for k, v in given.items() if k != "augment"})
    if "data" not in settings:
        raise ConfigError("--data is required (or a `data:` setting in the --config file)")
    try:
        cfg = TrainConfig.from_dict({**settings, "augment": AugmentSpec.from_dict(augment)})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except TypeError as e:  # a required setting missing
        raise ConfigError(f"{source}: {e}") from None
    return cfg.validate()
