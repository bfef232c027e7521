"""What hostile file names, looping folders, damaged studies and busy ports did to the command
line (issue #23 items 8-14), tried again."""

from __future__ import annotations

import csv
import socket
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlens.cli import main
from medlens.fileio import csv_cell, csv_text, write_csv


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _png(path: Path, image_factory, kind="bright", seed=0) -> Path:
    Image.fromarray(image_factory(kind, seed=seed)).save(path, format="PNG")
    return path


def test_csv_cells_that_spreadsheets_would_run_are_neutralised(tmp_path):
    rows = [
        {"path": '=HYPERLINK("http://evil.example","x").png', "v": -0.5},
        {"path": "+cmd.png", "v": 1},
        {"path": "@sum.png", "v": None},
        {"path": "\tx.png", "v": 2},
        {"path": "a\rb.png", "v": 3},  # a CR in a name: quoted, still one row
        {"path": "ward\nc.png", "v": 4},
        {"path": "-x.png", "v": 5},
        {"path": "plain.png", "v": 6},
    ]
    out = tmp_path / "x.csv"
    write_csv(out, rows, ["path", "v"])
    with open(out, newline="") as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(rows)
    for row, got in zip(rows, back):
        assert not got["path"].startswith(("=", "+", "@", "\t", "\r", "-"))
        assert csv_text(got["path"]) == row["path"]  # MedLens reads its own cells back
    assert back[0]["v"] == "-0.5"  # numbers stay numbers
    assert csv_cell(None) == "" and csv_cell(3) == 3 and csv_cell("=1") == "'=1"


def test_predict_csv_and_table_with_hostile_file_names(
    capsys, tmp_path, trained_run, image_factory
):
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["=1+1.png", "-minus.png", "new\nline.png", "tab\tname.png", "ok.png"]
    for i, n in enumerate(names):
        _png(folder / n, image_factory, seed=i)
    out_csv = tmp_path / "p.csv"
    code, _, _ = _run(
        capsys, "predict", folder, "--model", trained_run, "--out", out_csv, "--quiet"
    )
    assert code == 0
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(names)
    got = sorted(Path(csv_text(r["path"])).name for r in rows)
    assert got == sorted(names)
    assert not any(r["path"].startswith(("=", "-", "+", "@")) for r in rows)
    # the console table: one line per image, a name cannot forge a row or a column
    code, out, _ = _run(capsys, "predict", folder, "--model", trained_run, "--quiet")
    lines = out.strip().splitlines()
    assert len(lines) == len(names)
    assert any("new\\nline.png" in line for line in lines)
    assert any("tab\\tname.png" in line for line in lines)
    assert all(len(line.split("\t")) == 4 for line in lines)


def test_a_symlink_loop_is_walked_once(capsys, tmp_path, trained_run, image_factory):
    root = tmp_path / "scans"
    (root / "a").mkdir(parents=True)
    _png(root / "a" / "one.png", image_factory)
    (root / "a" / "back").symlink_to(root)  # a loop to the top
    (root / "a" / "again").symlink_to(root / "a")  # a loop to itself
    (root / "twin").symlink_to(root / "a")  # the same folder under another name
    code, out, _ = _run(capsys, "predict", root, "--model", trained_run, "--quiet")
    assert code == 0
    assert len(out.strip().splitlines()) == 1  # one image, one row


