"""Realistic and hostile DICOM uploads to ``medlens serve`` (issue #23): a 12-bit JPEG
Extended DICOM that is not corrupt (item 3)."""

from __future__ import annotations

import importlib.util
import io
import warnings

import numpy as np
import pydicom
import pytest
from dicom_fixtures import dicom_bytes
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from serve_fixtures import MULTI, save_untrained_multiclass

from medlens.data.imaging import read_image
from medlens.errors import ImageReadError
from medlens.serve import create_app

URL = f"/api/v1/models/{MULTI}/predict"
JPEG_EXTENDED_12BIT = get_testdata_file("JPGExtended.dcm")  # ships inside pydicom


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A folder holding one untrained three-class model (no training needed: the documents
    and the server's behaviour are under test, not the prediction)."""
    root = tmp_path_factory.mktemp("hostile") / "models"
    save_untrained_multiclass(root / MULTI)
    return root


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app([models], bundled=False)) as c:
        yield c


def to_bytes(ds: pydicom.Dataset) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dicom_bytes(ds)


def _post(client, data: bytes, fmt: str | None = "dicom-sr"):
    params = {"format": fmt} if fmt else {}
    return client.post(URL, params=params, files={"file": ("x.dcm", data)})


# ------------------------------------------------------------------ 3. 12-bit JPEG Extended


def test_a_12_bit_jpeg_extended_dicom_is_decoded_or_named_unsupported(client):
    data = open(JPEG_EXTENDED_12BIT, "rb").read()
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID.endswith(".4.51")
    r = _post(client, data, None)
    if importlib.util.find_spec("libjpeg"):  # pylibjpeg-libjpeg decodes 12-bit JPEG
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "corrupt" not in detail
    assert "JPEG Extended" in detail and "1.2.840.10008.1.2.4.51" in detail
    assert "this installation cannot decode" in detail and "12-bit" in detail
    assert "pylibjpeg-libjpeg" in detail  # what to install
    with pytest.raises(ImageReadError, match="this installation cannot decode"):
        read_image(JPEG_EXTENDED_12BIT)


def test_a_damaged_jpeg_dicom_is_still_called_corrupt():
    """Control: real damage (a codestream Pillow can read the header of, cut short) is still
    reported as such, not as a missing codec."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit
    from test_imaging import make_dicom

    ds = make_dicom(np.zeros((64, 64), np.uint8), tsyntax=JPEGBaseline8Bit)
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8), (64, 1))).save(buf, format="JPEG")
    ds.PixelData = encapsulate([buf.getvalue()[:200]])
    ds["PixelData"].VR = "OB"
    with pytest.raises(ImageReadError, match=r"corrupt\?"):
        read_image(to_bytes(ds))
