"""Inference-only model folders (``medlens export --bundle``), float16 weight storage and
Grad-CAM (MONAI through torch, and the closed form inside the ONNX graph)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from medlens.artifacts.folders import ModelFolder
from medlens.artifacts.model import load_network, read_meta
from medlens.artifacts.onnx import halve_weights, onnx_bytes, ort_session, quantize_weights
from medlens.cli import main
from medlens.errors import ModelLoadError
from medlens.fileio import sha256_file
from medlens.inference.predictor import Predictor


def _manual_grad_cam(net, x: torch.Tensor, k: int) -> np.ndarray:
    """Grad-CAM written out with autograd: relu(sum_c mean(dlogit_k/dA_c) * A_c), upsampled
    and scaled to [0, 1]."""
    net = net.float().eval()
    with torch.enable_grad():
        fmap = net.backbone(x).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(net.head(fmap)[0, k], fmap)
    m = torch.relu((g.mean((2, 3), keepdim=True) * fmap).sum(1, keepdim=True))
    m = (
        torch.nn.functional.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False)[
            0, 0
        ]
        .detach()
        .numpy()
    )
    return (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.zeros_like(m)


@pytest.fixture(scope="module")
def bundle(trained_run, tmp_path_factory):
    dest = tmp_path_factory.mktemp("bundled") / "tiny-pneumonia"
    assert main(["export", "--model", str(trained_run), "--bundle", str(dest), "--half"]) == 0
    return dest


def test_grad_cam_highlights_the_evidence_not_its_inverse(trained_run, image_factory):
    """MONAI's default post-processing inverts the map; explain() must not."""
    pred = Predictor(trained_run, backend="torch")
    img = image_factory("bright", seed=3)
    cam, idx = pred.explain(img)
    ref = _manual_grad_cam(pred.net, pred.pre(img)[None], 0)
    assert idx == 1
    np.testing.assert_allclose(cam, ref, atol=1e-5)


@pytest.mark.slow
def test_multiclass_grad_cam_onnx_equals_monai(
    tmp_path, synthetic_data_3class, image_factory, train_config
):
    from conftest import tiny_config

    from medlens.training.trainer import train

    run = train(tiny_config(synthetic_data_3class, tmp_path / "run3", epochs=1))
    net, meta = load_network(run)
    pred = Predictor(run, backend="torch")
    onnx = Predictor(run, backend="onnx")
    img = image_factory("dark", seed=1)
    peaks = 0
    for k in range(3):
        a, ia = pred.explain(img, class_index=k)
        b, ib = onnx.explain(img, class_index=k)
        assert ia == ib == k
        np.testing.assert_allclose(a, b, atol=1e-4)
        np.testing.assert_allclose(a, _manual_grad_cam(net, pred.pre(img)[None], k), atol=1e-4)
        peaks += a.max() == 1.0
    assert peaks >= 1  # at least one class has positive evidence somewhere


@pytest.mark.parametrize(
    "store, ratio, tol", [(halve_weights, 0.7, 2e-2), (quantize_weights, 0.4, 5e-2)]
)
def test_weight_storage_shrinks_the_file_and_keeps_the_outputs(trained_run, store, ratio, tol):
    import onnx

    net, meta = load_network(trained_run)
    full = onnx_bytes(net, meta)
    small = store(full)
    assert len(small) < ratio * len(full)
    x = np.random.default_rng(0).normal(size=(4, 1, 32, 32)).astype(np.float32)
    a = ort_session(full).run(None, {"input": x})
    b = ort_session(small).run(None, {"input": x})
    for u, v in zip(a, b):
        assert u.dtype == v.dtype == np.float32 and u.shape == v.shape
        assert np.abs(u - v).max() <= tol * max(np.abs(u).max(), 1.0)
    assert np.abs(a[0] - b[0]).max() > 0  # the logits moved: the weights really were rounded
    kinds = {i.data_type for i in onnx.load_from_string(small).graph.initializer}
    assert (onnx.TensorProto.INT8 in kinds) == (store is quantize_weights)


