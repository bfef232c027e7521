"""A corpus of malformed files (made here, seeded) through the reader and the predict endpoint:
every file either decodes or is an ImageReadError naming it, and the endpoint answers 200 or
a 4xx with a ``detail``, never a 500 (issue 13)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit
from serve_fixtures import (
    BINARY,
    served_models,  # noqa: F401 - fixture
)
from test_imaging import dicom_bytes, make_dicom

from medlens.data.imaging import read_image
from medlens.errors import ImageReadError
from medlens.serve import create_app


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    """Valid files of each kind the reader handles."""
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="TIFF")
    tiff = buf.getvalue()
    enc = make_dicom(np.zeros((48, 64), np.uint8), tsyntax=JPEGBaseline8Bit)
    enc.PixelData = encapsulate([jpeg])
    enc["PixelData"].VR = "OB"
    return {
        "png": _png(ramp),
        "png16": _png(ramp.astype(np.uint16) * 250),
        "jpeg": jpeg,
        "tiff": tiff,
        "dicom": dicom_bytes(make_dicom(ramp.astype(np.uint16) * 16, bits_stored=12)),
        "dicom-deflated": dicom_bytes(
            make_dicom(ramp.astype(np.uint16), tsyntax=DeflatedExplicitVRLittleEndian)
        ),
        "dicom-jpeg": dicom_bytes(enc),
    }


def _corpus() -> list[tuple[str, bytes]]:
    """Truncations, bit flips, zeroed and repeated blocks of every seed."""
    rng = np.random.default_rng(13)
    cases = []
    for name, data in _seeds().items():
        n = len(data)
        for frac in (0.0, 0.01, 0.05, 0.2, 0.5, 0.9, 0.99):
            cases.append((f"{name}-cut{frac}", data[: int(n * frac)]))
        for i in range(12):
            flipped = bytearray(data)
            for pos in rng.integers(0, n, size=1 + i % 4):
                flipped[pos] ^= 1 << int(rng.integers(0, 8))
            cases.append((f"{name}-flip{i}", bytes(flipped)))
        for i in range(4):
            start = int(rng.integers(0, n))
            zeroed = data[:start] + b"\0" * min(64, n - start) + data[start + 64 :]
            cases.append((f"{name}-zero{i}", zeroed))
        cases.append((f"{name}-twice", data + data))
        cases.append(
            (f"{name}-head-garbage", data[:16] + bytes(rng.integers(0, 256, 512, np.uint8)))
        )
    return cases


CORPUS = _corpus()


@pytest.mark.parametrize("name, data", CORPUS, ids=[c[0] for c in CORPUS])
def test_the_reader_decodes_or_names_the_problem(name, data):
    try:
        img = read_image(data, name=f"{name}.bin")
    except ImageReadError as e:
        assert f"{name}.bin" in str(e) and "\n" not in str(e)
    else:
        assert img.pixels.dtype == np.uint8 and img.pixels.ndim in (2, 3)
        assert min(img.pixels.shape[:2]) >= 1


@pytest.mark.slow
def test_the_endpoint_never_answers_500(served_models):  # noqa: F811
    app = create_app([served_models], bundled=False)
    statuses = {}
    with TestClient(app, raise_server_exceptions=False) as client:
        for name, data in CORPUS:
            r = client.post(
                f"/api/v1/models/{BINARY}/predict", files={"file": (f"{name}.bin", data)}
            )
            statuses[name] = r.status_code
            assert r.status_code < 500, (name, r.status_code, r.text[:200])
            if r.status_code != 200:
                assert r.json()["detail"], name
        assert client.get("/healthz").status_code == 200
    assert sum(code == 422 for code in statuses.values()) > len(CORPUS) / 3
