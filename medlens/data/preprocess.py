"""The one preprocessing definition: used by training, evaluation, export and serving.

An image goes through two steps:

1. :meth:`Preprocess.prepare` - decoded ``uint8`` pixels (any size, grey or colour) ->
   ``uint8 (C, S, S)``: channel handling and resize. Its output is what the training cache
   stores, so every epoch reuses it without decoding a JPEG again. This step alone is a
   :class:`Geometry` (what training decodes with before the statistics are known).
2. :meth:`Preprocess.normalize` - ``uint8 (B, C, S, S)`` -> ``float32`` scaled to [0, 1] and
   standardised with the spec's mean/std (TRAIN split statistics, or ImageNet statistics for
   ImageNet-pretrained backbones).

Augmentation (train only) sits between the two, on [0, 1] floats: see :func:`augment`.
The spec is saved inside every model (``model.json``) and rebuilt with :meth:`from_dict`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

RESIZE_MODES = ("stretch", "pad", "crop")


@dataclass(frozen=True)
class Geometry:
    """Step 1 alone: how decoded pixels become ``uint8 (C, S, S)``, with no statistics.

    What decoding (and the prepared-pixel cache) needs before the mean/std are known; the
    fields mean what :class:`Preprocess`'s of the same names do, and
    :meth:`Preprocess.geometry` is the one a full spec prepares with.
    """

    image_size: int = 224
    channels: int = 3
    resize: str = "stretch"
    grayscale: bool = False

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"preprocess.channels must be 1 or 3, got {self.channels}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(
                f"preprocess.resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}"
            )
        if not 8 <= self.image_size <= 2048:
            raise ValueError(f"preprocess.image_size must be 8..2048, got {self.image_size}")

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """Channel conversion and resize.

        Args:
            pixels: ``uint8`` array ``(H, W)`` or ``(H, W, 3)``.

        Returns:
            ``uint8`` array ``(channels, image_size, image_size)``.
        """
        if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
            raise ValueError(
                f"expected uint8 (H,W) or (H,W,3) pixels, got {pixels.dtype} {pixels.shape}"
            )
        img = Image.fromarray(pixels)
        if self.grayscale:
            img = img.convert("L")
        img = img.convert("L" if self.channels == 1 else "RGB")
        s = self.image_size
        if self.resize == "crop" and img.width != img.height:
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side))
        if self.resize == "pad":
            scale = s / max(img.size)
            w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
            canvas = Image.new(img.mode, (s, s))
            canvas.paste(
                img.resize((w, h), Image.Resampling.BILINEAR), ((s - w) // 2, (s - h) // 2)
            )
            img = canvas
        elif img.size != (s, s):
            # PIL's bilinear filter widens its support when shrinking, so large uploads are
            # antialiased rather than aliased.
            img = img.resize((s, s), Image.Resampling.BILINEAR)
        # np.array, not np.asarray: PIL's buffer is read-only and torch.from_numpy warns on it.
        arr = np.array(img, dtype=np.uint8)
        return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))

    def geometry_key(self) -> str:
        """Hash of what :meth:`prepare` depends on (the cache key for prepared pixels)."""
        blob = json.dumps(
            {
                "size": self.image_size,
                "channels": self.channels,
                "resize": self.resize,
                "grayscale": self.grayscale,
                "v": 2,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Preprocess:
    """How raw pixels become a network input.

    Attributes:
        image_size: side of the square network input, pixels.
        channels: 1 (grey) or 3 (RGB; grey images are replicated).
        mean, std: per-channel statistics applied after scaling to [0, 1].
        resize: "stretch" (resize to SxS, aspect ratio not kept: the public datasets are
            distributed like that), "pad" (letterbox on black, aspect ratio kept) or "crop"
            (centre square crop, aspect ratio kept, no bars: when image shape differs between
            sources of one dataset, neither distortion nor bars can give the source away).
        grayscale: convert every image to grey before channel handling (a 3-channel input
            then holds three equal channels). For modalities that are grey by nature but
            stored partly as RGB files, so the file's colour mode cannot become a cue.
    """

    image_size: int = 224
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    resize: str = "stretch"
    grayscale: bool = False

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"preprocess.channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"preprocess.mean/std need {self.channels} values each, got "
                f"{list(self.mean)} and {list(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"preprocess.std must be positive, got {list(self.std)}")
        Geometry(self.image_size, self.channels, self.resize, self.grayscale)  # resize, size

    @classmethod
    def from_geometry(
        cls, geometry: Geometry, mean: Sequence[float], std: Sequence[float]
    ) -> Preprocess:
        """The full spec: ``geometry`` with the statistics that standardise its output."""
        return cls(
            image_size=geometry.image_size,
            channels=geometry.channels,
            mean=tuple(mean),
            std=tuple(std),
            resize=geometry.resize,
            grayscale=geometry.grayscale,
        )

    # -- step 1: geometry and channels (uint8 in, uint8 out) --------------------------
    @property
    def geometry(self) -> Geometry:
        """Step 1's part of the spec (no statistics)."""
        return Geometry(self.image_size, self.channels, self.resize, self.grayscale)

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """Channel conversion and resize (:meth:`Geometry.prepare`).

        Args:
            pixels: ``uint8`` array ``(H, W)`` or ``(H, W, 3)``.

        Returns:
            ``uint8`` array ``(channels, image_size, image_size)``.
        """
        return self.geometry.prepare(pixels)

    # -- step 2: scale and standardise -------------------------------------------------
    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8 (B, C, S, S)`` -> ``float32`` in [0, 1]."""
        return x.float().div_(255.0)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] floats -> ``(x - mean) / std`` per channel."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8 (B, C, S, S)`` (or ``(C, S, S)``) -> standardised ``float32``."""
        squeeze = x.ndim == 3
        out = self.standardize(self.to_unit(x[None] if squeeze else x))
        return out[0] if squeeze else out

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        """Decoded pixels -> network input ``float32 (C, S, S)``."""
        return self.normalize(torch.from_numpy(self.prepare(pixels)))

    # -- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        known = {
            k: d[k]
            for k in ("image_size", "channels", "mean", "std", "resize", "grayscale")
            if k in d
        }
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(float(v) for v in known[k])
        return cls(**known)

    def geometry_key(self) -> str:
        """Hash of what :meth:`prepare` depends on (the cache key for prepared pixels)."""
        return self.geometry.geometry_key()


def compute_mean_std(prepared: np.ndarray | torch.Tensor, chunk: int = 512) -> tuple[list, list]:
    """Per-channel mean and std of prepared ``uint8 (N, C, S, S)`` images, in [0, 1] units."""
    x = torch.as_tensor(prepared)
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for i in range(0, len(x), chunk):
        b = x[i : i + chunk].to(torch.float64) / 255.0
        total += b.sum(dim=(0, 2, 3))
        total_sq += (b * b).sum(dim=(0, 2, 3))
        count += b.shape[0] * b.shape[2] * b.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return [round(float(m), 6) for m in mean], [round(max(float(s), 1e-3), 6) for s in std]
