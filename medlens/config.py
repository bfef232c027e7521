"""Every training setting, declared once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from medlens.errors import TrainError


@dataclass(frozen=True)
class AugmentSpec:
    """Random geometric and intensity augmentation, as in the seed projects.

    Attributes:
        rotation: maximum rotation, degrees (uniform in [-rotation, rotation]).
        shift: maximum translation, fraction of the image side.
        zoom: maximum zoom, fraction (scale uniform in [1 - zoom, 1 + zoom]).
        hflip: flip left-right with probability 0.5 (the seeds use it; a recipe may turn it
            off where laterality matters).
        brightness, contrast: maximum relative intensity changes.
    """

    rotation: float = 10.0
    shift: float = 0.08
    zoom: float = 0.1
    hflip: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    enabled: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> AugmentSpec:
        return cls(**(d or {}))


@dataclass
class TrainConfig:
    """Every setting of a training run; saved fully resolved as ``config.yaml``."""

    data: str
    out: str
    model: str = "efficientnet-lite0"
    epochs: int = 15  # max epochs of the main stage (finetune or full)
    head_epochs: int = 40  # max epochs of the frozen-feature head stage
    image_size: int | None = None  # default: the backbone's
    batch_size: int = 32
    lr: float | None = None  # head/full stage; finetune uses lr * finetune_lr_scale
    finetune_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adam | adamw
    seed: int = 0
    transfer: str = "finetune"  # pretrained models: frozen | finetune | full
    unfreeze: int = 2  # backbone stages trained in the finetune stage
    aug_copies: int = 4  # finetune: training-set copies cached (1 clean + augmented)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    patience: int = 5
    monitor: str = "val_auc"  # val_auc | val_loss
    class_weights: bool = True
    channels: int | None = None  # None: 3 for pretrained, else 1 unless images have colour
    resize: str = "stretch"  # stretch | pad | crop (see Preprocess)
    grayscale: bool = False  # grey every image first (see Preprocess)
    dropout: float = 0.3
    bn_momentum: float | None = None  # None: the backbone's own (MONAI EfficientNet: 0.01)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    patient_regex: str | None = None
    target_sensitivity: float | None = None
    skip_bad_images: bool = False
    precision: str = "auto"  # auto (bf16 frozen passes, fp32 training) | fp32 | bf16
    device: str = "auto"  # auto (cuda when torch sees one, else cpu) | cpu | cuda[:N]
    threads: int | None = None
    cache_dir: str | None = None
    pretrained: bool = True
    name: str | None = None
    progress: bool = True
    card: dict | None = None  # model-card text (title, intended use, citation, ...)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainError(f"unknown training setting(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        if not isinstance(d.get("augment", AugmentSpec()), AugmentSpec):
            d["augment"] = AugmentSpec.from_dict(d["augment"])
        return cls(**d)

    @classmethod
    def from_saved(cls, saved: dict) -> TrainConfig:
        """The settings of a run's ``config.yaml`` (which also records resolved facts:
        classes, counts, ...; those are left out)."""
        names = {f.name for f in fields(cls)}
        return cls.from_dict({k: v for k, v in saved.items() if k in names})

    def to_dict(self) -> dict:
        """Every setting, as ``config.yaml`` stores it."""
        return asdict(self)
