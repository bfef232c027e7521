"""Ensembles: one inference-only model folder whose ONNX graph averages several runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medlens.artifacts.folders import ModelFolder
from medlens.artifacts.model import load_network
from medlens.artifacts.onnx import ort_session
from medlens.cli import main
from medlens.evaluation.ood import EnsembleGuard, load_guard
from medlens.inference.predictor import Predictor
from medlens.serve import create_app
from medlens.training.trainer import train


@pytest.fixture(scope="module")
def members(tmp_path_factory, synthetic_data):
    """Two runs on the same split (same seed) with other settings: they share validation."""
    from conftest import tiny_config

    d = tmp_path_factory.mktemp("members")
    a = train(tiny_config(synthetic_data, d / "a"))
    b = train(tiny_config(synthetic_data, d / "b", dropout=0.5, lr=3e-3))
    return a, b


@pytest.mark.slow
def test_an_ensemble_folder_averages_its_members(members, tmp_path, image_factory):
    dest = tmp_path / "ens"
    assert main(["export", "--model", *map(str, members), "--bundle", str(dest)]) == 0
    meta = json.loads((dest / "model.json").read_text())
    assert [m["run"] for m in meta["ensemble"]] == ["a", "b"]
    assert "validation images the members share" in meta["ensemble_calibration"]
    assert meta["metrics"]["val"]["n"] > 0 and not (dest / "model.pt").exists()
    # The graph's logits are the mean of the members' (float32 here, no --half).
    nets = [load_network(m)[0].eval() for m in members]
    pre = Predictor(members[0]).pre
    x = np.stack([pre.prepare(image_factory(k, seed=i)) for i, k in enumerate(["bright", "dark"])])
    xin = pre.normalize(torch.as_tensor(x))
    with torch.no_grad():
        want = torch.stack([n(xin) for n in nets]).mean(0).numpy()
    session = ort_session(dest / "model.onnx")
    logits, cam, stats = session.run(["logits", "cam", "stats"], {"input": xin.numpy()})
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    assert cam.shape[:2] == (2, 1)
    guard = load_guard(dest / "ood.npz")
    assert isinstance(guard, EnsembleGuard) and stats.shape[1] == sum(guard.widths)
    card = json.loads((dest / "model_card.json").read_text())
    assert card["ood"]["members"] == 2 and card["ood"]["threshold"] == 1.0
    assert (
        "on average the 2 members score it above their own thresholds"
        in (dest / "model_card.md").read_text()
    )
    pred = Predictor(dest)
    out = pred.predict_prepared(x)
    assert all(p.ood["flag"] is not None for p in out)
    heat, _ = pred.explain(image_factory("bright", seed=0))
    assert heat.shape == (pre.image_size, pre.image_size) and float(heat.max()) == 1.0
    assert "ens" in create_app([dest], bundled=False).state.models


@pytest.mark.slow
def test_members_of_different_tasks_are_refused(members, trained_run, tmp_path, capsys,
                                                synthetic_data_3class):  # fmt: skip
    from conftest import tiny_config

    other = train(tiny_config(synthetic_data_3class, tmp_path / "three", epochs=1))
    code = main(["export", "--model", str(members[0]), str(other), "--bundle", str(tmp_path / "x")])
    assert code == 2 and "cannot join an ensemble" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", "--model", *map(str, members)]) == 2
    assert "give --bundle DEST too" in capsys.readouterr().err


@pytest.mark.slow
def test_a_fold_ensemble_keeps_the_members_calibration(tmp_path, synthetic_data):
    from conftest import tiny_config

    runs = [train(tiny_config(synthetic_data, tmp_path / f"f{i}", folds=2, fold=i, epochs=1))
            for i in range(2)]  # fmt: skip
    dest = tmp_path / "folds"
    assert main(["export", "--model", *map(str, runs), "--bundle", str(dest)]) == 0
    meta = json.loads((dest / "model.json").read_text())
    temps = [json.loads((r / "model.json").read_text())["temperature"] for r in runs]
    assert meta["temperature"] == pytest.approx(np.mean(temps))
    assert "share no validation images" in meta["ensemble_calibration"]
    assert meta["metrics"]["test"]["n"] > 0
    # No shared validation images: the card reports the pooled out-of-fold estimate, saying so.
    oof = meta["metrics"]["val"]
    n_val = [json.loads((r / "eval" / "val" / "metrics.json").read_text())["n"] for r in runs]
    assert oof["n"] == sum(n_val) and oof["measured_on"].startswith("out-of-fold")
    md = (dest / "model_card.md").read_text()
    assert "### Validation split, out of fold (n =" in md and "Out-of-fold: each validation" in md
    assert md.index("### Carved test split") < md.index("### Validation split, out of fold")
    # The bundle ships the pooled out-of-fold predictions for the dashboard.
    shipped = ModelFolder(dest).read_predictions("val", meta["labels"])
    assert len(shipped.paths) == oof["n"] and len(set(shipped.paths)) == oof["n"]
