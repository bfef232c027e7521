"""Tests for medlens.export (ONNX + model card), the ONNX Runtime backend of the Predictor and
batch prediction (``medlens predict DIR --out predictions.csv``), which runs through it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serve_fixtures import copy_run

from medlens.artifacts.card import export_model
from medlens.artifacts.model import load_network, read_meta
from medlens.artifacts.onnx import check_onnx, onnx_bytes, ort_session
from medlens.cli import main
from medlens.errors import ExportError, ModelLoadError
from medlens.fileio import sha256_file
from medlens.inference.predictor import Predictor


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    """A copy of the tiny run with a ``card`` in model.json, exported once."""
    run = copy_run(trained_run, tmp_path_factory.mktemp("export") / "chest")
    d = json.loads((run / "model.json").read_text())
    d["card"] = {
        "title": "Tiny chest test model",
        "modality": "chest X-ray (PA)",
        "intended_use": "Testing MedLens only.",
        "references": ["a paper"],
    }
    (run / "model.json").write_text(json.dumps(d))
    assert main(["export", "--model", str(run)]) == 0
    return run


def test_export_writes_onnx_that_matches_torch(exported):
    assert (exported / "model.onnx").stat().st_size > 10_000
    net, meta = load_network(exported)
    session = ort_session(exported / "model.onnx")
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits", "features", "cam", "stats"]
    for batch in (1, 5):  # dynamic batch axis
        x = torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref_logits, ref_feats = net.forward_with_features(x)
        logits, feats = session.run(["logits", "features"], {"input": x.numpy()})
        assert logits.shape == (batch, 1) and feats.shape == (batch, net.num_features)
        rel = np.abs(logits - ref_logits.numpy()).max() / np.abs(ref_logits.numpy()).max()
        assert rel <= 1e-4
        np.testing.assert_allclose(feats, ref_feats.numpy(), rtol=1e-4, atol=1e-5)
        (stats,) = session.run(["stats"], {"input": x.numpy()})
        with torch.no_grad():
            ref_stats = net.forward_with_stats(x)[2].numpy()
        assert stats.shape == (batch, sum(net.stat_widths(1)))
        np.testing.assert_allclose(stats, ref_stats, rtol=1e-3, atol=1e-4)
    assert check_onnx(net, (exported / "model.onnx").read_bytes(), meta) <= 1e-4
    # Provenance travels inside the graph.
    props = session.get_modelmeta().custom_metadata_map
    assert props["medlens.weights_sha256"] == sha256_file(exported / "model.pt")
    assert json.loads(props["medlens.labels"]) == ["NORMAL", "PNEUMONIA"]


def test_check_onnx_refuses_a_graph_that_differs(exported):
    net, meta = load_network(exported)
    blob = onnx_bytes(net, meta)
    with torch.no_grad():
        net.head.fc.bias += 1.0  # the torch network no longer matches the graph
    with pytest.raises(ExportError, match="differ from torch's"):
        check_onnx(net, blob, meta)


def test_model_card(exported):
    card = json.loads((exported / "model_card.json").read_text())
    meta = read_meta(exported)
    assert card["title"] == "Tiny chest test model" and card["name"] == "tiny_cnn"
    assert card["task"] == "binary" and card["labels"] == ["NORMAL", "PNEUMONIA"]
    assert card["input"] == {"modality": "chest X-ray (PA)", "size": 32, "channels": 1}
    assert card["preprocessing"] == meta.preprocess.to_dict()
    assert card["calibration"]["temperature"] == meta.temperature
    assert card["decision"]["threshold"] == meta.threshold
    assert card["decision"]["method"] == meta.threshold_method == "balanced"
    op = card["decision"]["operating_point"]
    assert op == meta.extra["operating_point"] and op["threshold"] == meta.threshold == 0.5
    assert op["n"] == sum(meta.extra["metrics"]["val"]["support"].values())
    assert card["metrics"] == meta.extra["metrics"]
    assert len(card["metrics"]["val"]["ci"]["auc"]) == 2
    assert card["training"]["split_counts"] == meta.extra["training"]["split_counts"]
    assert card["intended_use"] == "Testing MedLens only."
    assert card["limitations"] == ""  # placeholder to fill in
    assert card["references"] == ["a paper"]  # extra card fields are kept
    assert card["files"]["model.onnx"]["sha256"] == sha256_file(exported / "model.onnx")
    assert card["files"]["model.pt"]["sha256"] == sha256_file(exported / "model.pt")
    assert card["version"] == sha256_file(exported / "model.pt")[:12]
    md = (exported / "model_card.md").read_text()
    assert md.startswith("# Model card: Tiny chest test model")
    assert "## Intended use\n\nTesting MedLens only." in md
    assert "## Limitations\n\n_Not stated yet._" in md
    lo, hi = card["metrics"]["val"]["ci"]["accuracy"]
    assert f"| accuracy | {card['metrics']['val']['accuracy']:.3f} | {lo:.3f} – {hi:.3f} |" in md
    assert card["files"]["model.onnx"]["sha256"] in md


def test_predictor_uses_model_onnx_and_agrees_with_torch(exported, image_factory):
    onnx = Predictor(exported)
    torch_pred = Predictor(exported, backend="torch")
    assert onnx.backend == "onnx" and onnx.session is not None
    assert torch_pred.backend == "torch" and torch_pred.session is None
    imgs = [image_factory(k, seed=i) for i, k in enumerate(["bright", "dark", "bright"])]
    a, b = onnx.predict_pixels(imgs), torch_pred.predict_pixels(imgs)
    for pa, pb in zip(a, b):
        assert pa.label == pb.label and pa.ood["flag"] == pb.ood["flag"]
        assert pa.ood["score"] == pytest.approx(pb.ood["score"], rel=1e-3)
        assert pa.probabilities == pytest.approx(pb.probabilities, abs=1e-5)
    x = np.stack([onnx.pre.prepare(p) for p in imgs])
    logits, feats = onnx.forward_prepared(x, batch_size=2, features=True)
    assert logits.shape == (3, 1) and feats.shape == (3, onnx.net.num_features)
    # Grad-CAM from the graph's cam output is MONAI's Grad-CAM from the torch network.
    cam, idx = onnx.explain(imgs[0])
    ref, ref_idx = torch_pred.explain(imgs[0])
    assert idx == ref_idx == 1 and cam.shape == (32, 32)
    np.testing.assert_allclose(cam, ref, atol=1e-4)


def test_in_memory_export_when_the_folder_has_no_onnx(trained_run):
    pred = Predictor(trained_run, backend="onnx")
    assert pred.backend == "onnx (exported in memory)"
    assert not (trained_run / "model.onnx").exists()  # nothing written
    assert Predictor(trained_run).backend == "torch"  # auto: torch without model.onnx


def test_the_web_app_serves_model_onnx_and_the_card(exported):
    from fastapi.testclient import TestClient

    from medlens.serve import create_app

    app = create_app([exported])
    assert app.state.models["chest"].predictor.backend == "onnx"  # from the file, no re-export
    with TestClient(app) as client:
        (info,) = [m for m in client.get("/api/v1/models").json() if m["name"] == "chest"]
        page = client.get("/").text
    assert info["name"] == "chest" and info["title"] == "Tiny chest test model"
    assert info["input"] == {"modality": "chest X-ray (PA)", "size": 32}
    assert "Testing MedLens only." in page and "chest X-ray (PA)" in page


def test_stale_onnx_is_refused(exported, tmp_path):
    run = copy_run(exported, tmp_path / "stale")
    # As if model.pt had been retrained after the export: new weights, model.json updated.
    state = torch.load(run / "model.pt", weights_only=True)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, run / "model.pt")
    d = json.loads((run / "model.json").read_text())
    d["weights_sha256"] = sha256_file(run / "model.pt")
    (run / "model.json").write_text(json.dumps(d))
    with pytest.raises(ModelLoadError, match="exported from other weights.*medlens export"):
        Predictor(run)
    assert Predictor(run, backend="torch").backend == "torch"


def _flip_a_bit(path, offset_fraction=0.6):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["model.pt", "model.onnx", "ood.npz"])
def test_a_flipped_bit_in_a_model_file_is_refused_naming_it(exported, tmp_path, capsys, damaged):
    run = copy_run(exported, tmp_path / "bad")
    _flip_a_bit(run / damaged)
    with pytest.raises(ModelLoadError, match=f"{damaged} is damaged or was replaced"):
        Predictor(run)
    img = tmp_path / "x.png"
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(img)
    assert main(["predict", "--model", str(run), str(img)]) == 2
    err = capsys.readouterr().err
    assert str(run / damaged) in err and "sha256" in err


def test_serve_refuses_only_the_damaged_model(exported, tmp_path, caplog):
    from fastapi.testclient import TestClient

    from medlens.serve import create_app

    good, bad = copy_run(exported, tmp_path / "good"), copy_run(exported, tmp_path / "bad")
    _flip_a_bit(bad / "model.onnx")
    app = create_app([good, bad], bundled=False)
    assert set(app.state.models) == {"good"}
    assert "model.onnx is damaged" in app.state.refused_models["bad"]
    assert any("model bad refused" in r.getMessage() for r in caplog.records)
    with TestClient(app) as client:
        assert [m["name"] for m in client.get("/api/v1/models").json()] == ["good"]
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["models"] == {"good": "ok"}
        assert "model.onnx is damaged" in r.json()["refused"]["bad"]
    with TestClient(create_app([good], bundled=False)) as client:
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready"
    with pytest.raises(ModelLoadError, match="no model could be loaded"):
        create_app([bad], bundled=False)


def test_export_of_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    assert main(["export", "--model", str(tmp_path / "half")]) == 2
    assert "model.json is missing" in capsys.readouterr().err


def test_export_function_returns_paths_and_error(exported):
    res = export_model(exported)
    assert res["onnx"] == exported / "model.onnx" and res["relative_error"] <= 1e-4
    assert res["card_md"].exists() and res["card_json"].exists()


# --------------------------------------------------------------------------- batch prediction


def test_batch_predict_csv(exported, tmp_path, image_factory, capsys):
    data = tmp_path / "incoming"
    (data / "ward" / "b").mkdir(parents=True)
    Image.fromarray(image_factory("bright", seed=1)).save(data / "a.png")
    Image.fromarray(image_factory("dark", seed=2)).save(data / "ward" / "b" / "c.png")
    Image.fromarray(image_factory("bright", seed=3)).convert("RGB").save(data / "ward" / "d.jpg")
    (data / "ward" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "notes.txt").write_text("not an image extension: not listed")
    out = tmp_path / "predictions.csv"
    rc = main(
        ["predict", "--model", str(exported), str(data), "--out", str(out), "--batch-size", "2"]
    )
    assert rc == 0
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = {Path(r["path"]).relative_to(data).as_posix(): r for r in reader}
        assert reader.fieldnames == [
            "path",
            "label",
            "p_NORMAL",
            "p_PNEUMONIA",
            "threshold",
            "ood_flag",
            "ood_score",
            "ood_ratio",
            "error",
        ]
    assert set(rows) == {"a.png", "ward/b/c.png", "ward/d.jpg", "ward/broken.png"}
    level = Predictor(exported).ood_guard.threshold
    assert rows["a.png"]["label"] == "PNEUMONIA" and rows["ward/b/c.png"]["label"] == "NORMAL"
    for name in ("a.png", "ward/b/c.png", "ward/d.jpg"):
        r = rows[name]
        # the guard's verdict follows from its score and level (not from where a synthetic
        # image happens to fall against a learnt level: that moves with the CPU's rounding)
        assert r["error"] == "" and r["ood_flag"] == str(float(r["ood_score"]) > level)
        assert float(r["threshold"]) == pytest.approx(read_meta(exported).threshold)
        assert 0 <= float(r["ood_score"])
        assert float(r["p_NORMAL"]) + float(r["p_PNEUMONIA"]) == pytest.approx(1, abs=1e-5)
    broken = rows["ward/broken.png"]
    assert broken["label"] == "" and "broken.png" in broken["error"]
    assert "wrote 4 rows" in capsys.readouterr().err


def test_non_finite_outputs_are_an_error_and_a_503_not_a_500(exported, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from medlens.serve import create_app

    run = copy_run(exported, tmp_path / "nan")
    state = torch.load(run / "model.pt", weights_only=True)
    state = {k: v * float("nan") if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, run / "model.pt")
    d = json.loads((run / "model.json").read_text())
    d["weights_sha256"] = sha256_file(run / "model.pt")  # consistent files, bad numbers
    (run / "model.json").write_text(json.dumps(d))
    for name in ("model.onnx", "model_card.json"):
        (run / name).unlink()
    img = tmp_path / "x.png"
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(img)
    assert main(["predict", "--model", str(run), "--backend", "torch", str(img)]) == 2
    assert "answered with non-finite numbers" in capsys.readouterr().err
    app = create_app([run], bundled=False, backend="torch")
    with TestClient(app) as client:
        r = client.post("/api/v1/models/nan/predict", files={"file": img.read_bytes()})
        assert r.status_code == 503 and "non-finite" in r.json()["detail"]
        assert client.get("/healthz").status_code == 200  # the server keeps serving
        r = client.get("/readyz")  # but it is not ready: the model cannot answer
        assert r.status_code == 503 and "non-finite" in r.json()["models"]["nan"]


def test_a_damaged_guard_without_a_recorded_hash_is_still_a_clear_error(exported, tmp_path):
    run = copy_run(exported, tmp_path / "old")
    d = json.loads((run / "model.json").read_text())
    d["ood"].pop("sha256")  # as in folders written before the hash was recorded
    (run / "model.json").write_text(json.dumps(d))
    _flip_a_bit(run / "ood.npz", 0.5)
    with pytest.raises(ModelLoadError, match="ood.npz cannot be read as the out-of-distribution"):
        Predictor(run)
