"""Installs that fit their use: the core (`pip install .`) trains, evaluates and predicts
without any extra's packages, `serve` needs only its own, and a command that needs a missing
extra says which one to install.

Each check runs MedLens in a fresh Python process whose import system answers "not
installed" for every package that only the left-out extras bring, transitively (the
dependencies the core does not also pull in, from the installed metadata): a real fresh
virtual environment takes minutes to install, so it was checked by hand once (recorded in
docs/development.md) and this repeats its import side in every run. pyproject.toml's extras
are checked against the CLI's list and constraints.txt.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from medlens.cli import EXTRA_OF_MODULE

# starts outside processes or runs real models on real data (`make test-fast` leaves it out)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# The distributions each extra brings, as pyproject.toml names them.
EXTRA_DISTRIBUTIONS = {
    "serve": {"fastapi", "uvicorn", "python-multipart", "fastapi-offline", "limits",
              "prometheus-client", "sqlalchemy", "alembic", "httpx2"},
    "interop": {"fhir.resources", "highdicom", "dicomweb-client"},
    "tune": {"optuna"},
    "ray": {"ray"},
    "tracking": {"mlflow"},
    "postgres": {"psycopg"},
}  # fmt: skip
RUNNER = """
import os, sys
BLOCKED = set(filter(None, os.environ["MEDLENS_BLOCK"].split(",")))
class Hidden:  # every finder answers "not installed" for the blocked packages
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"))
"""


def _canon(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[str]) -> set[str]:
    """The installed distributions these requirements pull in, transitively (their own
    optional extras included where a requirement names them, e.g. ``ray[data]``)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [(Requirement(r), set()) for r in requirements]
    while todo:
        req, _ = todo.pop()
        name = _canon(req.name)
        if name == "medlens":  # `dev` = medlens[serve,...]: follow the named extras
            meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
            for extra in req.extras:
                todo += [(Requirement(r), set()) for r in meta["optional-dependencies"][extra]]
            continue
        if name in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for text in dist.requires or []:
            sub = Requirement(text)
            env = [{"extra": e} for e in (req.extras or {""})]
            if sub.marker is None or any(sub.marker.evaluate(e) for e in env):
                todo.append((sub, set()))
    return seen


def _blocked(*extras: str) -> str:
    """The top-level modules of every distribution that only ``extras`` bring (not the core,
    and not the extras left out): what a venv without those extras would lack."""
    from importlib import metadata

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = meta["optional-dependencies"]
    keep = _closure(meta["dependencies"] + [r for e in EXTRA_DISTRIBUTIONS if e not in extras
                                            for r in optional[e]])  # fmt: skip
    gone = _closure([r for e in extras for r in optional[e]]) - keep
    modules = {m for m, dists in metadata.packages_distributions().items()
               if all(_canon(d) in gone for d in dists)}  # fmt: skip
    return ",".join(sorted(modules | {m for m, e in EXTRA_OF_MODULE.items() if e in extras}))


def _run(tmp_path: Path, script: str, blocked: str) -> subprocess.CompletedProcess:
    (tmp_path / "script.py").write_text(script)
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {**os.environ, "MEDLENS_BLOCK": blocked}
    return subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "script.py")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)  # fmt: skip


def _name(requirement: str) -> str:
    import re

    return re.split(r"[<>=\[; ]", requirement, maxsplit=1)[0].lower()


def test_pyproject_extras_are_the_ones_the_cli_names():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    core = {_name(r) for r in meta["dependencies"]}
    for extra, dists in EXTRA_DISTRIBUTIONS.items():
        assert {_name(r) for r in extras[extra]} == dists, extra
        assert not dists & core, f"{extra}'s packages are in the core dependencies"
    assert set(EXTRA_OF_MODULE.values()) == set(EXTRA_DISTRIBUTIONS)
    assert "pyarrow" in core  # predict reads CSV manifests and writes Parquet with it
    pinned = {_name(line).replace("_", "-").replace(".", "-")
              for line in (ROOT / "constraints.txt").read_text().splitlines()
              if line and not line.startswith("#")}  # fmt: skip
    for dist in set().union(*EXTRA_DISTRIBUTIONS.values()) | core:
        assert dist.replace(".", "-") in pinned, f"{dist} is not in constraints.txt"


def test_the_core_trains_evaluates_and_predicts_without_any_extra(tmp_path, synthetic_data):
    every = _blocked(*EXTRA_DISTRIBUTIONS)
    image = next(iter(sorted(synthetic_data.rglob("*.png"))))
    script = f"""
from medlens.cli import main
assert main(["train", "--data", {str(synthetic_data)!r}, "--out", "run", "--model", "cnn",
             "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--quiet"]) == 0
assert main(["evaluate", "--model", "run", "--data", {str(synthetic_data)!r}, "--out", "ev"]) == 0
assert main(["predict", "--model", "run", {str(image)!r}]) == 0
# a command that needs a missing extra names it (exit 2, one line)
assert main(["predict", "--model", "run", "--format", "fhir", "--out", "docs", {str(image)!r}]) == 2
import sys
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {every.split(",")!r})
assert not loaded, loaded
print("CORE OK")
"""
    r = _run(tmp_path, script, every)
    assert r.returncode == 0 and "CORE OK" in r.stdout, r.stderr[-3000:]
    assert "needs MedLens's `interop` extra" in r.stderr
    assert "pip install 'medlens[interop]'" in r.stderr
    assert (tmp_path / "run" / "model.json").exists() and (
        tmp_path / "ev" / "metrics.json"
    ).exists()


def test_serve_needs_only_the_serve_extra(tmp_path, trained_run):
    others = _blocked("interop", "tune", "ray", "tracking", "postgres")
    script = f"""
import io
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient
from medlens.monitoring.store import open_store
from medlens.serve.app import create_app
buf = io.BytesIO()
Image.fromarray(np.full((48, 48), 200, np.uint8)).save(buf, format="PNG")
app = create_app([{str(trained_run)!r}], bundled=False, record=open_store("sqlite:///r.db"))
with TestClient(app) as c:
    r = c.post("/api/v1/models/{trained_run.name}/predict", files={{"file": ("x.png", buf.getvalue())}})
    assert r.status_code == 200, r.text
    label = r.json()["label"]
    fb = c.post("/api/v1/feedback", json={{"prediction_id": r.json()["prediction_id"], "label": label}})
    assert fb.status_code == 200, fb.text
    assert c.get("/").status_code == 200 and c.get("/monitoring").status_code == 200
print("SERVE OK")
"""
    r = _run(tmp_path, script, others)
    assert r.returncode == 0 and "SERVE OK" in r.stdout, r.stderr[-3000:]
