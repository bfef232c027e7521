"""Tests for medlens.config: each setting declared once; CLI, recipes, config.yaml from it."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest
import yaml

from medlens.cli import build_parser, main
from medlens.config import (
    RECORDED_FACTS,
    AugmentSpec,
    TrainConfig,
    add_options,
    given_settings,
    merge_settings,
)
from medlens.errors import ConfigError


def _parse(*argv: str) -> dict:
    p = argparse.ArgumentParser()
    add_options(p)
    return given_settings(p.parse_args(["--out", "o", *argv]))


def test_every_declared_setting_has_an_option_with_its_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no line breaks inside help texts
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for cls in (TrainConfig, AugmentSpec):
        for f in fields(cls):
            if not f.metadata["cli"] or f.name == "augment":
                continue
            assert " ".join(f.metadata["help"].replace("%%", "%").split()) in text, f.name
    for flag in (
        "--image-size",
        "--no-hflip",
        "--no-augment",
        "--quiet",
        "--no-pretrained",
        "--no-class-weights",
        "--bn-momentum",
        "--config",
        "--resume",
        "--overwrite",
    ):
        assert flag in text
    assert "--card" not in text  # recipe-only
    # A --no-X flag's help says what typing it does, not what the setting means.
    assert "--no-pretrained do not start from ImageNet weights" in text
    assert "--quiet do not show progress bars (on by default)" in text
    assert "--no-class-weights do not weight the loss by inverse class frequency" in text


def test_only_typed_flags_reach_the_settings():
    assert _parse() == {"out": "o"}
    assert _parse("--epochs", "3", "--no-hflip", "--zoom", "0.2", "--quiet") == {
        "out": "o",
        "epochs": 3,
        "augment": {"hflip": False, "zoom": 0.2},
        "progress": False,
    }


def test_defaults_then_recipe_then_flags_field_by_field():
    recipe = {"data": "d", "epochs": 9, "resize": "crop", "augment": {"rotation": 5, "zoom": 0.3}}
    cfg = merge_settings(recipe, _parse("--resize", "stretch", "--zoom", "0.2"))
    assert cfg.epochs == 9  # recipe over default
    assert cfg.resize == "stretch"  # a typed flag wins, even when it repeats the default
    assert cfg.augment == AugmentSpec(rotation=5, zoom=0.2)  # nested: merged per field
    assert cfg.out == "o" and cfg.batch_size == 32  # out from the command line; default


@pytest.mark.slow
def test_a_saved_config_yaml_reruns_to_the_same_configuration(tmp_path, synthetic_data):
    out = tmp_path / "run"
    argv = ["train", "--data", str(synthetic_data), "--out", str(out), "--model", "cnn",
            "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--threads", "1",
            "--zoom", "0.05", "--no-hflip", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert set(RECORDED_FACTS) <= set(saved)
    again = merge_settings(saved, {"out": str(out)}, source="config.yaml")
    assert again == TrainConfig.from_saved(saved)
    assert again.to_dict() == {k: v for k, v in saved.items() if k not in RECORDED_FACTS}
    # ... and through the command line: the second run records the same settings.
    out2 = tmp_path / "run2"
    assert main(["train", "--config", str(out / "config.yaml"), "--out", str(out2)]) == 0
    saved2 = yaml.safe_load((out2 / "config.yaml").read_text())
    assert {k: v for k, v in saved2.items() if k != "out"} == {
        k: v for k, v in saved.items() if k != "out"
    }


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"bn_momentum": 1.5}, r"--bn-momentum must be in \(0, 1\], got 1.5"),
        ({"transfer": "half"}, "--transfer must be frozen, finetune or full, got 'half'"),
        ({"epochs": "three"}, "--epochs must be a whole number, got 'three'"),
        ({"val_fraction": 1.0}, r"--val-fraction must be in \[0, 1\), got 1.0"),
        ({"augment": {"hflip": "yes"}}, "--no-hflip must be true or false, got 'yes'"),
        ({"augment": {"tilt": 3}}, r"unknown augment setting\(s\) \['tilt'\]"),
        ({"epochz": 3}, r"r.yaml: unknown training setting\(s\) \['epochz'\]; known: \["),
    ],
)
def test_bad_settings_name_the_flag(recipe, message):
    with pytest.raises(ConfigError, match=message):
        merge_settings({"data": "d", **recipe}, {"out": "o"}, source="r.yaml")


def test_data_must_come_from_somewhere():
    with pytest.raises(ConfigError, match="--data is required"):
        merge_settings({}, {"out": "o"})


def test_bad_setting_on_the_command_line_is_exit_2(capsys, tmp_path):
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--lr", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "--lr must be > 0, got -1.0" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_parser_knows_debug_everywhere():
    p = build_parser()
    assert p.parse_args(["--debug", "models"]).debug is True
    assert p.parse_args(["models", "--debug"]).debug is True
    assert p.parse_args(["models"]).debug is False
