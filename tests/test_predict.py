"""Tests for medlens.predict: Predictor, Grad-CAM explanations, overlays, model resolution."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from medlens.artifacts.folders import find_models, resolve_model
from medlens.data.imaging import read_image
from medlens.errors import ModelLoadError
from medlens.inference.cam import overlay_cam
from medlens.inference.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(trained_run) -> Predictor:
    return Predictor(trained_run)


def _files(data: Path, cls: str, n: int = 4) -> list[Path]:
    return sorted((data / cls).glob("*.png"))[:n]


def test_predictor_loads_the_run(predictor, trained_run):
    assert predictor.folder == trained_run
    assert predictor.labels == ["NORMAL", "PNEUMONIA"]
    assert predictor.pre.image_size == 32 and predictor.pre.channels == 1
    assert not predictor.net.training


def test_probabilities_sum_to_one_and_follow_the_threshold_rule(predictor, synthetic_data):
    files = _files(synthetic_data, "NORMAL") + _files(synthetic_data, "PNEUMONIA")
    preds = predictor.predict_pixels([read_image(f).pixels for f in files])
    assert len(preds) == len(files)
    thr = predictor.meta.threshold
    for _f, p in zip(files, preds):
        assert set(p.probabilities) == {"NORMAL", "PNEUMONIA"}
        assert sum(p.probabilities.values()) == pytest.approx(1, abs=1e-5)
        assert all(0 <= v <= 1 for v in p.probabilities.values())
        expected = "PNEUMONIA" if p.probabilities["PNEUMONIA"] >= thr else "NORMAL"
        assert p.label == expected
        assert p.threshold == thr
        assert p.to_dict() == {"label": p.label, "probabilities": p.probabilities, "threshold": thr}
    # The model learnt the synthetic task.
    assert sum(p.label == f.parent.name for f, p in zip(files, preds)) >= len(files) - 1


def test_predict_pixels_matches_the_prepared_path_and_is_temperature_scaled(
    predictor, synthetic_data
):
    files = _files(synthetic_data, "PNEUMONIA", 3)
    pixels = [read_image(f).pixels for f in files]
    x = np.stack([predictor.pre.prepare(p) for p in pixels])
    probs = predictor.probs_prepared(x)
    assert probs.shape == (3, 2)
    logits = predictor.logits_prepared(x).view(-1)
    p_pos = torch.sigmoid(logits / predictor.meta.temperature).numpy()
    np.testing.assert_allclose(probs[:, 1], p_pos, atol=1e-6)
    got = [p.probabilities["PNEUMONIA"] for p in predictor.predict_pixels(pixels)]
    np.testing.assert_allclose(got, probs[:, 1], atol=1e-6)  # rounded to 6 places


def test_rgb_input_to_a_grey_model_is_converted(predictor, image_factory):
    grey = image_factory("bright", seed=3)
    rgb = np.stack([grey] * 3, -1)
    a, b = predictor.predict_pixels([grey, rgb])
    assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)


def test_explain_returns_a_normalised_non_constant_map(predictor, image_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hook warnings on every call
        cam, idx = predictor.explain(image_factory("bright", seed=5))
    assert idx == 1  # binary: the positive-class logit is explained
    assert cam.shape == (32, 32) and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() <= 1
    assert cam.max() - cam.min() > 0.5  # min-max normalised, not flat
    # The network is left usable for prediction afterwards.
    p = predictor.predict_pixels([image_factory("bright", seed=5)])[0]
    assert sum(p.probabilities.values()) == pytest.approx(1, abs=1e-5)


def test_the_jet_colour_map_runs_blue_green_red():
    from medlens.inference.cam import jet

    np.testing.assert_allclose(
        jet(np.array([0.0, 0.5, 1.0])), [[0, 0, 0.5], [0.5, 1, 0.5], [0.5, 0, 0]]
    )
    rgb = jet(np.linspace(0, 1, 101))
    assert rgb.shape == (101, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert np.argmax(rgb[:, 2]) < np.argmax(rgb[:, 1]) < np.argmax(rgb[:, 0])  # b, g, r peaks


def test_overlay_cam_shapes_and_dtype():
    grey = np.zeros((40, 60), np.uint8)
    cam = np.zeros((8, 8), np.float32)
    cam[:4] = 1.0
    out = overlay_cam(grey, cam)
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
    # Hot (red) where the map is 1, cold (blue) where it is 0, on a black image.
    top, bottom = out[2, 30].astype(int), out[37, 30].astype(int)
    assert top[0] > top[2] and bottom[2] > bottom[0]
    big = overlay_cam(np.zeros((40, 60, 3), np.uint8), cam, size=100)
    assert big.shape == (100, 100, 3)
    # alpha=0 leaves the image itself.
    img = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    assert np.array_equal(overlay_cam(img, cam, alpha=0.0), np.stack([img] * 3, -1))


# --------------------------------------------------------------------------- resolve_model


def test_resolve_model_accepts_a_run_folder(trained_run):
    assert resolve_model(trained_run) == trained_run
    assert resolve_model(str(trained_run)) == trained_run


def test_resolve_model_folder_without_model_json(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ModelLoadError) as e:
        resolve_model(tmp_path / "half")
    assert "model.json is missing" in str(e.value) and "medlens train" in str(e.value)
    with pytest.raises(ModelLoadError):
        Predictor(tmp_path / "half")


def test_resolve_model_unknown_name_lists_the_find_models(tmp_path, trained_run):
    shelf = tmp_path / "models"
    shelf.mkdir()
    shutil.copytree(
        trained_run, shelf / "chest-tiny", ignore=shutil.ignore_patterns("eval", "checkpoints")
    )
    (shelf / "not-a-model").mkdir()
    assert set(find_models([shelf])) >= {"chest-tiny"}
    assert "not-a-model" not in find_models([shelf])
    assert resolve_model("chest-tiny", [shelf]) == shelf / "chest-tiny"
    with pytest.raises(ModelLoadError) as e:
        resolve_model("chest-huge", [shelf])
    msg = str(e.value)
    assert "'chest-huge'" in msg and "available:" in msg and "chest-tiny" in msg
    # Predictor finds it by name too.
    p = Predictor("chest-tiny", model_dirs=[shelf])
    assert p.folder == shelf / "chest-tiny"


def test_resolve_model_unknown_name_without_models_says_none(tmp_path, monkeypatch):
    import medlens.artifacts.folders as mp

    monkeypatch.setattr(mp, "bundled_models_dir", lambda: tmp_path / "no-bundle")
    with pytest.raises(ModelLoadError, match="available: none"):
        resolve_model("anything")


# --------------------------------------------------------------------------- multi-class


@pytest.fixture(scope="module")
def multiclass_predictor(trained_run, tmp_path_factory):
    """An untrained 3-class cnn saved with save_model: enough for the softmax/argmax rules.
    (A trained 3-class run is tested in test_train.)"""
    from medlens.artifacts.model import ModelMeta, build_network, save_model
    from medlens.data.preprocess import Preprocess

    meta = ModelMeta(
        arch="cnn",
        labels=["a", "b", "c"],
        preprocess=Preprocess(image_size=32, channels=1, mean=(0.4,), std=(0.2,)),
        temperature=2.0,
        name="three",
    )
    torch.manual_seed(0)
    net = build_network(meta).eval()
    folder = tmp_path_factory.mktemp("three") / "three"
    save_model(folder, net, meta)
    return Predictor(folder)


def test_multiclass_prediction_is_the_argmax_of_a_softmax(multiclass_predictor, image_factory):
    pred = multiclass_predictor
    imgs = [image_factory(k, seed=i) for i, k in enumerate(["bright", "dark", "stripes"])]
    x = np.stack([pred.pre.prepare(p) for p in imgs])
    logits = pred.logits_prepared(x)
    assert logits.shape == (3, 3)
    expected = torch.softmax(logits / 2.0, 1).numpy()
    np.testing.assert_allclose(pred.probs_prepared(x), expected, atol=1e-6)
    for p, e in zip(pred.predict_pixels(imgs), expected):
        assert p.threshold is None
        assert p.label == ["a", "b", "c"][int(e.argmax())]
        assert sum(p.probabilities.values()) == pytest.approx(1, abs=1e-5)


def test_multiclass_explain_each_class(multiclass_predictor, image_factory):
    img = image_factory("stripes", seed=1)
    cam, idx = multiclass_predictor.explain(img)
    x = multiclass_predictor.pre(img)[None]
    with torch.no_grad():
        assert idx == int(multiclass_predictor.net(x).argmax(1))
    for k in range(3):
        cam_k, idx_k = multiclass_predictor.explain(img, class_index=k)
        assert idx_k == k and cam_k.shape == (32, 32)
        assert cam_k.min() >= 0 and cam_k.max() <= 1


# --------------------------------------------------------------------------- backends


def test_backend_auto_without_onnx_file_is_torch(predictor):
    assert predictor.backend == "torch" and predictor.session is None


def test_onnx_backend_matches_torch(trained_run, predictor, synthetic_data):
    files = _files(synthetic_data, "NORMAL", 3) + _files(synthetic_data, "PNEUMONIA", 3)
    x = np.stack([predictor.pre.prepare(read_image(f).pixels) for f in files])
    onnx = Predictor(trained_run, backend="onnx")
    assert onnx.backend.startswith("onnx")
    assert not (trained_run / "model.onnx").exists()  # exported in memory only
    np.testing.assert_allclose(onnx.probs_prepared(x), predictor.probs_prepared(x), atol=1e-4)
    logits, feats = onnx.forward_prepared(x, features=True)
    t_logits, t_feats = predictor.forward_prepared(x, features=True)
    assert feats.shape == t_feats.shape == (6, 256)
    np.testing.assert_allclose(feats, t_feats, atol=1e-4)
    assert [p.label for p in onnx.predict_prepared(x)] == [
        p.label for p in predictor.predict_prepared(x)
    ]


def test_unknown_backend_is_an_error(trained_run):
    with pytest.raises(ValueError, match="backend must be auto, onnx or torch"):
        Predictor(trained_run, backend="tensorrt")


def test_bf16_and_fp32_predictions_agree(trained_run, synthetic_data):
    """bf16 autocast (what training's frozen passes use where the CPU has it) gives the same
    labels as float32 on the fixture, with probabilities close."""
    from medlens.training.device import bf16_supported

    if not bf16_supported():
        pytest.skip("this CPU has no bfloat16 support: nothing to compare")
    files = _files(synthetic_data, "NORMAL", 6) + _files(synthetic_data, "PNEUMONIA", 6)
    pixels = [read_image(f).pixels for f in files]
    fp32 = Predictor(trained_run, backend="torch").predict_pixels(pixels)
    bf16 = Predictor(trained_run, backend="torch", dtype=torch.bfloat16).predict_pixels(pixels)
    assert [p.label for p in bf16] == [p.label for p in fp32]
    for a, b in zip(fp32, bf16):
        assert b.probabilities == pytest.approx(a.probabilities, abs=0.05)


# --------------------------------------------------------------------------- test-time augmentation


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_tta_averages_the_logits_of_the_image_and_its_mirror(trained_run, image_factory, backend):
    plain = Predictor(trained_run, backend=backend)
    tta = Predictor(trained_run, backend=backend, tta=True)
    x = np.stack([plain.pre.prepare(image_factory(k, seed=i)) for i, k in
                  enumerate(["bright", "dark", "bright"])])  # fmt: skip
    x[..., :10] = 255  # a bright band on the left: the mirror image differs
    mirrored = np.ascontiguousarray(x[..., ::-1])
    want = (plain.logits_prepared(x) + plain.logits_prepared(mirrored)) / 2
    torch.testing.assert_close(tta.logits_prepared(x), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, plain.logits_prepared(x), atol=1e-4)
    # The OOD statistics stay the image's own (the guard was fitted on unmirrored images).
    _, stats = tta.forward_prepared(x, features="stats")
    np.testing.assert_allclose(stats, plain.forward_prepared(x, features="stats")[1], rtol=1e-5)


def test_cli_predict_tta(capsys, tmp_path, trained_run):
    from PIL import Image

    from medlens.cli import main

    pixels = np.zeros((48, 48), np.uint8)
    pixels[:, :20] = 200  # lopsided: the mirror image is another input
    img = tmp_path / "half.png"
    Image.fromarray(pixels).save(img)
    rows = []
    for extra in ([], ["--tta"]):
        assert main(["predict", "--model", str(trained_run), str(img), "--json", *extra]) == 0
        rows.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    tta = Predictor(trained_run, tta=True).predict_pixels([pixels])[0]
    assert rows[1]["probabilities"] == pytest.approx(tta.probabilities, abs=1e-5)
    # TTA changes the answer: compared on the logits, which a saturated probability hides.
    prepared = Predictor(trained_run).pre.prepare(pixels)[None]
    plain = Predictor(trained_run).logits_prepared(prepared)
    mirrored = Predictor(trained_run, tta=True).logits_prepared(prepared)
    assert float((plain - mirrored).abs().max()) > 1e-3
