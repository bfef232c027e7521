"""Grad-CAM maps as heat maps and overlays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def cam_to_heat(acti: torch.Tensor, size: Sequence[int]) -> np.ndarray:
    """``(1, 1, h, w)`` activation map -> ``float32 (S, S)`` in [0, 1]: bilinear upsampling to
    the input size (MONAI's default upsampler) and min-max scaling, 1 = strongest evidence."""
    heat = torch.nn.functional.interpolate(
        acti, size=tuple(size), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    lo, hi = float(heat.min()), float(heat.max())
    heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    return heat.astype(np.float32)


def jet(x: np.ndarray) -> np.ndarray:
    """The 'jet' colour map in closed form (blue - cyan - yellow - red): ``(...)`` values in
    [0, 1] -> ``(..., 3)`` RGB in [0, 1]. Computed here rather than through matplotlib, whose
    import writes a configuration folder into the user's home (serving writes nothing)."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0, 1)[..., None]
    centres = np.array([3.0, 2.0, 1.0], np.float32)  # red, green, blue peak at 3/4, 1/2, 1/4
    return np.clip(1.5 - np.abs(4 * x - centres), 0, 1)


def overlay_cam(
    pixels: np.ndarray, cam: np.ndarray, size: int | None = None, alpha: float = 0.4
) -> np.ndarray:
    """Blend a [0, 1] heat map over an image with the 'jet' colour map.

    Args:
        pixels: ``uint8 (H, W)`` or ``(H, W, 3)``.
        cam: ``float (h, w)`` in [0, 1] (resized to the image).
        size: output side (square); default keeps the image's size.

    Returns:
        ``uint8 (H, W, 3)`` RGB overlay.
    """
    from PIL import Image

    img = Image.fromarray(pixels).convert("RGB")
    if size:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    heat = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize(
        img.size, Image.Resampling.BILINEAR
    )
    colour = jet(np.asarray(heat, dtype=np.float32) / 255.0)
    base = np.asarray(img, dtype=np.float32) / 255.0
    out = (1 - alpha) * base + alpha * colour
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)
