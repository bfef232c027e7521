"""What a stage trains on, one batch at a time.

* :class:`ImageBatches` - decoded uint8 images, augmented on the fly (the ``full`` stage);
* :class:`CachedBatches` - activations computed once (the ``head`` and ``finetune`` stages);
* :class:`ModelInput` and :class:`AugmentedInput` - uint8 images to the network's input.

A batch source is called once per epoch with the epoch number and the stage's generator; the
generator draws the shuffle first, then each batch's augmentation, in that order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from medlens.config import AugmentSpec
from medlens.data.augment import augment
from medlens.data.preprocess import Preprocess
from medlens.training.distributed import sampled_batches

Batch = tuple[torch.Tensor, torch.Tensor]
BatchSource = Callable[[int, torch.Generator], Iterator[Batch]]
"""``(epoch, generator) -> (inputs, labels)`` batches of one epoch."""


class ModelInput:
    """uint8 images ``(B, C, S, S)`` -> the network's input: standardised, channels-last."""

    def __init__(self, pre: Preprocess):
        self.pre = pre

    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        return self.pre.normalize(b).contiguous(memory_format=torch.channels_last)


class AugmentedInput:
    """uint8 images -> the network's input, augmented (when ``augmenting``) on the way.

    Args:
        pre: scaling and standardisation.
        spec: the augmentation.
        generator: where the augmentation draws from.
        augmenting: false for a clean copy.
    """

    def __init__(
        self, pre: Preprocess, spec: AugmentSpec, generator: torch.Generator, augmenting: bool
    ):
        self.pre, self.spec, self.generator, self.augmenting = pre, spec, generator, augmenting

    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        u = self.pre.to_unit(b)
        if self.augmenting:
            u = augment(u, self.spec, self.generator)
        return self.pre.standardize(u).contiguous(memory_format=torch.channels_last)


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator, epoch: int = 0
) -> Iterator[torch.Tensor]:
    """One epoch's shuffled index batches (this rank's share under torchrun: see
    :func:`medlens.training.distributed.sampled_batches`); a last batch of one sample is
    dropped.

    Args:
        n: samples.
        batch_size: samples per (global) batch.
        generator: draws the shuffle's seed (when iteration starts).
        epoch: the epoch (the sampler's ``set_epoch``).

    Yields:
        Index tensors.
    """
    yield from sampled_batches(n, batch_size, generator, epoch)


class ImageBatches:
    """Decoded training images, scaled, augmented (when ``augmenting``) and standardised.

    Args:
        x: uint8 images ``(N, C, S, S)``.
        y: labels ``(N,)``.
        pre: scaling and standardisation.
        spec: the augmentation.
        augmenting: whether to augment.
        batch_size: images per batch.
        device: where the batches go.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: torch.Tensor,
        pre: Preprocess,
        spec: AugmentSpec,
        *,
        augmenting: bool,
        batch_size: int,
        device: torch.device | None,
        workers: int = 0,
    ):
        self.x, self.y, self.pre, self.spec = x, y, pre, spec
        self.augmenting, self.batch_size, self.device = augmenting, batch_size, device
        self.workers = workers

    def __call__(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        if self.workers and self.augmenting:
            yield from self._from_workers(generator, epoch)
            return
        for idx in batch_indices(len(self.y), self.batch_size, generator, epoch):
            xb = torch.from_numpy(np.ascontiguousarray(self.x[idx.numpy()]))
            xb = self.pre.to_unit(xb.to(self.device, non_blocking=True))
            if self.augmenting:
                xb = augment(xb, self.spec, generator)
            yield (
                self.pre.standardize(xb).contiguous(memory_format=torch.channels_last),
                self.y[idx].to(self.device),
            )

    def _from_workers(self, generator: torch.Generator, epoch: int) -> Iterator[Batch]:
        """The same epoch prepared ahead by ``workers`` processes (``torch.utils.data``): the
        shuffle and one seed per batch come from ``generator``, so the batches do not depend on
        how many workers there are."""
        from torch.utils.data import DataLoader

        batches = list(batch_indices(len(self.y), self.batch_size, generator, epoch))
        seeds = torch.randint(0, 2**62, (len(batches),), generator=generator).tolist()
        loader = DataLoader(
            _AugmentedBatches(self.x, batches, seeds, self.pre, self.spec),
            batch_size=None,
            num_workers=self.workers,
            worker_init_fn=_one_thread,
            multiprocessing_context="fork",
        )
        for idx, xb in zip(batches, loader):
            xb = xb.to(self.device, non_blocking=True)
            yield (
                self.pre.standardize(xb).contiguous(memory_format=torch.channels_last),
                self.y[idx].to(self.device),
            )


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # each worker is one core's worth of augmentation


class _AugmentedBatches(torch.utils.data.Dataset):
    """Batch ``i``: its images scaled to [0, 1] and augmented with its own seed."""

    def __init__(self, x: np.ndarray, batches: list, seeds: list[int], pre: Preprocess,
                 spec: AugmentSpec):  # fmt: skip
        self.x, self.batches, self.seeds, self.pre, self.spec = x, batches, seeds, pre, spec

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        xb = self.pre.to_unit(
            torch.from_numpy(np.ascontiguousarray(self.x[self.batches[i].numpy()]))
        )
        return augment(xb, self.spec, torch.Generator().manual_seed(self.seeds[i]))


class CachedBatches:
    """Cached activations ``(copies * N, ...)``; epoch ``e`` uses copy ``e % copies``, or
    with ``mix`` a copy drawn per image and epoch.

    Args:
        x: the activations, ``copies`` blocks of ``N`` rows.
        y: labels ``(N,)``.
        batch_size: rows per batch.
        device: where the batches go (as float32).
        copies: blocks in ``x``.
        mix: draw each image's copy from the run's generator every epoch (the same draw on
            every rank under torchrun, since all ranks share the generator's seed).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        batch_size: int,
        device: torch.device | None,
        copies: int = 1,
        mix: bool = False,
    ):
        self.x, self.y, self.batch_size, self.device, self.copies = x, y, batch_size, device, copies
        self.mix = mix

    def rows(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """Row of ``x`` that image ``i`` comes from this epoch, ``(N,)``."""
        n = len(self.y)
        if self.mix and self.copies > 1:
            copy = torch.randint(0, self.copies, (n,), generator=generator)
        else:
            copy = torch.full((n,), epoch % self.copies, dtype=torch.long)
        return copy * n + torch.arange(n)

    def __call__(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        rows = self.rows(epoch, generator)
        for idx in batch_indices(len(self.y), self.batch_size, generator, epoch):
            yield (
                self.x[rows[idx]].to(self.device, non_blocking=True).float(),
                self.y[idx].to(self.device),
            )
