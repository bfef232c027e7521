"""Tests for medlens.train: run folder contents, learning on separable data, --out safety,
resume, unreadable images, multi-class and frozen/fine-tuned transfer learning.

Every run is tiny (32 px, a few epochs); the shared binary run comes from conftest.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from medlens.artifacts.folders import HISTORY_COLUMNS
from medlens.config import TrainConfig
from medlens.errors import DataError, TrainError
from medlens.modeling import registry as models
from medlens.training.trainer import train

# fmt: off
COLUMNS = [
    "epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr", "seconds",
]
# fmt: on


def _history(run: Path) -> list[dict]:
    with open(run / "training_metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def train_logs(caplog):
    """pytest's ``caplog``, seeing the ``medlens`` loggers at INFO.

    Its handler sits on the ``medlens`` logger itself (which stops propagating meanwhile):
    ``medlens``'s own logging setup, run by CLI tests, makes that logger not propagate.
    """
    logger = logging.getLogger("medlens")
    propagate = logger.propagate
    caplog.set_level(logging.INFO, logger="medlens")
    logger.addHandler(caplog.handler)
    logger.propagate = False
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate


# --------------------------------------------------------------------------- the shared run


def test_history_columns_constant():
    assert HISTORY_COLUMNS == COLUMNS


def test_run_folder_has_every_artefact(trained_run):
    for rel in (
        "config.yaml",
        "training_metrics.csv",
        "model.json",
        "model.pt",
        "checkpoints/last.pt",
        "eval/val/metrics.json",
        "eval/val/report.html",
        "eval/val/predictions.csv",
        "eval/test/metrics.json",
        "eval/test/report.html",
        "eval/test/predictions.csv",
    ):
        assert (trained_run / rel).is_file(), rel
    assert not list(trained_run.rglob("*.tmp"))


def test_config_yaml_is_fully_resolved(trained_run, synthetic_data):
    cfg = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert cfg["model"] == "cnn" and cfg["data"] == str(synthetic_data)
    assert cfg["image_size"] == 32
    assert cfg["channels"] == 1  # grey images, no pretrained weights
    assert cfg["pretrained"] is False  # cnn has no ImageNet weights
    assert cfg["epochs"] == 4 and cfg["seed"] == 0
    assert cfg["classes"] == ["NORMAL", "PNEUMONIA"]
    assert cfg["precision_resolved"] in ("fp32", "bf16")
    assert cfg["device"] == "auto"
    assert cfg["device_resolved"] == ("cuda" if torch.cuda.is_available() else "cpu")
    pre = cfg["preprocess"]
    assert pre["image_size"] == 32 and pre["channels"] == 1 and pre["resize"] == "stretch"
    # From-scratch models standardise with the TRAIN split's statistics, not 0.5/0.25.
    assert len(pre["mean"]) == 1 and 0.2 < pre["mean"][0] < 0.7 and pre["mean"][0] != 0.5
    assert 0.05 < pre["std"][0] < 0.5
    counts = cfg["split_counts"]
    assert set(counts) == {"train", "val", "test"}
    assert sum(sum(c.values()) for c in counts.values()) == 80
    assert all(v > 0 for c in counts.values() for v in c.values())
    assert any("patient" in n for n in cfg["data_notes"])
    # Every TrainConfig setting is in there.
    from dataclasses import fields

    assert {f.name for f in fields(TrainConfig)} <= set(cfg)


def test_training_metrics_has_one_row_per_epoch(trained_run):
    rows = _history(trained_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert {r["stage"] for r in rows} == {"full"}
    for r in rows:
        assert float(r["train_loss"]) >= 0 and 0 <= float(r["train_acc"]) <= 1
        assert float(r["val_loss"]) >= 0 and 0 <= float(r["val_acc"]) <= 1
        assert 0 <= float(r["val_auc"]) <= 1
        assert 0 < float(r["lr"]) <= 1e-3 and float(r["seconds"]) >= 0
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_model_json_is_calibrated_and_binary(trained_run):
    m = _json(trained_run / "model.json")
    assert m["arch"] == "cnn" and m["task"] == "binary"
    assert m["labels"] == ["NORMAL", "PNEUMONIA"]
    assert m["name"] == trained_run.name
    assert m["temperature"] > 0
    # the default operating point: balanced, p >= 0.5, with its record and intervals
    assert m["threshold"] == 0.5 and m["threshold_method"] == "balanced"
    op = m["operating_point"]
    assert op["rule"] == "balanced" and op["threshold_ci"] == [0.5, 0.5]
    assert op["measured_on"] == "validation" and op["n"] == m["metrics"]["val"]["n"]
    lo, hi = op["sensitivity_ci"]
    assert lo <= op["sensitivity"] <= hi
    assert op["sensitivity"] == pytest.approx(m["metrics"]["val"]["sensitivity"])
    assert (
        m["preprocess"] == yaml.safe_load((trained_run / "config.yaml").read_text())["preprocess"]
    )
    t = m["training"]
    assert t["epochs_run"] == 4 and t["stages"] == ["full"] and t["layout"] == "class_folders"
    assert set(m["metrics"]) == {"val", "test"}
    assert m["metrics"]["val"]["n"] == sum(t["split_counts"]["val"].values())
    ckpt = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["stages_done"] == ["full"] and len(ckpt["history"]) == 4


def test_separable_data_is_learned(trained_run):
    for split in ("val", "test"):
        m = _json(trained_run / "eval" / split / "metrics.json")
        assert m["accuracy"] >= 0.9, (split, m["accuracy"])
        assert m["auc"] >= 0.95, (split, m["auc"])
        assert m["threshold"] == pytest.approx(_json(trained_run / "model.json")["threshold"])
        assert sum(map(sum, m["confusion_matrix"])) == m["n"]
    html = (trained_run / "eval" / "val" / "report.html").read_text()
    assert "<html" in html.lower() and "tiny_cnn" in html


def test_predictions_csv_lists_the_split(trained_run):
    with open(trained_run / "eval" / "test" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["path", "true", "pred", "p_NORMAL", "p_PNEUMONIA"]
    assert len(rows) == _json(trained_run / "eval" / "test" / "metrics.json")["n"]
    for r in rows:
        assert Path(r["path"]).exists()
        assert Path(r["path"]).parent.name == r["true"]  # class folder = true label
        assert float(r["p_NORMAL"]) + float(r["p_PNEUMONIA"]) == pytest.approx(1, abs=1e-5)


# --------------------------------------------------------------------------- errors, --out


def test_bad_settings_fail_before_anything_is_written(tmp_path, synthetic_data, train_config):
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="--transfer"):
        train(train_config(synthetic_data, out, transfer="partial"))
    with pytest.raises(TrainError, match="--optimizer"):
        train(train_config(synthetic_data, out, optimizer="sgd"))
    with pytest.raises(ValueError, match="unknown model 'alexnet'"):
        train(train_config(synthetic_data, out, model="alexnet"))
    with pytest.raises(TrainError, match="--image-size 32: inceptionv3 needs at least 75 px"):
        train(train_config(synthetic_data, out, model="inceptionv3"))
    with pytest.raises(DataError, match="does not exist"):
        train(train_config(tmp_path / "nowhere", out))
    assert not out.exists()


def test_train_config_from_dict_rejects_unknown_settings():
    with pytest.raises(TrainError) as e:
        TrainConfig.from_dict({"data": "d", "out": "o", "epoch": 3})
    assert "'epoch'" in str(e.value) and "epochs" in str(e.value)


def test_out_holding_a_run_is_refused_without_overwrite(tmp_path, synthetic_data, train_config):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.json").write_text("{}")
    with pytest.raises(TrainError) as e:
        train(train_config(synthetic_data, out))
    assert "already holds a run" in str(e.value) and "--overwrite" in str(e.value)
    assert [p.name for p in out.iterdir()] == ["model.json"]  # untouched


def test_resume_without_checkpoint_is_an_error(tmp_path, synthetic_data, train_config):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(TrainError, match=r"no checkpoint \(checkpoints/last.pt\)"):
        train(train_config(synthetic_data, out), resume=True)


# --------------------------------------------------------------------------- resume


class _Interrupt(Exception):
    pass


class _InterruptAt(logging.Handler):
    """Raises :class:`_Interrupt` from the logging call of the first message starting with
    ``prefix``: training stops right there, as if the process were killed."""

    def __init__(self, prefix: str):
        super().__init__(logging.INFO)
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            raise _Interrupt(record.getMessage())


@contextlib.contextmanager
def _interrupt_at(prefix: str):
    logger = logging.getLogger("medlens")
    handler, level = _InterruptAt(prefix), logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.slow
def test_resume_after_a_finished_stage_skips_it(
    tmp_path, trained_run, train_config, synthetic_data, train_logs
):
    run = tmp_path / "tiny_cnn"
    shutil.copytree(trained_run, run)
    before = torch.load(run / "model.pt", weights_only=True)
    train(train_config(synthetic_data, run, epochs=4), resume=True)
    assert not any(m.startswith("stage full") for m in train_logs.messages)
    assert len(_history(run)) == 4
    after = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_resume_continues_an_interrupted_run(tmp_path, synthetic_data, train_config, train_logs):
    out = tmp_path / "run"
    with _interrupt_at("[full] epoch 2/3"), pytest.raises(_Interrupt):
        train(train_config(synthetic_data, out, epochs=3))
    assert not (out / "model.json").exists()
    train_logs.clear()
    # As `medlens train --resume`: the settings come from the run's config.yaml.
    train(train_config(synthetic_data, out, epochs=3), resume=True)
    assert "resuming stage full at epoch 2" in train_logs.messages
    assert [int(r["epoch"]) for r in _history(out)] == [1, 2, 3]
    assert _json(out / "model.json")["training"]["epochs_run"] == 3
    # The console says which accuracy is which (issue 14: they seemed to disagree).
    saved = [m for m in train_logs.messages if m.startswith("saved model to")]
    assert saved and "calibrated, at the operating point: val: acc" in saved[0]


@pytest.mark.slow
def test_resume_checkpoint_mechanics(tmp_path, synthetic_data, train_config, train_logs):
    """The checkpoint half of --resume, with config.yaml removed to sidestep the bug above:
    the interrupted stage continues at the next epoch with its history, then finishes.
    (No test split: one evaluation per call keeps the three calls quick.)"""
    out = tmp_path / "run"
    with _interrupt_at("[full] epoch 2/3"), pytest.raises(_Interrupt):
        train(train_config(synthetic_data, out, epochs=3, test_fraction=0))
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["stage"] == "full" and ckpt["epoch"] == 0 and len(ckpt["history"]) == 1
    assert not (out / "model.json").exists()
    first_epoch = _history(out)[0]
    (out / "config.yaml").unlink()
    train_logs.clear()
    train(train_config(synthetic_data, out, epochs=3, test_fraction=0), resume=True)
    assert "resuming stage full at epoch 2" in train_logs.messages
    assert [int(r["epoch"]) for r in _history(out)] == [1, 2, 3]
    assert _history(out)[0] == first_epoch  # the checkpoint's history, not retrained
    assert _json(out / "model.json")["training"]["epochs_run"] == 3

    # Resuming the finished run again trains nothing and keeps the weights.
    before = torch.load(out / "model.pt", weights_only=True)
    (out / "config.yaml").unlink()
    train_logs.clear()
    train(train_config(synthetic_data, out, epochs=3, test_fraction=0), resume=True)
    assert not any(m.startswith("stage ") for m in train_logs.messages)
    assert len(_history(out)) == 3
    after = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- bad images


def _with_bad_images(src: Path, dst: Path) -> list[Path]:
    shutil.copytree(src, dst)
    empty = dst / "NORMAL" / "IM-0100-0001.png"
    empty.write_bytes(b"")
    text = dst / "PNEUMONIA" / "person999_bacteria_1.png"
    text.write_text("this is a text file, renamed")
    return [empty, text]


CHANNELS = [pytest.param(None, id="channels-auto"), pytest.param(1, id="channels-1")]


@pytest.mark.parametrize("channels", CHANNELS)
def test_unreadable_images_are_listed_before_out_is_touched(
    tmp_path, synthetic_data, train_config, channels
):
    data = tmp_path / "data"
    bad = _with_bad_images(synthetic_data, data)
    out = tmp_path / "run"
    with pytest.raises(DataError) as e:
        train(train_config(data, out, channels=channels))
    msg = str(e.value)
    assert "2 unreadable image(s)" in msg and "--skip-bad-images" in msg
    for p in bad:
        assert str(p) in msg
    assert not out.exists()


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.slow
def test_skip_bad_images_trains_and_notes_the_count(
    tmp_path, synthetic_data, train_config, channels, train_logs
):
    data = tmp_path / "data"
    bad = _with_bad_images(synthetic_data, data)
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    train(
        train_config(data, out, epochs=1, skip_bad_images=True, channels=channels, test_fraction=0),
        overwrite=True,
    )
    assert not (out / "stale.txt").exists()  # --overwrite replaced the old run
    assert (out / "model.json").exists()
    skipped = [r for r in train_logs.records if r.getMessage().startswith("skipped 2 unreadable")]
    assert skipped and all(str(p) in skipped[0].getMessage() for p in bad)
    assert skipped[0].levelno == logging.WARNING
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert "skipped 2 unreadable images" in cfg["data_notes"]
    assert "skipped 2 unreadable images" in _json(out / "model.json")["training"]["notes"]
    assert cfg["channels"] == 1
    assert sum(sum(c.values()) for c in cfg["split_counts"].values()) == 80  # images used
    with open(out / "eval" / "val" / "predictions.csv", newline="") as f:
        sources = [r["path"] for r in csv.DictReader(f)]
    assert len(sources) == _json(out / "eval" / "val" / "metrics.json")["n"]
    assert not set(map(str, bad)) & set(sources)  # ... but the bad ones not used


# --------------------------------------------------------------------------- multi-class


@pytest.mark.slow
def test_three_classes_train_with_softmax_and_no_threshold(
    tmp_path, synthetic_data_3class, train_config
):
    out = train(
        train_config(synthetic_data_3class, tmp_path / "run3", epochs=3, test_fraction=0),
    )
    m = _json(out / "model.json")
    assert m["task"] == "multiclass" and m["labels"] == ["bright", "dark", "stripes"]
    assert m["threshold"] is None and m["threshold_method"] is None
    assert m["temperature"] > 0
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["head.fc.weight"].shape[0] == 3  # one logit per class: softmax
    val = _json(out / "eval" / "val" / "metrics.json")
    assert val["labels"] == ["bright", "dark", "stripes"]
    assert len(val["confusion_matrix"]) == 3 and val["threshold"] is None
    assert val["accuracy"] >= 0.9 and val["auc"] >= 0.95
    with open(out / "eval" / "val" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[3:] == ["p_bright", "p_dark", "p_stripes"]
    for r in rows:
        probs = [float(r[f"p_{c}"]) for c in m["labels"]]
        assert sum(probs) == pytest.approx(1, abs=1e-5)
        assert r["pred"] == m["labels"][probs.index(max(probs))]  # argmax, no threshold


# --------------------------------------------------------------------------- transfer


@pytest.mark.slow
def test_frozen_lite0_trains_only_the_head(tmp_path, synthetic_data, train_config):
    # 64 px: at 32 px Lite0's pretrained 1x1 head conv outputs all zeros after ReLU6.
    lite = dict(model="efficientnet-lite0", image_size=64, test_fraction=0)
    out = train(
        train_config(
            synthetic_data, tmp_path / "lite", transfer="frozen", head_epochs=3, epochs=50, **lite
        )
    )
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["pretrained"] is True and cfg["channels"] == 3
    m = _json(out / "model.json")
    assert m["arch"] == "efficientnet-lite0"
    assert m["preprocess"]["mean"] == pytest.approx(list(models.IMAGENET_MEAN))
    assert m["preprocess"]["std"] == pytest.approx(list(models.IMAGENET_STD))
    assert m["preprocess"]["channels"] == 3 and m["preprocess"]["image_size"] == 64
    assert m["training"]["stages"] == ["head"]
    rows = _history(out)
    assert len(rows) == 3 and {r["stage"] for r in rows} == {"head"}
    # The backbone is exactly the ImageNet one, batch-norm statistics included.
    pth = torch.load(models.lite_weights_path(0), weights_only=True)
    state = torch.load(out / "model.pt", weights_only=True)
    assert torch.equal(state["backbone.0.1.weight"], pth["_conv_stem.weight"])
    assert torch.equal(state["backbone.0.2.running_mean"], pth["_bn0.running_mean"])
    assert torch.equal(state["backbone.8.1.weight"], pth["_conv_head.weight"])
    assert torch.equal(state["backbone.8.2.running_var"], pth["_bn1.running_var"])
    assert _json(out / "eval" / "val" / "metrics.json")["auc"] >= 0.8


def _finetune_lite0(tmp_path, synthetic_data, train_config, **settings) -> Path:
    """A lite0 run at 64 px fine-tuning its top stage (one cached copy, no test split)."""
    return train(
        train_config(
            synthetic_data,
            tmp_path / "ft",
            model="efficientnet-lite0",
            image_size=64,
            transfer="finetune",
            unfreeze=1,
            aug_copies=1,
            test_fraction=0,
            **settings,
        )  # fmt: skip
    )


@pytest.mark.slow
def test_lite0_finetune_trains_head_then_top_stages(tmp_path, synthetic_data, train_config):
    out = _finetune_lite0(tmp_path, synthetic_data, train_config, head_epochs=2, epochs=1)
    rows = _history(out)
    assert [r["stage"] for r in rows] == ["head", "head", "finetune"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[2]["lr"]) == pytest.approx(1e-4)  # lr x finetune_lr_scale
    m = _json(out / "model.json")
    assert m["training"]["stages"] == ["head", "finetune"]
    pth = torch.load(models.lite_weights_path(0), weights_only=True)
    state = torch.load(out / "model.pt", weights_only=True)
    # Below the unfrozen top stage nothing moved; the top stage (1x1 head conv) did.
    assert torch.equal(state["backbone.0.1.weight"], pth["_conv_stem.weight"])
    assert torch.equal(
        state["backbone.7.15._project_conv.weight"], pth["_blocks.15._project_conv.weight"]
    )
    assert not torch.equal(state["backbone.8.1.weight"], pth["_conv_head.weight"])
    # Batch norm trains as usual: the top stage's running statistics moved.
    assert not torch.equal(state["backbone.8.2.running_mean"], pth["_bn1.running_mean"])


def test_warmup_and_frozen_batch_norm_in_fine_tuning(tmp_path, synthetic_data, train_config):
    out = _finetune_lite0(tmp_path, synthetic_data, train_config, head_epochs=1, epochs=2,
                          warmup_epochs=2, freeze_bn=True, patience=5)  # fmt: skip
    rows = _history(out)
    assert [r["stage"] for r in rows] == ["head", "finetune", "finetune"]
    # The head's rate is not warmed; fine-tuning's rises linearly to lr x finetune_lr_scale
    # over two epochs (half of it at the end of the first).
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3, 5e-5, 1e-4])
    pth = torch.load(models.lite_weights_path(0), weights_only=True)
    state = torch.load(out / "model.pt", weights_only=True)
    assert not torch.equal(state["backbone.8.1.weight"], pth["_conv_head.weight"])
    assert torch.equal(state["backbone.8.2.running_mean"], pth["_bn1.running_mean"])
    assert torch.equal(state["backbone.8.2.running_var"], pth["_bn1.running_var"])
    assert not torch.equal(state["backbone.8.2.weight"], pth["_bn1.weight"])  # affine trains


# --------------------------------------------------------------------------- --device


def test_resolve_device_auto_cpu_and_errors(monkeypatch):
    from medlens.training.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(TrainError, match=r"--device cuda: .*sees no CUDA device; use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(TrainError, match="--device must be auto, cpu or cuda"):
        resolve_device("gpu0")
    with pytest.raises(TrainError, match="--device must be auto, cpu or cuda"):
        resolve_device("meta")


def test_device_cuda_without_gpu_fails_before_the_run_folder(tmp_path, synthetic_data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    cfg = TrainConfig(
        data=str(synthetic_data),
        out=str(out),
        model="cnn",
        image_size=32,
        epochs=1,
        device="cuda",
        progress=False,
    )
    with pytest.raises(TrainError, match="sees no CUDA device"):
        train(cfg)
    assert not out.exists()


def test_bn_momentum_setting(tmp_path, synthetic_data):
    from medlens.artifacts.model import ModelMeta, build_network
    from medlens.data.preprocess import Preprocess
    from medlens.training.device import set_bn_momentum

    net = build_network(
        ModelMeta(
            arch="efficientnet-lite0",
            labels=["a", "b"],
            preprocess=Preprocess(image_size=64, channels=3),
        ),
        pretrained=False,
    )
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    # MONAI's EfficientNet keeps TensorFlow's 0.01 in the backbone (why the option exists).
    head = set(net.head.modules())
    assert all(m.momentum == pytest.approx(0.01) for m in bns if m not in head)
    assert set_bn_momentum(net, 0.1) == len(bns) > 40
    assert {m.momentum for m in bns} == {0.1}
    cfg = TrainConfig(
        data=str(synthetic_data),
        out=str(tmp_path / "r"),
        model="cnn",
        bn_momentum=1.5,
        progress=False,
    )
    with pytest.raises(TrainError, match=r"--bn-momentum must be in \(0, 1\], got 1.5"):
        train(cfg)
    assert not (tmp_path / "r").exists()


def test_float32_passes_turn_tf32_off_on_cuda_only():
    from medlens.inference.runtime import exact_float32

    before = torch.backends.cudnn.allow_tf32
    with exact_float32(None, torch.device("cuda")):
        assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 == before
    with exact_float32(torch.bfloat16, torch.device("cuda")):
        assert torch.backends.cudnn.allow_tf32 == before
    with exact_float32(None, torch.device("cpu")):
        assert torch.backends.cudnn.allow_tf32 == before


def test_augmenting_workers_give_the_same_batches_whatever_their_number(synthetic_data):
    import numpy as np

    from medlens.config import AugmentSpec
    from medlens.data.preprocess import Preprocess
    from medlens.training.batches import ImageBatches

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (20, 1, 32, 32), dtype=np.uint8)
    y = torch.arange(20) % 2
    pre = Preprocess(image_size=32, channels=1, mean=(0.5,), std=(0.25,))
    spec = AugmentSpec(gamma=0.2)

    def epoch(workers: int) -> list:
        batches = ImageBatches(x, y, pre, spec, augmenting=True, batch_size=8, device=None,
                               workers=workers)  # fmt: skip
        return list(batches(0, torch.Generator().manual_seed(4)))

    one, two = epoch(1), epoch(2)
    assert len(one) == len(two) == 3  # 8 + 8 + 4
    for (xa, ya), (xb, yb) in zip(one, two):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    plain = ImageBatches(x, y, pre, spec, augmenting=False, batch_size=8, device=None)
    unaugmented = list(plain(0, torch.Generator().manual_seed(4)))
    assert torch.equal(one[0][1], unaugmented[0][1])  # the same shuffle
    assert not torch.allclose(one[0][0], unaugmented[0][0])  # augmented


def test_cached_copies_one_per_epoch_or_mixed_within_it():
    from medlens.training.batches import CachedBatches

    n, copies = 40, 3
    # row r of copy c holds the value c * n + r: a batch says which copy each image came from
    x = torch.arange(copies * n, dtype=torch.float32)[:, None]
    y = torch.arange(n) % 2

    def epoch(batches, e, seed=7):
        got = [(xb[:, 0].long(), yb) for xb, yb in batches(e, torch.Generator().manual_seed(seed))]
        rows = torch.cat([r for r, _ in got])
        assert torch.equal(torch.cat([yb for _, yb in got]), y[rows % n])  # labels follow rows
        return rows

    whole = CachedBatches(x, y, batch_size=8, device=None, copies=copies)
    for e in range(4):  # epoch e goes through copy e % 3, every image once
        rows = epoch(whole, e)
        assert sorted((rows % n).tolist()) == list(range(n))
        assert set((rows // n).tolist()) == {e % copies}
    mixed = CachedBatches(x, y, batch_size=8, device=None, copies=copies, mix=True)
    first = epoch(mixed, 0)
    assert sorted((first % n).tolist()) == list(range(n))  # still every image once
    counts = torch.bincount(first // n, minlength=copies)
    assert (counts > 0).all() and counts.max() < n  # every copy drawn, none alone
    assert torch.equal(epoch(mixed, 0), first)  # the run's generator decides: reproducible
    assert not torch.equal(epoch(mixed, 0, seed=8) // n, first // n)
    single = CachedBatches(x[:n], y, batch_size=8, device=None, copies=1, mix=True)
    assert set((epoch(single, 3) // n).tolist()) == {0}


@pytest.mark.slow
def test_full_training_with_augmenting_workers(tmp_path, synthetic_data, train_config):
    out = train(train_config(synthetic_data, tmp_path / "w", workers=1))
    assert (out / "model.pt").exists()
    assert "workers: 1" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_overwrite_keeps_the_old_run_until_the_new_one_is_complete(
    tmp_path, synthetic_data, train_config, monkeypatch
):
    from medlens.training.trainer import Trainer

    out = tmp_path / "run"
    out.mkdir()
    (out / "model.json").write_text('{"old": true}')

    def crash(self, resume_state):
        assert not (out / "model.json").exists()  # the new run trains in a clean folder
        raise RuntimeError("power cut")

    monkeypatch.setattr(Trainer, "_run_stages", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        train(train_config(synthetic_data, out, epochs=1), overwrite=True)
    assert (out / "model.json").read_text() == '{"old": true}'  # the old run is back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left beside it
    monkeypatch.undo()
    train(train_config(synthetic_data, out, epochs=1), overwrite=True)
    assert "old" not in json.loads((out / "model.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_full_disk_is_one_clear_line(tmp_path, synthetic_data, capsys, monkeypatch):
    import errno

    from medlens.cli import main

    out = tmp_path / "run"

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("medlens.fileio.os.fsync", no_space)
    code = main(["train", "--data", str(synthetic_data), "--out", str(out), "--model", "cnn",
                 "--image-size", "32", "--epochs", "1", "--threads", "1", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if "error" in ln]  # after the data summary
    assert line.startswith("medlens train: error: no space left on the disk while writing")
    assert str(out) in line and "--resume" in line
    assert not [p for p in out.rglob("*.tmp")]  # no half-written file left


@pytest.mark.parametrize("ema", [0.0, 0.9])
@pytest.mark.slow
def test_a_resumed_run_repeats_an_uninterrupted_one_exactly(
    tmp_path, synthetic_data, train_config, ema
):
    """Killed after epoch 1 and resumed, a run (dropout on, with and without EMA) gives the
    same history and weights as one that was never interrupted."""
    settings = dict(epochs=3, test_fraction=0, dropout=0.5, ema=ema, patience=5)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(train_config(synthetic_data, whole, **settings))
    with _interrupt_at("[full] epoch 2/3"), pytest.raises(_Interrupt):
        train(train_config(synthetic_data, cut, **settings))
    train(train_config(synthetic_data, cut, **settings), resume=True)
    cols = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc")
    assert [[r[c] for c in cols] for r in _history(cut)] == [
        [r[c] for c in cols] for r in _history(whole)
    ]
    a = torch.load(whole / "model.pt", weights_only=True)
    b = torch.load(cut / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _json(cut / "model.json")["threshold"] == _json(whole / "model.json")["threshold"]


@pytest.mark.slow
def test_a_recipe_can_state_the_class_order(tmp_path, synthetic_data, train_config):
    """`classes: [PNEUMONIA, NORMAL]`: the last is the positive class of a two-class model (the
    threshold, sensitivity and FHIR's positive refer to it), whatever the folders sort to."""
    from medlens.training.trainer import train

    out = tmp_path / "reversed"
    train(train_config(synthetic_data, out, epochs=1, classes=["PNEUMONIA", "NORMAL"]))
    m = _json(out / "model.json")
    assert m["labels"] == ["PNEUMONIA", "NORMAL"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["classes"] == ["PNEUMONIA", "NORMAL"]
    preds = (out / "eval" / "val" / "predictions.csv").read_text().splitlines()
    assert preds[0].startswith("path,true,pred,p_PNEUMONIA,p_NORMAL")
