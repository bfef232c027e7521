"""Results as FHIR R4 and DICOM SR, from the API (``?format=``) and ``medlens predict
--format`` (issue #15), with the bundled pneumonia model and a DICOM chest X-ray."""

from __future__ import annotations

import io
import json
import logging

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_fixtures import PATIENT_ID, dicom_xray, to_bytes
from fastapi.testclient import TestClient
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from PIL import Image

from medlens.cli import main
from medlens.serve import create_app

URL = "/api/v1/models/pneumonia/predict"


def _pixels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:224, :224]
    img = (
        110 + 50 * np.exp(-((xx - 112) ** 2 + (yy - 112) ** 2) / 4000) + rng.normal(0, 8, xx.shape)
    )
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app([], bundled=True)) as c:
        yield c


@pytest.fixture()
def xray():
    return dicom_xray(_pixels())


def _post(client, data: bytes, name: str, fmt: str | None = None):
    params = {"format": fmt} if fmt else {}
    return client.post(URL, params=params, files={"file": (name, data)})


def test_fhir_report_is_valid_and_carries_the_result(client, xray, caplog):
    caplog.set_level(logging.DEBUG)
    plain = _post(client, to_bytes(xray), "x.dcm").json()
    r = _post(client, to_bytes(xray), "x.dcm", "fhir")
    assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json"
    report = r.json()
    DiagnosticReport.model_validate(report)  # valid under fhir.resources (R4B)
    assert report["status"] == "preliminary"
    assert report["meta"]["security"][0]["code"] == "AIAST"
    obs = [c for c in report["contained"] if c["resourceType"] == "Observation"]
    device = next(c for c in report["contained"] if c["resourceType"] == "Device")
    assert device["version"][0]["value"] == plain["version"]
    assert [o["code"]["text"] for o in obs] == ["NORMAL", "PNEUMONIA"]
    assert [o["code"]["coding"][0]["code"] for o in obs] == ["17621005", "233604007"]
    for o in obs:
        assert o["valueQuantity"]["value"] == pytest.approx(
            plain["probabilities"][o["code"]["text"]]
        )
        assert o["device"] == {"reference": "#model"} and o["status"] == "preliminary"
        predicted = o["code"]["text"] == plain["label"]
        assert o["interpretation"][0]["coding"][0]["code"] == ("POS" if predicted else "NEG")
        parts = {c["code"]["text"].split(" ")[0]: c for c in o["component"]}
        assert parts["operating"]["valueQuantity"]["value"] == pytest.approx(plain["threshold"])
        assert parts["image"]["valueBoolean"] is plain["ood"]["flag"]
    assert report["result"] == [{"reference": f"#{o['id']}"} for o in obs]
    assert report["subject"]["identifier"]["value"] == PATIENT_ID  # filed with the patient
    study = report["imagingStudy"][0]["identifier"]["value"]
    assert study == f"urn:oid:{xray.StudyInstanceUID}"
    assert "not for diagnostic use" in report["conclusion"]
    # Identifiers go to the requester only: never into the server's log.
    assert PATIENT_ID not in caplog.text and xray.StudyInstanceUID not in caplog.text
    # The JSON answer shows the header facts that matter, and no identifier.
    assert plain["dicom"] == {"Modality": "DX", "ViewPosition": "PA", "BodyPartExamined": "CHEST",
                              "PhotometricInterpretation": "MONOCHROME2", "BitsStored": 8,
                              "Rows": 224, "Columns": 224}  # fmt: skip
    assert PATIENT_ID not in json.dumps(plain)


def test_fhir_for_a_png_names_no_patient(client):
    buf = io.BytesIO()
    Image.fromarray(_pixels(1)).save(buf, format="PNG")
    report = _post(client, buf.getvalue(), "x.png", "fhir").json()
    DiagnosticReport.model_validate(report)
    assert "subject" not in report and "imagingStudy" not in report


