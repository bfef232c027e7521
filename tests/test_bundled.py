"""The four bundled models (``medlens/bundled/<name>/``, issue 4).

Each is loaded by name, its ``model.onnx`` is checked against the sha256 in its model card,
it runs on images made here, and its out-of-distribution guard is measured on
``../shared/data`` (skipped when that folder is absent): images of the other three tasks must
be flagged at least 95% of the time, the model's own validation images at most 5%.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from medlens.artifacts.folders import bundled_models_dir, find_models
from medlens.fileio import sha256_file
from medlens.inference.predictor import Predictor
from medlens.reporting.ood_rates import flag_rate, sample_files

# starts outside processes or runs real models on real data (`make test-fast` leaves it out)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# name -> (data folder under ../shared/data, labels)
BUNDLED = {
    "pneumonia": ("chest_xray/train", ["NORMAL", "PNEUMONIA"]),
    "brain-tumor": ("brain_mri/train", ["glioma", "meningioma", "notumor", "pituitary"]),
    "covid": ("covid_xray/train", ["covid19", "no_finding", "pneumonia"]),
    "pharyngitis": ("pharyngitis", ["no_pharyngitis", "yes_pharyngitis"]),
    "tuberculosis": ("tb_xray/train", ["normal", "tuberculosis"]),
    "covid-ct": ("covid_ct/train", ["non_covid", "covid"]),
}
# Tasks on the same kind of image: adult frontal chest X-rays are in scope for both the covid and
# the tuberculosis model (their normals even share NIH/RSNA sources), so neither guard is
# expected to flag the other's images; every other pair must be flagged.
SAME_KIND = {frozenset({"covid", "tuberculosis"})}
OTHER_PER_TASK = 60  # images drawn from each other task's data (every pair flags 100% of 120)
OWN_MAX = 250  # of its own validation images at most (seeded draw): SE of a 2.5% rate 1%
needs_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real data not available at {SHARED_DATA} (fresh clone)"
)


@pytest.fixture(scope="module", params=sorted(BUNDLED))
def bundled(request):
    return request.param, Predictor(request.param)


def test_all_are_bundled_within_the_size_budget():
    found = find_models()
    assert set(BUNDLED) <= set(found)
    # every file of every bundled model, evaluation records included: 64 MiB in all
    total = sum(f.stat().st_size for f in bundled_models_dir().rglob("*") if f.is_file())
    assert total <= 64 * 1024 * 1024, f"bundled models take {total / 2**20:.1f} MiB"
    for name in BUNDLED:
        assert not (bundled_models_dir() / name / "model.pt").exists()  # ONNX only
        assert (ROOT / "recipes" / f"{name}.yaml").exists()


def test_card_sha256_and_contents(bundled):
    name, pred = bundled
    folder = bundled_models_dir() / name
    card = json.loads((folder / "model_card.json").read_text())
    assert card["files"]["model.onnx"]["sha256"] == sha256_file(folder / "model.onnx")
    assert card["name"] == name and card["labels"] == BUNDLED[name][1] == pred.labels
    for key in ("intended_use", "out_of_scope_use", "limitations", "license", "citation"):
        assert len(card[key]) > 40, key
    assert card["training"]["command"].startswith(f"medlens train --config recipes/{name}.yaml")
    assert card["calibration"]["temperature"] > 0
    assert card["preprocessing"] == pred.pre.to_dict()
    val = card["metrics"]["val"]
    assert val["n"] > 40 and len(val["ci"]["auc"]) == 2
    assert card["ood"]["threshold"] > 0
    md = (folder / "model_card.md").read_text()
    assert card["files"]["model.onnx"]["sha256"] in md and card["citation"][:40] in md


def test_runs_on_generated_images_and_flags_blank_and_noise(bundled):
    name, pred = bundled
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:300, :300]
    images = {
        "blank": np.zeros((300, 300), np.uint8),
        "white": np.full((300, 300, 3), 255, np.uint8),
        "noise": rng.integers(0, 256, (300, 300, 3), dtype=np.uint8),
        "stripes": (((xx // 15) % 2) * 255).astype(np.uint8),
    }
    preds = pred.predict_pixels(list(images.values()))
    for kind, p in zip(images, preds):
        assert p.label in pred.labels
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert p.ood["flag"] is True, f"{name} did not flag a {kind} image"
    cam, idx = pred.explain(images["noise"])
    assert cam.shape == (pred.pre.image_size,) * 2 and 0 <= idx < len(pred.labels)


def test_predict_cli_warns_about_an_out_of_distribution_image(tmp_path, capsys):
    from PIL import Image

    from medlens.cli import main

    noise = np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    assert main(["predict", "--model", "pneumonia", str(tmp_path / "noise.png")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(tmp_path / "noise.png")) and "OUT-OF-DISTRIBUTION" in out


@needs_data
def test_ood_rates_on_real_data(bundled):
    from medlens.training.training_data import recipe_splits

    name, pred = bundled
    ds = recipe_splits(ROOT / "recipes" / f"{name}.yaml", SHARED_DATA / BUNDLED[name][0])
    val = ds.splits["val"]
    if len(val) > OWN_MAX:
        picks = np.random.default_rng(0).choice(len(val), OWN_MAX, replace=False)
        val = [val[i] for i in sorted(picks)]
    own = flag_rate(pred, val)
    assert own <= 0.05, f"{name}: {own:.1%} of its own validation images flagged"
    for other, (folder, _) in BUNDLED.items():
        if other == name or frozenset({name, other}) in SAME_KIND:
            continue
        rate = flag_rate(pred, sample_files(SHARED_DATA / folder, OTHER_PER_TASK, seed=1))
        assert rate >= 0.95, f"{name}: only {rate:.1%} of {other} images flagged"


def test_the_dashboard_has_curves_and_results_of_each_bundled_model(bundled):
    """What ``make run`` shows at /dashboard: the bundle ships its curves and the shipped
    file's per-image results (issue #14 item 2), carved test split first where there is one."""
    from medlens.serve.dashboard import run_results

    name, pred = bundled
    res = run_results(name, bundled_models_dir() / name)
    assert res["missing"] == []
    ids = {f["id"] for f in res["figures"]}
    assert {"curve-acc", "curve-loss", "roc", "confusion"} <= ids
    meta_metrics = pred.meta.extra["metrics"]
    assert [s["split"] for s in res["splits"]] == sorted(meta_metrics, key=lambda s: s != "test")
    for s in res["splits"]:  # the tables show the card's figures
        m = meta_metrics[s["split"]]
        assert s["n"] == m["n"] and s["headline"]["Accuracy"][0] == m["accuracy"]
    card = json.loads((bundled_models_dir() / name / "model_card.json").read_text())
    assert "../" not in json.dumps(card["training"])  # no developer paths
    assert " /" not in (card["training"].get("command") or "")


def test_the_readme_model_table_is_the_cards():
    """The README's model table is generated from the bundled cards (`medlens models --table`):
    a re-exported model whose README figures were not regenerated fails here."""
    from medlens.artifacts.card import TABLE_END, TABLE_START, models_table

    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(TABLE_START) + len(TABLE_START), readme.index(TABLE_END)
    assert readme[start:end].strip() == models_table(find_models())
