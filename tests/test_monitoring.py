"""The prediction record, feedback and drift monitoring (issue #24), on real images, against
the real SQLite and a real PostgreSQL server (tests/postgres_fixture.py)."""

from __future__ import annotations

import csv
import io
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import SHARED_DATA
from dicom_fixtures import PATIENT_ID, PATIENT_NAME, dicom_xray, to_bytes
from fastapi.testclient import TestClient
from PIL import Image
from postgres_fixture import pg_dump, postgres_url  # noqa: F401 - a fixture

from medlens.artifacts.folders import bundled_models_dir
from medlens.cli import main
from medlens.evaluation.drift import em_prevalence, excess_rate, ks, psi
from medlens.monitoring.store import PredictionRecord, open_store, predictions
from medlens.serve.app import create_app

# starts outside processes or runs real models on real data (`make test-fast` leaves it out)
pytestmark = pytest.mark.slow

PNEUMONIA = bundled_models_dir() / "pneumonia"
KERMANY = SHARED_DATA / "chest_xray" / "train"
ADULT = SHARED_DATA / "covid_xray" / "train"
needs_data = pytest.mark.skipif(not KERMANY.exists(), reason="needs ../shared/data")


# ----------------------------------------------------------------------------- statistics


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    ref = rng.beta(2, 5, 4000)
    same = psi(ref, rng.beta(2, 5, 4000))
    moved = psi(ref, rng.beta(5, 2, 4000))
    assert same < 0.02 < 0.25 < moved
    # by hand: two bins at the median, shares 0.5/0.5 against 0.9/0.1 (with 0.5 smoothing)
    r, c = np.array([0.25, 0.75] * 50), np.array([0.25] * 90 + [0.75] * 10)
    pr, pc = np.array([50.5, 50.5]) / 101, np.array([90.5, 10.5]) / 101
    assert psi(r, c, bins=2) == pytest.approx(np.sum((pc - pr) * np.log(pc / pr)))


def test_ks_and_the_flag_rate_test_are_scipys():
    from scipy import stats

    a, b = np.linspace(0, 1, 50), np.linspace(0.3, 1.3, 60)
    assert ks(a, b) == pytest.approx(tuple(stats.ks_2samp(a, b)))
    # 5 of 40 flagged where 2.5% are expected: P(X >= 5), X ~ Binomial(40, 0.025)
    expected = 1 - stats.binom.cdf(4, 40, 0.025)
    assert excess_rate(5, 40, 0.025) == pytest.approx(expected)
    assert excess_rate(0, 0, 0.025) == 1.0


def test_em_prevalence_recovers_a_changed_prior():
    """Saerens et al. 2002: posteriors calibrated at a 50% prior, data drawn at 20%: EM
    finds 20% where counting predicted labels (or averaging posteriors) does not."""
    rng = np.random.default_rng(1)
    n = 20000
    y = rng.random(n) < 0.2
    x = rng.normal(np.where(y, 1.0, -1.0), 1.0)
    lik1, lik0 = np.exp(-((x - 1) ** 2) / 2), np.exp(-((x + 1) ** 2) / 2)
    post = lik1 / (lik1 + lik0)  # the posterior under the training prior 0.5
    probs = np.stack([1 - post, post], 1)
    est = em_prevalence(probs, np.array([0.5, 0.5]))
    assert est[1] == pytest.approx(0.2, abs=0.015)
    assert abs(probs[:, 1].mean() - 0.2) > 0.05  # the naive estimate is far off
    assert est.sum() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the record


def _record(store, model="pneumonia", label="NORMAL", flag=False) -> str:
    return store.add_prediction(
        PredictionRecord(
            model,
            "v1",
            "ab" * 32,
            label,
            {"NORMAL": 0.8, "PNEUMONIA": 0.2},
            0.5,
            {"flag": flag, "score": 1.0, "ratio": 0.7},
            10.0,
        )  # fmt: skip
    )


def test_the_schema_is_alembics_head_and_reopening_keeps_the_rows(tmp_path):
    url = f"sqlite:///{tmp_path / 'rec.db'}"
    store = open_store(url)
    pid = _record(store)
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("select version_num from alembic_version")).scalar() == "0001"
    again = open_store(url)  # migrating an up-to-date record changes nothing
    assert again.prediction(pid)["label"] == "NORMAL"
    assert again.prediction(pid)["created_at"].tzinfo is not None


def test_retention_removes_old_predictions_and_their_feedback(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'rec.db'}")
    old, new = _record(store), _record(store)
    store.add_feedback(old, "PNEUMONIA", False, None, False)
    with store.engine.begin() as conn:
        conn.execute(predictions.update().where(predictions.c.id == old).values(
            created_at=datetime.now(UTC) - timedelta(days=40)))  # fmt: skip
    assert store.prune(keep_days=30) == 1
    assert store.prediction(old) is None and store.prediction(new) is not None
    assert store.feedback_rows() == []


