"""Prediction writes nothing anywhere: no ONNX Runtime telemetry files in HOME or TMPDIR."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

# starts outside processes or runs real models on real data (`make test-fast` leaves it out)
pytestmark = pytest.mark.slow


def test_predicting_leaves_home_tmp_and_cwd_untouched(tmp_path):
    dirs = {name: tmp_path / name for name in ("home", "tmp", "cwd")}
    for d in dirs.values():
        d.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(dirs["home"]), TMPDIR=str(dirs["tmp"]), XDG_CACHE_HOME="")
    code = (
        "import numpy as np\n"
        "from medlens.inference.predictor import Predictor\n"
        "p = Predictor('pneumonia')\n"
        "print(p.predict_pixels([np.zeros((224, 224), np.uint8)])[0].label)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=dirs["cwd"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in ("NORMAL", "PNEUMONIA")
    for name, d in dirs.items():
        left = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
        assert left == [], f"{name} holds {left}"


def test_serving_writes_nothing_anywhere(tmp_path, trained_run):
    import shutil

    import httpx2
    import numpy as np
    from PIL import Image

    from medlens.bench import running_server

    dirs = {name: tmp_path / name for name in ("home", "tmp", "cwd")}
    for d in dirs.values():
        d.mkdir()
    models = tmp_path / "models"
    shutil.copytree(trained_run, models / "chest")
    before = {p: p.stat().st_mtime_ns for p in models.rglob("*")}
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(dirs["home"]), TMPDIR=str(dirs["tmp"]), XDG_CACHE_HOME="")
    with running_server(models, "--log-level", "warning", env=env, cwd=dirs["cwd"]) as srv:
        url = f"http://127.0.0.1:{srv.port}"
        buf = io.BytesIO()
        Image.fromarray(np.tile(np.arange(0, 256, 2, dtype=np.uint8), (128, 1))).save(buf, "PNG")
        big = buf.getvalue() + b"\0" * 3_000_000  # > 1 MB: would spool to a temporary file
        for data in (buf.getvalue(), big):
            r = httpx2.post(
                url + "/api/v1/models/chest/predict?explain=true",
                files={"file": ("x.png", data)},
                timeout=60,
            )
            assert r.status_code in (200, 422), r.text
        # A DICOM (with patient identifiers) as FHIR and as a DICOM SR: answered, not stored.
        from dicom_fixtures import dicom_xray, to_bytes

        dcm = to_bytes(dicom_xray(np.full((64, 64), 90, np.uint8)))
        for fmt, media in (("fhir", "application/fhir+json"), ("dicom-sr", "application/dicom")):
            r = httpx2.post(
                url + f"/api/v1/models/chest/predict?format={fmt}",
                files={"file": ("x.dcm", dcm)},
                timeout=60,
            )
            assert r.status_code == 200 and r.headers["content-type"] == media, r.text
        assert httpx2.get(url + "/readyz", timeout=60).status_code == 200
        assert httpx2.get(url + "/", timeout=10).status_code == 200
    for name, d in dirs.items():
        left = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
        assert left == [], f"{name} holds {left}"
    assert {p: p.stat().st_mtime_ns for p in models.rglob("*")} == before
