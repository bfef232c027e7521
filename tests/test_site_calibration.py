"""``medlens calibrate`` end to end on real chest X-rays: site calibration of the bundled
pneumonia model, its refusals, and restating a model's operating point."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from medlens.artifacts.folders import bundled_models_dir
from medlens.cli import main
from medlens.evaluation.metrics import compute_metrics
from medlens.fileio import sha256_file
from medlens.inference.predictor import Predictor

# runs real models on real data (`make test-fast` leaves it out)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not SHARED_DATA.is_dir(), reason=f"real data not available at {SHARED_DATA} (fresh clone)"
    ),
]
BASE = bundled_models_dir() / "pneumonia"


def _site(root: Path, per_class: int, classes=("NORMAL", "PNEUMONIA")) -> Path:
    """A 'new hospital' folder: the bundled model's carved test images (never trained on),
    ``per_class`` of each class, linked into ``root/<class>/``."""
    with open(BASE / "eval" / "test" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        picked = [r for r in rows if r["true"] == cls][:per_class]
        for r in picked:
            src = SHARED_DATA / "chest_xray" / "train" / r["path"]
            os.symlink(src, root / cls / Path(r["path"]).name)
    return root


def test_site_calibration_writes_a_model_that_names_its_base(tmp_path, capsys):
    site = _site(tmp_path / "hospital", 30)
    out = tmp_path / "pneumonia-site"
    code = main(["calibrate", "--model", "pneumonia", "--data", str(site), "--out", str(out),
                 "--min-per-class", "20", "--refit-guard", "--operating-point", "balanced",
                 "--quiet"])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    meta = json.loads((out / "model.json").read_text())
    sc = meta["site_calibration"]
    assert sc["base_model"] == "pneumonia"
    assert sc["base_model_json_sha256"] == sha256_file(BASE / "model.json")
    assert sc["data"]["images"] == 60 and sc["data"]["per_class"] == {"NORMAL": 30, "PNEUMONIA": 30}
    assert sc["data"]["folder"] == f"{tmp_path.name}/hospital" and sc["date"]
    # the network is the base's; temperature and threshold are the site's
    assert sha256_file(out / "model.onnx") == sha256_file(BASE / "model.onnx")
    op = meta["operating_point"]
    assert op["rule"] == "balanced" and meta["threshold"] == 0.5
    assert op["measured_on"] == "site" and op["n"] == 60 and op["n_positive"] == 30
    # "before": the base model's own decisions on the same images, recomputed here
    base = Predictor("pneumonia")
    files = sorted(site.glob("*/*"))
    probs = np.array([list(p.probabilities.values()) for p in
                      base.predict_pixels([_pixels(f) for f in files])])  # fmt: skip
    y = np.array([0 if f.parent.name == "NORMAL" else 1 for f in files])
    ref = compute_metrics(y, probs, base.labels, base.meta.threshold, n_bootstrap=0)
    assert sc["before"]["accuracy"] == pytest.approx(ref["accuracy"])
    assert sc["before"]["specificity"] == pytest.approx(ref["specificity"])
    # "after": cross-fitted decisions, one row per image with a relative path, OOD columns
    with open(out / "eval" / "site" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60 and not any(str(tmp_path) in r["path"] for r in rows)
    assert {r["path"].split("/")[0] for r in rows} == {"NORMAL", "PNEUMONIA"}
    correct = np.mean([r["true"] == r["pred"] for r in rows])
    assert sc["after"]["accuracy"] == pytest.approx(correct)
    assert {"ood_score", "ood_ratio", "ood_flag"} <= set(rows[0])
    # the guard's level was set on these images: at most 2.5% (1 of 60) flagged
    assert sum(r["ood_flag"] == "True" for r in rows) <= 2
    assert meta["ood"]["level_set_on"] == "the site's images"
    # the table and the card
    assert "base model" in printed.out and "site calibration, cross-fitted" in printed.out
    assert "operating point balanced: threshold 0.500000" in printed.out
    md = (out / "model_card.md").read_text()
    assert "## Site calibration" in md and "from base model `pneumonia`" in md
    # the new folder is a model like any other: it loads and decides at its own threshold
    mine = Predictor(out)
    assert mine.meta.threshold == 0.5 and mine.meta.temperature == meta["temperature"]
    assert mine.meta.temperature != base.meta.temperature


def _pixels(path: Path) -> np.ndarray:
    from medlens.data.imaging import read_image

    return read_image(path).pixels


def test_site_calibration_refusals(tmp_path, capsys):
    out = tmp_path / "out"
    # too few images of a class
    few = _site(tmp_path / "few", 10)
    assert main(["calibrate", "--model", "pneumonia", "--data", str(few), "--out", str(out),
                 "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "at least 25 labelled images of each class" in err and "NORMAL 10" in err
    assert "PNEUMONIA 10" in err and not out.exists()
    # a label set the model does not have
    wrong = _site(tmp_path / "wrong", 3)
    (wrong / "NORMAL").rename(wrong / "covid19")
    assert main(["calibrate", "--model", "pneumonia", "--data", str(wrong), "--out", str(out),
                 "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "unknown class names" in err and "covid19" in err and not out.exists()
    # an unreadable file: named, nothing written; --skip-bad-images goes on without it
    bad = _site(tmp_path / "bad", 25)
    (bad / "NORMAL" / "scan.png").write_bytes(b"not an image")
    args = ["calibrate", "--model", "pneumonia", "--data", str(bad), "--out", str(out), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "scan.png" in err and "--skip-bad-images" in err and not out.exists()
    assert main([*args, "--skip-bad-images"]) == 0
    sc = json.loads((out / "model.json").read_text())["site_calibration"]
    assert sc["data"]["images"] == 50 and sc["data"]["unreadable_skipped"] == 1
    # an existing --out is kept unless --overwrite
    assert main(args[:-1] + ["--skip-bad-images"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    # a rule a model of more than two classes cannot have
    assert main(["calibrate", "--model", "brain-tumor", "--out", str(tmp_path / "b"),
                 "--operating-point", "sensitivity=0.9"]) == 2  # fmt: skip
    assert "other rules apply to two-class models" in capsys.readouterr().err


def test_restating_the_operating_point_on_recorded_validation(tmp_path, capsys):
    out = tmp_path / "screening"
    code = main(["calibrate", "--model", "pneumonia", "--out", str(out),
                 "--operating-point", "sensitivity=0.98"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "model.json").read_text())
    t = meta["threshold"]
    with open(BASE / "eval" / "val" / "predictions.csv", newline="") as f:
        val = list(csv.DictReader(f))
    pos = np.array([float(r["p_PNEUMONIA"]) for r in val if r["true"] == "PNEUMONIA"])
    neg = np.array([float(r["p_PNEUMONIA"]) for r in val if r["true"] == "NORMAL"])
    assert (pos >= t).mean() >= 0.98  # the target holds on validation...
    assert meta["operating_point"]["specificity"] == pytest.approx((neg < t).mean())
    higher = np.sort(pos[pos >= t])  # ...and is the highest cut that keeps it
    assert ((pos >= (higher[0] + higher[1]) / 2).mean()) < 0.98
    assert meta["threshold_method"] == "sensitivity=0.98"
    # the carved test split's figures are re-measured at the new threshold
    with open(out / "eval" / "test" / "predictions.csv", newline="") as f:
        test = list(csv.DictReader(f))
    sens = np.mean([r["pred"] == "PNEUMONIA" for r in test if r["true"] == "PNEUMONIA"])
    assert meta["metrics"]["test"]["sensitivity"] == pytest.approx(sens)
    assert meta["operating_point_restated"]["base_model"] == "pneumonia"
