"""Near-identical images across splits (:mod:`medlens.data.duplicates`) and the note a
training run writes about them."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
from conftest import make_dataset, synth_image, tiny_config
from PIL import Image

from medlens.data.duplicates import thumbnails, twins
from medlens.training.trainer import train


def test_a_copy_with_other_contrast_matches_and_distinct_images_do_not():
    rng = np.random.default_rng(0)
    originals = np.stack([synth_image(k, rng, 64) for k in ("bright", "dark", "stripes")])
    copy = np.clip(originals[1].astype(float) * 0.7 + 40, 0, 255).astype(np.uint8)
    buf = io.BytesIO()  # saved again as a JPEG
    Image.fromarray(copy).save(buf, "JPEG", quality=90)
    copy = np.asarray(Image.open(buf))
    others = np.stack([synth_image("dark", rng, 64), np.zeros((64, 64), np.uint8), copy])
    found = twins(thumbnails(others), thumbnails(originals))
    # another dark disc is not the same picture; a blank image matches nothing
    assert found.tolist() == [-1, -1, 1]
    # colour (N, C, H, W) input reads as grey
    rgb = np.repeat(originals[:, None], 3, axis=1)
    assert np.allclose(thumbnails(rgb), thumbnails(originals), atol=1e-6)
    assert twins(thumbnails(others[:0]), thumbnails(originals)).shape == (0,)


def test_training_notes_validation_images_that_are_copies_of_training_images(tmp_path):
    src = make_dataset(tmp_path / "src", {"NORMAL": "dark", "PNEUMONIA": "bright"},
                       n_patients=40, per_patient=1)  # fmt: skip
    root = tmp_path / "data"
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted((src / cls).iterdir())
        # 16 + 16 validation images: a given val split under 30 images is merged into train
        for split, part in (("train", files[:24]), ("val", files[24:])):
            (root / split / cls).mkdir(parents=True)
            for f in part:
                shutil.copy(f, root / split / cls / f.name)
    # one training image again in validation, brighter and under another patient's name
    original = root / "train" / "PNEUMONIA" / sorted(f.name for f in files[:24])[2]
    pixels = np.asarray(Image.open(original), float)
    Image.fromarray(np.clip(pixels * 0.8 + 30, 0, 255).astype(np.uint8)).save(
        root / "val" / "PNEUMONIA" / "person7777_bacteria_1.png"
    )
    out = train(tiny_config(root, tmp_path / "run", epochs=1, test_fraction=0))
    notes = json.loads((out / "model.json").read_text())["training"]["notes"]
    twin = [n for n in notes if "near-identical" in n]
    assert len(twin) == 1, notes
    assert twin[0].startswith("1 of 33 val images have a near-identical image in the training")
    assert f"person7777_bacteria_1.png ~ {original}" in twin[0]


def test_a_run_without_copies_notes_none(trained_run):
    notes = json.loads((trained_run / "model.json").read_text())["training"]["notes"]
    assert notes and not [n for n in notes if "near-identical" in n]
