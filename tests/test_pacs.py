"""A real PACS round trip: Orthanc with its DICOMweb plugin, started here on 127.0.0.1 with a
temporary storage folder (issue #15).

A DICOM chest X-ray goes into Orthanc through its REST API; ``medlens pacs`` finds it
(QIDO-RS), fetches it (WADO-RS), predicts with the bundled pneumonia model and stores a DICOM
SR (STOW-RS); the SR is then found in the same study through Orthanc's own API. ``make test``
installs Debian's ``orthanc`` and ``orthanc-dicomweb``; outside CI the module skips, with a
message, where they are missing. Orthanc's storage is deleted afterwards: no patient data is
left behind.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pydicom
import pytest
from conftest import SHARED_DATA
from dicom_fixtures import PATIENT_ID, PATIENT_NAME, dicom_xray, to_bytes
from PIL import Image

from medlens.cli import main

# starts outside processes or runs real models on real data (`make test-fast` leaves it out)
pytestmark = pytest.mark.slow

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
if not (Path(ORTHANC).exists() and PLUGIN.exists()):
    if os.environ.get("CI"):
        raise RuntimeError(f"{ORTHANC} or {PLUGIN} is missing: `make test` installs them")
    pytest.skip(
        f"Orthanc is not installed ({ORTHANC}, {PLUGIN}): `make test` installs the Debian "
        "packages orthanc and orthanc-dicomweb; in CI this test runs",
        allow_module_level=True,
    )

PNEUMONIA_SCT = "233604007"
NORMAL_SCT = "17621005"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_orthanc(root: Path, lua: str | None = None) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    config = {
        "Name": "medlens-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    if lua:
        (root / "filter.lua").write_text(lua)
        config["LuaScripts"] = [str(root / "filter.lua")]
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            if httpx.get(f"{base}/system", timeout=1).status_code == 200:
                return base, proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"Orthanc did not start: {(root / 'orthanc.log').read_text()}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen, root: Path) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(root / "storage", ignore_errors=True)
    assert not (root / "storage").exists()  # no patient data left behind


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    root = tmp_path_factory.mktemp("orthanc")
    base, proc = _start_orthanc(root)
    yield base
    _stop(proc, root)


def _xray_pixels() -> np.ndarray:
    files = sorted((SHARED_DATA / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))
    if files:  # a real paediatric chest X-ray where the data is here
        return np.asarray(Image.open(files[0]).convert("L"))
    yy, xx = np.mgrid[:224, :224]
    return (128 + 60 * np.sin(xx / 17.0) * np.cos(yy / 23.0)).astype(np.uint8)


def _upload(base: str, ds) -> None:
    r = httpx.post(f"{base}/instances", content=to_bytes(ds), timeout=30)
    assert r.status_code == 200, r.text


def _pacs(base: str, study_uid: str) -> int:
    """``medlens pacs`` with the bundled pneumonia model on one study."""
    return main(["pacs", "--url", f"{base}/dicom-web", "--model", "pneumonia",
                 "--study", study_uid])  # fmt: skip


def _study_instances(base: str, study_uid: str) -> list[pydicom.Dataset]:
    found = httpx.post(
        f"{base}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
    ).json()
    assert len(found) == 1
    out = []
    for inst in httpx.get(f"{base}/studies/{found[0]}/instances").json():
        raw = httpx.get(f"{base}/instances/{inst['ID']}/file").content
        out.append(pydicom.dcmread(io.BytesIO(raw)))
    return out


def test_pacs_round_trip_stores_an_sr_in_the_same_study(orthanc, capsys, tmp_path, monkeypatch):
    import highdicom as hd

    source = dicom_xray(_xray_pixels())
    _upload(orthanc, source)
    monkeypatch.chdir(tmp_path)  # MedLens writes nothing: the folder must stay empty
    assert _pacs(orthanc, source.StudyInstanceUID) == 0
    out, err = capsys.readouterr()
    assert "1 report(s) stored, 0 already there, 0 image(s) could not be used" in out
    assert "series 1, instance 1:" in out and "report stored" in out
    for secret in (PATIENT_ID, "Testpatient", source.StudyInstanceUID, source.SOPInstanceUID):
        assert secret not in out + err  # names instances by number only
    assert list(tmp_path.iterdir()) == []
    instances = _study_instances(orthanc, source.StudyInstanceUID)
    sr = [d for d in instances if d.Modality == "SR"]
    assert len(instances) == 2 and len(sr) == 1
    sr = sr[0]
    assert sr.PatientID == PATIENT_ID and str(sr.PatientName) == PATIENT_NAME
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert "not for diagnostic use" in sr.SeriesDescription
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    report = hd.sr.srread(io.BytesIO(to_bytes(sr)))
    assert report.VerificationFlag == "UNVERIFIED" and report.PreliminaryFlag == "PRELIMINARY"
    group = report.content.get_image_measurement_groups()[0]
    finding = group.get_qualitative_evaluations()[0].value
    assert finding.scheme_designator == "SCT" and finding.value in (PNEUMONIA_SCT, NORMAL_SCT)
    probs = {m.name.meaning: m.value for m in group.get_measurements()}
    assert sum(v for k, v in probs.items() if k.startswith("Calibrated")) == pytest.approx(1, 1e-4)
    assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID


def test_pacs_unknown_study_and_server_down_are_clear_errors(orthanc, capsys):
    assert _pacs(orthanc, "1.2.3.4") == 2
    assert "has no instances of the requested study" in capsys.readouterr().err
    down = f"http://127.0.0.1:{_free_port()}/dicom-web"
    assert main(["pacs", "--url", down, "--model", "pneumonia", "--study", "1.2.3.4"]) == 2
    assert "cannot reach the DICOMweb server" in capsys.readouterr().err


def test_a_refused_stow_is_an_error_and_stores_nothing(tmp_path, capsys):
    # This Orthanc accepts images but filters out every structured report (its DICOMweb
    # plugin still acknowledges the STOW-RS request: MedLens checks with a search).
    lua = "function ReceivedInstanceFilter(dicom, origin, info)\n" \
          "  return dicom.Modality ~= 'SR'\nend\n"  # fmt: skip
    base, proc = _start_orthanc(tmp_path, lua)
    try:
        source = dicom_xray(_xray_pixels())
        _upload(base, source)
        assert _pacs(base, source.StudyInstanceUID) == 2
        err = capsys.readouterr().err
        assert "did not keep the report on series 1, instance 1: STOW-RS acknowledged" in err
        assert [d.Modality for d in _study_instances(base, source.StudyInstanceUID)] == ["DX"]
    finally:
        _stop(proc, tmp_path)


def test_an_unusable_instance_is_reported_and_the_others_go_on(orthanc, capsys):
    study = dicom_xray(_xray_pixels())
    _upload(orthanc, study)
    broken = dicom_xray(np.full((64, 64), 90, np.uint8), study_uid=study.StudyInstanceUID)
    broken.SeriesInstanceUID, broken.SeriesNumber = study.SeriesInstanceUID, 1
    broken.InstanceNumber = 2
    broken.PixelData = broken.PixelData[:100]  # cut off: it says 64x64 but holds 100 bytes
    _upload(orthanc, broken)
    assert _pacs(orthanc, study.StudyInstanceUID) == 0
    out = capsys.readouterr().out
    assert "1 report(s) stored, 0 already there, 1 image(s) could not be used" in out
    assert "series 1, instance 2" in out and PATIENT_ID not in out
    kinds = sorted(d.Modality for d in _study_instances(orthanc, study.StudyInstanceUID))
    assert kinds == ["DX", "DX", "SR"]  # a report for the usable image only


def test_running_twice_stores_no_duplicate_and_force_and_dry_run(orthanc, capsys):
    source = dicom_xray(_xray_pixels())
    _upload(orthanc, source)
    study = source.StudyInstanceUID
    assert _pacs(orthanc, study) == 0
    capsys.readouterr()
    # again: this model version already reported on the image
    assert _pacs(orthanc, study) == 0
    out = capsys.readouterr().out
    assert "0 report(s) stored, 1 already there" in out and "is stored already" in out
    assert [d.Modality for d in _study_instances(orthanc, study)].count("SR") == 1
    # a dry run stores nothing and says what it would do
    args = ["pacs", "--url", f"{orthanc}/dicom-web", "--model", "pneumonia", "--study", study]
    assert main([*args, "--dry-run", "--force"]) == 0
    out = capsys.readouterr().out
    assert "a report would be stored (dry run)" in out and "(dry run: nothing stored)" in out
    assert [d.Modality for d in _study_instances(orthanc, study)].count("SR") == 1
    # --force stores another report (a new UID)
    assert main([*args, "--force"]) == 0
    assert "1 report(s) stored" in capsys.readouterr().out
    assert [d.Modality for d in _study_instances(orthanc, study)].count("SR") == 2


class _Hostile:
    """A server on 127.0.0.1 that answers every request the way ``mode`` says: an HTML page,
    garbage, a redirect to itself, one byte every 2 s, or DICOM JSON of an instance without
    UIDs. It is the attacker (or the misconfigured proxy), not a PACS."""

    def __init__(self, mode: str):
        import http.server
        import threading

        hostile = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                hostile.answer(self)

            do_POST = do_GET

        self.mode = mode
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, h) -> None:
        if self.mode == "redirect":
            h.send_response(302)
            h.send_header("Location", h.path)
            h.end_headers()
            return
        if self.mode == "drip":
            h.send_response(200)
            h.send_header("Content-Type", "application/dicom+json")
            h.send_header("Content-Length", "1000")
            h.end_headers()
            for _ in range(30):
                try:
                    h.wfile.write(b" ")
                    h.wfile.flush()
                except OSError:
                    return
                time.sleep(2)
            return
        if self.mode == "no-uids":
            body = json.dumps([{"00080060": {"vr": "CS", "Value": ["DX"]},
                                "00200011": {"vr": "IS", "Value": [1]},
                                "00200013": {"vr": "IS", "Value": [1]}}]).encode()  # fmt: skip
            kind = "application/dicom+json"
        elif self.mode == "html":
            body, kind = b"<html><body><h1>Login</h1></body></html>", "text/html"
        else:
            body, kind = bytes(range(256)) * 4, "application/dicom+json"
        h.send_response(200)
        h.send_header("Content-Type", kind)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    "mode, words",
    [
        ("html", "did not answer the QIDO-RS search as a DICOMweb server would"),
        ("garbage", "did not answer the QIDO-RS search as a DICOMweb server would"),
        ("redirect", "redirects in a loop"),
    ],
)
def test_a_hostile_server_is_a_one_line_error_not_a_crash(capsys, mode, words):
    server = _Hostile(mode)
    try:
        code = main(["pacs", "--url", server.url, "--model", "pneumonia", "--study", "1.2.3",
                     "--timeout", "20"])  # fmt: skip
    finally:
        server.close()
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err and len(err.strip().splitlines()) == 1
    assert "internal error" not in err


def test_the_timeout_is_a_deadline_for_the_whole_request():
    """A server that drips a byte every 2 s resets a per-read timeout for ever: the request is
    stopped after --timeout seconds in all."""
    from medlens.interop.pacs import PacsError, round_trip

    server = _Hostile("drip")
    try:
        t0 = time.time()
        with pytest.raises(PacsError, match="did not finish the QIDO-RS search within 3 s"):
            round_trip(server.url, ["1.2.3"], None, {}, {}, timeout=3)
        assert time.time() - t0 < 6
    finally:
        server.close()


def test_instances_listed_without_uids_are_reported_not_a_crash(capsys):
    server = _Hostile("no-uids")
    try:
        code = main(["pacs", "--url", server.url, "--model", "pneumonia", "--study", "1.2.3",
                     "--timeout", "5"])  # fmt: skip
    finally:
        server.close()
    out, err = capsys.readouterr()
    assert code == 1 and "internal error" not in err
    assert "series 1, instance 1: the server listed it without its UIDs; skipped" in out
    assert "0 report(s) stored, 0 already there, 1 image(s) could not be used" in out
