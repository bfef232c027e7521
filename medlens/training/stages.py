"""The stages of training, each a :class:`Stage` built by one function.

* ``head`` - pretrained backbones: the backbone is frozen, its pooled features are computed
  once and the head (batch norm, dropout, dense) trains on them in seconds.
* ``finetune`` - the top ``unfreeze`` backbone stages train with a lower learning rate. The
  frozen stages below them are run once over ``aug_copies`` augmented copies of the training
  images and their activations cached (:meth:`StageContext.activations`), so an epoch costs
  only the top stages.
* ``full`` - everything trains on augmented images (models from scratch, or ``--transfer
  full``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medlens.config import TrainConfig
from medlens.inference.runtime import compute_logits
from medlens.modeling.classifier import Classifier, Head
from medlens.training.batches import (
    AugmentedInput,
    BatchSource,
    CachedBatches,
    ImageBatches,
    ModelInput,
)
from medlens.training.resolve import resolve_lr

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One stage of training: what trains, on what, for how long."""

    name: str
    module: nn.Module  # put in train()/eval() mode per epoch
    forward: Callable[[torch.Tensor], torch.Tensor]  # inputs -> logits
    params: list
    train_batches: BatchSource
    n_train: int
    val_x: np.ndarray | torch.Tensor
    val_transform: Callable | None
    val_y: torch.Tensor
    epochs: int
    lr: float
    dtype: torch.dtype | None
    device: torch.device | None = None


def stage_names(cfg: TrainConfig, pretrained: bool) -> list[str]:
    """The stages a run goes through, in order.

    Args:
        cfg: the settings (``transfer``, ``unfreeze``).
        pretrained: whether the backbone starts from ImageNet weights.

    Returns:
        ``["head"]``, ``["head", "finetune"]`` or ``["full"]``.
    """
    if not (pretrained and cfg.transfer in ("frozen", "finetune")):
        return ["full"]
    if cfg.transfer == "finetune" and cfg.unfreeze > 0:
        return ["head", "finetune"]
    return ["head"]


@dataclass
class StageContext:
    """What every stage is built from: the network, the data, where and how precisely.

    Attributes:
        dtype: autocast dtype of the frozen (no-grad) passes.
        train_dtype: autocast dtype of the passes that train.
        n_top: backbone stages the finetune stage trains (0 without one).
        copies: copies of the training set in the activation cache (augmented but the first).
    """

    cfg: TrainConfig
    net: Classifier
    to_input: ModelInput
    x_train: np.ndarray
    y_train: torch.Tensor
    x_val: np.ndarray
    y_val: torch.Tensor
    device: torch.device
    dtype: torch.dtype | None
    train_dtype: torch.dtype | None
    n_top: int
    copies: int
    _activations: tuple[torch.Tensor, torch.Tensor] | None = field(
        default=None, init=False, repr=False
    )

    @property
    def lr(self) -> float:
        """The head / full stage learning rate (fine-tuning scales it); resolved by
        :func:`medlens.training.resolve.resolve_lr`."""
        return resolve_lr(self.cfg)

    def activations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen-prefix activations of the training set (copy 0 clean, the rest augmented,
        bfloat16) and of the validation set; computed once, shared by head and finetune."""
        if self._activations is None:
            self._activations = _frozen_activations(self)
        return self._activations


def stage_context(
    cfg: TrainConfig,
    net: Classifier,
    names: list[str],
    *,
    to_input: ModelInput,
    x_train: np.ndarray,
    y_train: torch.Tensor,
    x_val: np.ndarray,
    y_val: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
    train_dtype: torch.dtype | None,
) -> StageContext:
    """A :class:`StageContext`, with the fine-tuned depth and cached copies worked out.

    Args:
        cfg: the settings.
        net: the network.
        names: the run's stages (:func:`stage_names`).
        to_input, x_train, y_train, x_val, y_val, device, dtype, train_dtype: the other
            :class:`StageContext` fields.

    Returns:
        The context.
    """
    finetune = "finetune" in names
    n_top = min(cfg.unfreeze, len(net.backbone) - 1) if finetune else 0
    copies = max(1, cfg.aug_copies) if finetune and cfg.augment.enabled else 1
    return StageContext(
        cfg=cfg, net=net, to_input=to_input, x_train=x_train, y_train=y_train, x_val=x_val,
        y_val=y_val, device=device, dtype=dtype, train_dtype=train_dtype, n_top=n_top,
        copies=copies,
    )  # fmt: skip


def _frozen_activations(ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
    backbone = list(ctx.net.backbone)
    prefix = nn.Sequential(*backbone[: len(backbone) - ctx.n_top]).eval()
    gen = torch.Generator().manual_seed(ctx.cfg.seed + 77)
    t0 = time.time()
    acts = []
    for c in range(ctx.copies):
        transform = AugmentedInput(ctx.to_input.pre, ctx.cfg.augment, gen, augmenting=c > 0)
        acts.append(
            compute_logits(
                prefix, ctx.x_train, dtype=ctx.dtype, transform=transform, device=ctx.device
            ).to(torch.bfloat16)
        )
    ava = compute_logits(
        prefix, ctx.x_val, dtype=ctx.dtype, transform=ctx.to_input, device=ctx.device
    )
    log.info(
        f"cached frozen activations {tuple(ava.shape[1:])} of {ctx.copies} cop"
        f"{'y' if ctx.copies == 1 else 'ies'} of the training set in {time.time() - t0:.1f}s"
    )
    return torch.cat(acts), ava


def _top_stages(net: Classifier, n_top: int) -> list[nn.Module]:
    backbone = list(net.backbone)
    return backbone[len(backbone) - n_top :]


class PooledFeatures:
    """Cached activations -> the head's input: the top backbone stages, then pooling."""

    def __init__(self, top: nn.Module, head: Head):
        self.top, self.head = top, head

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        return self.head.pooled(self.top(a.float()))