def test_a_bad_database_url_is_one_clear_line(tmp_path, capsys):
    from medlens.errors import UsageError

    with pytest.raises(UsageError, match="not a database URL"):
        open_store("no-such-scheme")
    with pytest.raises(UsageError, match="cannot be opened"):
        open_store("postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert main(["monitor", "--db", "nonsense"]) == 2
    assert "--db 'nonsense' is not a database URL" in capsys.readouterr().err


# ----------------------------------------------------------------------------- served


def _kermany(n: int, seed: int = 0) -> list[Path]:
    """Paediatric X-rays of the pneumonia model's carved test split (never trained on)."""
    rows = list(csv.DictReader((PNEUMONIA / "eval" / "test" / "predictions.csv").open()))
    return [KERMANY / r["path"] for r in random.Random(seed).sample(rows, n)]


def _adult(n: int) -> list[Path]:
    """Adult X-rays (NIH ChestX-ray8 images of the covid_xray set)."""
    half = n // 2
    return (sorted((ADULT / "no_finding").glob("*"))[:half]
            + sorted((ADULT / "pneumonia").glob("*"))[: n - half])  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def record_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'records.db'}"
    url = request.getfixturevalue("postgres_url")
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # a fresh schema for each test
        conn.execute(sa.text("drop table if exists feedback, predictions, alembic_version"))
    engine.dispose()
    return url


def _client(url: str, **kw) -> TestClient:
    return TestClient(create_app([PNEUMONIA], bundled=False, record=open_store(url), **kw))


def _database_text(url: str) -> str:
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*")).decode("latin-1")
    return pg_dump(url)


@needs_data
def test_predictions_feedback_and_monitoring_through_the_api(record_url):
    """Predict returns a prediction_id (JSON and FHIR), feedback on it is stored, monitoring
    counts it all, and the database holds no file name, pixel or DICOM identifier."""
    files = _kermany(3)
    pixels = np.asarray(Image.open(files[0]).convert("L").resize((256, 256)))
    ds = dicom_xray(pixels)
    with _client(record_url) as c:
        answers = [c.post("/api/v1/models/pneumonia/predict",
                          files={"file": (f.name, f.read_bytes())}).json() for f in files]  # fmt: skip
        r = c.post("/api/v1/models/pneumonia/predict?format=fhir",
                   files={"file": ("scan.dcm", to_bytes(ds))})  # fmt: skip
        fhir_id = r.json()["identifier"][0]["value"]
        ids = [a["prediction_id"] for a in answers] + [fhir_id]
        assert len(set(ids)) == 4 and all(len(i) == 32 for i in ids)
        wrong = "PNEUMONIA" if answers[0]["label"] == "NORMAL" else "NORMAL"
        fb = c.post("/api/v1/feedback", json={"prediction_id": ids[0], "label": wrong,
                                              "comment": "lobar consolidation missed"})  # fmt: skip
        assert fb.status_code == 200, fb.text
        assert fb.json()["agrees"] is False and fb.json()["predicted"] == answers[0]["label"]
        ok = c.post("/api/v1/feedback",
                    json={"prediction_id": ids[1], "label": answers[1]["label"]})  # fmt: skip
        assert ok.status_code == 200
        unknown = c.post("/api/v1/feedback", json={"prediction_id": "0" * 32, "label": "NORMAL"})
        assert unknown.status_code == 404 and "no prediction with id" in unknown.json()["detail"]
        bad = c.post("/api/v1/feedback", json={"prediction_id": ids[1], "label": "glioma"})
        assert bad.status_code == 422 and "NORMAL, PNEUMONIA" in bad.json()["detail"]
        mon = c.get("/api/v1/monitoring/pneumonia").json()
    flagged = sum(a["ood"]["flag"] is True for a in answers)
    assert mon["predictions"] == 4 and mon["feedback"] == 2
    assert mon["ood_flagged"] >= flagged and mon["feedback_agreement"] == 0.5
    assert mon["per_day"][-1]["predictions"] == 4
    text = _database_text(record_url)
    assert ids[0] in text  # the grep does read the rows
    for private in [*(f.name for f in files), "scan.dcm", PATIENT_ID, PATIENT_NAME,
                    str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), "ACC-0042"]:  # fmt: skip
        assert private not in text, private
    assert len(text) < 400_000  # no pixels: one 256 x 256 image alone would be 65 kB


