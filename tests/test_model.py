"""Tests for medlens.artifacts.model: the model.json + model.pt format and atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from medlens import fileio
from medlens.artifacts import model as modelfile
from medlens.artifacts.model import ModelMeta, build_network, load_network, read_meta, save_model
from medlens.data.preprocess import Preprocess
from medlens.errors import ModelLoadError
from medlens.fileio import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    sha256_file,
    write_csv,
    write_json,
    write_yaml,
)


def _meta(labels=("NORMAL", "PNEUMONIA"), arch="cnn", **kw) -> ModelMeta:
    return ModelMeta(
        arch=arch,
        labels=list(labels),
        preprocess=Preprocess(image_size=32, channels=1, mean=(0.42,), std=(0.21,)),
        temperature=1.7,
        threshold=0.37 if len(labels) == 2 else None,
        threshold_method="youden" if len(labels) == 2 else None,
        dropout=0.25,
        name="tiny",
        **kw,
    )


def _trained_looking(meta: ModelMeta):
    """A network with non-default weights and batch-norm statistics."""
    torch.manual_seed(0)
    net = build_network(meta)
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, meta.preprocess.channels, 32, 32))
    return net.eval()


@pytest.fixture()
def saved(tmp_path):
    meta = _meta(extra={"metrics": {"val": {"auc": 0.9}}})
    net = _trained_looking(meta)
    folder = tmp_path / "model"
    save_model(folder, net, meta)
    return folder, net, meta


def test_save_and_load_round_trip_gives_identical_outputs(saved):
    folder, net, meta = saved
    loaded, meta2 = load_network(folder)
    assert not loaded.training
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert meta2.arch == "cnn" and meta2.labels == ["NORMAL", "PNEUMONIA"]
    assert meta2.preprocess == meta.preprocess
    assert meta2.temperature == 1.7 and meta2.threshold == 0.37
    assert meta2.threshold_method == "youden" and meta2.dropout == 0.25 and meta2.name == "tiny"
    assert meta2.binary and meta2.num_outputs == 1
    assert meta2.extra["metrics"] == {"val": {"auc": 0.9}}
    assert meta2.extra["weights_sha256"] == sha256_file(folder / "model.pt")


def test_model_json_contents_and_weights_only_load(saved):
    folder, net, _ = saved
    d = json.loads((folder / "model.json").read_text())
    assert d["format_version"] == modelfile.FORMAT_VERSION
    assert d["task"] == "binary" and d["arch"] == "cnn"
    assert d["preprocess"] == {
        "image_size": 32,
        "channels": 1,
        "mean": [0.42],
        "std": [0.21],
        "resize": "stretch",
        "grayscale": False,
    }
    assert d["weights_sha256"] == sha256_file(folder / "model.pt")
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    assert set(state) == set(net.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    # Only files of the format: no temporary files left over.
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.pt"]


def test_multiclass_meta():
    meta = _meta(labels=("a", "b", "c"))
    assert not meta.binary and meta.num_outputs == 3
    d = meta.to_dict()
    assert d["task"] == "multiclass" and d["threshold"] is None
    assert ModelMeta.from_dict(d).labels == ["a", "b", "c"]
    assert build_network(meta).head.fc.out_features == 3


def test_read_meta_without_model_json_says_how_to_get_one(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        read_meta(tmp_path)
    assert "medlens train" in str(e.value) and "model.json" in str(e.value)
    assert str(tmp_path) in str(e.value)


def test_read_meta_invalid_json_and_missing_field(tmp_path):
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        read_meta(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"arch": "cnn", "labels": ["a", "b"]}))
    with pytest.raises(ModelLoadError, match="'preprocess'"):
        read_meta(tmp_path)


def test_wrong_architecture_is_a_model_load_error(saved):
    folder, _, _ = saved
    d = json.loads((folder / "model.json").read_text())
    d["arch"] = "resnet18"
    (folder / "model.json").write_text(json.dumps(d))
    with pytest.raises(ModelLoadError) as e:
        load_network(folder)
    assert "resnet18" in str(e.value) and "does not match" in str(e.value)


def test_wrong_number_of_labels_is_a_model_load_error(saved):
    folder, _, _ = saved
    d = json.loads((folder / "model.json").read_text())
    d["labels"] = ["a", "b", "c"]
    (folder / "model.json").write_text(json.dumps(d))
    with pytest.raises(ModelLoadError, match="does not match"):
        load_network(folder)


def test_missing_weights_is_a_model_load_error(saved):
    folder, _, _ = saved
    (folder / "model.pt").unlink()
    with pytest.raises(ModelLoadError, match="model.pt is missing"):
        load_network(folder)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_weights_are_a_model_load_error(saved, damage):
    folder, _, _ = saved
    wpath = folder / "model.pt"
    data = wpath.read_bytes()
    wpath.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x80garbage" * 100)
    with pytest.raises(ModelLoadError) as e:
        load_network(folder)
    assert "model.pt" in str(e.value) and "damaged" in str(e.value)


def test_weights_with_pickled_code_are_refused(saved):
    folder, _, _ = saved
    torch.save({"x": Path("/")}, folder / "model.pt")  # not a plain tensor dict
    with pytest.raises(ModelLoadError, match="model.pt is damaged or was replaced"):
        load_network(folder)  # its sha256 no longer matches model.json's
    # Even with model.json rewritten to match, the pickled object is not unpickled.
    meta = json.loads((folder / "model.json").read_text())
    meta["weights_sha256"] = sha256_file(folder / "model.pt")
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="cannot be read"):
        load_network(folder)


# --------------------------------------------------------------------------- atomic io


def test_atomic_write_replaces_content(tmp_path):
    p = tmp_path / "sub" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in p.parent.iterdir()] == ["f.txt"]


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "model.onnx", b"x")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "private.csv", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "model.onnx").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert (tmp_path / "private.csv").stat().st_mode & 0o777 == 0o600


def test_atomic_write_keeps_the_old_file_when_replace_fails(tmp_path, monkeypatch):
    p = tmp_path / "model.json"
    p.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(p, b"new contents")
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["model.json"]  # no temp file left


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    p = tmp_path / "model.pt"
    p.write_bytes(b"old")

    def boom(fd):
        raise KeyboardInterrupt  # e.g. Ctrl-C mid-write: BaseException is handled too

    monkeypatch.setattr(fileio.os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"w": torch.ones(3)}, p)
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["model.pt"]


def test_save_model_failure_leaves_previous_model_loadable(saved, monkeypatch):
    folder, net, meta = saved
    before = (folder / "model.json").read_text(), (folder / "model.pt").read_bytes()
    real_replace = os.replace
    calls = []

    def fail_on_json(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == "model.json":
            raise OSError("no space")
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", fail_on_json)
    with pytest.raises(OSError):
        save_model(folder, net, meta)
    assert calls == ["model.pt", "model.json"]  # weights first, model.json marks completion
    assert (folder / "model.json").read_text() == before[0]
    assert not [x for x in folder.iterdir() if x.name.endswith(".tmp")]


def test_write_json_yaml_csv(tmp_path):
    write_json(tmp_path / "a.json", {"x": [1, 2], "y": None})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2], "y": None}
    with pytest.raises(ValueError):  # NaN is not JSON
        write_json(tmp_path / "b.json", {"x": float("nan")})
    assert not (tmp_path / "b.json").exists()
    write_yaml(tmp_path / "c.yaml", {"b": 1, "a": [0.5]})
    assert (tmp_path / "c.yaml").read_text().startswith("b: 1")  # order kept
    assert yaml.safe_load((tmp_path / "c.yaml").read_text()) == {"b": 1, "a": [0.5]}
    write_csv(tmp_path / "d.csv", [{"p": 1, "q": None, "extra": 9}, {"p": 2}], ["p", "q"])
    assert (tmp_path / "d.csv").read_text() == "p,q\n1,\n2,\n"
