"""Data-parallel training with PyTorch DistributedDataParallel, launched by ``torchrun``.

``torchrun --standalone --nproc-per-node=N -m medlens train ...`` (or ``--nnodes`` and
``--rdzv-endpoint`` across machines) starts N copies of the same command; each reads its
rank from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins
the process group (gloo on the CPU, NCCL on GPUs). Then:

* every rank loads and decodes the same data and builds the same splits (same seed);
* each epoch a :class:`torch.utils.data.DistributedSampler` (``set_epoch``, its seed drawn
  from the stage's generator, identical on every rank) deals the shuffled indices out, and
  each rank trains on ``batch_size / N`` of each global batch: the global batch is
  ``--batch-size`` whatever N is, so the learning rate needs no change (the same batches, in
  the same order, as one process would use);
* the trained module is wrapped in DDP, which averages the gradients;
* each epoch's validation is split over the ranks and gathered, whole and in order, to every
  rank (early stopping and the scheduler decide the same everywhere);
* only rank 0 writes: ``training_metrics.csv``, checkpoints, then calibration, the OOD guard,
  evaluation and the model, alone, after the others have finished.

Batch norm layers normalise over the global batch, as in one process: on GPUs they become
``SyncBatchNorm``; on the CPU (where ``SyncBatchNorm`` refuses to run) their batch statistics
are all-reduced with autograd-aware collectives (:func:`_global_batch_norm`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

__all__ = [
    "World",
    "world",
    "start",
    "stop",
    "train_forward",
    "sampled_batches",
    "gather_rows",
    "sum_over_ranks",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_WORLD = World()


def world() -> World:
    """The current world (one process unless :func:`start` joined a torchrun job)."""
    return _WORLD


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device) -> World:
    """Join the torchrun job (gloo on the CPU, NCCL on CUDA); a no-op for one process."""
    global _WORLD
    if not launched() or _WORLD.distributed:
        return _WORLD
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    _WORLD = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if not _WORLD.main:  # one voice: rank 0 logs, the others only warn
        logging.getLogger("medlens").setLevel(logging.WARNING)
    log.info(f"distributed: {_WORLD.size} processes ({backend})")
    return _WORLD


def stop() -> None:
    """Wait for every rank, then leave the process group."""
    global _WORLD
    if not _WORLD.distributed:
        return
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    _WORLD = World()


def barrier() -> None:
    if _WORLD.distributed:
        import torch.distributed as dist

        dist.barrier()


class _Call(nn.Module):
    """``fn`` as the forward of a module that owns ``module``'s parameters (what DDP wraps)."""

    def __init__(self, module: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.inner, self.fn = module, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks in the forward pass, and the gradients' sum in the backward pass
    (every rank's loss depends on every rank's share)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        import torch.distributed as dist

        out = grad.clone()
        dist.all_reduce(out)
        return out


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the ranks, differentiable."""
    return _AllReduceSum.apply(t)


def _global_batch_norm(
    bn: nn.modules.batchnorm._BatchNorm,
    local: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
) -> torch.Tensor:
    """Batch norm over the global batch (every rank's share): sums, sums of squares and counts
    all-reduced with an autograd-aware collective, so the backward pass is the global batch's
    too. What ``SyncBatchNorm`` does on GPUs, for the CPU (gloo)."""
    if not bn.training:
        return local(x)
    dims = [0] + list(range(2, x.dim()))
    xf = x.float()
    count = torch.tensor(float(xf.numel() // xf.shape[1]), dtype=torch.float32)
    total = all_reduce(torch.stack([count.expand(xf.shape[1]), xf.sum(dims), (xf * xf).sum(dims)]))
    n, mean = total[0], total[1] / total[0]
    var = total[2] / n - mean * mean
    running_mean, running_var, tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
    # medlens's networks track running statistics (track_running_stats=True)
    assert running_mean is not None and running_var is not None and tracked is not None
    with torch.no_grad():
        m = bn.momentum if bn.momentum is not None else 1.0 / float(tracked + 1)
        running_mean.mul_(1 - m).add_(m * mean.detach())
        running_var.mul_(1 - m).add_(m * (var.detach() * n / (n - 1).clamp_min(1)))
        tracked += 1
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (xf - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class _GlobalBatchNorm:
    """While active, the batch norm layers of a module normalise over the global batch."""

    def __init__(self, module: nn.Module) -> None:
        self.layers = [
            m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self.local_forwards: list[Callable[[torch.Tensor], torch.Tensor]] = []

    def __enter__(self) -> None:
        self.local_forwards = [bn.forward for bn in self.layers]
        for bn, local in zip(self.layers, self.local_forwards):
            # an instance attribute shadows the class's forward while active
            vars(bn)["forward"] = partial(_global_batch_norm, bn, local)

    def __exit__(self, *exc) -> None:
        for bn, local in zip(self.layers, self.local_forwards):
            vars(bn)["forward"] = local


class _DataParallelForward:
    """DDP over the trained module; on the CPU its batch norm layers use the global batch
    (on GPUs they become ``SyncBatchNorm`` in place)."""

    def __init__(self, module: nn.Module, forward: Callable) -> None:
        from torch.nn.parallel import DistributedDataParallel

        cuda = next(module.parameters()).is_cuda
        if cuda:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        self.sync = None if cuda else _GlobalBatchNorm(module)
        ids = [_WORLD.local_rank] if cuda else None
        self.ddp = DistributedDataParallel(_Call(module, forward), device_ids=ids)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.sync is None:
            return self.ddp(x)
        with self.sync:
            return self.ddp(x)


def train_forward(module: nn.Module, forward: Callable) -> Callable:
    """The training forward: ``forward`` itself, or through DDP when distributed."""
    if not _WORLD.distributed:
        return forward
    return _DataParallelForward(module, forward)


def sampled_batches(
    n: int, batch_size: int, generator: torch.Generator, epoch: int
) -> Iterator[torch.Tensor]:
    """One epoch's index batches of this rank: a :class:`DistributedSampler` over ``n``
    samples (``set_epoch(epoch)``, its seed drawn from ``generator``) dealt out in batches of
    ``batch_size / world size``; a global batch of one sample per rank or less is dropped (batch
    norm cannot train on one sample), on every rank alike."""
    from torch.utils.data import DistributedSampler

    w = _WORLD
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    # the sampler only takes len() of its dataset; torch's stubs ask for a Dataset
    sampler: DistributedSampler[int] = DistributedSampler(
        range(n),  # type: ignore[arg-type]
        num_replicas=w.size,
        rank=w.rank,
        shuffle=True,
        seed=seed,
        drop_last=False,
    )
    sampler.set_epoch(epoch)
    mine = torch.tensor(list(sampler), dtype=torch.long)
    per_rank = max(1, batch_size // w.size)
    total = (n + w.size - 1) // w.size  # the sampler pads every rank to this many
    for i in range(0, total, per_rank):
        idx = mine[i : i + per_rank]
        if min(per_rank, total - i) < 2:
            continue
        yield idx


def sum_over_ranks(values: list[float]) -> list[float]:
    """Each value summed over the ranks (the epoch's training loss and accuracy counts)."""
    if not _WORLD.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return [float(v) if isinstance(v0, float) else int(v) for v, v0 in zip(t.tolist(), values)]


def gather_rows(compute: Callable[[torch.Tensor], torch.Tensor], n: int) -> torch.Tensor:
    """``compute(indices)`` for this rank's share (every N-th of ``0..n-1``), gathered whole
    and in order on every rank: no sample dropped or counted twice."""
    w = _WORLD
    if not w.distributed:
        return compute(torch.arange(n))
    import torch.distributed as dist

    part = compute(torch.arange(w.rank, n, w.size))
    parts: list = [None] * w.size
    dist.all_gather_object(parts, part.cpu())
    out = torch.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, p in enumerate(parts):
        out[r :: w.size] = p
    return out
