"""Subgroup (fairness) report: ``medlens evaluate --groups GROUPS.csv`` (issue #14 item 10).

The end-to-end test evaluates the bundled pneumonia model on images of its carved test split
(held out from its training, calibration and threshold) with attributes derived from the
images themselves (the images are all 224 px squares): their exposure (mean grey level below or
above the median) and their contrast (grey-level spread below or above the median).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from PIL import Image

from medlens.cli import main
from medlens.data.groups import read_groups
from medlens.errors import DataError
from medlens.evaluation.metrics import compute_metrics
from medlens.evaluation.subgroups import subgroup_metrics

# starts outside processes or runs real models on real data (`make test-fast` leaves it out)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = 40


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------ reading the file


def test_groups_match_relative_paths_and_unique_file_names(tmp_path):
    root = tmp_path / "data"
    sources = [str(root / "A" / "x.png"), str(root / "B" / "y.png"), str(root / "B" / "z.png")]
    csv_path = _write(
        tmp_path / "g.csv", "path,sex,site\nA/x.png,F,north\ny.png,M,\nnot/there.png,F,south\n"
    )
    values, notes = read_groups(csv_path, sources, root)
    assert values == {"sex": ["F", "M", None], "site": ["north", None, None]}
    assert notes == [
        "1 row(s) of g.csv name no evaluated image (first: 'not/there.png')",
        "1 evaluated image(s) are not in g.csv",
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("file,sex\na.png,F\n", "no 'path' column (columns: file, sex)"),
        ("path\na.png\n", "no attribute column beside 'path'"),
        ("path,sex\nA/a.png,F\nA/a.png,M\n", "line 3: 'A/a.png' is listed twice (first on line 2)"),
        ("path,sex\na.png,F\n", "line 2: 'a.png' names 2 images; give its path relative"),
        ("path,sex\nq.png,F\n", "none of its 1 rows names an evaluated image (first: 'q.png')"),
    ],
)
def test_bad_groups_files_say_what_to_fix(tmp_path, text, message):
    sources = [str(tmp_path / "A" / "a.png"), str(tmp_path / "B" / "a.png")]
    csv_path = _write(tmp_path / "groups.csv", text)
    with pytest.raises(DataError) as e:
        read_groups(csv_path, sources, tmp_path)
    assert message in str(e.value) and "groups.csv" in str(e.value)


def test_missing_groups_file(tmp_path):
    with pytest.raises(DataError, match="no such groups file"):
        read_groups(tmp_path / "nope.csv", [], tmp_path)


# ------------------------------------------------------------------------ the metrics


def test_each_group_gets_its_own_metrics_and_the_largest_gap():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 100)
    p1 = np.clip(y * 0.6 + rng.uniform(0, 0.4, y.size), 0, 1)
    p1[:64] = rng.uniform(0, 1, 64)  # group "a" (the first 64): guesses
    probs = np.stack([1 - p1, p1], axis=1)
    values = ["a"] * 64 + ["b"] * 124 + ["c"] * 12
    out = subgroup_metrics(y, probs, ["neg", "pos"], 0.5, {"site": values})["site"]
    assert set(out["groups"]) == {"a", "b", "c"} and out["unknown"] == 0
    for value, idx in (("a", slice(0, 64)), ("b", slice(64, 188))):
        ref = compute_metrics(y[idx], probs[idx], ["neg", "pos"], 0.5)
        g = out["groups"][value]
        assert g["n"] == ref["n"] and g["accuracy"] == ref["accuracy"] and g["auc"] == ref["auc"]
        assert g["ci"]["accuracy"] == ref["ci"]["accuracy"] and g["warning"] is None
    assert out["groups"]["b"]["accuracy"] == 1.0 and out["groups"]["a"]["accuracy"] < 0.8
    assert "too few for the interval to mean much" in out["groups"]["c"]["warning"]
    # The tiny group is left out of the gaps: b against a.
    gap = out["largest_gap"]["accuracy"]
    assert (gap["highest"], gap["lowest"]) == ("b", "a")
    assert gap["gap"] == pytest.approx(1.0 - out["groups"]["a"]["accuracy"])


# ------------------------------------------------------------------------ end to end


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not at {SHARED_DATA}")
def test_evaluate_groups_on_the_bundled_models_held_out_images(tmp_path, capsys):
    from medlens.training.training_data import recipe_splits

    ds = recipe_splits(ROOT / "recipes" / "pneumonia.yaml", SHARED_DATA / "chest_xray" / "train")
    data, rows = tmp_path / "held-out", []
    for label, cls in enumerate(ds.classes):
        for s in [s for s in ds.splits["test"] if s.label == label][:PER_CLASS]:
            link = data / cls / Path(s.source).name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.abspath(s.source), link)
            with Image.open(link) as im:
                grey = np.asarray(im.convert("L"), dtype=np.float32)
            rows.append({"path": f"{cls}/{link.name}", "mean": grey.mean(), "std": grey.std()})
    cut = {k: float(np.median([r[k] for r in rows])) for k in ("mean", "std")}
    with open(tmp_path / "groups.csv", "w", newline="") as f:
        out = csv.DictWriter(f, ["path", "exposure", "contrast"])
        out.writeheader()
        for r in rows:
            exposure = "darker" if r["mean"] < cut["mean"] else "brighter"
            contrast = "lower" if r["std"] < cut["std"] else "higher"
            out.writerow({"path": r["path"], "exposure": exposure, "contrast": contrast})
    argv = ["evaluate", "--model", "pneumonia", "--data", str(data), "--out",
            str(tmp_path / "ev"), "--groups", str(tmp_path / "groups.csv"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    with open(tmp_path / "ev" / "predictions.csv", newline="") as f:
        preds = {Path(r["path"]).name: r["true"] == r["pred"] for r in csv.DictReader(f)}
    groups = {r["path"].split("/")[-1]: r for r in csv.DictReader(open(tmp_path / "groups.csv"))}
    size = metrics["subgroups"]["exposure"]
    assert set(size["groups"]) == {"darker", "brighter"} and size["unknown"] == 0
    for value, g in size["groups"].items():  # each group's accuracy, recounted by hand
        hits = [ok for name, ok in preds.items() if groups[name]["exposure"] == value]
        assert g["n"] == len(hits) and g["accuracy"] == pytest.approx(np.mean(hits))
        assert g["auc"] is not None and len(g["ci"]["accuracy"]) == 2
    assert sum(g["n"] for g in size["groups"].values()) == metrics["n"] == 2 * PER_CLASS
    assert "accuracy" in size["largest_gap"]
    html = (tmp_path / "ev" / "report.html").read_text()
    assert '<section id="subgroups">' in html and "<h3>contrast</h3>" in html
    assert "Largest gaps" in html
    printed = capsys.readouterr().out
    assert "exposure=darker: n=" in printed and "largest accuracy gap" in printed


def test_a_group_of_one_class_reports_what_can_be_computed():
    """A group holding only NORMAL images: AUC and sensitivity cannot be computed, accuracy
    and specificity can; it is not called "too small" for having no PNEUMONIA images."""
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(242), np.ones(100)].astype(int)
    p1 = np.clip(np.where(y == 1, 0.8, 0.2) + rng.normal(0, 0.15, len(y)), 0, 1)
    probs = np.column_stack([1 - p1, p1])
    site = np.where(np.arange(len(y)) < 242, "normals-only", "mixed")
    site[200:242] = "mixed"
    res = subgroup_metrics(y, probs, ["NORMAL", "PNEUMONIA"], 0.5, {"site": list(site)},
                           n_bootstrap=50)  # fmt: skip
    g = res["site"]["groups"]["normals-only"]
    assert g["n"] == 200 and g["warning"] is None
    assert g["missing_classes"] == ["PNEUMONIA"]
    assert set(g["undefined"]) == {"auc", "sensitivity", "balanced_accuracy"} or set(
        g["undefined"]
    ) >= {"auc", "sensitivity"}
    assert g["accuracy"] is not None and g["specificity"] == g["accuracy"]
    assert "holds no PNEUMONIA image" in g["note"] and "reported: accuracy" in g["note"]
    assert "Only 0" not in str(g)
    assert "missing_classes" not in res["site"]["groups"]["mixed"]
