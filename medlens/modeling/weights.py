"""Initialise a backbone from a state_dict the user brings (``medlens train --weights FILE``).

Weights for the seed projects' families (ImageNet VGG16/ResNet50/DenseNet121/InceptionV3, or
chest X-ray weights such as TorchXRayVision's) can be downloaded where there is internet and
used here offline. The file is read with ``torch.load(weights_only=True)`` (no pickled code
runs); a checkpoint that nests its weights (``{"state_dict": ...}``, ``{"model": ...}``) or was
saved from ``DataParallel`` (``module.`` prefixes) is unwrapped.

Tensors are matched to the backbone's own (MONAI or torchvision-style) parameter names and
shapes. When no name matches but the file holds the same architecture under other names (a
torchvision checkpoint for a MONAI network), and every tensor's shape agrees in order, the
tensors are matched by order instead. What was loaded, missing (left as initialised),
unexpected (in the file, unused) or of another shape is reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medlens.errors import ConfigError

__all__ = ["WeightsReport", "read_state_dict", "load_matching"]

_NESTED = ("state_dict", "model_state_dict", "model", "net", "weights")


@dataclass
class WeightsReport:
    """How a state_dict file met a backbone."""

    file: str
    matched_by: str  # "name" or "order"
    loaded: int
    total: int  # tensors of the backbone
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: file shape vs model shape"

    def summary(self) -> str:
        """One line for the log."""

        def few(names: list[str]) -> str:
            return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")

        parts = [f"--weights {self.file}: loaded {self.loaded} of {self.total} tensors "
                 f"(matched by {self.matched_by})"]  # fmt: skip
        for label, names in (("missing (left as initialised)", self.missing),
                             ("unexpected (unused)", self.unexpected),
                             ("other shape (left as initialised)", self.mismatched)):  # fmt: skip
            if names:
                parts.append(f"{len(names)} {label}: {few(names)}")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"file": self.file, "matched_by": self.matched_by, "loaded": self.loaded,
                "total": self.total, "missing": len(self.missing),
                "unexpected": len(self.unexpected), "mismatched": len(self.mismatched)}  # fmt: skip


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pt``/``.pth`` file, unwrapped (see the module doc).

    Raises:
        ConfigError: the file is missing, not a torch file, holds pickled code, or no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - not a torch file, pickled code, truncated zip
        raise ConfigError(
            f"--weights {path} cannot be read as a state_dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); save the weights with "
            "torch.save(model.state_dict(), FILE)"
        ) from None
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _NESTED if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    tensors = (
        {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if isinstance(obj, dict)
        else {}
    )
    if not tensors:
        raise ConfigError(f"--weights {path}: holds no tensors (expected a state_dict)")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def _by_order(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> dict | None:
    """Rename ``given`` onto ``own`` by position when both hold equal shapes in equal order."""
    if len(own) != len(given):
        return None
    pairs = list(zip(own.items(), given.values()))
    if any(o.shape != g.shape for (_, o), g in pairs):
        return None
    return {name: g for (name, _), g in pairs}


def load_matching(native: nn.Module, state: dict[str, torch.Tensor], file: str) -> WeightsReport:
    """Load the tensors of ``state`` that fit ``native``; report the rest.

    Raises:
        ConfigError: not one tensor fits (another architecture).
    """
    own = native.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    matched_by = "name"
    if not fits:
        fits = _by_order(own, state) or {}
        matched_by = "order"
    if not fits:
        raise ConfigError(
            f"--weights {file}: none of its {len(state)} tensors fit this backbone by name or "
            f"by order (first: {', '.join(list(state)[:3])}; the backbone's: "
            f"{', '.join(list(own)[:3])}); is it for another architecture?"
        )
    native.load_state_dict(fits, strict=False)
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and own[k].shape != v.shape] if matched_by == "name" else []  # fmt: skip
    return WeightsReport(
        file=str(file),
        matched_by=matched_by,
        loaded=len(fits),
        total=len(own),
        missing=[k for k in own if k not in fits and (matched_by == "order" or k not in state)],
        unexpected=[k for k in state if k not in own] if matched_by == "name" else [],
        mismatched=mismatched,
    )
