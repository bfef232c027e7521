"""``GET /metrics``: Prometheus text format with request, latency, prediction and
out-of-distribution series, and nothing that identifies a patient or an image (issue #16)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from dicom_fixtures import PATIENT_ID, dicom_xray, to_bytes
from fastapi.testclient import TestClient
from PIL import Image
from postgres_fixture import postgres_url  # noqa: F401 - a fixture
from prometheus_client.parser import text_string_to_metric_families

from medlens.serve import create_app

URL = "/api/v1/models/pneumonia/predict"


def _series(client) -> dict[tuple, float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(series, name, **labels) -> float:
    return series.get((name, tuple(sorted(labels.items()))), 0.0)


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def client():
    with TestClient(create_app([], bundled=True)) as c:
        yield c


def test_a_flagged_upload_moves_the_ood_counter(client):
    before = _series(client)
    noise = np.random.default_rng(0).integers(0, 256, (224, 224), dtype=np.uint8)
    body = client.post(URL, files={"file": ("noise.png", _png(noise))}).json()
    assert body["ood"]["flag"] is True
    after = _series(client)
    key = dict(model="pneumonia", verdict="flagged")
    assert _get(after, "medlens_ood_total", **key) == _get(before, "medlens_ood_total", **key) + 1
    label = dict(model="pneumonia", label=body["label"])
    assert _get(after, "medlens_predictions_total", **label) == 1
    # The score over the flag level lands in the histogram's bucket above 1.
    assert _get(after, "medlens_ood_ratio_count", model="pneumonia") == 1
    assert _get(after, "medlens_ood_ratio_bucket", model="pneumonia", le="1.0") == 0
    assert _get(after, "medlens_ood_ratio_sum", model="pneumonia") == pytest.approx(
        body["ood"]["ratio"], rel=1e-3
    )
    route = dict(method="POST", route="/api/v1/models/{name}/predict", status="200")
    assert _get(after, "medlens_http_requests_total", **route) == 1
    assert _get(after, "medlens_http_request_duration_seconds_count",
                method="POST", route="/api/v1/models/{name}/predict") == 1  # fmt: skip


def test_metrics_hold_no_patient_or_image_data(client):
    dcm = dicom_xray(np.full((224, 224), 100, np.uint8))
    assert client.post(URL, files={"file": ("alice-smith.dcm", to_bytes(dcm))}).status_code == 200
    assert client.post(URL, files={"file": ("bad.png", b"nope")}).status_code == 422
    client.get("/no/such/page/for/patient/" + PATIENT_ID)
    text = client.get("/metrics").text
    for secret in (PATIENT_ID, "alice", dcm.StudyInstanceUID, dcm.SOPInstanceUID, "no/such"):
        assert secret not in text
    series = _series(client)
    assert (
        _get(series, "medlens_http_requests_total", method="GET", route="other", status="404") == 1
    )
    assert _get(series, "medlens_http_requests_total", method="POST",
                route="/api/v1/models/{name}/predict", status="422") == 1  # fmt: skip


@pytest.mark.slow
def test_two_worker_processes_serve_and_share_their_metrics(tmp_path, trained_run, postgres_url):  # noqa: F811
    """``medlens serve --workers 2 --api-key-file F --db postgresql...``: two processes, each
    with the model loaded, one port; the metrics of both are aggregated and every prediction
    of both lands in the one PostgreSQL record. The workers get their settings in a private
    file: neither the key nor the settings are in any process's environment. The counter
    folder and the settings folder are removed at exit."""
    import shutil

    import httpx2
    import psutil
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:  # a fresh record
        conn.execute(sa.text("drop table if exists feedback, predictions, alembic_version"))

    from medlens.bench import running_server

    key = "k3y-" + "x" * 28
    (tmp_path / "key").write_text(key)
    models = tmp_path / "models"
    shutil.copytree(trained_run, models / "chest")
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    png = _png(np.full((48, 48), 200, np.uint8))
    with running_server(models, "--workers", "2", "--log-level", "warning", "--db", postgres_url,
                        "--api-key-file", str(tmp_path / "key"), env=env) as srv:  # fmt: skip
        procs = [psutil.Process(srv.proc.pid), *psutil.Process(srv.proc.pid).children(True)]
        workers = [p for p in procs if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2
        for p in procs:
            environ = p.environ()
            assert not any(key in v for v in environ.values()), p.pid
            assert "MEDLENS_SERVE_CONFIG" not in environ and "MEDLENS_API_KEY" not in environ
        url = f"http://127.0.0.1:{srv.port}"
        auth = {"Authorization": f"Bearer {key}"}
        n = 12
        with httpx2.Client(timeout=60, headers=auth) as c:
            assert httpx2.get(url + "/api/v1/models").status_code == 401  # the key holds
            for _ in range(n):
                r = c.post(url + "/api/v1/models/chest/predict", files={"file": ("x.png", png)})
                assert r.status_code == 200
            assert c.get(url + "/api/v1/monitoring/chest").json()["predictions"] == n
            series = {}
            for family in text_string_to_metric_families(c.get(url + "/metrics").text):
                for s in family.samples:
                    series[(s.name, tuple(sorted(s.labels.items())))] = s.value
        total = sum(v for (name, _), v in series.items() if name == "medlens_predictions_total")
        assert total == n  # every process's predictions, whichever answered the scrape
        names = sorted(p.name for p in (tmp_path / "tmp").iterdir())
        assert any(n.startswith("medlens-metrics-") for n in names)
        assert any(n.startswith("medlens-serve-") for n in names)  # the settings, 0700
    assert list((tmp_path / "tmp").iterdir()) == []  # both folders are gone
    with engine.connect() as conn:  # both processes wrote to the one record
        assert conn.execute(sa.text("select count(*) from predictions")).scalar() == n


def test_metrics_need_the_api_key_when_one_is_set():
    from medlens.serve.security import SecurityPolicy

    key = "k" * 24
    app = create_app([], bundled=True, security=SecurityPolicy(api_key=key, rate_limit=None))
    with TestClient(app) as c:
        r = c.get("/metrics", follow_redirects=False)  # a scraper gets a 401, not a login page
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        r = c.get("/metrics", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and "medlens_http_requests_total" in r.text


def test_made_up_methods_share_one_metrics_label():
    with TestClient(create_app([], bundled=False)) as c:  # no model needed
        for i in range(5):
            assert c.request(f"MADEUP{i}", "/healthz").status_code == 405
        c.request("OPTIONS", "/healthz")
        text = c.get("/metrics").text
    assert "MADEUP" not in text
    methods = {
        s.labels["method"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "method" in s.labels
    }
    assert methods == {"other", "OPTIONS"}  # GET /metrics is counted after this answer
    other = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "medlens_http_requests_total" and s.labels["method"] == "other"
    ]
    assert other == [5.0]
