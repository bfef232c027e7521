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
    from matplotlib import colormaps
    from PIL import Image

    img = Image.fromarray(pixels).convert("RGB")
    if size:
        img = img.resize((size, size), Image.BILINEAR)
    heat = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize(
        img.size, Image.BILINEAR
    )
    colour = colormaps["jet"](np.asarray(heat, dtype=np.float32) / 255.0)[..., :3]
    base = np.asarray(img, dtype=np.float32) / 255.0
    out = (1 - alpha) * base + alpha * colour
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)
