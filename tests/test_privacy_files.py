"""Prediction writes nothing anywhere: no ONNX Runtime telemetry files in HOME or TMPDIR."""

from __future__ import annotations

import os
import subprocess
import sys


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