def test_dicom_sr_references_the_image_and_keeps_the_study(client, xray):
    plain = _post(client, to_bytes(xray), "x.dcm").json()
    r = _post(client, to_bytes(xray), "x.dcm", "dicom-sr")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    sr = pydicom.dcmread(io.BytesIO(r.content))
    assert sr.Modality == "SR" and sr.PatientID == PATIENT_ID
    assert sr.StudyInstanceUID == xray.StudyInstanceUID
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == xray.SOPInstanceUID
    assert ref.ReferencedSOPSequence[0].ReferencedSOPClassUID == xray.SOPClassUID
    report = hd.sr.srread(io.BytesIO(r.content))
    assert (
        report.PreliminaryFlag == "PRELIMINARY" and "not for diagnostic use" in sr.SeriesDescription
    )
    group = report.content.get_image_measurement_groups()[0]
    finding = group.get_qualitative_evaluations()[0]
    assert finding.name.value == "439401001"  # SNOMED CT "Diagnosis"
    expected = {"NORMAL": "17621005", "PNEUMONIA": "233604007"}[plain["label"]]
    assert finding.value.value == expected and finding.value.scheme_designator == "SCT"
    probs = {m.name.meaning: m.value for m in group.get_measurements()}
    for label, p in plain["probabilities"].items():
        assert probs[f"Calibrated probability of {label}"] == pytest.approx(p)
    assert probs["Operating threshold"] == pytest.approx(plain["threshold"])
    texts = _texts(sr)
    assert texts["Algorithm Name"] == {"MedLens pneumonia"}
    assert texts["Algorithm Version"] == {plain["version"]}


def _texts(ds) -> dict[str, set]:
    """Every TEXT content item of an SR, by concept name."""
    out = {}
    for item in getattr(ds, "ContentSequence", []):
        if item.ValueType == "TEXT":
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            out.setdefault(name, set()).add(item.TextValue)
        for k, v in _texts(item).items():
            out.setdefault(k, set()).update(v)
    return out


def test_dicom_sr_needs_a_dicom_upload_and_unknown_formats_are_422(client, xray):
    buf = io.BytesIO()
    Image.fromarray(_pixels(2)).save(buf, format="PNG")
    r = _post(client, buf.getvalue(), "x.png", "dicom-sr")
    assert r.status_code == 422 and "format=dicom-sr needs a DICOM upload" in r.json()["detail"]
    r = _post(client, to_bytes(xray), "x.dcm", "hl7v2")
    assert r.status_code == 422
    del xray.SOPInstanceUID  # a DICOM the report could not reference
    xray.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    r = _post(client, to_bytes(xray), "x.dcm", "dicom-sr")
    assert r.status_code == 422 and "lacks SOPInstanceUID" in r.json()["detail"]
    assert client.get("/healthz").status_code == 200  # and the server keeps serving


def test_predict_cli_writes_fhir_and_sr_files(tmp_path, capsys, xray):
    dcm = tmp_path / "in" / "x.dcm"
    dcm.parent.mkdir()
    dcm.write_bytes(to_bytes(xray))
    png = tmp_path / "in" / "y.png"
    Image.fromarray(_pixels(3)).save(png)
    assert main(["predict", str(dcm), "--model", "pneumonia", "--format", "fhir"]) == 0
    report = json.loads(capsys.readouterr().out.strip())
    DiagnosticReport.model_validate(report)
    out = tmp_path / "sr"
    code = main(["predict", str(dcm), str(png), "--model", "pneumonia", "--format", "dicom-sr",
                 "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert (
        code == 0 and "y.png\tERROR\ta DICOM structured report needs a DICOM image" in captured.err
    )
    files = list(out.iterdir())
    assert len(files) == 1 and files[0].suffix == ".dcm"
    sr = pydicom.dcmread(files[0])
    assert sr.Modality == "SR" and files[0].stem == sr.SOPInstanceUID  # no patient in the name
    assert main(["predict", str(dcm), "--model", "pneumonia", "--format", "dicom-sr"]) == 2
    assert "give --out DIR" in capsys.readouterr().err