@needs_data
def test_monitoring_raises_its_alert_when_adult_xrays_arrive(tmp_path):
    """Paediatric X-rays of the model's own kind: no alert; then adult ones (covid_xray):
    the guard's flag rate and the probability drift raise alerts, in the API and the page."""
    url = f"sqlite:///{tmp_path / 'records.db'}"
    with _client(url) as c:
        for f in _kermany(40, seed=2):
            assert c.post("/api/v1/models/pneumonia/predict",
                          files={"file": ("x.jpeg", f.read_bytes())}).status_code == 200  # fmt: skip
        calm = c.get("/api/v1/monitoring/pneumonia").json()
        assert calm["predictions"] == 40 and calm["alerts"] == [], calm["alerts"]
        assert "No alert." in c.get("/monitoring").text
        for f in _adult(40):
            assert c.post("/api/v1/models/pneumonia/predict",
                          files={"file": ("x.png", f.read_bytes())}).status_code == 200  # fmt: skip
        drift = c.get("/api/v1/monitoring/pneumonia").json()
        page = c.get("/monitoring").text
    signals = {a["signal"] for a in drift["alerts"]}
    assert drift["predictions"] == 80 and drift["ood_flagged"] >= 30
    assert "ood_rate" in signals, drift["alerts"]
    # the probabilities moved too: further from validation than the paediatric ones were
    assert drift["ks"]["PNEUMONIA"]["statistic"] > calm["ks"]["PNEUMONIA"]["statistic"]
    assert drift["psi"]["PNEUMONIA"] > calm["psi"]["PNEUMONIA"]
    assert 'role="alert"' in page and "as unlike the training data" in page


@needs_data
def test_monitor_cli_and_feedback_export_with_kept_images(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'records.db'}"
    keep = tmp_path / "kept-images"
    files = _kermany(3, seed=3)
    with _client(url, feedback_images=keep) as c:
        ids = [c.post("/api/v1/models/pneumonia/predict",
                      files={"file": (f.name, f.read_bytes())}).json()["prediction_id"]
               for f in files]  # fmt: skip
        assert "keeps the\n    images you give feedback on" in c.get("/").text
        assert c.post("/api/v1/feedback", json={"prediction_id": ids[1], "label": "PNEUMONIA"}
                      ).json()["image_kept"] is True  # fmt: skip
    assert sorted(p.name for p in (keep / "kept").iterdir()) == [f"{ids[1]}.png"]
    assert len(list((keep / "pending").iterdir())) == 2  # the others wait (24 h at most)
    assert main(["monitor", "--db", url, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["models"][0]
    assert (rep["model"], rep["predictions"], rep["feedback"]) == ("pneumonia", 3, 1)
    assert main(["monitor", "--db", url]) == 0
    assert "pneumonia: 3 predictions" in capsys.readouterr().out
    out = tmp_path / "export"
    assert main(["feedback", "export", "--db", url, "--out", str(out), "--images", str(keep)]) == 0
    rows = list(csv.DictReader((out / "feedback.csv").open()))
    assert [(r["prediction_id"], r["label"]) for r in rows] == [(ids[1], "PNEUMONIA")]
    img = Image.open(out / "pneumonia" / "PNEUMONIA" / f"{ids[1]}.png")
    assert img.size[0] > 100 and rows[0]["image"] == f"pneumonia/PNEUMONIA/{ids[1]}.png"
    # the kept image is the decoded upload, with no file name of the patient's
    assert not any(f.name in (out / "feedback.csv").read_text() for f in files)


def test_feedback_and_monitoring_without_a_record_say_how_to_get_one():
    with TestClient(create_app([PNEUMONIA], bundled=False)) as c:
        r = c.post("/api/v1/models/pneumonia/predict",
                   files={"file": ("x.png", _png_bytes())})  # fmt: skip
        assert r.status_code == 200 and r.json()["prediction_id"] is None
        fb = c.post("/api/v1/feedback", json={"prediction_id": "x", "label": "NORMAL"})
        assert fb.status_code == 409 and "--db URL" in fb.json()["detail"]
        assert c.get("/api/v1/monitoring/pneumonia").status_code == 409
        assert "keeps no prediction record" in c.get("/monitoring").text


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_the_prometheus_alert_rules_name_metrics_the_server_exports():
    """docs/prometheus-alerts.yml (linked from docs/deployment.md) parses, and every metric its rules
    read is one that GET /metrics exports."""
    import re

    import yaml

    rules = yaml.safe_load((Path(__file__).parents[1] / "docs" / "prometheus-alerts.yml").open())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    with TestClient(create_app([PNEUMONIA], bundled=False)) as c:
        c.post("/api/v1/models/pneumonia/predict", files={"file": ("x.png", _png_bytes())})
        exported = set(re.findall(r"^(medlens_\w+?)(?:\{| )", c.get("/metrics").text, re.M))
    used = {m for e in exprs for m in re.findall(r"\b(medlens_\w+)", e)}
    assert len(exprs) == 4 and used and used <= exported, used - exported
