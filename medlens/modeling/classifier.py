"""The network every backbone becomes: backbone stages plus a small affine head.

:class:`Classifier` exposes what training, export and the OOD guard need: trainable stages,
pooled features, per-stage activation statistics, and the head's affine map (which makes
closed-form Grad-CAM possible in the ONNX graph).
"""

from __future__ import annotations

import torch
from torch import nn

from medlens.modeling.weights import WeightsReport


class Head(nn.Module):
    """Global average pooling -> BatchNorm1d -> Dropout -> Linear."""

    def __init__(self, in_features: int, num_outputs: int, dropout: float = 0.3):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.BatchNorm1d(in_features)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_outputs)

    def pooled(self, fmap: torch.Tensor) -> torch.Tensor:
        """``(B, F, h, w)`` feature map -> ``(B, F)`` penultimate features."""
        return self.pool(fmap).flatten(1)

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` pooled features -> ``(B, num_outputs)`` logits."""
        return self.fc(self.dropout(self.norm(feats)))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pooled(fmap))


class Classifier(nn.Module):
    """A backbone of stages and a :class:`Head`; outputs raw logits ``(B, num_outputs)``.

    ``num_outputs`` is 1 for a binary task (sigmoid/BCE) and K for K classes (softmax/CE).
    """

    def __init__(
        self, backbone: nn.Sequential, num_features: int, num_outputs: int, dropout: float = 0.3
    ):
        super().__init__()
        self.backbone = backbone
        self.head = Head(num_features, num_outputs, dropout)
        self.num_features = num_features
        self.num_outputs = num_outputs
        # what loading a weights file into the backbone matched (set by create_model)
        self.weights_report: WeightsReport | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pooled backbone) features, ``(B, F)``."""
        return self.head.pooled(self.backbone(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)
        return self.head.classify(feats), feats

    @property
    def first_stat_stage(self) -> int:
        """First backbone stage whose activation statistics feed the OOD guard: the upper
        two thirds of the network (mid-level texture and style up to the last stage)."""
        return len(self.backbone) // 3

    def stat_widths(self, in_channels: int, size: int = 128) -> list[int]:
        """Length of each stage's block in :meth:`forward_with_stats`' statistics (found with
        one blank ``size`` px image: Inception-v3 needs at least 75 px)."""
        widths = []
        with torch.no_grad():
            x = torch.zeros(1, in_channels, size, size)
            was = self.training
            self.eval()
            for i, stage in enumerate(self.backbone):
                x = stage(x)
                if i >= self.first_stat_stage:
                    widths.append(2 * x.shape[1])
            self.train(was)
        return widths

    def backbone_with_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last feature map and activation statistics ``(B, sum(stat_widths))``: the
        per-channel spatial mean and standard deviation of every stage from
        :attr:`first_stat_stage` on (Lee et al. 2018 fit their OOD detector on several layers;
        channel means and standard deviations are a layer's "style", Huang & Belongie 2017)."""
        stats = []
        for i, stage in enumerate(self.backbone):
            x = stage(x)
            if i >= self.first_stat_stage:
                mean = x.mean((2, 3))
                var = (x * x).mean((2, 3)) - mean * mean
                stats += [mean, torch.sqrt(torch.clamp(var, min=0.0) + 1e-8)]
        return x, torch.cat(stats, 1)

    def forward_with_stats(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, penultimate features and activation statistics (see
        :meth:`backbone_with_stats`)."""
        fmap, stats = self.backbone_with_stats(x)
        feats = self.head.pooled(fmap)
        return self.head.classify(feats), feats, stats

    def set_trainable_stages(self, n: int | None) -> None:
        """Train only the last ``n`` backbone stages and the head (``None``: everything).

        Frozen stages are also put in eval mode by :meth:`train`, so their batch-norm
        statistics stay those of pretraining.
        """
        stages = list(self.backbone)
        n_frozen = 0 if n is None else max(0, len(stages) - n)
        self._n_frozen = n_frozen
        for i, stage in enumerate(stages):
            for p in stage.parameters():
                p.requires_grad_(i >= n_frozen)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        for stage in list(self.backbone)[: getattr(self, "_n_frozen", 0)]:
            stage.eval()
        return self
