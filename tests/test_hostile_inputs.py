"""Realistic and hostile DICOM uploads to ``medlens serve`` (issue #23, items 1-3): images a
structured report used to fail on with a 500 (anonymised, malformed, retired SOP class, other
character sets), logs that must name an upload by its hash only, and a 12-bit JPEG Extended
DICOM that is not corrupt. Hardening of the server itself (connections, redirects, Host,
metrics) is tested in ``test_security.py`` and ``test_prometheus.py``."""

from __future__ import annotations

import importlib.util
import io
import logging
import warnings

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_fixtures import PATIENT_ID, PATIENT_NAME, dicom_bytes, dicom_xray
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from serve_fixtures import MULTI, save_untrained_multiclass

from medlens.data.imaging import read_image
from medlens.errors import ImageReadError
from medlens.interop.sr import TYPE2
from medlens.serve import create_app
from medlens.serve.api import NOTES_HEADER

URL = f"/api/v1/models/{MULTI}/predict"
JPEG_EXTENDED_12BIT = get_testdata_file("JPGExtended.dcm")  # ships inside pydicom
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)


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


def _xray(**changes) -> pydicom.Dataset:
    """The fixture X-ray with ``changes`` (None deletes the attribute); pydicom's warnings
    about the malformed values the tests set on purpose are not shown."""
    ds = dicom_xray(np.full((64, 64), 100, np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, value in changes.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
    return ds


def to_bytes(ds: pydicom.Dataset) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dicom_bytes(ds)


def _post(client, data: bytes, fmt: str | None = "dicom-sr"):
    params = {"format": fmt} if fmt else {}
    return client.post(URL, params=params, files={"file": ("x.dcm", data)})


def _sr(r) -> pydicom.Dataset:
    """The SR of a 200 answer, checked readable by pydicom and highdicom."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom"
    hd.sr.srread(io.BytesIO(r.content))
    return pydicom.dcmread(io.BytesIO(r.content))


# ------------------------------------------------------------------ 1. realistic DICOMs, SR


@pytest.mark.parametrize("key", list(TYPE2))
def test_an_anonymised_image_without_a_type_2_attribute_gets_a_valid_sr(client, key):
    ds = _xray(**{key: None})
    sr = _sr(_post(client, to_bytes(ds)))
    assert key in sr and str(sr[key].value or "") == ""  # present and empty, as type 2 allows
    assert sr.StudyInstanceUID == ds.StudyInstanceUID
    if key != "PatientID":
        assert sr.PatientID == PATIENT_ID
    r = _post(client, to_bytes(ds))
    assert key in r.headers[NOTES_HEADER] and "absent" in r.headers[NOTES_HEADER]
    assert _post(client, to_bytes(ds), "fhir").status_code == 200


def test_an_image_without_modality_gets_a_valid_sr(client):
    sr = _sr(_post(client, to_bytes(_xray(Modality=None))))
    assert sr.Modality == "SR"


@pytest.mark.parametrize(
    "changes, emptied, why",
    [
        ({"StudyDate": "2024-13-45"}, "StudyDate", "not a DICOM date"),
        ({"StudyDate": "20241345"}, "StudyDate", "not a DICOM date"),
        ({"PatientBirthDate": "1970-01-01"}, "PatientBirthDate", "not a DICOM date"),
        ({"StudyTime": "99:99"}, "StudyTime", "not a DICOM time"),
        ({"PatientSex": "female"}, "PatientSex", "not M, F or O"),
        ({"PatientName": ["Doe^Jane", "Roe^Jim"]}, "PatientName", "2 values"),
        ({"AccessionNumber": ["A1", "A2"]}, "AccessionNumber", "2 values"),
    ],
)
def test_a_malformed_type_2_value_is_left_empty_and_named(client, changes, emptied, why):
    r = _post(client, to_bytes(_xray(**changes)))
    sr = _sr(r)
    assert str(sr[emptied].value or "") == ""
    assert emptied in r.headers[NOTES_HEADER] and why in r.headers[NOTES_HEADER]
    for other in ("PatientID", "StudyID"):  # the rest is copied as it was
        assert sr[other].value == _xray()[other].value
    assert _post(client, to_bytes(_xray(**changes)), "fhir").status_code == 200


def test_a_retired_sop_class_is_referenced_as_it_is(client):
    ds = _xray()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = US_RETIRED
    sr = _sr(_post(client, to_bytes(ds)))
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPClassUID == US_RETIRED
    assert sr.PatientID == PATIENT_ID and sr.PatientName == PATIENT_NAME
    assert sr.StudyDate == ds.StudyDate


def test_a_japanese_iso_2022_image_keeps_its_names(client):
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds = _xray(SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName=name)
    data = to_bytes(ds)
    assert b"\x1b$B" in data  # really ISO 2022 escape sequences (JIS X 0208)
    sr = _sr(_post(client, data))
    assert str(sr.PatientName) == name and sr.SpecificCharacterSet == "ISO_IR 192"
    assert NOTES_HEADER not in _post(client, data).headers


def test_an_unknown_character_set(client):
    ascii_only = _xray(SpecificCharacterSet="ISO_IR 999")
    sr = _sr(_post(client, to_bytes(ascii_only)))  # plain ASCII reads the same in any
    assert sr.PatientName == PATIENT_NAME
    latin = _xray(SpecificCharacterSet="ISO_IR 999", PatientName="Müller^Jürgen")
    r = _post(client, to_bytes(latin))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "ISO_IR 999" in detail and "Specific Character Set" in detail
    assert "ISO_IR 192" in detail  # what to do
    assert _post(client, to_bytes(latin), "fhir").status_code == 200


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"SeriesInstanceUID": None}, "lacks SeriesInstanceUID"),
        ({"StudyInstanceUID": ""}, "lacks StudyInstanceUID"),
        ({"SOPInstanceUID": "not-a-uid"}, "SOPInstanceUID that is not a DICOM UID"),
    ],
)
def test_missing_or_malformed_uids_are_a_422_that_names_them(client, changes, expected):
    ds = _xray(**changes)
    r = _post(client, to_bytes(ds))
    assert r.status_code == 422 and expected in r.json()["detail"]
    assert "format=json or fhir" in r.json()["detail"]
    assert _post(client, to_bytes(ds), "fhir").status_code == 200


# ------------------------------------------------------------------ 2. logs name uploads by hash


def _leaks(text: str, ds: pydicom.Dataset) -> list[str]:
    secrets = [ds.SOPInstanceUID, ds.StudyInstanceUID, ds.get("SeriesInstanceUID", "-"),
               str(ds.PatientID), str(ds.PatientName).split("^")[0]]  # fmt: skip
    return [s for s in secrets if s and s in text]


def test_logs_and_warnings_carry_no_uid_or_patient_field(client, caplog):
    """An SR of a clean image and of a malformed one, and a DICOM the decoder rejects: one log
    line each, by the upload's hash; nothing from pydicom or highdicom (highdicom's "copy ...
    from dataset <SOPInstanceUID>", pydicom's decoder tracebacks, values quoted in warnings)."""
    clean = _xray()
    malformed = _xray(StudyDate="2024-13-45", PatientName="A" * 80)  # the libraries talk
    rejected = open(JPEG_EXTENDED_12BIT, "rb").read()
    jpeg = pydicom.dcmread(JPEG_EXTENDED_12BIT, stop_before_pixels=True)
    decodes_12_bit = importlib.util.find_spec("libjpeg") is not None
    cases = [
        (to_bytes(clean), clean, 200),
        (to_bytes(malformed), malformed, 200),
        (rejected, jpeg, 200 if decodes_12_bit else 422),
    ]
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for data, ds, status in cases:
            caplog.clear()
            r = _post(client, data)
            assert r.status_code == status, r.text
            records = [rec for rec in caplog.records if not rec.name.startswith("httpx")]
            assert [rec.name for rec in records] == ["medlens.serve"], [
                (rec.name, rec.getMessage()[:80]) for rec in records
            ]
            assert records[0].levelno == logging.INFO and records[0].exc_info is None
            text = caplog.text
            assert not _leaks(text, ds), text[:500]
            assert "Traceback" not in text and "upload_sha256=" in text
    messages = "\n".join(str(w.message) for w in caught)
    for _, ds, _ in cases:
        assert not _leaks(messages, ds), messages[:500]
    assert not [w for w in caught if "pydicom" in w.filename or "highdicom" in w.filename]


_FRESH_SERVER = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, format="LOG %(name)s: %(message)s")
from fastapi.testclient import TestClient
from medlens.serve import create_app
fresh = "pydicom" not in sys.modules
with TestClient(create_app([sys.argv[1]], bundled=False)) as c:
    data = open(sys.argv[2], "rb").read()
    r = c.post(sys.argv[3], params={"format": "dicom-sr"}, files={"file": ("x.dcm", data)})
print("status", r.status_code, "pydicom imported by the request:", fresh)
"""


@pytest.mark.slow
def test_a_fresh_server_process_logs_nothing_from_pydicom(models, tmp_path):
    """In a server process pydicom is first imported by the first DICOM upload, and its import
    sets its logger to WARNING: the silencing must hold all the same."""
    import subprocess
    import sys

    ds = _xray(StudyDate="2024-13-45", PatientName="Zzyzx" * 20)
    dcm = tmp_path / "x.dcm"
    dcm.write_bytes(to_bytes(ds))
    out = subprocess.run(
        [sys.executable, "-c", _FRESH_SERVER, str(models), str(dcm), URL],
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = out.stdout + out.stderr
    assert "status 200" in text, text[-2000:]
    lines = [ln for ln in text.splitlines() if ln.startswith("LOG ")]
    assert not [ln for ln in lines if ln.startswith(("LOG pydicom", "LOG highdicom"))], lines
    assert len([ln for ln in lines if ln.startswith("LOG medlens.serve: prediction ")]) == 1
    assert not _leaks(text, ds) and "Zzyzx" not in text and "2024-13-45" not in text


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
