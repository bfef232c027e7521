"""Tests for the ``medlens`` command line: help, every subcommand, exit codes, messages.

Commands run in-process through ``medlens.cli.main``; a few run as real subprocesses to check
the installed entry point and exit statuses.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medlens.artifacts.model import read_meta
from medlens.cli import COMMANDS, build_parser, main
from medlens.data.splits import patient_id
from medlens.modeling.registry import count_parameters, create_model, list_models

# fmt: off
METRIC_KEYS = {
    "n", "accuracy", "balanced_accuracy", "auc", "f1", "f2", "precision", "sensitivity",
    "specificity", "log_loss", "brier", "ece", "confusion_matrix", "per_class", "threshold",
    "ci",
}
# fmt: on
VENV_BIN = Path(sys.executable).parent
CHEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray" / "train"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- help


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_subcommand_help_mentions_every_option(capsys, command):
    parser = _subparsers()[command]
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: medlens {command}")
    options = [s for a in parser._actions for s in a.option_strings]
    positionals = [a.dest for a in parser._actions if not a.option_strings]
    assert options, command
    for opt in options + positionals:
        assert opt in out, f"`medlens {command} --help` does not mention {opt}"


def test_missing_required_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "x"])
    assert e.value.code == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.slow
def test_installed_entry_point_and_module_run_as_subprocesses(tmp_path):
    exe = VENV_BIN / "medlens"
    assert exe.exists(), "the medlens console script is not installed in the venv"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for cmd in COMMANDS:
        assert cmd in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "medlens.cli", "predict", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "--json" in r.stdout
    # A real exit status for a user error: 2 and a one-line message naming the path.
    missing = tmp_path / "no-such-data"
    r = subprocess.run(
        [
            str(exe),
            "train",
            "--data",
            str(missing),
            "--out",
            str(tmp_path / "o"),
            "--model",
            "cnn",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(missing) in r.stderr and r.stderr.startswith("medlens train: error:")
    assert not (tmp_path / "o").exists()


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom medlens.cli import main\ntry:\n    main(['train', '--help'])\n"
        "except SystemExit as e:\n    assert e.code == 0\nprint('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


# --------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, synthetic_data):
    """A run trained through `medlens train --config recipe.yaml` with overriding flags."""
    d = tmp_path_factory.mktemp("cli")
    recipe = d / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": "cnn",
                "epochs": 2,
                "image_size": 48,
                "batch_size": 8,
                "threads": 1,
                "patience": 7,
                "augment": {"rotation": 0.0, "hflip": False},
                "precision": "fp32",
                "resize": "pad",
                "card": {"title": "Recipe card"},
            }
        )
    )
    out = d / "recipe_run"
    code = main(
        [
            "train",
            "--data",
            str(synthetic_data),
            "--out",
            str(out),
            "--config",
            str(recipe),
            "--image-size",
            "32",
            "--name",
            "from-recipe",
            "--quiet",
            "--resize=stretch",
        ]
    )
    assert code == 0
    return out


@pytest.mark.slow
def test_train_recipe_with_flags_overriding_it(cli_run):
    cfg = yaml.safe_load((cli_run / "config.yaml").read_text())
    assert cfg["image_size"] == 32  # the flag wins over the recipe's 48
    assert cfg["resize"] == "stretch"  # ... also when it repeats the default
    assert cfg["epochs"] == 2 and cfg["batch_size"] == 8 and cfg["patience"] == 7  # recipe
    assert cfg["precision"] == "fp32" and cfg["precision_resolved"] == "fp32"
    assert cfg["augment"]["rotation"] == 0.0 and cfg["augment"]["hflip"] is False
    assert cfg["augment"]["zoom"] == pytest.approx(0.1)  # unspecified: the default
    assert cfg["model"] == "cnn" and cfg["progress"] is False
    meta = json.loads((cli_run / "model.json").read_text())
    assert meta["name"] == "from-recipe"
    assert meta["preprocess"]["image_size"] == 32 and meta["preprocess"]["resize"] == "stretch"
    assert meta["card"] == {"title": "Recipe card"}
    assert meta["training"]["command"].startswith("medlens train --data ")
    with open(cli_run / "training_metrics.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2


def _train(capsys, data, out, *extra) -> tuple[int, str, str]:
    """``medlens train`` of a tiny cnn, quietly."""
    return _run(capsys, "train", "--data", data, "--out", out, "--model", "cnn", "--quiet", *extra)


def test_train_recipe_with_unknown_setting_is_exit_2(capsys, tmp_path, synthetic_data):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochz: 3\n")
    code, _, err = _train(capsys, synthetic_data, tmp_path / "o", "--config", recipe)
    assert code == 2 and "epochz" in err
    assert not (tmp_path / "o").exists()


def test_train_missing_recipe_file_is_exit_2(capsys, tmp_path, synthetic_data):
    code, _, err = _train(
        capsys, synthetic_data, tmp_path / "o", "--config", tmp_path / "nope.yaml"
    )
    assert code == 2 and "nope.yaml" in err


def test_train_nonexistent_data_is_exit_2_with_one_line(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    code, out, err = _run(
        capsys, "train", "--data", missing, "--out", tmp_path / "o", "--model", "cnn", "--quiet"
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and str(missing) in err
    assert not (tmp_path / "o").exists()


def test_train_unknown_model_is_exit_2_listing_choices(capsys, tmp_path, synthetic_data):
    code, _, err = _train(capsys, synthetic_data, tmp_path / "o", "--model", "alexnet")
    assert code == 2 and "alexnet" in err
    for name in list_models():
        assert name in err
    assert not (tmp_path / "o").exists()


def test_train_existing_run_is_exit_2(capsys, trained_run, synthetic_data):
    code, _, err = _train(capsys, synthetic_data, trained_run, "--image-size", "32")
    assert code == 2 and "already holds a run" in err
    assert (trained_run / "model.json").exists()


# --------------------------------------------------------------------------- evaluate


def test_evaluate_writes_metrics_report_and_predictions(
    capsys, tmp_path, trained_run, synthetic_data
):
    out = tmp_path / "ev"
    code, stdout, _ = _run(
        capsys,
        "evaluate",
        "--model",
        trained_run,
        "--data",
        synthetic_data,
        "--out",
        out,
        "--quiet",
    )
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(m)
    assert m["n"] == 80 and m["labels"] == ["NORMAL", "PNEUMONIA"]
    for k in ("accuracy", "auc", "sensitivity", "specificity"):
        lo, hi = m["ci"][k]
        assert 0 <= lo <= m[k] <= hi <= 1, k
    assert set(m["per_class"]) == {"NORMAL", "PNEUMONIA"}
    assert np.array(m["confusion_matrix"]).sum() == 80
    assert m["threshold"] == pytest.approx(
        json.loads((trained_run / "model.json").read_text())["threshold"]
    )
    assert m["auc"] >= 0.95
    assert (out / "report.html").is_file() and (out / "predictions.csv").is_file()
    with open(out / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 80
    assert stdout.startswith("n=80  accuracy ")
    assert str(out / "metrics.json") in stdout


@pytest.mark.slow
def test_evaluate_bad_image_stops_unless_skipped(capsys, tmp_path, trained_run, synthetic_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    bad = data / "NORMAL" / "IM-0999-0001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv = ["evaluate", "--model", trained_run, "--data", data, "--out", tmp_path / "ev", "--quiet"]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and str(bad) in err and "--skip-bad-images" in err
    assert not (tmp_path / "ev" / "metrics.json").exists()
    code, stdout, err = _run(capsys, *argv, "--skip-bad-images")
    assert code == 0
    assert "skipped 1 unreadable image(s)" in err  # a message (stderr), not a result
    assert any(line.startswith("n=80 ") for line in stdout.splitlines())
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 80
    # Running again into the same --out stops at once (nothing decoded, nothing replaced).
    before = (tmp_path / "ev" / "metrics.json").read_bytes()
    code, _, err = _run(capsys, *argv, "--skip-bad-images")
    assert code == 2 and "already holds an evaluation" in err and "--overwrite" in err
    assert (tmp_path / "ev" / "metrics.json").read_bytes() == before
    assert _run(capsys, *argv, "--skip-bad-images", "--overwrite")[0] == 0


def test_evaluate_unknown_class_and_unknown_model_are_exit_2(
    capsys, tmp_path, trained_run, synthetic_data_3class
):
    code, _, err = _run(
        capsys,
        "evaluate",
        "--model",
        trained_run,
        "--data",
        synthetic_data_3class,
        "--out",
        tmp_path / "ev",
        "--quiet",
    )
    assert code == 2 and "unknown class names" in err and "NORMAL" in err
    code, _, err = _run(
        capsys,
        "evaluate",
        "--model",
        "no-such-model",
        "--data",
        synthetic_data_3class,
        "--out",
        tmp_path / "ev",
        "--quiet",
    )
    assert code == 2 and "no-such-model" in err and "available" in err


# --------------------------------------------------------------------------- predict


@pytest.fixture()
def predict_inputs(tmp_path, synthetic_data):
    good = (
        sorted((synthetic_data / "NORMAL").glob("*.png"))[:2]
        + sorted((synthetic_data / "PNEUMONIA").glob("*.png"))[:2]
    )
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    missing = tmp_path / "missing.png"
    # The unreadable files sit between good ones: the batch must not stop at them.
    return [good[0], junk, good[1], missing, good[2], good[3]], good, junk, missing


def test_predict_table(capsys, trained_run, predict_inputs):
    files, good, junk, missing = predict_inputs
    code, out, _ = _run(capsys, "predict", *files, "--model", trained_run, "--quiet")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == len(files)
    by_path = {line.split("\t")[0]: line.split("\t") for line in lines}
    for f in good:
        path, label, probs, ood = by_path[str(f)]
        # the guard's verdict with its ratio to the flag level, in words
        assert re.fullmatch(
            r"ood \d\.\d\dx: (typical|near the flag level)|OUT-OF-DISTRIBUTION \((borderline, )?"
            r"\d+\.\d\dx the flag level\): unlike this model's training images; do not trust "
            r"the label",
            ood,
        ), ood
        # the label with the decision rule beside it
        thr = read_meta(trained_run).threshold
        name, rule = label.split(" ", 1)
        assert name in ("NORMAL", "PNEUMONIA") and rule == f"(p(PNEUMONIA) >= {thr:.6f})"
        values = dict(kv.split("=") for kv in probs.split())
        assert set(values) == {"NORMAL", "PNEUMONIA"}
        assert sum(map(float, values.values())) == pytest.approx(1, abs=2e-4)
    assert by_path[str(junk)][1] == "ERROR" and "not an image" in by_path[str(junk)][2]
    assert by_path[str(missing)][1] == "ERROR" and "does not exist" in by_path[str(missing)][2]


def test_predict_reads_a_manifest_relative_to_its_folder(capsys, tmp_path, trained_run,
                                                        predict_inputs):  # fmt: skip
    import shutil

    _, good, _, _ = predict_inputs
    folder = tmp_path / "batch"
    (folder / "img").mkdir(parents=True)
    shutil.copy(good[0], folder / "img" / "a.png")
    (folder / "list.csv").write_text(f"path\nimg/a.png\n{good[1]}\n")
    code, out, _ = _run(capsys, "predict", folder / "list.csv", "--model", trained_run, "--quiet")
    assert code == 0
    paths = [line.split("\t")[0] for line in out.strip().splitlines()]
    assert paths == [str(folder / "img" / "a.png"), str(good[1])]


def test_predict_json_lines(capsys, trained_run, predict_inputs):
    files, good, junk, _ = predict_inputs
    code, out, _ = _run(
        capsys, "predict", *files, "--model", trained_run, "--json", "--quiet", "--batch-size", "2"
    )
    assert code == 0
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert len(records) == len(files)
    ok = [r for r in records if r["error"] is None]
    assert [r["path"] for r in ok] == [str(f) for f in good]
    thr = json.loads((trained_run / "model.json").read_text())["threshold"]
    for r in ok:
        assert r["model"] == trained_run.name and r["threshold"] == round(thr, 6)  # not 17 digits
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert r["label"] == ("PNEUMONIA" if r["probabilities"]["PNEUMONIA"] >= thr else "NORMAL")
    bad = next(r for r in records if r["path"] == str(junk))
    assert bad["label"] is None and bad["probabilities"] is None and "not an image" in bad["error"]


def test_predict_csv_lists_unreadable_files(capsys, tmp_path, trained_run, predict_inputs):
    files, good, junk, missing = predict_inputs
    out_csv = tmp_path / "preds.csv"
    code, out, err = _run(
        capsys, "predict", *files, "--model", trained_run, "--out", out_csv, "--quiet"
    )
    assert code == 0
    assert out == ""
    assert f"wrote {len(files)} rows" in err and "(2 unreadable)" in err
    with open(out_csv, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames
        assert cols[:4] == ["path", "label", "p_NORMAL", "p_PNEUMONIA"] and cols[-1] == "error"
        assert cols[4:-1] == ["threshold", "ood_flag", "ood_score", "ood_ratio"]
        rows = {r["path"]: r for r in reader}
    assert set(rows) == {str(f) for f in files}
    for f in good:
        r = rows[str(f)]
        assert r["error"] == "" and r["label"] in ("NORMAL", "PNEUMONIA")
        assert float(r["p_NORMAL"]) + float(r["p_PNEUMONIA"]) == pytest.approx(1, abs=1e-5)
    for f, why in ((junk, "not an image"), (missing, "does not exist")):
        r = rows[str(f)]
        assert r["label"] == "" and r["p_NORMAL"] == "" and why in r["error"]


def test_predict_backends_agree(capsys, trained_run, synthetic_data):
    files = sorted((synthetic_data / "PNEUMONIA").glob("*.png"))[:3]
    results = {}
    for backend in ("torch", "onnx"):
        code, out, _ = _run(
            capsys,
            "predict",
            *files,
            "--model",
            trained_run,
            "--json",
            "--quiet",
            "--backend",
            backend,
        )
        assert code == 0
        results[backend] = [json.loads(line) for line in out.strip().splitlines()]
    for t, o in zip(results["torch"], results["onnx"]):
        assert t["path"] == o["path"] and t["label"] == o["label"]
        for c in ("NORMAL", "PNEUMONIA"):
            assert t["probabilities"][c] == pytest.approx(o["probabilities"][c], abs=1e-4)


def test_predict_folder_recurses(capsys, trained_run, synthetic_data):
    code, out, _ = _run(
        capsys, "predict", synthetic_data, "--model", trained_run, "--json", "--quiet"
    )
    assert code == 0
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert len(records) == 80
    correct = sum(r["label"] == Path(r["path"]).parent.name for r in records)
    assert correct >= 72  # >= 90% on the (mostly training) synthetic images


def test_predict_only_unreadable_files_is_exit_1(capsys, tmp_path, trained_run):
    junk = tmp_path / "junk.png"
    junk.write_text("nope")
    code, out, _ = _run(capsys, "predict", junk, "--model", trained_run, "--quiet")
    assert code == 1 and "ERROR" in out


def test_predict_unknown_model_is_exit_2(capsys, tmp_path, synthetic_data):
    code, _, err = _run(
        capsys, "predict", synthetic_data, "--model", tmp_path / "nothing", "--quiet"
    )
    assert code == 2 and "nothing" in err and "available" in err


# --------------------------------------------------------------------------- explain


def test_explain_writes_a_colour_overlay_png(capsys, tmp_path, trained_run, synthetic_data):
    img = sorted((synthetic_data / "PNEUMONIA").glob("*.png"))[0]
    out_png = tmp_path / "cam" / "overlay.png"
    code, out, _ = _run(capsys, "explain", img, "--model", trained_run, "--out", out_png)
    assert code == 0
    with Image.open(out_png) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (224, 224)  # max(image_size, 224)
        arr = np.asarray(im).astype(int)
    assert np.abs(arr[..., 0] - arr[..., 2]).mean() > 5  # coloured, not grey
    first = out.splitlines()[0].split("\t")
    assert first[0] == str(img) and first[1] in ("NORMAL", "PNEUMONIA")
    assert f"wrote {out_png}" in out


def test_explain_errors_are_exit_2(capsys, tmp_path, trained_run, synthetic_data):
    img = sorted((synthetic_data / "NORMAL").glob("*.png"))[0]
    code, _, err = _run(
        capsys,
        "explain",
        img,
        "--model",
        trained_run,
        "--out",
        tmp_path / "x.png",
        "--class",
        "COVID",
    )
    assert code == 2 and "COVID" in err and "NORMAL" in err
    code, _, err = _run(
        capsys,
        "explain",
        tmp_path / "none.png",
        "--model",
        trained_run,
        "--out",
        tmp_path / "x.png",
    )
    assert code == 2 and "none.png" in err
    assert not (tmp_path / "x.png").exists()
    # A file that is no image: the message names it, not the decoding library, and suggests
    # nothing explain does not have.
    junk = tmp_path / "scan.png"
    junk.write_text("a letter, not a scan")
    code, _, err = _run(
        capsys, "explain", junk, "--model", trained_run, "--out", tmp_path / "x.png"
    )
    assert code == 2 and f"`{junk}` is not an image MedLens can read" in err
    assert "PIL" not in err and "--skip-bad-images" not in err and "save it again as PNG" in err


# --------------------------------------------------------------------------- compare, models


def test_compare_two_runs(capsys, tmp_path, trained_run, cli_run):
    out = tmp_path / "cmp"
    code, stdout, _ = _run(capsys, "compare", trained_run, cli_run, "--out", out)
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("Validation split of each run (chose the epoch")  # which split
    assert lines[1].startswith("name")
    assert "Validation split of each run" in (out / "compare.html").read_text()
    assert any(line.startswith(trained_run.name) for line in lines)
    assert any(line.startswith(cli_run.name) for line in lines)
    assert (out / "compare.html").is_file() and f"wrote {out / 'compare.html'}" in stdout
    code, stdout, _ = _run(capsys, "compare", trained_run, cli_run, "--out", out, "--split", "test")
    assert code == 0 and cli_run.name in stdout
    assert stdout.startswith("Carved test split of each run (held out from training")


def test_compare_missing_run_is_exit_2(capsys, tmp_path, trained_run):
    code, _, err = _run(
        capsys, "compare", trained_run, tmp_path / "ghost", "--out", tmp_path / "cmp"
    )
    assert code == 2 and "ghost" in err


@pytest.mark.slow
def test_models_lists_every_backbone_with_parameter_counts(capsys):
    code, out, _ = _run(capsys, "models")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("backbones")
    for name in list_models():
        line = next((x for x in lines if x.split() and x.split()[0] == name), None)
        assert line is not None, name
        assert "M params" in line
    cnn = next(x for x in lines if x.split() and x.split()[0] == "cnn")
    n = count_parameters(create_model("cnn", 1, 3, pretrained=False))
    assert cnn.split()[1] == f"{n / 1e6:.2f}M"
    assert "trained models" in out


# --------------------------------------------------------------------------- real data
# End to end on real chest X-rays: `medlens train` (frozen EfficientNet-Lite0) on a small
# patient-disjoint slice of Kermany's training images, then `medlens evaluate` on another.
# Small on purpose (~120 images per slice at 64 px, head-only transfer: ~20 s) so it runs in
# the default suite; skipped when ../shared/data is absent.
PER_CLASS = 60


def _patient_slices(folder: Path, n: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Two disjoint sets of >= n images each, made of whole patients (deterministic)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(folder.iterdir()):
        groups[patient_id(f.name) or f.name].append(f)
    order = sorted(groups)
    np.random.default_rng(seed).shuffle(order)
    slices: list[list[Path]] = [[], []]
    for pid in order:
        if len(groups[pid]) > 3:  # no patient dominates a slice
            continue
        target = slices[0] if len(slices[0]) < n else slices[1]
        target += groups[pid]
        if len(slices[1]) >= n:
            break
    return slices[0], slices[1]


def _manifest(path: Path, rows: list[tuple[Path, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows((str(p), label) for p, label in rows)
    return path


@pytest.mark.skipif(
    not CHEST.is_dir(),
    reason=f"real data not available: {CHEST} is absent "
    "(the shared data folder sits beside the project root in the workspace)",
)
@pytest.mark.slow
def test_lite0_on_real_chest_xrays_generalises_to_unseen_patients(tmp_path, capsys):
    train_rows, eval_rows = [], []
    for label in ("NORMAL", "PNEUMONIA"):
        a, b = _patient_slices(CHEST / label, PER_CLASS)
        assert len(a) >= PER_CLASS and len(b) >= PER_CLASS
        train_rows += [(p, label) for p in a]
        eval_rows += [(p, label) for p in b]
    train_patients = {patient_id(p.name) for p, _ in train_rows}
    assert not train_patients & {patient_id(p.name) for p, _ in eval_rows}

    train_csv = _manifest(tmp_path / "train.csv", train_rows)
    eval_csv = _manifest(tmp_path / "eval.csv", eval_rows)
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--data",
            str(train_csv),
            "--out",
            str(run),
            "--model",
            "efficientnet-lite0",
            "--transfer",
            "frozen",
            "--image-size",
            "64",
            "--head-epochs",
            "30",
            "--batch-size",
            "16",
            "--threads",
            "1",
            "--quiet",
        ]
    )
    assert code == 0
    meta = json.loads((run / "model.json").read_text())
    assert meta["arch"] == "efficientnet-lite0" and meta["labels"] == ["NORMAL", "PNEUMONIA"]
    assert meta["training"]["layout"] == "csv"

    out = tmp_path / "eval"
    code = main(
        ["evaluate", "--model", str(run), "--data", str(eval_csv), "--out", str(out), "--quiet"]
    )
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == len(eval_rows)
    assert m["auc"] > 0.8, m["auc"]
    assert (out / "report.html").is_file()
    capsys.readouterr()


def test_train_device_cuda_without_gpu_is_one_line_error(
    capsys, tmp_path, synthetic_data, monkeypatch
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _run(
        capsys,
        "train",
        "--data",
        synthetic_data,
        "--out",
        tmp_path / "r",
        "--model",
        "cnn",
        "--device",
        "cuda",
    )
    assert code == 2
    assert "--device cuda" in err and "use --device cpu" in err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- exit codes


def test_a_bug_exits_1_with_a_hint_and_the_traceback_only_with_debug(capsys, monkeypatch):
    import medlens.cli as cli

    def broken(a):
        raise KeyError("boom")  # a programming error, not a user's

    monkeypatch.setitem(cli.COMMANDS, "models", (cli.COMMANDS["models"][0], broken))
    code, _, err = _run(capsys, "models")
    assert code == 1
    assert "internal error (KeyError: 'boom')" in err and "--debug" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "--debug", "models")
    assert code == 1 and "Traceback (most recent call last)" in err and "broken" in err


def test_a_user_error_exits_2_with_one_line(capsys, tmp_path):
    code, out, err = _run(capsys, "predict", "--model", tmp_path / "nope", tmp_path / "x.png")
    assert code == 2 and out == ""
    assert err.startswith("medlens predict: error: no model ") and len(err.splitlines()) == 1