@pytest.mark.slow
def test_bundle_holds_only_inference_files_and_its_card_matches(bundle, trained_run):
    assert sorted(p.name for p in bundle.iterdir()) == sorted(
        [
            "model.json",
            "model.onnx",
            "ood.npz",
            "model_card.json",
            "model_card.md",
            "eval",
            "training_metrics.csv",
        ]  # fmt: skip
    )
    # What the dashboard draws: the run's curves and the shipped file's per-image results,
    # with paths relative to the data folder (no developer paths).
    assert (bundle / "training_metrics.csv").read_bytes() == (
        trained_run / "training_metrics.csv"
    ).read_bytes()
    for split in ("val", "test"):
        shipped = ModelFolder(bundle)
        m = shipped.read_metrics(split)
        preds = shipped.read_predictions(split, m["labels"])
        run_preds = ModelFolder(trained_run).read_predictions(split, m["labels"])
        assert m["n"] == len(preds.paths) == len(run_preds.paths) and "confusion_matrix" in m
        assert m["auc"] == read_meta(bundle).extra["metrics"][split]["auc"]
        assert all(not os.path.isabs(p) and ".." not in p for p in preds.paths)
        assert [p.split("/")[-1] for p in preds.paths] == [
            os.path.basename(p) for p in run_preds.paths
        ]
        assert np.abs(preds.probs - run_preds.probs).max() < 0.05
    card = json.loads((bundle / "model_card.json").read_text())
    assert card["files"] == {"model.onnx": {"sha256": sha256_file(bundle / "model.onnx")}}
    assert card["name"] == "tiny-pneumonia"
    assert card["export"]["weights"] == "float16 storage, float32 compute"
    meta, run_meta = read_meta(bundle), read_meta(trained_run)
    # Metrics were re-measured on the shipped file, on the run's own validation images.
    assert meta.extra["metrics"]["val"]["n"] == run_meta.extra["metrics"]["val"]["n"]
    assert meta.extra["metrics"]["val"]["auc"] == pytest.approx(
        run_meta.extra["metrics"]["val"]["auc"], abs=0.02
    )
    assert 0 <= card["export"]["max_probability_change"] < 0.05
    assert meta.threshold == run_meta.threshold and meta.temperature == run_meta.temperature
    md = (bundle / "model_card.md").read_text()
    assert card["files"]["model.onnx"]["sha256"] in md and "## Out-of-distribution guard" in md
    assert "model.pt" not in card["files"]
    # The card names the data folder, not the trainer's disk layout.
    data = card["training"]["data"]
    assert data.count("/") == 1 and not os.path.isabs(data) and ".." not in data
    assert f"`{data}`" in md
    # No half-written leftovers beside it.
    assert [p.name for p in bundle.parent.iterdir()] == ["tiny-pneumonia"]


def test_bundle_predicts_and_explains_without_torch_weights(bundle, trained_run, image_factory):
    pred = Predictor(bundle)
    assert pred.backend == "onnx" and pred.net is None
    imgs = [image_factory(k, seed=i) for i, k in enumerate(["bright", "dark"])]
    got = pred.predict_pixels(imgs)
    ref = Predictor(trained_run, backend="torch").predict_pixels(imgs)
    for a, b in zip(got, ref):
        assert a.label == b.label and a.ood["flag"] == b.ood["flag"]
        assert a.probabilities == pytest.approx(b.probabilities, abs=0.02)
    cam, idx = pred.explain(imgs[0])
    assert idx == 1 and cam.shape == (32, 32) and cam.max() == pytest.approx(1.0)
    with pytest.raises(ModelLoadError, match="holds only model.onnx.*ONNX Runtime only"):
        Predictor(bundle, backend="torch")


def test_bundle_refuses_to_overwrite_and_needs_a_run(bundle, trained_run, capsys):
    assert main(["export", "--model", str(trained_run), "--bundle", str(bundle)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", "--model", str(bundle), "--bundle", str(bundle.parent / "x")]) == 2
    assert "has no model.pt" in capsys.readouterr().err
    assert main(["export", "--model", str(trained_run), "--half"]) == 2
    assert "go with --bundle" in capsys.readouterr().err
