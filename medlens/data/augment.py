"""Training-time augmentation of batches of [0, 1] images.

Geometry, flips, brightness and contrast come from one vectorised affine resample; the
acquisition-shift transforms (random resized crop, gamma, blur, sharpening, noise, CLAHE) from
kornia.augmentation, drawn from the same generator so a run stays reproducible.

Sits between :meth:`~medlens.data.preprocess.Preprocess.prepare` (what the cache stores) and
standardisation; only training batches are augmented.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from medlens.config import AugmentSpec

if TYPE_CHECKING:
    import kornia.augmentation as K


def augment(
    x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Augment a batch of [0, 1] images in one vectorised affine resample.

    One ``affine_grid``/``grid_sample`` call per batch instead of per-image transforms keeps
    augmentation cheap on a 2-core CPU.

    Args:
        x: ``float32 (B, C, S, S)`` in [0, 1].
        spec: what to randomise.
        generator: for reproducible draws.

    Returns:
        Augmented batch, same shape, clipped to [0, 1].
    """
    if not spec.enabled:
        return x
    b = x.shape[0]

    def uniform(lo, hi):
        return torch.rand(b, generator=generator) * (hi - lo) + lo

    angle = uniform(-spec.rotation, spec.rotation) * (math.pi / 180.0)
    scale = uniform(1.0 - spec.zoom, 1.0 + spec.zoom)
    tx, ty = uniform(-spec.shift, spec.shift) * 2, uniform(-spec.shift, spec.shift) * 2
    flip = (
        torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
        if spec.hflip
        else torch.ones(b)
    )
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # Draws come from the (CPU) generator whatever the batch's device: same augmentation
    # sequence on CPU and GPU.
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    ).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if spec.brightness or spec.contrast:
        gain = uniform(1 - spec.contrast, 1 + spec.contrast).view(b, 1, 1, 1).to(x.device)
        bias = uniform(-spec.brightness, spec.brightness).view(b, 1, 1, 1).to(x.device)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * gain + mean + bias
    out = out.clamp_(0.0, 1.0)
    if any((spec.crop_scale, spec.gamma, spec.clahe, spec.blur, spec.sharpen, spec.noise)):
        out = _acquisition_shift(out, spec, generator)
    if spec.downscale:
        out = _resolution_shift(out, spec.downscale, generator)
    if spec.stamp:
        out = _stamp_boxes(out, spec.stamp, generator)
    return out


def _stamp_boxes(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """On a random share ``p`` of the batch, a solid white rectangle (25-55% of the width,
    6-18% of the height) near the bottom edge (three times in four) or the top edge, where
    anonymisation boxes sit: stamped on every class, the box stops being a cue for one."""
    b, _, h, w = x.shape
    u = torch.rand(b, 6, generator=generator)
    x = x.clone()
    for i in torch.nonzero(u[:, 0] < p).flatten().tolist():
        bw, bh = int(w * (0.25 + 0.3 * u[i, 1])), max(2, int(h * (0.06 + 0.12 * u[i, 2])))
        x0 = int((w - bw) * u[i, 3])
        gap = int(h * 0.1 * u[i, 4])
        y0 = h - bh - gap if u[i, 5] < 0.75 else gap
        x[i, :, y0 : y0 + bh, x0 : x0 + bw] = 1.0
    return x


def _resolution_shift(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """A random share ``p`` of the batch shrunk to one drawn fraction (35-90%) of its side by
    area averaging and enlarged back bilinearly: the loss of detail of an image stored at
    another resolution and resized, which blur alone does not imitate (aliasing, blockiness)."""
    chosen = torch.rand(x.shape[0], generator=generator) < p
    factor = float(torch.rand(1, generator=generator)) * 0.55 + 0.35
    if not bool(chosen.any()):
        return x
    side = tuple(max(8, round(s * factor)) for s in x.shape[-2:])
    sub = x[chosen.to(x.device)]
    small = F.interpolate(sub, size=side, mode="area")
    x = x.clone()
    x[chosen.to(x.device)] = F.interpolate(
        small, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False
    ).clamp_(0.0, 1.0)
    return x


def _shift_transforms(spec: AugmentSpec, size: tuple[int, int]) -> list[K.AugmentationBase2D]:
    """The kornia transforms the spec turns on, in the order they are applied (the crop
    resizes back to the batch's ``size``)."""
    import kornia.augmentation as K

    out: list[K.AugmentationBase2D] = []
    if spec.crop_scale:
        out.append(K.RandomResizedCrop(size, scale=(1 - spec.crop_scale, 1.0),
                                       ratio=(3 / 4, 4 / 3), p=1.0))  # fmt: skip
    if spec.gamma:
        out.append(K.RandomGamma((1 - spec.gamma, 1 + spec.gamma), p=1.0))
    if spec.clahe:
        out.append(K.RandomClahe(clip_limit=(2.0, 2.0), p=spec.clahe))
    if spec.blur:
        out.append(K.RandomGaussianBlur((5, 5), (0.1, 1.5), p=spec.blur))
    if spec.sharpen:
        out.append(K.RandomSharpness(0.5, p=spec.sharpen))
    if spec.noise:
        out.append(K.RandomGaussianNoise(std=spec.noise, p=0.5))
    return out


def _acquisition_shift(
    x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None
) -> torch.Tensor:
    """Apply :func:`_shift_transforms` with kornia, its random draws seeded from ``generator``
    (kornia draws from torch's global generator, which is left as it was)."""
    import kornia.augmentation as K

    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    pipeline = K.AugmentationSequential(*_shift_transforms(spec, (x.shape[-2], x.shape[-1])))
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return pipeline(x).clamp_(0.0, 1.0)
