"""Where and in what precision training runs: device, autocast dtype, seeds, batch norm."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medlens.errors import TrainError
from medlens.machine import cpu_info


def bf16_supported() -> bool:
    """Whether bfloat16 autocast pays off here: CPUs with AMX or AVX-512 BF16.

    Returns:
        True when ``/proc/cpuinfo`` lists ``amx_bf16`` or ``avx512_bf16``.
    """
    flags = set(cpu_info().get("flags", "").split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_device(name: str) -> torch.device:
    """The device of ``--device``: ``auto`` is the first CUDA device torch sees, else the CPU.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The torch device.

    Raises:
        TrainError: an unknown device, or a CUDA device torch does not see.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(
            f"--device {name}: torch {torch.__version__} sees no CUDA device; "
            "use --device cpu (or auto)"
        )
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise TrainError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise TrainError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return dev


def resolve_precision(precision: str, device: torch.device | None = None) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` on ``device``.

    Args:
        precision: ``fp32``, ``bf16`` or ``auto`` (bf16 where the CPU or GPU supports it).
        device: where the passes run (None: the CPU).

    Returns:
        ``torch.bfloat16``, or None for plain float32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device is not None and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if bf16_supported() else None


def set_seed(seed: int) -> None:
    """Seed NumPy's and torch's global generators."""
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_bn_momentum(net: nn.Module, momentum: float) -> int:
    """Set every batch-norm layer's momentum.

    MONAI's EfficientNet keeps TensorFlow's momentum (0.01): fine-tuning every layer on a few
    hundred images then leaves the running statistics mostly ImageNet's.

    Args:
        net: the network.
        momentum: the new momentum, in (0, 1].

    Returns:
        How many layers were set.
    """
    layers = batch_norms(net)
    for m in layers:
        m.momentum = momentum
    return len(layers)


def batch_norms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every batch-norm layer of ``net``."""
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batch_norms(net: nn.Module) -> int:
    """Put every batch-norm layer of ``net`` in inference mode (running statistics, not the
    batch's; not updated), after ``net.train()``. Their affine weights still train.

    Returns:
        How many layers were frozen.
    """
    layers = batch_norms(net)
    for m in layers:
        m.eval()
    return len(layers)
