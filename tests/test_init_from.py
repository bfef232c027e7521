"""``medlens train --init-from MODEL``: continued training from a run folder or a bundled
model, its provenance, and its refusals; the torch network read back from a bundled ONNX graph."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import SHARED_DATA, make_dataset

from medlens.artifacts.folders import bundled_models_dir
from medlens.artifacts.model import build_network, read_meta
from medlens.artifacts.onnx_weights import load_onnx_weights, reestimate_batch_norm
from medlens.cli import main
from medlens.data.imaging import read_image
from medlens.fileio import sha256_file
from medlens.inference.predictor import Predictor

# starts outside processes or runs real models on real data (`make test-fast` leaves it out)
pytestmark = pytest.mark.slow

PNEUMONIA = bundled_models_dir() / "pneumonia"
real_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real data not available at {SHARED_DATA} (fresh clone)"
)


@pytest.fixture(scope="module")
def new_data(tmp_path_factory):
    """Other images of the same two classes (another seed): the 'new hospital'."""
    return make_dataset(
        tmp_path_factory.mktemp("new") / "data",
        {"NORMAL": "dark", "PNEUMONIA": "bright"},
        n_patients=12,
        seed=7,
    )


def _train(capsys, *args) -> tuple[int, str]:
    code = main(["train", "--quiet", *map(str, args)])
    return code, capsys.readouterr().err


def test_continued_run_starts_from_the_base_weights_and_records_its_base(
    capsys, tmp_path, trained_run, new_data
):
    out = tmp_path / "continued"
    # --epochs 0: no step taken, so the saved network is exactly the one training started from
    code, err = _train(capsys, "--init-from", trained_run, "--data", new_data, "--out", out,
                       "--epochs", "0")  # fmt: skip
    assert code == 0, err
    base = torch.load(trained_run / "model.pt", weights_only=True)
    new = torch.load(out / "model.pt", weights_only=True)
    assert base.keys() == new.keys()
    assert all(torch.equal(base[k], new[k]) for k in base)
    meta = json.loads((out / "model.json").read_text())
    base_meta = json.loads((trained_run / "model.json").read_text())
    assert meta["labels"] == base_meta["labels"] and meta["preprocess"] == base_meta["preprocess"]
    start = meta["training"]["init_from"]
    assert start["base_model"] == trained_run.name
    assert start["base_version"] == base_meta["weights_sha256"][:12]
    assert start["base_model_json_sha256"] == sha256_file(trained_run / "model.json")
    assert start["weights_from"] == "model.pt"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    base_cfg = yaml.safe_load((trained_run / "config.yaml").read_text())
    # the base's recipe, then the flags: batch size and model from the base, epochs typed
    assert cfg["model"] == "cnn" and cfg["batch_size"] == base_cfg["batch_size"] == 8
    assert cfg["epochs"] == 0 and cfg["init_from"] == str(trained_run)
    assert cfg["data"] == str(new_data) and cfg["image_size"] == 32


def test_first_epoch_starts_where_the_base_ended(capsys, tmp_path, trained_run, new_data):
    """One epoch from the base vs one from scratch on the same new data."""
    losses = {}
    for name, extra in (("scratch", ["--model", "cnn", "--image-size", "32",
                                     "--batch-size", "8", "--threads", "1"]),
                        ("continued", ["--init-from", trained_run])):  # fmt: skip
        out = tmp_path / name
        code, err = _train(capsys, "--data", new_data, "--out", out, "--epochs", "1", *extra)
        assert code == 0, err
        with open(out / "training_metrics.csv") as f:
            losses[name] = float(f.read().splitlines()[1].split(",")[4])  # val_loss, epoch 1
    print(f"first-epoch validation loss: {losses}")
    assert losses["continued"] < 0.5 * losses["scratch"], losses


def test_refusals_name_what_differs(capsys, tmp_path, trained_run, synthetic_data_3class,
                                    new_data):  # fmt: skip
    code, err = _train(capsys, "--init-from", trained_run, "--data", synthetic_data_3class,
                       "--out", tmp_path / "a")  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "[NORMAL, PNEUMONIA]" in err and "[bright, dark, stripes]" in err
    code, err = _train(capsys, "--init-from", trained_run, "--data", new_data,
                       "--out", tmp_path / "b", "--image-size", "64")  # fmt: skip
    assert code == 2 and "--image-size 64" in err and "image_size 32" in err, err
    code, err = _train(capsys, "--init-from", trained_run, "--data", new_data,
                       "--out", tmp_path / "c", "--grayscale")  # fmt: skip
    assert code == 2 and "--grayscale True" in err, err
    code, err = _train(capsys, "--init-from", "covid", "--data", new_data, "--out", tmp_path / "d")
    assert code == 2 and "ensemble" in err and "one member" in err, err
    code, err = _train(capsys, "--init-from", tmp_path / "nowhere", "--data", new_data,
                       "--out", tmp_path / "e")  # fmt: skip
    assert code == 2 and "nowhere" in err, err
    assert not any((tmp_path / n).exists() for n in "abcde")  # refused before any folder


@real_data
def test_network_read_back_from_a_bundled_int8_graph_predicts_as_the_graph(tmp_path):
    meta = read_meta(PNEUMONIA)
    net = build_network(meta)
    loaded = load_onnx_weights(net, PNEUMONIA / "model.onnx", meta.preprocess.image_size)
    assert loaded.tensors == len([k for k in net.state_dict() if "num_batches" not in k])
    assert loaded.storage.startswith("int8") and len(loaded.folded) > 40
    pre = meta.preprocess
    files = sorted((SHARED_DATA / "chest_xray" / "train" / "PNEUMONIA").iterdir())[:2]
    files += sorted((SHARED_DATA / "chest_xray" / "train" / "NORMAL").iterdir())[:2]
    x = np.stack([pre.prepare(read_image(f).pixels) for f in files])
    onnx_probs = Predictor(PNEUMONIA).probs_prepared(x)

    def torch_probs() -> np.ndarray:
        with torch.no_grad():
            logits = net.eval()(pre.normalize(torch.from_numpy(x))) / meta.temperature
        p = torch.sigmoid(logits).numpy().ravel()
        return np.stack([1 - p, p], 1)

    assert np.abs(torch_probs() - onnx_probs).max() < 1e-4
    # batch-norm statistics measured on images: the eval function does not move
    reestimate_batch_norm(net, loaded.folded, [pre.normalize(torch.from_numpy(x))])
    assert np.abs(torch_probs() - onnx_probs).max() < 1e-4
    assert onnx_probs[:2, 1].min() > 0.5 > onnx_probs[2:, 1].max()  # the images' own labels


@real_data
def test_continued_training_from_a_bundled_model(capsys, tmp_path):
    """``--init-from pneumonia`` on a few of its carved test images (never trained on)."""
    import csv

    with open(PNEUMONIA / "eval" / "test" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for cls in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "site" / cls).mkdir(parents=True)
        for r in [r for r in rows if r["true"] == cls][:16]:
            src = SHARED_DATA / "chest_xray" / "train" / r["path"]
            (tmp_path / "site" / cls / src.name).symlink_to(src)
    out = tmp_path / "pneumonia-site"
    t0 = time.time()
    code, err = _train(capsys, "--init-from", "pneumonia", "--data", tmp_path / "site",
                       "--out", out, "--epochs", "1", "--batch-size", "8", "--threads", "2",
                       "--val-fraction", "0.3", "--test-fraction", "0.2",
                       "--precision", "fp32")  # fmt: skip
    assert code == 0, err
    print(f"continued training from the bundled model: {time.time() - t0:.0f}s")
    meta = json.loads((out / "model.json").read_text())
    start = meta["training"]["init_from"]
    assert start["base_model"] == "pneumonia" and start["weights_from"] == "model.onnx"
    assert start["base_model_json_sha256"] == sha256_file(PNEUMONIA / "model.json")
    assert "re-estimated" in start["batch_norm_statistics"]
    assert meta["preprocess"] == read_meta(PNEUMONIA).preprocess.to_dict()
    with open(out / "training_metrics.csv") as f:
        first = dict(zip(*[line.split(",") for line in f.read().splitlines()[:2]]))
    print(f"first epoch from the bundled model: {first}")
    # the base already separates these images: the first epoch's validation is good
    assert float(first["val_auc"]) > 0.9 and float(first["val_loss"]) < 0.5, first


def test_backbone_from_another_task_keeps_this_runs_head_input_and_labels(
    capsys, tmp_path, synthetic_data_3class
):
    """``--backbone-from pneumonia``: the bundled two-class chest X-ray model's backbone under
    a fresh three-class head, at this run's own image size."""
    out = tmp_path / "three"
    # --epochs 0: no step taken, so the saved backbone is the one training started from
    code, err = _train(capsys, "--backbone-from", "pneumonia", "--data", synthetic_data_3class,
                       "--out", out, "--model", "efficientnet-lite0", "--image-size", "64",
                       "--transfer", "full", "--epochs", "0", "--threads", "2")  # fmt: skip
    assert code == 0, err
    meta = json.loads((out / "model.json").read_text())
    assert meta["labels"] == ["bright", "dark", "stripes"]
    assert meta["preprocess"]["image_size"] == 64
    start = meta["training"]["backbone_from"]
    assert start["base_model"] == "pneumonia" and start["weights_from"] == "model.onnx"
    assert start["base_labels"] == ["NORMAL", "PNEUMONIA"]
    assert "re-estimated" in start["batch_norm_statistics"]
    base_meta = read_meta(PNEUMONIA)
    base = build_network(base_meta, pretrained=False)
    load_onnx_weights(base, PNEUMONIA / "model.onnx", base_meta.preprocess.image_size)
    ref, new = base.state_dict(), torch.load(out / "model.pt", weights_only=True)
    convs = [k for k in ref if k.startswith("backbone.") and k.endswith("conv.weight")]
    assert len(convs) > 30 and all(torch.equal(ref[k], new[k]) for k in convs)
    head = [k for k in new if not k.startswith("backbone.") and new[k].dim() == 2]
    assert head and all(new[k].shape[0] == 3 for k in head)  # this run's three classes
    # refusals: another network, or two sources of starting weights
    code, err = _train(capsys, "--backbone-from", "pneumonia", "--data", synthetic_data_3class,
                       "--out", tmp_path / "a", "--model", "cnn")  # fmt: skip
    assert code == 2 and "efficientnet-lite0 model" in err and "this run trains cnn" in err, err
    code, err = _train(capsys, "--backbone-from", "pneumonia", "--init-from", "pneumonia",
                       "--data", synthetic_data_3class, "--out", tmp_path / "b")  # fmt: skip
    assert code == 2 and "pass one" in err, err
    code, err = _train(capsys, "--backbone-from", "covid", "--data", synthetic_data_3class,
                       "--out", tmp_path / "c", "--model", "efficientnet-lite0")  # fmt: skip
    assert code == 2 and "--backbone-from covid: an ensemble" in err, err
    assert not any((tmp_path / n).exists() for n in "abc")
