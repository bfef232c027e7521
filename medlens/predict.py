"""Prediction and Grad-CAM explanations for a trained model.

:class:`Predictor` is the one inference path: decoded pixels -> :class:`Preprocess` (the
model's own saved spec) -> network -> temperature-scaled probabilities -> label at the stored
threshold. Evaluation, ``medlens predict`` and the web app all go through it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .modelfile import ModelLoadError, ModelMeta, load_network, read_meta

__all__ = ["Predictor", "resolve_model", "Prediction", "bundled_models_dir"]


def bundled_models_dir() -> Path:
    return Path(__file__).parent / "bundled"


def resolve_model(ref: str | os.PathLike, extra_dirs: list[str | os.PathLike] = ()) -> Path:
    """A model reference -> its folder.

    ``ref`` is a model folder (a run of ``medlens train``), or the name of a bundled model
    or of a model folder inside one of ``extra_dirs`` (``--models DIR``).
    """
    p = Path(ref)
    if (p / "model.json").exists():
        return p
    if p.exists():
        raise ModelLoadError(f"{p} is not a trained model: model.json is missing (train one with "
                             "`medlens train --out RUN`, or wait until the run has finished)")
    name = str(ref)
    for d in [*extra_dirs, bundled_models_dir()]:
        cand = Path(d) / name
        if (cand / "model.json").exists():
            return cand
    known = sorted(available_models(extra_dirs))
    raise ModelLoadError(f"no model {name!r}: not a run folder and not a bundled model; "
                         f"available: {', '.join(known) if known else 'none'} "
                         "(or pass the path of a run folder)")


def available_models(extra_dirs: list[str | os.PathLike] = ()) -> dict[str, Path]:
    """Names of bundled models and of models in ``extra_dirs`` -> folder."""
    found = {}
    for d in [bundled_models_dir(), *extra_dirs]:
        d = Path(d)
        if d.is_dir():
            for sub in sorted(d.iterdir()):
                if (sub / "model.json").exists():
                    found[sub.name] = sub
    return found


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]
    threshold: float | None

    def to_dict(self) -> dict:
        return {"label": self.label, "probabilities": self.probabilities,
                "threshold": self.threshold}


class Predictor:
    """A loaded model ready to predict.

    Args:
        ref: model folder or bundled-model name.
        extra_dirs: more folders holding model folders.
    """

    def __init__(self, ref: str | os.PathLike, extra_dirs=(), dtype: torch.dtype | None = None):
        self.folder = resolve_model(ref, extra_dirs)
        self.net, self.meta = load_network(self.folder)
        self.net = self.net.to(memory_format=torch.channels_last)
        self.pre = self.meta.preprocess
        self.dtype = dtype

    @classmethod
    def from_network(cls, net, meta: ModelMeta, dtype=None) -> "Predictor":
        self = cls.__new__(cls)
        self.folder, self.net, self.meta, self.pre, self.dtype = None, net.eval(), meta, \
            meta.preprocess, dtype
        return self

    @property
    def labels(self) -> list[str]:
        return self.meta.labels

    def logits_prepared(self, x_uint8, batch_size: int = 64) -> torch.Tensor:
        """Raw logits of prepared ``uint8 (N, C, S, S)`` images."""
        from .train import compute_logits

        self.net.eval()
        return compute_logits(self.net, x_uint8, batch_size, self.dtype,
                              transform=lambda b: self.pre.normalize(b).contiguous(
                                  memory_format=torch.channels_last))

    def probs_prepared(self, x_uint8, batch_size: int = 64) -> np.ndarray:
        """Calibrated ``(N, K)`` probabilities of prepared images."""
        from .train import logits_to_probs_t

        return logits_to_probs_t(self.logits_prepared(x_uint8, batch_size), self.meta.binary,
                                 self.meta.temperature)

    def predict_pixels(self, pixels_list: list[np.ndarray]) -> list[Prediction]:
        """Decoded images (``uint8 (H,W)`` or ``(H,W,3)``) -> predictions."""
        x = np.stack([self.pre.prepare(p) for p in pixels_list])
        return [self.to_prediction(p) for p in self.probs_prepared(x)]

    def to_prediction(self, probs: np.ndarray) -> Prediction:
        from .metrics import predict_labels

        idx = int(predict_labels(probs[None], self.meta.threshold)[0])
        return Prediction(self.labels[idx],
                          {c: round(float(v), 6) for c, v in zip(self.labels, probs)},
                          self.meta.threshold)

    def explain(self, pixels: np.ndarray, class_index: int | None = None) -> tuple[np.ndarray, int]:
        """Grad-CAM (Selvaraju et al. 2017) through MONAI on the last backbone stage.

        Returns:
            ``(cam, class_index)``: ``cam`` is ``float32 (S, S)`` in [0, 1] at the network's
            input size; for a binary model the map explains the positive-class logit.
        """
        from monai.visualize import GradCAM

        x = self.pre(pixels)[None].contiguous()
        net = self.net.float().to(memory_format=torch.contiguous_format)
        net.eval()
        cam = GradCAM(nn_module=net, target_layers="backbone")
        with torch.enable_grad():
            if self.meta.binary:
                # Grad-CAM of the single logit; class_idx 0 is that logit.
                heat = cam(x, class_idx=0)
                idx = 1
            else:
                if class_index is None:
                    with torch.no_grad():
                        class_index = int(net(x).argmax(1))
                heat = cam(x, class_idx=class_index)
                idx = class_index
        heat = heat[0, 0].detach().float().numpy()
        lo, hi = float(heat.min()), float(heat.max())
        heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        return heat.astype(np.float32), idx


def overlay_cam(pixels: np.ndarray, cam: np.ndarray, size: int | None = None,
                alpha: float = 0.4) -> np.ndarray:
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
    heat = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize(img.size,
                                                                               Image.BILINEAR)
    colour = colormaps["jet"](np.asarray(heat, dtype=np.float32) / 255.0)[..., :3]
    base = np.asarray(img, dtype=np.float32) / 255.0
    out = (1 - alpha) * base + alpha * colour
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)
