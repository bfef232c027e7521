"""``medlens predict --engine ray`` (Ray Data, a local runtime started by the command) gives
the rows of ``--engine local`` for every image (issue #16)."""

from __future__ import annotations

import csv
import re
import sys

import pytest
from conftest import SHARED_DATA

from medlens.cli import main

# starts outside processes or runs real models on real data (`make test-fast` leaves it out)
pytestmark = pytest.mark.slow

pytest.importorskip(
    "ray", reason="Ray is not installed: pip install 'medlens[ray]' (make install does)"
)


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture()
def images(tmp_path, image_factory):
    """Real X-rays where the data is here (else synthetic images), plus an unreadable file."""
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    real = sorted((SHARED_DATA / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[:6]
    real += sorted((SHARED_DATA / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))[:6]
    for i, src in enumerate(real):
        (folder / f"{i:02d}-{src.name}").write_bytes(src.read_bytes())
    for i in range(0 if real else 8):
        Image.fromarray(image_factory("bright" if i % 2 else "dark", seed=i, size=96)).save(
            folder / f"s{i}.png"
        )
    (folder / "zz-broken.png").write_bytes(b"not an image")
    return folder


def test_ray_engine_gives_the_local_engines_rows(tmp_path, images, capfd):
    local, ray_csv, ray_pq = tmp_path / "local.csv", tmp_path / "ray.csv", tmp_path / "m.parquet"
    base = ["predict", "--model", "pneumonia", str(images), "--quiet"]
    assert main([*base, "--out", str(local)]) == 0
    capfd.readouterr()
    assert main([*base, "--out", str(ray_csv), "--engine", "ray", "--ray-workers", "2"]) == 0
    err = capfd.readouterr().err  # Ray's own processes write to the file descriptor
    errors = [line for line in err.splitlines() if re.search(r"\[[^]]* E \d+ \d+\]", line)]
    assert errors == [], errors  # no error-level line from Ray on a normal run
    a, b = _rows(local), _rows(ray_csv)
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) >= 9
    for x, y in zip(a, b):
        assert x["label"] == y["label"]
        for k in ("p_NORMAL", "p_PNEUMONIA", "ood_score"):
            if x[k]:
                assert float(x[k]) == pytest.approx(float(y[k]), abs=1e-5)
    assert b[-1]["label"] == "" and "is not an image" in b[-1]["error"]
    assert [r["error"] for r in a] == [r["error"] for r in b]  # the same messages
    # A manifest (CSV with a path column) in, Parquet out: the same rows again (the manifest
    # and the Parquet writer are the engines' shared code: the local engine saves a second
    # Ray start-up here).
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\n" + "\n".join(r["path"] for r in a) + "\n")
    assert main(["predict", "--model", "pneumonia", str(manifest), "--out", str(ray_pq),
                 "--quiet"]) == 0  # fmt: skip
    import pyarrow.parquet as pq

    table = pq.read_table(ray_pq).to_pylist()
    assert [r["label"] or "" for r in table] == [r["label"] for r in a]


def test_without_ray_the_error_says_what_to_install(monkeypatch, capsys, images):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    code = main(["predict", "--model", "pneumonia", str(images), "--engine", "ray"])
    assert code == 2
    assert "pip install 'medlens[ray]'" in capsys.readouterr().err
