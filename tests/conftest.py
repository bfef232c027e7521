"""Shared fixtures: tiny synthetic image-folder datasets and one tiny trained run.

Everything here is built in pytest's temporary folders. The synthetic classes are really
separable (a bright disc vs a dark disc on a noisy background, plus a stripes class for the
three-class set), so a from-scratch CNN learns them in a few epochs at 32 px. File names are
Kermany-like (``IM-0003-0001.png``, ``person3_bacteria_31.png``) so every patient has two
images and the patient-grouped splits have something to group.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# The test machine has 2 cores and other jobs may run beside the suite: one intra-op thread
# avoids OpenMP oversubscription, which makes tiny-network steps 10-30x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_record_folder(tmp_path_factory):
    """Servers started by the tests keep their prediction record in a temporary folder, never
    in the user's ``~/.local/share/medlens``."""
    import os

    os.environ["MEDLENS_DATA_DIR"] = str(tmp_path_factory.mktemp("medlens-data"))


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IMAGE_SIZE = 32  # network input side of every training test


def synth_image(kind: str, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """One ``uint8 (size, size)`` image of a synthetic class.

    kind: "bright" (bright disc), "dark" (dark disc) or "stripes" (horizontal stripes); the
    disc's centre and radius and the background noise vary per image.
    """
    yy, xx = np.mgrid[:size, :size]
    img = rng.normal(110, 18, (size, size))
    if kind == "stripes":
        phase = rng.integers(0, 8)
        img += np.where(((yy + phase) // 4) % 2 == 0, 70, -70)
    else:
        cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
        r = rng.uniform(size * 0.18, size * 0.28)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[inside] = rng.normal(225 if kind == "bright" else 20, 12, int(inside.sum()))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(
    root: Path,
    classes: dict[str, str],
    n_patients: int = 20,
    per_patient: int = 2,
    size: int = 48,
    seed: int = 0,
) -> Path:
    """Write ``root/<class>/<image>.png``.

    Args:
        classes: class folder name -> synthetic kind (see :func:`synth_image`).
        n_patients: patients per class; each has ``per_patient`` images.
    """
    rng = np.random.default_rng(seed)
    for ci, (cls, kind) in enumerate(classes.items()):
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for p in range(n_patients):
            for m in range(per_patient):
                if cls == "NORMAL":
                    name = f"IM-{p:04d}-{m + 1:04d}.png"
                else:  # distinct patient numbers per class: no patient has two labels
                    pid = ci * 1000 + p
                    name = f"person{pid}_bacteria_{pid * 10 + m}.png"
                Image.fromarray(synth_image(kind, rng, size)).save(folder / name)
    return root


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """Binary class folders NORMAL (dark disc) / PNEUMONIA (bright disc), 40 PNGs each."""
    return make_dataset(
        tmp_path_factory.mktemp("synth2") / "data", {"NORMAL": "dark", "PNEUMONIA": "bright"}
    )


@pytest.fixture(scope="session")
def synthetic_data_3class(tmp_path_factory) -> Path:
    """Three classes (bright disc, dark disc, stripes), 32 PNGs each."""
    return make_dataset(
        tmp_path_factory.mktemp("synth3") / "data",
        {"bright": "bright", "dark": "dark", "stripes": "stripes"},
        n_patients=16,
        seed=1,
    )


@pytest.fixture(scope="session")
def image_factory():
    """``image_factory(kind, seed=0, size=48)`` -> one synthetic ``uint8`` image."""

    def make(kind: str, seed: int = 0, size: int = 48) -> np.ndarray:
        return synth_image(kind, np.random.default_rng(seed), size)

    return make


def tiny_config(data, out, **overrides):
    """A TrainConfig for a fast from-scratch ``cnn`` run at 32 px."""
    from medlens.config import TrainConfig

    settings = dict(
        data=str(data),
        out=str(out),
        model="cnn",
        image_size=IMAGE_SIZE,
        epochs=2,
        batch_size=8,
        progress=False,
        threads=1,
        seed=0,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="session")
def train_config():
    """``train_config(data, out, **overrides)`` -> TrainConfig of a tiny cnn run."""
    return tiny_config


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synthetic_data) -> Path:
    """One finished ``cnn`` run at 32 px on :func:`synthetic_data`, shared read-only.

    Tests that modify a run must copy it first (``shutil.copytree``).
    """
    from medlens.training.trainer import train

    out = tmp_path_factory.mktemp("runs") / "tiny_cnn"
    train(tiny_config(synthetic_data, out, epochs=4))
    return out
