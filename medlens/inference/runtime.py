"""Batched forward passes: the maths every inference path shares."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medlens.modeling.classifier import Classifier


import contextlib
from collections.abc import Callable

import numpy as np
import torch


def autocast(
    dtype: torch.dtype | None, device: torch.device | None = None
) -> contextlib.AbstractContextManager:
    """bf16 (or ``dtype``) autocast on ``device``'s type; a no-op when ``dtype`` is None."""
    kind = device.type if device is not None else "cpu"
    return torch.autocast(kind, dtype=dtype, enabled=dtype is not None)


def exact_float32(
    dtype: torch.dtype | None, device: torch.device | None
) -> contextlib.AbstractContextManager:
    """cuDNN convolutions run in TF32 by default on recent GPUs; a float32 pass (calibration,
    evaluation, the OOD guard) must be the float32 that CPU serving computes."""
    if dtype is not None or device is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False)


def compute_logits(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: np.ndarray | torch.Tensor,
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    transform: Callable | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Apply ``fn`` to ``x`` in batches under no_grad (each batch moved to ``device`` first,
    then ``transform``-ed); returns float32 logits on CPU."""
    outs = []
    with torch.no_grad(), autocast(dtype, device), exact_float32(dtype, device):
        for i in range(0, len(x), batch_size):
            b = torch.as_tensor(x[i : i + batch_size])
            if device is not None:
                b = b.to(device, non_blocking=True)
            if transform is not None:
                b = transform(b)
            outs.append(fn(b).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def logits_and_stats(net: Classifier, b: torch.Tensor) -> torch.Tensor:
    logits, _, stats = net.forward_with_stats(b)
    return torch.cat([logits, stats], 1)
