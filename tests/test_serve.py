"""Tests for medlens.serve: every route, every bad upload, privacy of uploads and logs."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import tempfile

import numpy as np
import pytest
from PIL import Image
from serve_fixtures import BINARY, MULTI, encode, served_models  # noqa: F401 - fixture
from test_imaging import SR_STORAGE, _encapsulated, dicom_bytes, make_dicom, png_header_only  # noqa: E402

from medlens.artifacts.folders import find_models
from medlens.artifacts.model import read_meta
from medlens.errors import ModelLoadError
from medlens.inference.predictor import Predictor
from medlens.serve import create_app

pytest.importorskip("httpx2", reason="FastAPI's TestClient needs httpx2: pip install -e '.[test]'")
from fastapi import FastAPI, UploadFile  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

PREDICT = f"/api/v1/models/{BINARY}/predict"
PATIENT = ("Doe", "Jane", "12345", "19700101")


@pytest.fixture(scope="module")
def app(served_models):  # noqa: F811
    return create_app([served_models], bundled=False)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture
def png(image_factory) -> bytes:
    return encode(Image.fromarray(image_factory("bright", seed=7)))


def post(client, data: bytes, name: str = "scan.png", model: str = BINARY, **params):
    return client.post(
        f"/api/v1/models/{model}/predict",
        params=params,
        files={"file": (name, data, "application/octet-stream")},
    )


def detail(r) -> str:
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and body["detail"]
    return body["detail"]


# --------------------------------------------------------------------------- API


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_models_lists_every_model_with_its_contract(client, served_models):  # noqa: F811
    r = client.get("/api/v1/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()}
    assert set(models) == {BINARY, MULTI}
    chest = models[BINARY]
    assert set(chest) == {"name", "title", "task", "labels", "input", "version", "metrics"}
    assert chest["task"] == "binary" and chest["labels"] == ["NORMAL", "PNEUMONIA"]
    assert chest["input"] == {"modality": None, "size": 32}
    meta = read_meta(served_models / BINARY)
    assert chest["version"] == meta.extra["weights_sha256"][:12]
    val = chest["metrics"]["val"]
    assert 0 <= val["accuracy"] <= 1 and len(val["ci"]["accuracy"]) == 2
    three = models[MULTI]
    assert three["task"] == "multiclass" and three["labels"] == ["bright", "dark", "stripes"]
    assert three["metrics"] == {}


def test_predict_png_matches_the_torch_network(client, served_models, png, image_factory):  # noqa: F811
    r = post(client, png)
    assert r.status_code == 200, r.text
    body = r.json()
    # every field of PredictOut, always (the schema is the answer): null where not asked for
    assert set(body) == {
        "prediction_id",
        "model",
        "version",
        "label",
        "probabilities",
        "threshold",
        "ood",
        "elapsed_ms",
        "notes",
        "dicom",
        "cam_png_base64",
        "image_png_base64",
    }
    assert body["prediction_id"] is None and body["cam_png_base64"] is None
    assert body["model"] == BINARY and body["dicom"] == {}  # a PNG has no DICOM header
    # The run's guard (ood.npz) scores every upload and flags it by its own level: the verdict
    # follows from score and level (whether this synthetic image sits just under or just over
    # a learnt level depends on the CPU's rounding, so that is not what is checked).
    served = client.app.state.models[BINARY].predictor
    level = served.ood_guard.threshold
    assert body["ood"]["score"] > 0
    assert body["ood"]["flag"] is (body["ood"]["score"] > level)
    assert body["ood"]["ratio"] == pytest.approx(body["ood"]["score"] / level, abs=0.01)
    assert list(body["probabilities"]) == ["NORMAL", "PNEUMONIA"]
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    thr = read_meta(served_models / BINARY).threshold
    assert body["threshold"] == thr
    assert body["label"] == ("PNEUMONIA" if body["probabilities"]["PNEUMONIA"] >= thr else "NORMAL")
    assert body["label"] == "PNEUMONIA"  # a bright disc
    assert body["elapsed_ms"] > 0 and body["notes"] == []
    # ONNX Runtime serves it; the torch network gives the same probabilities and OOD score.
    assert served.backend.startswith("onnx") and served.session is not None
    ref = Predictor(served_models / BINARY, backend="torch").predict_pixels(
        [image_factory("bright", seed=7)]
    )[0]
    for c, p in ref.probabilities.items():
        assert body["probabilities"][c] == pytest.approx(p, abs=1e-4)
    assert body["ood"]["score"] == pytest.approx(ref.ood["score"], rel=1e-3)


def _png_image(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(data))


def test_predict_with_explain_adds_the_grad_cam_overlay(client, png):
    body = post(client, png, explain="true").json()
    cam = _png_image(body["cam_png_base64"])
    image = _png_image(body["image_png_base64"])
    assert cam.size == image.size == (224, 224) and cam.mode == "RGB"
    # The overlay differs from the plain image: the heat map is blended in.
    assert np.abs(np.asarray(cam, float) - np.asarray(image, float)).mean() > 5


def test_predict_multiclass_with_explain(client, image_factory):
    r = post(
        client, encode(Image.fromarray(image_factory("stripes", seed=2))), model=MULTI, explain=True
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["threshold"] is None and list(body["probabilities"]) == [
        "bright",
        "dark",
        "stripes",
    ]
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert "cam_png_base64" in body


def test_explain_must_be_a_boolean(client, png):
    r = post(client, png, explain="maybe")
    assert r.status_code == 422
    msg = detail(r)
    assert "`explain`" in msg and "explain=true" in msg


def test_unknown_model_is_404_and_names_the_available_ones(client, png):
    r = post(client, png, model="brain-huge")
    assert r.status_code == 404
    msg = detail(r)
    assert "'brain-huge'" in msg and BINARY in msg and MULTI in msg and "/api/v1/models" in msg


@pytest.mark.parametrize(
    "path", ["/api/v1/models/..%2F..%2Fetc/predict", "/api/v1/models/../../etc/passwd/predict"]
)
def test_model_names_never_become_paths(client, png, path):
    r = client.post(path, files={"file": ("x.png", png)})
    assert r.status_code == 404
    detail(r)


def test_wrong_field_name_names_the_file_field(client, png):
    r = client.post(PREDICT, files={"image": ("scan.png", png)})
    assert r.status_code == 422
    msg = detail(r)
    assert "no field `file`" in msg and "`image`" in msg and "curl -F file=@" in msg


def test_body_that_is_not_multipart(client, png):
    r = client.post(PREDICT, content=png, headers={"content-type": "image/png"})
    assert r.status_code == 415
    assert "multipart/form-data" in detail(r)
    r = client.post(PREDICT)
    assert r.status_code == 415 and "field `file`" in detail(r)


def test_two_files_are_refused(client, png):
    r = client.post(PREDICT, files=[("file", ("a.png", png)), ("file", ("b.png", png))])
    assert r.status_code == 400 and "one image per request" in detail(r)


# --------------------------------------------------------------------------- bad input


def _truncated_jpeg(image_factory) -> bytes:
    data = encode(Image.fromarray(image_factory("bright", size=64)), "JPEG", quality=90)
    return data[: len(data) // 2]


BAD = {
    "empty": (lambda f: b"", "is empty"),
    "not an image": (lambda f: b"this is a text file, not an image\n" * 20, "is not an image"),
    "truncated JPEG": (_truncated_jpeg, "truncated"),
    # 30000 x 30000 grey PNG of 100 bytes: refused from its header, before decoding.
    "decompression bomb": (lambda f: png_header_only(30000, 30000), "900.0 MP"),
    "DICOM without pixel data": (lambda f: _dicom_without_pixels(), "has no pixel data"),
    "DICOM JPEG-LS": (
        lambda f: dicom_bytes(_encapsulated("1.2.840.10008.1.2.4.80")),
        "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)",
    ),
}


def _dicom_without_pixels() -> bytes:
    ds = make_dicom(None)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SR_STORAGE
    return dicom_bytes(ds)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_upload_is_a_clear_422_and_the_server_keeps_serving(client, png, image_factory, case):
    make, expected = BAD[case]
    r = post(client, make(image_factory), name="patient-doe-jane.png")
    assert r.status_code == 422, r.text
    msg = detail(r)
    assert expected in msg
    assert "`upload`" in msg and "doe-jane" not in msg  # the file name is not echoed
    if case == "DICOM JPEG-LS":
        assert "cannot decode" in msg or "could not be decoded" in msg
    assert post(client, png).status_code == 200


def test_upload_over_the_limit_is_413_while_reading(client, png):
    app = client.app
    old = app.state.max_upload_bytes
    app.state.max_upload_bytes = 200_000
    try:
        big = png + b"\0" * 300_000
        r = post(client, big)
        assert r.status_code == 413
        msg = detail(r)
        assert "limit" in msg and "--max-upload-mb" in msg

        # No Content-Length (chunked): the limit is enforced on the bytes as they arrive.
        def chunks():
            head = (
                b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
                b"Content-Type: image/png\r\n\r\n"
            )
            yield head
            for _ in range(40):
                yield b"\0" * 65536
            yield b"\r\n--XyZ--\r\n"

        r = client.post(
            PREDICT, content=chunks(), headers={"content-type": "multipart/form-data; boundary=XyZ"}
        )
        assert r.status_code == 413 and "limit" in detail(r)
        assert post(client, png).status_code == 200  # just under the limit still works
    finally:
        app.state.max_upload_bytes = old


@pytest.mark.parametrize("length", [70, 256, 257, 5000])
def test_an_overlong_multipart_boundary_is_a_400(client, png, length):
    boundary = "b" * length
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    r = client.post(
        PREDICT, content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    if length <= 256:  # python-multipart's own maximum
        assert r.status_code == 200, r.text
    else:  # refused by the parser's constructor: a 400 with a detail, never a 500
        assert r.status_code == 400
        assert "multipart body is malformed" in detail(r) and "Boundary length" in detail(r)
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "P", "I;16"])
def test_unusual_image_modes_are_handled(client, image_factory, mode):
    grey = image_factory("bright", seed=3)
    if mode == "I;16":
        img = Image.fromarray(grey.astype(np.uint16) * 257)
        assert img.mode == "I;16"
        data = encode(img)
    elif mode == "CMYK":
        data = encode(Image.fromarray(grey).convert("CMYK"), "JPEG")
    elif mode == "RGBA":
        rgba = np.dstack([grey, grey, grey, np.full_like(grey, 200)])
        data = encode(Image.fromarray(rgba, "RGBA"))
    else:
        data = encode(Image.fromarray(grey).convert("RGB").convert("P", palette=Image.ADAPTIVE))
    r = post(client, data)
    assert r.status_code == 200, r.text
    assert sum(r.json()["probabilities"].values()) == pytest.approx(1, abs=1e-5)


def test_dicom_16bit_and_multi_frame(client, image_factory):
    frame = image_factory("bright", seed=4).astype(np.uint16) * 16  # 12-bit values
    r = post(client, dicom_bytes(make_dicom(frame, bits_stored=12)), name="a.dcm")
    assert r.status_code == 200, r.text
    single = r.json()
    frames = np.stack([frame, np.zeros_like(frame), np.full_like(frame, 4000)])
    r = post(client, dicom_bytes(make_dicom(frames, bits_stored=12, frames=3)), name="b.dcm")
    assert r.status_code == 200, r.text
    multi = r.json()
    assert any("multi-frame DICOM (3 frames): used the first frame" in n for n in multi["notes"])
    assert multi["probabilities"] == pytest.approx(single["probabilities"], abs=1e-6)


# --------------------------------------------------------------------------- privacy


def test_a_5mb_upload_never_touches_the_disk(client, monkeypatch, tmp_path):
    """The upload is parsed in memory: no temporary file is created, not even spooled."""
    rng = np.random.default_rng(0)
    data = encode(
        Image.fromarray(rng.integers(0, 256, (1300, 1300, 3), dtype=np.uint8)), compress_level=0
    )
    assert len(data) > 5_000_000
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    opened = []

    def no_temp_files(*args, **kwargs):
        opened.append(args)
        raise AssertionError("a temporary file was created for the upload")

    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_temp_files)
    r = post(client, data, name="big.png")
    assert r.status_code == 200, r.text
    assert opened == [] and list(spool.iterdir()) == []


def test_the_disk_check_would_see_starlettes_spooling(monkeypatch, tmp_path):
    """Control for the test above: a plain UploadFile endpoint does spool 5 MB to disk."""
    plain = FastAPI()

    @plain.post("/up")
    async def up(file: UploadFile):
        return {"n": len(await file.read())}

    opened = []
    real = tempfile.TemporaryFile

    def spy(*args, **kwargs):
        opened.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", spy)
    with TestClient(plain) as c:
        assert c.post("/up", files={"file": ("a", b"\0" * 5_000_000)}).json() == {"n": 5_000_000}
    assert opened, "Starlette no longer spools large uploads; the disk test proves less"


def test_one_log_line_per_prediction_without_names_or_patient_fields(client, caplog, image_factory):
    frame = image_factory("dark", seed=9).astype(np.uint16) * 16
    data = dicom_bytes(make_dicom(frame, bits_stored=12))
    with caplog.at_level(logging.INFO, logger="medlens.serve"):
        r = post(client, data, name="Doe_Jane_12345.dcm", explain=True)
        bad = post(client, b"not an image", name="Doe_Jane_12345.txt")
    assert r.status_code == 200 and bad.status_code == 422
    records = [rec for rec in caplog.records if rec.name == "medlens.serve"]
    text = "\n".join(rec.getMessage() for rec in records)
    preds = [rec.getMessage() for rec in records if rec.getMessage().startswith("prediction ")]
    assert len(preds) == 1
    line = preds[0]
    body = r.json()
    assert f"upload_sha256={hashlib.sha256(data).hexdigest()}" in line
    assert f"model={BINARY}" in line and f"version={body['version']}" in line
    assert f"label={body['label']}" in line and "elapsed_ms=" in line
    assert re.search(r"time=\d{4}-\d\d-\d\dT", line)
    assert "rejected" in text and hashlib.sha256(b"not an image").hexdigest() in text
    assert not any(s in text for s in PATIENT) and ".dcm" not in text and ".txt" not in text
    assert all(len(rec.getMessage()) < 400 for rec in records)  # no pixel data


# --------------------------------------------------------------------------- discovery


def test_discover_models_accepts_a_model_folder_or_a_folder_of_them(served_models, tmp_path):  # noqa: F811
    assert set(find_models([served_models])) >= {BINARY, MULTI}
    assert find_models([served_models / BINARY])[BINARY] == served_models / BINARY
    with pytest.raises(ModelLoadError, match="two models are named"):
        other = tmp_path / "other"
        (other / BINARY).mkdir(parents=True)
        (other / BINARY / "model.json").write_text("{}")
        find_models([served_models, other])
    with pytest.raises(ModelLoadError, match="no such folder"):
        find_models([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model folders"):
        find_models([tmp_path / "empty"])


def test_app_without_models_still_serves_its_pages(monkeypatch, tmp_path):
    import medlens.artifacts.folders as sapp

    monkeypatch.setattr(sapp, "bundled_models_dir", lambda: tmp_path / "none")
    with TestClient(create_app([])) as c:
        assert c.get("/api/v1/models").json() == []
        page = c.get("/")
        assert page.status_code == 200 and "No models are loaded" in page.text
        assert "No models are loaded" in c.get("/dashboard").text
        r = c.post("/api/v1/models/any/predict", files={"file": ("a.png", b"x")})
        assert r.status_code == 404 and "none are loaded" in detail(r)


# --------------------------------------------------------------------------- pages


def _local_only(html: str) -> None:
    for url in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert url.startswith(("/", "#", "data:")), f"external asset {url}"


def test_diagnose_page(client, served_models):  # noqa: F811
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    _local_only(html)
    for name in (BINARY, MULTI):  # a radio button each, none chosen for the user
        assert f'<input type="radio" name="model" value="{name}">' in html
    assert "checked>" not in html.split('id="model-picker"')[1].split("</fieldset>")[0]
    chosen = client.get(f"/?model={BINARY}").text  # a link may preselect one
    assert f'<input type="radio" name="model" value="{BINARY}" checked>' in chosen
    assert 'id="drop-zone"' in html and 'type="file"' in html
    assert "Not a medical device" in html and 'id="ood-warning"' in html
    assert 'src="/static/diagnose.js"' in html
    # Model card summary: carved test split first, then validation, with intervals, what each
    # split was for, and a warning where a split is too small to trust its interval.
    metrics = read_meta(served_models / BINARY).extra["metrics"]
    test_at = html.index(f"<strong>Carved test split</strong> (n = {metrics['test']['n']})")
    assert test_at < html.index(f"<strong>Validation split</strong> (n = {metrics['val']['n']})")
    for split in ("test", "val"):
        lo, hi = metrics[split]["ci"]["accuracy"]
        assert f"[{lo:.3f}–{hi:.3f}]" in html
    assert "Chose the epoch, the temperature and the threshold" in html
    assert "too few for the interval to mean much" in html
    assert "No evaluation recorded" in html  # the untrained three-class model


def test_dashboard_page(client, served_models):  # noqa: F811
    import csv

    r = client.get("/dashboard")
    assert r.status_code == 200
    html = r.text
    _local_only(html)
    assert 'src="/vendor/plotly.min.js"' in html
    figures = json.loads(
        re.search(r'<script type="application/json" id="figures">(.*?)</script>', html, re.S).group(
            1
        )
    )
    # The trained run: curves, ROC, confusion matrix; the comparison across models.
    assert {
        "m0-curve-acc",
        "m0-curve-loss",
        "m0-curve-lr",
        "m0-roc",
        "m0-confusion",
        "compare-metrics",
        "compare-val_acc",
        "compare-val_loss",
        "compare-roc",
    } <= set(figures)
    assert not any(dom.startswith("m1-") for dom in figures)  # the untrained model has none
    for dom in figures:
        assert f'id="{dom}"' in html
    # The figure dicts hold the run folder's numbers (medlens.reporting.figures draws them).
    run = served_models / BINARY
    with open(run / "training_metrics.csv", newline="") as fh:
        history = list(csv.DictReader(fh))
    acc = figures["m0-curve-acc"]["data"]
    assert [t["name"] for t in acc][:2] == ["train", "validation"]
    assert acc[1]["y"] == pytest.approx([float(h["val_acc"]) for h in history], abs=1e-4)
    # The carved test split comes first (validation chose the threshold); its figures are drawn.
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    val = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert figures["m0-confusion"]["data"][0]["type"] == "heatmap"
    assert figures["m0-confusion"]["data"][0]["customdata"] == metrics["confusion_matrix"]
    roc = next(t for t in figures["m0-roc"]["data"] if t["name"].startswith("PNEUMONIA"))
    assert float(np.trapezoid(roc["y"], roc["x"])) == pytest.approx(metrics["auc"], abs=1e-3)
    bars = figures["compare-metrics"]["data"]
    assert [b["name"] for b in bars] == [BINARY]  # the untrained model has no metrics
    assert bars[0]["y"][0] == pytest.approx(metrics["accuracy"], abs=1e-4)
    assert figures["m0-roc"]["layout"]["title"]["text"] == "ROC curve (carved test split)"
    test_at, val_at = (
        html.index("<strong>Carved test split</strong>"),
        html.index("<strong>Validation split</strong>"),
    )
    assert test_at < val_at and f"(n = {metrics['n']})" in html and f"(n = {val['n']})" in html
    assert "chose the epoch, the temperature and the threshold" in html
    # A split this small (a few images per class) gets a warning instead of trusted intervals.
    assert html.count("too few for the interval to mean much") == 2
    # The headline table (labels from medlens.reporting.figures) and the classification report.
    assert "<th>Balanced accuracy</th>" in html and f"{metrics['accuracy']:.3f}" in html
    assert "Classification report" in html and "NORMAL" in html
    # The untrained model has no curves or validation files, and says so.
    assert "Not available: training curves" in html and "Not available: evaluation results" in html


def test_static_and_vendored_assets(client):
    r = client.get("/vendor/plotly.min.js")
    assert r.status_code == 200 and len(r.content) > 1_000_000 and b"plotly" in r.content[:2000]
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"):
        assert client.get(f"/vendor/{asset}").status_code == 200
    assert client.get("/vendor/..%2Fapp.py").status_code == 404
    assert client.get("/static/diagnose.js").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def test_docs_are_served_offline(client):
    r = client.get("/docs")
    assert r.status_code == 200
    assert "/vendor/swagger-ui-bundle.js" in r.text and "/vendor/swagger-ui.css" in r.text
    assert "cdn" not in r.text.lower() and "https://" not in r.text
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/api/v1/models/{name}/predict"]["post"]
    schema = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["file"] and schema["properties"]["file"]["format"] == "binary"
    assert {"200", "404", "413", "422"} <= set(op["responses"])
    assert "/healthz" in spec["paths"] and "/api/v1/models" in spec["paths"]


def test_unknown_route_and_method_have_helpful_details(client):
    r = client.get("/nowhere")
    assert r.status_code == 404 and "/api/v1" in detail(r)
    r = client.post("/healthz")
    assert r.status_code == 405 and "POST is not allowed" in detail(r)
