"""Fixtures of the web-app tests: a folder of served models and upload payloads.

Import the fixtures into a test module (``from serve_fixtures import served_models``).
The models are copies of conftest's tiny trained ``cnn`` run (binary, with its training curves
and validation files) and an untrained three-class ``cnn`` with no evaluation, so the pages
and the API meet both kinds.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

BINARY, MULTI = "chest-tiny", "three"


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a run folder without its checkpoints (tests that write into it use this)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    return dest


def save_untrained_multiclass(folder: Path) -> Path:
    from medlens.artifacts.model import ModelMeta, build_network, save_model
    from medlens.data.preprocess import Preprocess

    meta = ModelMeta(
        arch="cnn",
        labels=["bright", "dark", "stripes"],
        preprocess=Preprocess(image_size=32, channels=1, mean=(0.4,), std=(0.2,)),
        temperature=1.5,
        name=MULTI,
    )
    torch.manual_seed(0)
    save_model(folder, build_network(meta).eval(), meta)
    return folder


@pytest.fixture(scope="session")
def served_models(tmp_path_factory, trained_run) -> Path:
    """``models/{chest-tiny,three}``: the folder given to ``create_app`` / ``--models``."""
    root = tmp_path_factory.mktemp("served") / "models"
    copy_run(trained_run, root / BINARY)
    save_untrained_multiclass(root / MULTI)
    return root


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()
