"""The OpenAPI schema is the contract: real answers of the predict endpoint validate against
the schema /openapi.json publishes, and carry exactly its fields."""

from __future__ import annotations

import io

import jsonschema
import numpy as np
import pytest
from conftest import SHARED_DATA
from dicom_fixtures import dicom_xray, to_bytes
from fastapi.testclient import TestClient
from PIL import Image

from medlens.artifacts.folders import bundled_models_dir
from medlens.monitoring.store import open_store
from medlens.serve.app import create_app

PNEUMONIA = bundled_models_dir() / "pneumonia"
XRAY = SHARED_DATA / "chest_xray" / "train" / "NORMAL"


def _schema(openapi: dict, path: str, method: str = "post") -> dict:
    """The 200 JSON schema of an operation, with the components it refers to."""
    op = openapi["paths"][path][method]
    schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    return {**schema, "components": openapi["components"]}


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("recorded", [False, True])
@pytest.mark.slow
def test_predict_answers_are_exactly_the_published_schema(tmp_path, recorded):
    record = open_store(f"sqlite:///{tmp_path / 'r.db'}") if recorded else None
    with TestClient(create_app([PNEUMONIA], bundled=False, record=record)) as c:
        openapi = c.get("/openapi.json").json()
        schema = _schema(openapi, "/api/v1/models/{name}/predict")
        validator = jsonschema.Draft202012Validator(schema)  # refs resolve in `components`
        out_schema = openapi["components"]["schemas"]["PredictOut"]
        xray = next(iter(sorted(XRAY.glob("*.jpeg")))) if XRAY.exists() else None
        grey = np.full((128, 128), 90, np.uint8)
        uploads = [("grey.png", _png(grey), ""), ("grey.png", _png(grey), "?explain=true"),
                   ("scan.dcm", to_bytes(dicom_xray(np.tile(np.arange(128, dtype=np.uint8),
                                                            (128, 1)))), "")]  # fmt: skip
        if xray is not None:
            uploads.append((xray.name, xray.read_bytes(), "?explain=true"))
        for name, data, query in uploads:
            r = c.post(f"/api/v1/models/pneumonia/predict{query}", files={"file": (name, data)})
            assert r.status_code == 200, r.text
            answer = r.json()
            validator.validate(answer)
            assert set(answer) == set(out_schema["properties"]), name
            assert (answer["prediction_id"] is not None) == recorded
            if query:
                assert answer["cam_png_base64"] and answer["image_png_base64"]
        # documents are not JSON answers: the schema names their media types
        doc = openapi["paths"]["/api/v1/models/{name}/predict"]["post"]["responses"]["200"]
        assert {"application/fhir+json", "application/dicom"} <= set(doc["content"])


def test_a_field_the_schema_lacks_cannot_reach_the_client(monkeypatch):
    """The handler's dict goes through the response model: a key the schema does not
    declare is dropped instead of leaking out (the schema and the answer cannot drift)."""
    from medlens.serve import api

    original = api._predict

    def leaky(*args, **kw):
        out = original(*args, **kw)
        out["upload_name"] = "patient-name.png"
        return out

    monkeypatch.setattr(api, "_predict", leaky)
    with TestClient(create_app([PNEUMONIA], bundled=False)) as c:
        r = c.post("/api/v1/models/pneumonia/predict",
                   files={"file": ("x.png", _png(np.full((64, 64), 80, np.uint8)))})  # fmt: skip
    assert r.status_code == 200 and "upload_name" not in r.json()


def _checker(openapi: dict, path: str, method: str = "get", name: str | None = None):
    schema = _schema(openapi, path, method)
    validator = jsonschema.Draft202012Validator(schema)

    def check(answer: dict) -> None:
        validator.validate(answer)
        if name:  # exactly the declared fields, at the top level
            assert set(answer) == set(openapi["components"]["schemas"][name]["properties"])

    return check


def test_every_json_answer_of_the_api_is_its_published_schema(tmp_path):
    """models, feedback, monitoring (with real drift figures), healthz and readyz."""
    with TestClient(create_app([PNEUMONIA], bundled=False,
                               record=open_store(f"sqlite:///{tmp_path / 'r.db'}"))) as c:  # fmt: skip
        api = c.get("/openapi.json").json()
        ids = []
        for value in (40, 90, 160, 220):
            r = c.post("/api/v1/models/pneumonia/predict",
                       files={"file": ("x.png", _png(np.full((96, 96), value, np.uint8)))})  # fmt: skip
            ids.append(r.json()["prediction_id"])
        fb = c.post("/api/v1/feedback", json={"prediction_id": ids[0], "label": "NORMAL"}).json()
        _checker(api, "/api/v1/feedback", "post", "FeedbackOut")(fb)
        mon = c.get("/api/v1/monitoring/pneumonia").json()
        _checker(api, "/api/v1/monitoring/{name}", "get", "MonitoringOut")(mon)
        assert mon["predictions"] == 4 and mon["per_day"] and mon["psi"]
        check_day = jsonschema.Draft202012Validator(
            {**api["components"]["schemas"]["DayOut"], "components": api["components"]}
        )
        for day in mon["per_day"]:
            check_day.validate(day)
            assert set(day) == set(api["components"]["schemas"]["DayOut"]["properties"])
        for item in c.get("/api/v1/models").json():
            assert set(item) == set(api["components"]["schemas"]["ModelOut"]["properties"])
        _checker(api, "/healthz", "get", "HealthOut")(c.get("/healthz").json())
        ready = c.get("/readyz")
        assert ready.status_code == 200
        _checker(api, "/readyz", "get", "ReadyOut")(ready.json())
