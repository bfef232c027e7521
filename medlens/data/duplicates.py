"""Near-identical images across splits.

The same picture saved twice under two names (re-encoded, resized, or with its contrast
changed) escapes patient grouping, which only sees names. When one copy trains and the other
validates or tests, those figures are optimistic. Public sets do this more than one would
think: 1146 of the 5708 brain MRI training images have a near-identical twin in the set, and
10 NIH images of the COVID-19 X-ray set are also among the tuberculosis set's normals.

Each image becomes a grey 16 x 16 thumbnail with zero mean and unit norm; two images are
near-identical when their thumbnails' cosine similarity is at least :data:`THRESHOLD`. On the
shared sets, the pairs above it that were looked at are copies (re-encoded, or with another
contrast); the Kermany chest X-rays have 28 pairs above 0.9995 and none between 0.995 and
0.9995, and the closest pairs of the COVID-CT slices reach 0.998.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["THRESHOLD", "thumbnails", "twins"]

THRESHOLD = 0.9995
"""Cosine similarity of two thumbnails from which the images count as one picture."""

SIDE = 16
"""Thumbnail side, in pixels."""


def thumbnails(pixels: np.ndarray, batch: int = 256) -> np.ndarray:
    """Grey ``SIDE x SIDE`` thumbnails of ``(N, C, H, W)`` (or ``(N, H, W)``) images, each
    with zero mean and unit norm (a blank image's is all zeros: it matches nothing).

    Returns:
        ``float32 (N, SIDE * SIDE)``.
    """
    out = []
    for i in range(0, len(pixels), batch):
        x = torch.as_tensor(np.asarray(pixels[i : i + batch])).float()
        x = x.unsqueeze(1) if x.dim() == 3 else x.mean(1, keepdim=True)
        t = F.adaptive_avg_pool2d(x, SIDE).flatten(1)
        t = t - t.mean(1, keepdim=True)
        norm = t.norm(dim=1, keepdim=True)
        out.append(torch.where(norm > 1e-3, t / norm.clamp_min(1e-6), torch.zeros_like(t)))
    return torch.cat(out).numpy() if out else np.zeros((0, SIDE * SIDE), np.float32)


def twins(
    query: np.ndarray, reference: np.ndarray, threshold: float = THRESHOLD, chunk: int = 1024
) -> np.ndarray:
    """For each query thumbnail, the index of the most similar reference thumbnail when their
    similarity reaches ``threshold``, else -1 (see :func:`thumbnails`).

    Returns:
        ``int64 (len(query),)``.
    """
    found = np.full(len(query), -1, np.int64)
    if not len(query) or not len(reference):
        return found
    for i in range(0, len(query), chunk):
        sim = query[i : i + chunk] @ reference.T
        best = sim.argmax(1)
        hit = sim[np.arange(len(best)), best] >= threshold
        found[i : i + chunk][hit] = best[hit]
    return found
