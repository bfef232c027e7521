"""Tests for medlens.modeling.weights: --weights FILE, a state_dict the user brings."""

from __future__ import annotations

import json

import pytest
import torch

from medlens.cli import main
from medlens.errors import ConfigError
from medlens.modeling.registry import create_model, model_info
from medlens.modeling.weights import load_matching, read_state_dict


def _native(name: str, channels: int = 3) -> torch.nn.Module:
    return model_info(name).builder(in_channels=channels, pretrained=False)[2]


def _shifted(state: dict, by: float) -> dict:
    """Every float tensor moved by ``by`` (counters such as num_batches_tracked kept)."""
    return {k: v + by if v.is_floating_point() else v.clone() for k, v in state.items()}


def test_nested_checkpoints_and_dataparallel_prefixes_are_unwrapped(tmp_path):
    state = _native("cnn").state_dict()
    f = tmp_path / "ckpt.pth"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}}, f)
    got = read_state_dict(f)
    assert list(got) == list(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"not a torch file", "cannot be read as a state_dict"),
        ({"epoch": 3, "note": "no tensors"}, "holds no tensors"),
    ],
)
def test_unusable_files_are_config_errors(tmp_path, content, message):
    f = tmp_path / "w.pt"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        torch.save(content, f)
    with pytest.raises(ConfigError, match=message):
        read_state_dict(f)


def test_pickled_code_is_refused(tmp_path):
    f = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "obj": ConfigError("x")}, f)  # not a plain tensor dict
    with pytest.raises(ConfigError, match="cannot be read as a state_dict"):
        read_state_dict(f)


def test_matching_by_name_reports_missing_unexpected_and_other_shapes():
    source = _native("cnn")
    state = _shifted(source.state_dict(), 1)
    first_conv = "0.0.weight"
    state[first_conv] = torch.zeros(32, 1, 3, 3)  # grey stem: other shape
    dropped = "4.1.running_mean"
    del state[dropped]
    state["classifier.weight"] = torch.zeros(10, 256)  # the source's own head
    target = _native("cnn")
    report = load_matching(target, state, "w.pt")
    own = target.state_dict()
    assert report.matched_by == "name" and report.total == len(own)
    assert report.loaded == len(own) - 2
    assert report.missing == [dropped] and report.unexpected == ["classifier.weight"]
    assert report.mismatched == [f"{first_conv}: (32, 1, 3, 3) vs (32, 3, 3, 3)"]
    assert torch.equal(own["1.0.weight"], state["1.0.weight"])
    assert not torch.equal(own[first_conv], state[first_conv].expand_as(own[first_conv]))
    line = report.summary()
    assert f"loaded {report.loaded} of {report.total} tensors (matched by name)" in line
    assert "1 missing" in line and "1 unexpected" in line and "1 other shape" in line


def test_same_architecture_under_other_names_matches_by_order():
    source = _native("resnet18")
    shifted = _shifted(source.state_dict(), 0.5)
    renamed = {f"encoder.{i}": v for i, v in enumerate(shifted.values())}
    target = _native("resnet18")
    report = load_matching(target, renamed, "tv.pth")
    assert report.matched_by == "order" and report.loaded == report.total == len(renamed)
    for got, want in zip(target.state_dict().values(), renamed.values()):
        assert torch.equal(got, want)


def test_weights_of_another_architecture_are_refused():
    with pytest.raises(ConfigError, match="none of its .* tensors fit this backbone"):
        load_matching(_native("cnn"), _native("resnet18").state_dict(), "r18.pth")


def test_create_model_loads_into_the_backbone_and_keeps_the_report(tmp_path):
    source = _native("densenet121")
    f = tmp_path / "dn.pth"
    torch.save(_shifted(source.state_dict(), 0.25), f)
    net = create_model("densenet121", num_outputs=2, pretrained=False, weights=f)
    assert net.weights_report.loaded == net.weights_report.total
    stem_conv = net.backbone[0][0]
    torch.testing.assert_close(stem_conv.weight, source.features.conv0.weight + 0.25)


@pytest.mark.slow
def test_train_with_weights_records_them_and_a_misfit_writes_nothing(
    tmp_path, synthetic_data, capsys
):
    f = tmp_path / "cnn.pth"
    torch.save(_native("cnn", channels=1).state_dict(), f)  # the synthetic images are grey
    argv = ["train", "--data", str(synthetic_data), "--model", "cnn", "--image-size", "32",
            "--epochs", "1", "--batch-size", "8", "--threads", "1", "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "run"), "--weights", str(f)]) == 0
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    init = meta["training"]["init_weights"]
    assert init["file"] == str(f) and init["loaded"] == init["total"] and init["missing"] == 0
    assert f"--weights {f}: loaded" in capsys.readouterr().err
    other = tmp_path / "r18.pth"
    torch.save(_native("resnet18").state_dict(), other)
    assert main([*argv, "--out", str(tmp_path / "bad"), "--weights", str(other)]) == 2
    assert "fit this backbone" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
