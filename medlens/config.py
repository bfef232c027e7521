"""Every training setting, declared once."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from medlens.data.augment import AugmentSpec
from medlens.errors import TrainError


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
    augment: dict = field(default_factory=lambda: AugmentSpec().to_dict())
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
        return cls(**d)
