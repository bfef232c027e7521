"""The shortcut audit on constructed data where the answer is known, and on a real model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_DATA, tiny_config
from PIL import Image

from medlens.cli import main
from medlens.evaluation import shortcuts

# starts outside processes or runs real models on real data (`make test-fast` leaves it out)
pytestmark = pytest.mark.slow


def _box_images(root, n=40, size=64, seed=0, box=True):
    """Two classes of the same noisy texture; class ``boxed`` alone carries a solid white box in
    the bottom-right corner (an anonymisation box stamped on one source only)."""
    rng = np.random.default_rng(seed)
    for cls in ("plain", "boxed"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.clip(rng.normal(110, 25, (size, size)), 0, 255)
            if cls == "boxed" and box:
                img[-8:-1, -18:-1] = 255  # inside the outer 15% band
            Image.fromarray(img.astype(np.uint8)).save(root / cls / f"{cls}_{i:03d}.png")
    return root


def _features(root):
    from medlens.data.imaging import read_image

    x, y = [], []
    for label, cls in enumerate(("plain", "boxed")):
        for f in sorted((root / cls).glob("*.png")):
            d = read_image(f)
            x.append(shortcuts.image_features(d.pixels, d.source_format, d.notes))
            y.append(label)
    return np.array(x), np.array(y)


def test_a_white_box_label_is_found_by_the_no_anatomy_baseline(tmp_path):
    x, y = _features(_box_images(tmp_path / "box"))
    res = shortcuts.baseline_auc(x, y, n_boot=200)
    assert res["auc"] >= 0.98 and res["auc_ci"][0] >= 0.9
    assert res["top_features"][0]["auc"] >= 0.98
    # the box's own features separate the classes completely
    for name in ("corner_br", "saturated_white", "solid_bright_cells"):
        col = x[:, shortcuts.FEATURE_NAMES.index(name)]
        assert col[y == 1].min() > col[y == 0].max(), name
    # the same images with labels that carry nothing: the baseline is near chance
    rng = np.random.default_rng(3)
    shuffled = shortcuts.baseline_auc(x, rng.permutation(y), n_boot=200)
    assert 0.3 <= shuffled["auc"] <= 0.7


def test_masks_and_centre_share_cover_the_regions_they_name():
    x = np.full((2, 1, 100, 100), 50, np.uint8)
    x[:, :, 90:, 90:] = 255  # a corner box (border band)
    x[:, :, 45:55, 45:55] = 0  # a central mark
    b = shortcuts.mask_border(x)
    assert (b[:, :, 90:, 90:] == 50).all() and (b[:, :, 45:55, 45:55] == 0).all()
    c = shortcuts.mask_centre(x)
    assert (c[:, :, 45:55, 45:55] == 50).all() and (c[:, :, 90:, 90:] == 255).all()
    assert (x[:, :, 90:, 90:] == 255).all()  # the input is left as it was
    cam = np.zeros((100, 100))
    cam[40:60, 40:60] = 1
    assert shortcuts.centre_share(cam) == 1.0
    assert shortcuts.centre_share(np.ones((100, 100))) == pytest.approx(0.49)
    corner = np.zeros((100, 100))
    corner[95:, 95:] = 1
    assert shortcuts.centre_share(corner) == 0.0


@pytest.mark.parametrize(
    "figures, level",
    [
        ((0.6, 0.95, 0.55, 0.94, 0.7), "low"),
        ((0.8, 0.95, 0.55, 0.94, 0.7), "moderate"),  # the data allow it, the model does not
        ((0.6, 0.95, 0.93, 0.94, 0.7), "moderate"),  # the border band alone still decides
        ((0.6, 0.95, 0.9, 0.55, 0.3), "high"),  # hiding the border collapses the model
        ((0.97, 0.95, 0.55, 0.94, 0.4), "high"),  # strong source signal, attention outside
    ],
)
def test_verdict_levels(figures, level):
    got, words = shortcuts.verdict(*figures)
    assert got == level and words.lower().startswith(f"{level} shortcut risk")


def test_audit_of_a_model_that_learnt_the_box(tmp_path, capsys):
    from medlens.training.trainer import train

    data = _box_images(tmp_path / "data", n=48)
    run = tmp_path / "boxnet"
    from medlens.config import AugmentSpec

    train(tiny_config(data, run, epochs=6, image_size=32, augment=AugmentSpec(enabled=False)))
    out = tmp_path / "audit"
    code = main(["audit", "--model", str(run), "--data", str(data), "--out", str(out),
                 "--cam-images", "20", "--quiet"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    record = json.loads((out / "audit.json").read_text())
    occ = record["occlusion"]
    assert record["n"] == 96 and record["baseline"]["auc"] >= 0.95
    assert occ["auc"] >= 0.9  # the box makes the task easy...
    assert occ["border_masked_auc"] <= 0.7  # ...and without the border it is gone
    assert record["verdict"]["level"] == "high"
    assert "hiding the border drops the model's AUC" in record["verdict"]["text"]
    html = (out / "audit.html").read_text()
    assert 'id="shortcut-audit"' in html and record["verdict"]["text"].split(":")[0] in html
    assert "High shortcut risk" in printed
    # --record puts the figures on the model card
    assert main(["audit", "--model", str(run), "--data", str(data), "--record",
                 "--cam-images", "5", "--quiet"]) == 0  # fmt: skip
    card = json.loads((run / "model_card.json").read_text())
    assert card["shortcut_audit"]["level"] == "high"
    assert card["shortcut_audit"]["baseline_auc"] == pytest.approx(
        record["baseline"]["auc"], abs=0.05
    )
    assert "## Shortcut audit" in (run / "model_card.md").read_text()


def test_audit_refusals(tmp_path, capsys, trained_run):
    data = _box_images(tmp_path / "data", n=12)
    assert main(["audit", "--model", str(trained_run), "--data", str(data)]) == 2
    assert "--out DIR" in capsys.readouterr().err
    assert main(["audit", "--model", str(trained_run), "--data", str(data), "--out",
                 str(tmp_path / "a")]) == 2  # fmt: skip
    assert "unknown class names" in capsys.readouterr().err  # plain/boxed vs NORMAL/PNEUMONIA


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not at {SHARED_DATA}")
def test_audit_of_the_bundled_pneumonia_model_on_real_images(tmp_path):
    from medlens.reporting.audit import audit_model

    # --split test: the images the model recorded as its carved test split, under the data folder
    record = audit_model("pneumonia", str(SHARED_DATA / "chest_xray" / "train"), tmp_path / "out",
                         max_images=60, cam_images=10, progress=False, split="test")  # fmt: skip
    assert record["n"] == 60 and set(record["per_class"]) == {"NORMAL", "PNEUMONIA"}
    assert record["data"] == "chest_xray/train (test split)"
    occ = record["occlusion"]
    assert occ["auc"] > 0.95 and 0 <= occ["centre_masked_auc"] <= 1
    assert occ["border_masked_auc"] > 0.9  # the model does not live in the border
    assert 0 < record["attention"]["centre_share"] < 1
    assert record["verdict"]["level"] in ("low", "moderate", "high")