@pytest.mark.parametrize("damage", ["garbage", "truncated", "folder", "locked"])
@pytest.mark.slow
def test_tune_with_a_damaged_study_is_a_one_line_user_error(
    capsys, tmp_path, synthetic_data, damage
):
    from medlens.training.tune import STUDY_DB, _open_study

    out = tmp_path / "tune"
    out.mkdir()
    db = out / STUDY_DB
    holder = None
    if damage == "garbage":
        db.write_bytes(b"not a database " * 100)
    elif damage == "truncated":
        _open_study(tmp_path / "real.db", 0)
        data = (tmp_path / "real.db").read_bytes()
        db.write_bytes(data[: len(data) // 3])
    elif damage == "folder":
        db.mkdir()
    else:
        _open_study(db, 0)
        holder = sqlite3.connect(db)
        holder.execute("BEGIN EXCLUSIVE")
    try:
        code, out_text, err = _run(capsys, "tune", "--data", synthetic_data, "--out", out,
                                   "--model", "cnn", "--trials", "1", "--image-size", "32")  # fmt: skip
    finally:
        if holder is not None:
            holder.close()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medlens tune: error: ")
    assert str(db) in lines[0] and "internal error" not in err and "SELECT" not in err
    assert "folder" in lines[0] if damage == "folder" else "move it away" in lines[0]


def test_serve_on_a_busy_port_is_one_line_and_exit_2(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, _, err = _run(capsys, "serve", "--port", port, "--no-bundled")
    assert code == 2
    assert err.strip() == (
        f"medlens serve: error: port {port} on 127.0.0.1 is in use (another medlens serve?); "
        "stop that server or choose another --port"
    )


def test_explain_warns_about_an_out_of_distribution_image(capsys, tmp_path, trained_run):
    # pure noise: nothing like the training discs
    noise = np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)
    img = tmp_path / "noise.png"
    Image.fromarray(noise).save(img)
    code, out, err = _run(
        capsys, "explain", "--model", trained_run, img, "--out", tmp_path / "c.png"
    )
    assert code == 0
    from medlens.inference.predictor import Predictor

    ref = Predictor(trained_run).predict_pixels([noise])[0]
    if ref.ood["flag"]:
        assert "OUT-OF-DISTRIBUTION" in out and f"{ref.ood['ratio']:.2f}x the flag level" in out
        assert "out of distribution" in err and "should not be trusted" in err
    else:
        assert f"ood {ref.ood['ratio']:.2f}x" in out


@pytest.mark.parametrize(
    "ratio, flag, words",
    [
        (0.5, False, "ood 0.50x: typical"),
        (0.95, False, "ood 0.95x: near the flag level"),
        (1.03, True, "OUT-OF-DISTRIBUTION (borderline, 1.03x the flag level)"),
        (4.4, True, "OUT-OF-DISTRIBUTION (4.40x the flag level)"),
        (None, None, ""),
    ],
)
def test_ood_text_bands(ratio, flag, words):
    from medlens.evaluation.ood import ood_text

    assert ood_text(ratio, flag).startswith(words)
    if words:
        assert ood_text(ratio, flag).startswith(words)
    else:
        assert ood_text(ratio, flag) == ""


@pytest.mark.slow
def test_a_collapsed_training_run_warns_in_the_console_and_on_the_card(tmp_path, caplog):
    """Labels that carry nothing (the same images in both classes): the network cannot learn, so
    it predicts one class or chance, and says so loudly."""
    import json
    import logging

    from conftest import tiny_config

    from medlens.artifacts.card import export_model
    from medlens.training.trainer import train

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for cls in ("NORMAL", "PNEUMONIA"):
        (data / cls).mkdir(parents=True)
    for i in range(40):  # the same noise image under both labels
        img = rng.integers(100, 120, (32, 32), dtype=np.uint8)
        for cls in ("NORMAL", "PNEUMONIA"):
            Image.fromarray(img).save(data / cls / f"{cls}_{i}.png")
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="medlens"):
        train(tiny_config(data, run, epochs=2, patient_regex="(?!)"))
    meta = json.loads((run / "model.json").read_text())
    warning = meta["training"]["warning"]
    assert warning.startswith("training did not produce a usable model")
    assert "at chance" in warning or "predicts" in warning
    assert any(
        "WARNING: training did not produce a usable model" in r.message for r in caplog.records
    )
    export_model(str(run))
    md = (run / "model_card.md").read_text()
    assert "> **Warning: training did not produce a usable model" in md


def test_collapse_warning_rules():
    from medlens.evaluation.metrics import collapse_warning

    fine = {"labels": ["a", "b"], "confusion_matrix": [[45, 5], [4, 46]], "balanced_accuracy": 0.91}
    assert collapse_warning(fine, 1.2, 20.0) is None
    one = {"labels": ["a", "b"], "confusion_matrix": [[50, 0], [48, 2]], "balanced_accuracy": 0.52}
    w = collapse_warning(one, 1.0, 20.0)
    assert "predicts a for 98%" in w and "at chance" in w
    capped = collapse_warning(fine, 20.0, 20.0)
    assert "temperature reached the cap (20)" in capped
    # a split that is 97% one class may well be predicted as that class
    skew = {"labels": ["a", "b"], "confusion_matrix": [[97, 0], [2, 1]], "balanced_accuracy": 0.83}
    assert collapse_warning(skew, 1.0, 20.0) is None


@pytest.mark.slow
def test_models_lists_what_predict_accepts(capsys, tmp_path, trained_run, image_factory):
    """Each model line starts with exactly what `medlens predict --model` takes: a bundled
    model's name, any other model's folder."""
    import shutil as sh

    runs = tmp_path / "runs"
    sh.copytree(trained_run, runs / "cnn")
    code, out, _ = _run(capsys, "models", "--models", runs)
    assert code == 0
    listed = out.split("trained models", 1)[1].splitlines()[1:]
    refs = [line.split()[0] for line in listed if line.startswith("  ")]
    assert str(runs / "cnn") in refs and "cnn" not in refs
    img = _png(tmp_path / "x.png", image_factory)
    for ref in refs:
        assert _run(capsys, "predict", "--model", ref, img, "--quiet")[0] == 0, ref


@pytest.mark.slow
def test_tune_on_a_study_that_already_holds_the_trials_says_so(capsys, tmp_path, synthetic_data):
    """--trials 1 on a study with 2 finished trials runs nothing, and now says so."""
    import optuna

    from medlens.training.tune import STUDY_DB, _open_study

    out = tmp_path / "tune"
    out.mkdir()
    study = _open_study(out / STUDY_DB, 0)
    dist = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}
    for value, lr in ((0.81, 1e-3), (0.84, 3e-4)):
        study.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions=dist,
                                                  value=value))  # fmt: skip
    code, out_text, err = _run(capsys, "tune", "--data", synthetic_data, "--out", out,
                               "--model", "cnn", "--trials", "1", "--image-size", "32")  # fmt: skip
    assert code == 0
    assert "already holds 2 finished trial(s), --trials 1: nothing to run" in err
    assert "best: trial 1, validation AUC 0.8400" in out_text
