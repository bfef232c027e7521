"""The Makefile's promises: an installed tree starts `make run` without reinstalling."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_on_an_installed_tree_does_not_reinstall():
    stamp = ROOT / ".venv" / ".medlens-installed"
    if not stamp.exists():
        pytest.skip("not installed with `make install` (no .venv stamp)")
    plan = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    assert "pip install" not in plan and "medlens serve" in plan
    forced = subprocess.run(["make", "-n", "install", "FORCE=1"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert "pip install --quiet -c constraints.txt -e" in forced
