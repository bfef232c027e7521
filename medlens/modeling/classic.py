"""The seed projects' ImageNet families MONAI does not provide: VGG-16 and Inception-v3.

Written here from the papers (Simonyan & Zisserman 2015, configuration D; Szegedy et al. 2016,
"Rethinking the Inception Architecture for Computer Vision", Figures 5-7 and Table 1). Module
names follow the layout of the torchvision checkpoints most people hold (``features.N`` for
VGG-16; ``Conv2d_1a_3x3``, ``Mixed_5b``, ... with ``conv``/``bn`` inside each convolution for
Inception-v3), so ``medlens train --weights vgg16.pth`` loads such a file by name. Without a
weights file they start from random initialisation: no weights can be downloaded here.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG16", "InceptionV3"]

# Configuration D: channels per convolution, "M" a 2x2 max-pool closing each of the 5 blocks.
_VGG16: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]  # fmt: skip


class VGG16(nn.Module):
    """VGG-16's convolutional part (``features``); MedLens adds its own pooled head."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in _VGG16:
            if isinstance(v, str):  # "M"
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.num_features = cin

    def stages(self) -> nn.Sequential:
        """The five blocks, each ending with its max-pool."""
        blocks, current = [], []
        for layer in self.features:
            current.append(layer)
            if isinstance(layer, nn.MaxPool2d):
                blocks.append(nn.Sequential(*current))
                current = []
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _Conv(nn.Module):
    """Convolution (no bias), batch norm (eps 0.001), ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.avg_pool2d(x, 3, stride=1, padding=1)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.max_pool2d(x, 3, stride=2)


class _BlockA(nn.Module):
    """35x35 grid: 1x1, 5x5, double 3x3 and pooled branches (Figure 5, 5x5 kept as in v3)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, c, self.branch_pool(_avg_pool(x))], 1)


class _ReduceB(nn.Module):
    """35x35 -> 17x17 grid reduction (Figure 10)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b, _max_pool(x)], 1)


class _BlockC(nn.Module):
    """17x17 grid with factorised 7x7 convolutions (Figure 6, n = 7)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = (0, 3), (3, 0)  # the padding of 1x7 and 7x1 kernels
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=row)
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=col)
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=col)
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=row)
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=col)
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=row)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for i in range(1, 6):
            c = getattr(self, f"branch7x7dbl_{i}")(c)
        return torch.cat([self.branch1x1(x), b, c, self.branch_pool(_avg_pool(x))], 1)


class _ReduceD(nn.Module):
    """17x17 -> 8x8 grid reduction."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = x
        for i in range(1, 5):
            b = getattr(self, f"branch7x7x3_{i}")(b)
        return torch.cat([a, b, _max_pool(x)], 1)


class _BlockE(nn.Module):
    """8x8 grid with expanded 1x3 / 3x1 branches (Figure 7)."""

    def __init__(self, cin: int):
        super().__init__()
        row, col = (0, 1), (1, 0)  # the padding of 1x3 and 3x1 kernels
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=row)
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=col)
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=row)
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=col)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(b),
                self.branch3x3dbl_3b(b),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class InceptionV3(nn.Module):
    """Inception-v3 without its auxiliary classifier and top (2048 features, 299 px input)."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(in_channels, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, stride=2)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(3, stride=2)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _ReduceB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _ReduceD(768)
        self.Mixed_7b = _BlockE(1280)
        self.Mixed_7c = _BlockE(2048)
        self.num_features = 2048

    def stages(self) -> nn.Sequential:
        """Stem, then the 35x35, 17x17 and 8x8 groups of inception blocks."""
        names = list(self._modules)
        groups = [[n for n in names if not n.startswith("Mixed")]]
        groups += [[n for n in names if n.startswith(f"Mixed_{g}")] for g in "567"]
        return nn.Sequential(*(nn.Sequential(*(self.get_submodule(n) for n in g)) for g in groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages()(x)