def _stage(
    ctx: StageContext,
    name: str,
    module: nn.Module,
    batches: BatchSource,
    val_x: np.ndarray | torch.Tensor,
    **kw: Any,
) -> Stage:
    """A :class:`Stage` on ``ctx``'s labels and device; ``forward`` defaults to ``module``,
    ``params`` to its trainable parameters."""
    kw.setdefault("forward", module)
    kw.setdefault("params", [p for p in module.parameters() if p.requires_grad])
    kw.setdefault("val_transform", None)
    kw.setdefault("dtype", None)
    return Stage(name=name, module=module, train_batches=batches, n_train=len(ctx.y_train),
                 val_x=val_x, val_y=ctx.y_val, device=ctx.device, **kw)  # fmt: skip


def head_stage(ctx: StageContext) -> Stage:
    """The head trains on pooled features of the frozen backbone, computed once."""
    net, cfg = ctx.net, ctx.cfg
    net.set_trainable_stages(0)
    net.eval()
    atr, ava = ctx.activations()
    pooled = PooledFeatures(nn.Sequential(*_top_stages(net, ctx.n_top)), net.head)
    ftr = compute_logits(pooled, atr[: len(ctx.y_train)], dtype=ctx.dtype, device=ctx.device)
    fva = compute_logits(pooled, ava, dtype=ctx.dtype, device=ctx.device)
    batches = CachedBatches(ftr, ctx.y_train, batch_size=cfg.batch_size, device=ctx.device)
    head = net.head
    return _stage(ctx, "head", head, batches, fva, forward=head.classify,
                  params=list(head.parameters()), epochs=cfg.head_epochs, lr=ctx.lr)  # fmt: skip


def finetune_stage(ctx: StageContext) -> Stage:
    """The top ``n_top`` backbone stages and the head train on cached activations."""
    net, cfg = ctx.net, ctx.cfg
    net.set_trainable_stages(ctx.n_top)
    atr, ava = ctx.activations()
    top = nn.Sequential(*_top_stages(net, ctx.n_top), net.head)
    batches = CachedBatches(
        atr,
        ctx.y_train,
        batch_size=cfg.batch_size,
        device=ctx.device,
        copies=ctx.copies,
        mix=cfg.mix_copies,
    )
    lr = ctx.lr * cfg.finetune_lr_scale
    return _stage(
        ctx, "finetune", top, batches, ava, epochs=cfg.epochs, lr=lr, dtype=ctx.train_dtype
    )


def full_stage(ctx: StageContext) -> Stage:
    """Everything trains on augmented images."""
    net, cfg = ctx.net, ctx.cfg
    net.set_trainable_stages(None)
    batches = ImageBatches(ctx.x_train, ctx.y_train, ctx.to_input.pre, cfg.augment,
                           augmenting=cfg.augment.enabled, batch_size=cfg.batch_size,
                           device=ctx.device, workers=cfg.workers)  # fmt: skip
    return _stage(ctx, "full", net, batches, ctx.x_val, val_transform=ctx.to_input,
                  params=list(net.parameters()), epochs=cfg.epochs, lr=ctx.lr,
                  dtype=ctx.train_dtype)  # fmt: skip


STAGES: dict[str, Callable[[StageContext], Stage]] = {
    "head": head_stage,
    "finetune": finetune_stage,
    "full": full_stage,
}
"""Stage name -> the function that builds it."""


def build_stage(name: str, ctx: StageContext) -> Stage:
    """The stage called ``name`` (one of :data:`STAGES`), built from ``ctx``."""
    return STAGES[name](ctx)
