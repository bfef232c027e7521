"""Regularisers of the training loop, all off by default: label smoothing, mixup, EMA.

* Label smoothing (Szegedy et al. 2016): binary targets become ``y (1 - e) + e / 2``;
  multi-class uses cross-entropy's own ``label_smoothing``.
* Mixup (Zhang et al. 2018): each batch is mixed with a shuffled copy of itself,
  ``lam x + (1 - lam) x[perm]`` with ``lam ~ Beta(alpha, alpha)``, and the loss mixed alike. In
  the cached stages it mixes the cached activations (manifold mixup, Verma et al. 2019).
* EMA of the weights (Polyak averaging) through ``torch.optim.swa_utils.AveragedModel``: the
  averaged weights (and batch-norm buffers) are what validation sees and what is kept.

Every random draw comes from the stage's generator, so a run stays reproducible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["smoothed_loss", "mix_batch", "WeightAverage"]


def smoothed_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor | None,
    binary: bool,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """Class-weighted BCE (binary, one logit) or cross-entropy (multi-class), with optional
    label smoothing.

    Args:
        logits: ``(B, 1)`` or ``(B, K)``.
        y: labels ``(B,)``.
        weights: per-class weights, or None.
        binary: one logit per image.
        smoothing: label smoothing ``e`` in [0, 0.5).

    Returns:
        The mean loss.
    """
    if binary:
        logits = logits.view(-1)
        w = None if weights is None else weights[y]
        target = y.float()
        if smoothing:
            target = target * (1 - smoothing) + smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, target, weight=w)
    return F.cross_entropy(logits, y, weight=weights, label_smoothing=smoothing)


def mix_batch(
    x: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup: ``(mixed x, perm, lam)``; the loss is ``lam L(y) + (1 - lam) L(y[perm])``."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], perm, lam


class WeightAverage:
    """An exponential moving average of ``module``'s weights and buffers.

    Args:
        module: what trains (its parameters are updated in place by the optimiser).
        decay: weight of the old average at each step, e.g. 0.999.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.module = module
        self.average = AveragedModel(
            module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
        )

    def update(self) -> None:
        """Fold the current weights into the average (after each optimiser step)."""
        self.average.update_parameters(self.module)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside: ``module`` holds the averaged weights; after: its own again."""
        own = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(self.average.module.state_dict())
        try:
            yield
        finally:
            self.module.load_state_dict(own)
