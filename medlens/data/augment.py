"""Training-time augmentation: random geometry and flips on batches of [0, 1] images.

Sits between :meth:`~medlens.data.preprocess.Preprocess.prepare` (what the cache stores) and
standardisation; only training batches are augmented.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medlens.config import AugmentSpec


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
    return out.clamp_(0.0, 1.0)
