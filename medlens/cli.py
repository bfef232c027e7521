"""The ``medlens`` command line."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from medlens.config import add_options, given_settings, merge_settings
from medlens.errors import MedLensError, UsageError
from medlens.fileio import read_yaml

if TYPE_CHECKING:
    from medlens.inference.predictor import Predictor

log = logging.getLogger("medlens")

EXIT_USAGE = 2  # a user error: one line saying what to do

# The optional parts of MedLens and the packages only they bring (pyproject.toml's extras):
# a command that needs one that is not installed says which extra to install.
EXTRA_OF_MODULE = {
    **dict.fromkeys(
        ["fastapi", "starlette", "uvicorn", "multipart", "python_multipart", "fastapi_offline",
         "limits", "prometheus_client", "sqlalchemy", "alembic", "httpx2"], "serve"),
    **dict.fromkeys(["fhir", "highdicom", "dicomweb_client"], "interop"),
    "optuna": "tune",
    "ray": "ray",
    "mlflow": "tracking",
    "psycopg": "postgres",
}  # fmt: skip
EXIT_BUG = 1  # a bug: a short hint; the traceback with --debug


def _add_train(p: argparse.ArgumentParser) -> None:
    """train a classifier on a folder of images

    Train, calibrate (on the validation split only) and evaluate a classifier. DATA may be
    <root>/<class>/<image> (split into train/val/test, stratified and patient-grouped),
    <root>/{train,val,test}/<class>/<image>, a CSV manifest
    (path,label[,patient_id][,split]) or a MedMNIST .npz file. Settings come from the
    defaults, then --config (a recipe, or a run's config.yaml), then the flags given here.
    """
    add_options(p)
    p.add_argument(
        "--config",
        default=None,
        help="YAML recipe with any of these settings, or a run's config.yaml to run it again "
        "(command-line flags win)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out from its last checkpoint",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    _add_tracking(p)


def _add_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="log this command to MLflow: parameters, per-epoch and final metrics, reports "
        "(file:./mlruns needs no server; default $MLFLOW_TRACKING_URI; none: no tracking)",
    )
    p.add_argument(
        "--experiment",
        default=None,
        help="MLflow experiment of the run (default $MLFLOW_EXPERIMENT_NAME, else medlens)",
    )


def _tracking(a: argparse.Namespace, run_name: str, **tags):
    """The MLflow run of this command (:func:`medlens.tracking.start_tracking`): none without
    --tracking-uri or $MLFLOW_TRACKING_URI, and none but rank 0's under torchrun."""
    from medlens.tracking import start_tracking, tracking_uri

    uri = tracking_uri(a.tracking_uri)
    if os.environ.get("RANK", "0") != "0":
        uri = None
    tags = {"medlens.command": a.command, **{f"medlens.{k}": v for k, v in tags.items()}}
    return start_tracking(uri, a.experiment, run_name=run_name, tags=tags)


def _under_torchrun() -> bool:
    from medlens.training.distributed import launched

    return launched()


def _cmd_train(a: argparse.Namespace) -> int:
    from medlens.training.cv import train_folds
    from medlens.training.init_from import layered_recipe
    from medlens.training.trainer import train

    recipe, source = {}, "the command line"
    if a.config:
        source = a.config
        recipe = read_yaml(a.config, "--config")
    given = given_settings(a)
    # --init-from: the base model's recipe beneath --config and the flags
    cfg = merge_settings(layered_recipe(recipe, given), given, source=source)
    argv = getattr(a, "_argv", None)
    run = train_folds if cfg.folds and cfg.fold is None else train
    if run is train_folds and _under_torchrun():
        raise UsageError(
            "--folds K trains K runs one after another: under torchrun, train one fold per "
            "command with --fold I (each fold then uses every process)"
        )
    with _tracking(a, Path(cfg.out).name, run_folder=cfg.out) as tracker:
        run(
            cfg,
            resume=a.resume,
            overwrite=a.overwrite,
            command="medlens " + shlex.join(argv) if argv else None,
            tracker=tracker,
        )
    return 0


def _add_tune(p: argparse.ArgumentParser) -> None:
    """search training settings with Optuna

    Train trials with settings drawn by Optuna (TPE sampler, median pruner) over the base
    configuration (defaults, --config, the flags given here), each scored by its calibrated
    validation AUC (patient-grouped split; mean over folds with --folds K). The study is kept in
    OUT/study.db: run the command again to continue it. Writes OUT/trial-N run folders,
    OUT/best.yaml (the best trial as a recipe), OUT/trials.csv and OUT/tune.html.
    """
    add_options(p)
    p.add_argument("--config", default=None, help="YAML recipe to start from (flags win)")
    p.add_argument(
        "--trials",
        type=int,
        default=20,
        help="finished trials the study should hold; default %(default)s",
    )
    p.add_argument(
        "--space",
        default=None,
        metavar="YAML",
        help="search space: setting: {low, high[, log]} or {choices: [...]}; default lr, "
        "weight_decay, dropout, label_smoothing, unfreeze, finetune_lr_scale",
    )
    _add_tracking(p)


def _cmd_tune(a: argparse.Namespace) -> int:
    from medlens.artifacts.folders import BEST_YAML, TUNE_HTML
    from medlens.training.tune import tune

    if _under_torchrun():
        raise UsageError(
            "medlens tune runs its trials in one process; start it without torchrun (or "
            "tune on one machine, then train the best recipe under torchrun)"
        )
    from medlens.training.init_from import layered_recipe

    recipe = read_yaml(a.config, "--config") if a.config else {}
    given = given_settings(a)
    recipe = layered_recipe(recipe, given)
    cfg = merge_settings(recipe, given, source=a.config or "the command line")
    space = read_yaml(a.space, "--space") if a.space else None
    if a.trials < 1:
        raise UsageError("--trials must be >= 1")
    kept = {**recipe, **{k: v for k, v in given.items() if k != "out"}}
    with _tracking(a, Path(cfg.out).name, study_folder=cfg.out) as tracker:
        res = tune(cfg, cfg.out, trials=a.trials, space=space, seed=cfg.seed, recipe=kept,
                   tracker=tracker)  # fmt: skip
    if res["best_trial"] is None:
        print("no trial finished with a validation AUC; see trials.csv")
        return 1
    print(f"best: trial {res['best_trial']}, validation AUC {res['best_value']:.4f}: "
          + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in res["best_params"].items()))  # fmt: skip
    print(f"wrote {Path(cfg.out) / BEST_YAML} and {Path(cfg.out) / TUNE_HTML}")
    return 0


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    """evaluate a model on a labelled folder

    Evaluate every image under DATA (nothing is split off): metrics.json (with 95%
    bootstrap intervals), report.html, predictions.csv in --out.
    """
    p.add_argument("--model", required=True, help="run folder, or a bundled/installed model name")
    p.add_argument(
        "--data",
        required=True,
        help="<root>/<class>/<image>, <root>/{train,val,test}/<class>/<image> "
        "(all splits), a CSV manifest, or a MedMNIST .npz (its test split)",
    )
    p.add_argument("--out", required=True, help="folder for metrics.json and report.html")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an evaluation already in --out"
    )
    p.add_argument(
        "--groups",
        metavar="GROUPS.csv",
        help="subgroup report: a CSV with a 'path' column (file name, or path relative to "
        "--data) and one column per attribute (sex, age band, site, scanner...); metrics.json "
        "gains 'subgroups' and report.html a section with each group's figures",
    )
    p.add_argument(
        "--skip-bad-images", action="store_true", help="skip unreadable images instead of stopping"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_tracking(p)


def _model_params(ref: str) -> dict:
    """A model's name, version (its weights' sha256, 12 digits) and model.json sha256, for
    tracking; the errors are the command's own, raised later."""
    from medlens.artifacts.folders import MODEL_JSON, resolve_model
    from medlens.artifacts.model import read_meta
    from medlens.errors import ModelLoadError
    from medlens.fileio import sha256_file

    try:
        folder = resolve_model(ref)
        meta = read_meta(folder)
    except ModelLoadError:
        return {}
    return {
        "model_name": meta.name or folder.name,
        "model_version": meta.version,
        "model_json_sha256": sha256_file(folder / MODEL_JSON),
        "labels": list(meta.labels),
    }


def _print_subgroups(subgroups: dict) -> None:
    for attr, res in subgroups.items():
        for value, g in res["groups"].items():
            auc = "n/a" if g.get("auc") is None else f"{g['auc']:.3f}"
            note = f"  ({g['note']})" if g.get("note") else ""
            print(
                f"  {printable(attr)}={printable(value)}: n={g['n']}  accuracy "
                f"{g['accuracy']:.3f}  auc {auc}"
                + ("  (too small to trust)" if g["warning"] else note)
            )
        gap = res["largest_gap"].get("accuracy")
        if gap:
            print(
                f"  {attr}: largest accuracy gap {gap['gap']:.3f} "
                f"({gap['highest']} vs {gap['lowest']})"
            )


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from medlens.reporting.evaluate import evaluate
    from medlens.tracking import summary_metrics

    with _tracking(a, Path(a.out).name, out=a.out) as tracker:
        tracker.log_params(
            {"model": a.model, **_model_params(a.model), "data": a.data, "groups": a.groups,
             "skip_bad_images": a.skip_bad_images}
        )  # fmt: skip
        m = evaluate(
            a.model,
            a.data,
            a.out,
            skip_bad_images=a.skip_bad_images,
            progress=not a.quiet,
            groups=a.groups,
            overwrite=a.overwrite,
        )
        tracker.log_metrics(summary_metrics(m))
        tracker.log_artifacts(a.out, ["metrics.json", "report.html"])
    ci = m.get("ci", {})

    def fmt(k):
        v = m.get(k)
        if v is None:
            return f"{k} n/a"
        lo_hi = ci.get(k)
        return f"{k} {v:.4f}" + (
            f" [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi and None not in lo_hi else ""
        )

    print(
        f"n={m['n']}  "
        + "  ".join(fmt(k) for k in ("accuracy", "auc", "sensitivity", "specificity"))
    )
    if m.get("threshold") is not None:
        print(f"decision: {m['labels'][1]} when p >= {m['threshold']:.6f}")
    if m.get("ood"):
        o = m["ood"]
        print(
            f"out-of-distribution: {o['flagged']} of {o['n']} images flagged ({o['share']:.1%}); "
            "they are counted in the figures above"
        )
    if m.get("subgroups"):
        _print_subgroups(m["subgroups"])
    print(f"wrote {Path(a.out) / 'metrics.json'} and {Path(a.out) / 'report.html'}")
    return 0


def _add_calibrate(p: argparse.ArgumentParser) -> None:
    """fit a model's temperature and operating point on a hospital's own labelled images

    Site calibration: the network is kept; its temperature, decision threshold (--operating-
    point) and, with --refit-guard, the out-of-distribution guard's flag level are fitted again
    on DATA, a few hundred labelled images of the site. A before/after table is measured by
    cross-fitting on those images (each judged by a calibration fitted without it). The new
    model folder OUT names its base model (sha256), the site data's counts and the date; serve,
    predict and the model card use it like any model. Without --data only the operating point
    is chosen again, on the validation probabilities the model recorded.
    """
    p.add_argument("--model", required=True, help="run folder, or a bundled/installed model name")
    p.add_argument(
        "--data",
        default=None,
        help="the site's labelled images: <root>/<class>/<image> (the model's class names), "
        "<root>/{train,val,test}/<class>/<image> (all used) or a CSV manifest",
    )
    p.add_argument("--out", required=True, help="the new model folder (its name is the model's)")
    _add_operating_point(p, "default: the model's own rule")
    p.add_argument(
        "--refit-guard",
        action="store_true",
        help="also set the out-of-distribution guard's flag level on the site images "
        "(2.5%% of them flagged)",
    )
    p.add_argument(
        "--min-per-class",
        type=int,
        default=25,
        help="refuse with fewer labelled images of any class (default 25)",
    )
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT")
    p.add_argument(
        "--skip-bad-images", action="store_true", help="skip unreadable images instead of stopping"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_tracking(p)


def _add_operating_point(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--operating-point",
        default=None,
        metavar="RULE",
        help="two-class models: balanced (p >= 0.5 on the calibrated probability), "
        "cost_ratio=R (a missed case costs R false alarms), sensitivity=S (screening), "
        f"specificity=S (confirmation) or youden; {default}",
    )


def _cmd_calibrate(a: argparse.Namespace) -> int:
    from medlens.inference.site import calibrate_model

    if a.min_per_class < 1 or a.folds < 2:
        raise UsageError("--min-per-class must be >= 1 and --folds >= 2")
    settings = {"model": a.model, "data": a.data, "operating_point": a.operating_point,
                "refit_guard": a.refit_guard, "min_per_class": a.min_per_class,
                "folds": a.folds, "skip_bad_images": a.skip_bad_images}  # fmt: skip
    with _tracking(a, Path(a.out).name, out=a.out) as tracker:
        tracker.log_params({**settings, **_model_params(a.model)})
        res = calibrate_model(
            a.model,
            a.out,
            data=a.data,
            operating_point=a.operating_point,
            refit_guard=a.refit_guard,
            min_per_class=a.min_per_class,
            folds=a.folds,
            overwrite=a.overwrite,
            skip_bad_images=a.skip_bad_images,
            progress=not a.quiet,
        )
        _track_calibration(tracker, res)
    meta = res["meta"]
    print(_before_after(res["before"], res["after"], bool(a.data)))
    op = meta.operating_point
    if op:
        lo, hi = op.threshold_ci or (None, None)
        print(
            f"operating point {op.rule}: threshold {op.threshold:.6f} "
            f"[{lo:.4f}, {hi:.4f}] ({op.measured_on}, {op.n} images); temperature "
            f"{meta.temperature:.4f}"
        )
        if op.warning:
            log.warning("%s", op.warning)
    else:
        print(f"temperature {meta.temperature:.4f}; the most probable class is predicted")
    print(f"wrote {res['folder']}")
    return 0


def _track_calibration(tracker, res: dict) -> None:
    """The before/after metrics with their intervals, the new temperature and threshold, and
    the new model folder's card, model.json and reports."""
    from medlens.tracking import summary_metrics

    if not tracker.active:
        return
    meta, folder = res["meta"], Path(res["folder"])
    for side in ("before", "after"):
        if res[side]:
            tracker.log_metrics(summary_metrics(res[side], prefix=f"{side}_"))
    tracker.log_metrics({"temperature": meta.temperature, "threshold": meta.threshold})
    reports = sorted(str(p.relative_to(folder)) for p in folder.glob("eval/*/*")
                     if p.name in ("metrics.json", "report.html"))  # fmt: skip
    tracker.log_artifacts(folder, ["model.json", "model_card.json", "model_card.md", *reports])


def _before_after(before: dict | None, after: dict | None, site: bool) -> str:
    """The before/after table of ``calibrate``: each metric with its 95% interval."""
    titles = (
        ("base model", "site calibration, cross-fitted")
        if site
        else ("recorded rule", "restated rule")
    )
    rows = [f"{'':<20}{titles[0]:<28}{titles[1]}"]
    for key in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc", "ece"):
        cells = []
        for m in (before, after):
            v = None if m is None else m.get(key)
            ci = None if m is None else (m.get("ci") or {}).get(key)
            cells.append(
                "n/a" if v is None else f"{v:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            )
        rows.append(f"{key:<20}{cells[0]:<28}{cells[1]}")
    return "\n".join(rows)


def _add_audit(p: argparse.ArgumentParser) -> None:
    """shortcut audit: what a model can decide without looking at the anatomy

    On labelled images (at most --max-images, stratified by class): a no-anatomy baseline (a
    cross-validated gradient-boosted classifier on size, format, intensity, border, corner,
    solid-box and text-mark features), the model's AUC with the central anatomy masked and with
    the border masked, and the share of its Grad-CAM mass in the central region, with a verdict
    in plain words. Writes audit.json and audit.html into --out (default: the model folder;
    --record also puts the figures on the model card).
    """
    p.add_argument("--model", required=True, help="run folder, or a bundled/installed model name")
    p.add_argument("--data", required=True, help="labelled images (any layout evaluate reads)")
    p.add_argument("--out", default=None, help="folder for audit.json and audit.html")
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default=None,
        help="audit only the images the model recorded for this split (its "
        "eval/SPLIT/predictions.csv, paths relative to --data): the images it held out",
    )
    p.add_argument("--max-images", type=int, default=400, help="images audited (default 400)")
    p.add_argument(
        "--cam-images", type=int, default=100, help="images whose Grad-CAM is measured (100)"
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="write the audit into the model folder and its figures onto its card (model.json "
        "shortcut_audit, model_card.json/.md)",
    )
    p.add_argument(
        "--skip-bad-images", action="store_true", help="skip unreadable images instead of stopping"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _cmd_audit(a: argparse.Namespace) -> int:
    from medlens.reporting.audit import AUDIT_JSON, audit_model, audit_summary

    if a.max_images < 10 or a.cam_images < 1:
        raise UsageError("--max-images must be >= 10 and --cam-images >= 1")
    if a.record and a.out:
        raise UsageError("--record writes into the model folder: leave out --out")
    if not a.record and not a.out:
        raise UsageError("give --out DIR for audit.json and audit.html, or --record")
    record = audit_model(
        a.model,
        a.data,
        a.out,
        max_images=a.max_images,
        cam_images=a.cam_images,
        skip_bad_images=a.skip_bad_images,
        progress=not a.quiet,
        split=a.split,
    )
    if a.record:
        from medlens.artifacts.card import write_card
        from medlens.artifacts.model import read_meta
        from medlens.inference.predictor import Predictor

        folder = Predictor(a.model).folder
        meta = read_meta(folder)
        meta.extra["shortcut_audit"] = audit_summary(record)
        write_card(folder, meta)
    occ = record["occlusion"]
    print(
        f"n={record['n']}  no-anatomy baseline AUC {record['baseline']['auc']:.3f}  model AUC "
        f"{occ['auc']:.3f}  centre masked {occ['centre_masked_auc']:.3f}  border masked "
        f"{occ['border_masked_auc']:.3f}  Grad-CAM in centre "
        + (
            "n/a"
            if record["attention"]["centre_share"] is None
            else f"{record['attention']['centre_share']:.1%}"
        )
    )
    print(record["verdict"]["text"])
    print(f"wrote {Path(a.out or Predictor(a.model).folder) / AUDIT_JSON} and audit.html")
    return 0


def _add_predict(p: argparse.ArgumentParser) -> None:
    """predict images or folders

    Predict the label and calibrated class probabilities of images (PNG, JPEG, DICOM, ...)
    or folders (recursive).
    """
    p.add_argument("paths", nargs="+", help="image files and/or folders")
    p.add_argument("--model", required=True, help="run folder or bundled/installed model name")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument(
        "--out",
        default=None,
        help="write a CSV (path,label,p_<class>...,threshold,ood_flag,ood_score,ood_ratio,error); "
        "threshold: the binary decision threshold on the last class's probability (empty: "
        "argmax); ood_score: the guard's score (flagged above 1 for ensembles, else above the "
        "threshold in the model card); unreadable files "
        "are listed with their error instead of stopping the batch",
    )
    p.add_argument(
        "--format",
        choices=["fhir", "dicom-sr"],
        default=None,
        help="instead of the table: fhir, an HL7 FHIR R4 DiagnosticReport per image (printed as "
        "JSON lines, or one .fhir.json file per image in --out DIR); dicom-sr, a DICOM "
        "Structured Report per DICOM image, written into --out DIR (it carries the image's "
        "patient and study identifiers, so the PACS files it with the study)",
    )
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process; ray: Ray Data, a pool of actors each holding one ONNX "
        "Runtime session and decoding its own batches (pip install 'medlens[ray]'); the same "
        "columns either way; default %(default)s",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="with --engine ray: join this running Ray cluster (e.g. auto, ray://head:10001) "
        "instead of starting a local runtime",
    )
    p.add_argument(
        "--ray-workers", type=int, default=2, help="with --engine ray: actors; default 2"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--backend",
        choices=["onnx", "torch"],
        default="onnx",
        help="ONNX Runtime (model.onnx, or exported in memory when the folder has "
        "none) or torch; default %(default)s",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average each image's logits with its left-right mirror "
        "image's (about twice the compute; calibration was fitted without it)",
    )


def _expand_inputs(paths: list[str]) -> list[str]:
    """Files and folders (every image under them) -> files; a missing path stays in the
    list and becomes an error row."""
    from medlens.data.datasets import list_images

    files = []
    for p in paths:
        if p.lower().endswith(".csv") and (Path(p).is_file() or "://" in p):
            from medlens.fileio import read_path_manifest

            files += read_path_manifest(p)  # a manifest: its `path` column
        elif Path(p).is_dir():
            found = list_images(p)
            if not found:
                log.warning("warning: no images under %s", p)
            files += [str(f) for f in found]
        else:
            files.append(str(p))
    return files


def _predict_rows(pred: Predictor, files: list[str], batch_size: int, quiet: bool) -> list[dict]:
    """One row per file: label, probabilities and OOD flag, or the reason it is unreadable."""
    import numpy as np
    from tqdm.auto import tqdm

    from medlens.data.imaging import read_image
    from medlens.errors import ImageReadError

    rows = []
    bar = tqdm(total=len(files), unit="img", desc="predict", file=sys.stderr,
               disable=quiet or len(files) < 2)  # fmt: skip
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        done: dict[int, dict] = {}  # rows by position: the output keeps input order
        ok: list[int] = []
        prepared: list[np.ndarray] = []
        for j, f in enumerate(chunk):
            try:
                pixels = read_image(f, target_size=pred.pre.image_size).pixels
                prepared.append(pred.pre.prepare(pixels))
                ok.append(j)
            except (ImageReadError, OSError) as e:
                done[j] = {"path": f, "label": None, "error": str(e)}
        if prepared:
            for j, r in zip(ok, pred.predict_prepared(np.stack(prepared), batch_size)):
                probs = {f"p_{c}": v for c, v in r.probabilities.items()}
                done[j] = {"path": chunk[j], "label": r.label, **probs, "threshold": r.threshold,
                           "ood_flag": r.ood["flag"], "ood_score": r.ood["score"],
                           "ood_ratio": r.ood.get("ratio"), "error": None}  # fmt: skip
        rows += [done[j] for j in range(len(chunk))]
        bar.update(len(chunk))
    bar.close()
    return rows


def ood_text(ratio: float | None, flag: bool | None) -> str:
    from medlens.evaluation.ood import ood_text as text

    return text(ratio, flag)


def printable(text: str) -> str:
    """``text`` for a terminal table: control characters (a newline or tab in a file name)
    shown escaped (``\\n``), so no name can forge a row or a column."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _print_rows(pred: Predictor, rows: list[dict], as_json: bool) -> None:
    for r in rows:
        if as_json:
            probs = {c: r.get(f"p_{c}") for c in pred.labels} if r["label"] else None
            print(json.dumps({"path": r["path"], "model": pred.meta.name, "label": r["label"],
                              "probabilities": probs, "threshold": r.get("threshold"),
                              "ood_flag": r.get("ood_flag"), "ood_score": r.get("ood_score"),
                              "error": r["error"]}))  # fmt: skip
        elif r["error"]:
            print(f"{printable(r['path'])}\tERROR\t{printable(r['error'])}")
        else:
            cells = "  ".join(f"{c}={r[f'p_{c}']:.4f}" for c in pred.labels)
            ood = ood_text(r.get("ood_ratio"), r.get("ood_flag"))
            warn = f"\t{ood}" if ood else ""
            label = r["label"]
            if r.get("threshold") is not None:  # the decision rule beside its answer
                label += f" (p({pred.labels[1]}) >= {r['threshold']:.6f})"
            print(f"{printable(r['path'])}\t{label}\t{cells}{warn}")


def _predict_documents(a: argparse.Namespace, pred: Predictor, files: list[str]) -> int:
    """``predict --format fhir|dicom-sr``: one document per image (see medlens.interop)."""
    from medlens.artifacts.card import model_card, model_version
    from medlens.data.imaging import read_image
    from medlens.errors import ImageReadError
    from medlens.fileio import atomic_write_bytes
    from medlens.interop.documents import render

    if a.format == "dicom-sr" and not a.out:
        raise UsageError("--format dicom-sr writes files: give --out DIR (a folder)")
    out = Path(a.out) if a.out else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; with --format give a folder")
        out.mkdir(parents=True, exist_ok=True)
    card = model_card(pred.meta, pred.folder)
    about = {"name": pred.meta.name, "version": model_version(pred.meta, pred.folder),
             "title": card["title"]}  # fmt: skip
    failed = 0
    for f in files:
        try:
            img = read_image(f, target_size=pred.pre.image_size)
            doc = render(a.format, pred.predict_pixels([img.pixels])[0], about, card, img.dicom)
        except (ImageReadError, OSError, UsageError) as e:
            failed += 1
            print(f"{f}\tERROR\t{e}", file=sys.stderr)
            continue
        if out is None:
            print(json.dumps(json.loads(doc.content)))
        else:
            atomic_write_bytes(out / doc.filename, doc.content)
            print(f"{f}\t{out / doc.filename}")
    return 1 if files and failed == len(files) else 0


def _write_parquet(path: str, rows: list[dict], columns: list[str]) -> None:
    """The prediction rows as Parquet (pyarrow), written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medlens.fileio import atomic_write_bytes

    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _cmd_predict(a: argparse.Namespace) -> int:
    from medlens.fileio import write_csv
    from medlens.inference.predictor import Predictor

    pred = Predictor(a.model, backend=a.backend, tta=a.tta)
    if a.format:
        return _predict_documents(a, pred, _expand_inputs(a.paths))
    files = _expand_inputs(a.paths)
    if a.engine == "ray":
        from medlens.inference.ray_engine import predict_on_ray

        rows = predict_on_ray(str(pred.folder), files, address=a.ray_address,
                              workers=a.ray_workers, batch_size=a.batch_size, tta=a.tta)  # fmt: skip
    else:
        rows = _predict_rows(pred, files, a.batch_size, a.quiet)
    failed = sum(r["error"] is not None for r in rows)
    if a.out:
        cols = ["path", "label"] + [f"p_{c}" for c in pred.labels]
        cols += ["threshold", "ood_flag", "ood_score", "ood_ratio", "error"]
        if a.out.lower().endswith(".parquet"):
            _write_parquet(a.out, rows, cols)
        else:
            write_csv(a.out, rows, cols)
        print(f"wrote {len(rows)} rows to {a.out} ({failed} unreadable)", file=sys.stderr)
    if a.json or not a.out:
        _print_rows(pred, rows, a.json)
    # Nothing could be predicted: a failed run, as for any batch tool (exit 1).
    return 1 if failed and failed == len(rows) else 0


def _add_explain(p: argparse.ArgumentParser) -> None:
    """Grad-CAM overlay for one image

    Write a Grad-CAM heat map of the last backbone stage (MONAI GradCAM with a run's torch
    weights; the ONNX graph's identical closed-form map for inference-only models such as
    the bundled ones) blended over the image.
    """
    p.add_argument("image", help="image file (PNG, JPEG, DICOM, ...)")
    p.add_argument("--model", required=True, help="run folder or bundled/installed model name")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument(
        "--class",
        dest="class_name",
        default=None,
        help="multi-class: explain this class instead of the predicted one",
    )


def _cmd_explain(a: argparse.Namespace) -> int:
    from PIL import Image

    from medlens.data.imaging import read_image
    from medlens.fileio import atomic_write_bytes
    from medlens.inference.cam import overlay_cam
    from medlens.inference.predictor import Predictor

    pred = Predictor(a.model)
    pixels = read_image(a.image, target_size=pred.pre.image_size).pixels
    idx = None
    if a.class_name is not None:
        if a.class_name not in pred.labels:
            raise UsageError(f"--class {a.class_name!r} is not one of {pred.labels}")
        idx = pred.labels.index(a.class_name)
    cam, _ = pred.explain(pixels, idx)
    over = overlay_cam(pixels, cam, size=max(pred.pre.image_size, 224))
    import io

    buf = io.BytesIO()
    Image.fromarray(over).save(buf, format="PNG")
    atomic_write_bytes(a.out, buf.getvalue())
    r = pred.predict_pixels([pixels])[0]
    ood = ood_text(r.ood.get("ratio"), r.ood.get("flag"))
    print(f"{printable(a.image)}\t{r.label}\t"
          + "  ".join(f"{c}={v:.4f}" for c, v in r.probabilities.items())
          + (f"\t{ood}" if ood else ""))  # fmt: skip
    if r.ood.get("flag"):
        log.warning(
            "warning: %s is out of distribution for %s (%.2fx the flag level): the heat map "
            "explains a label that should not be trusted", a.image, pred.meta.name, r.ood["ratio"],
        )  # fmt: skip
    print(f"wrote {a.out}")
    return 0


def _add_pacs(p: argparse.ArgumentParser) -> None:
    """classify a study's images on a PACS (DICOMweb) and store DICOM SRs back

    Find the image instances of each --study on a DICOMweb server (QIDO-RS), fetch them
    (WADO-RS), predict with --model, and store a DICOM Structured Report about each image
    into the same study (STOW-RS). Everything stays in memory; the summary names instances
    by series and instance number only.
    """
    p.add_argument(
        "--url",
        required=True,
        help="the server's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web",
    )
    p.add_argument("--model", required=True, help="run folder or bundled/installed model name")
    p.add_argument(
        "--study",
        action="append",
        required=True,
        metavar="UID",
        help="Study Instance UID (repeatable)",
    )
    p.add_argument("--no-store", action="store_true", help="predict only; store no reports")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per study")
    p.add_argument(
        "--timeout",
        type=float,
        default=30,
        help="seconds each request may take in all (a server that answers a byte at a time "
        "is stopped too); default 30",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="predict and say which reports would be stored or skipped; store nothing",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="store a report even where this model version stored one before (by default such "
        "instances are skipped, so running twice stores no duplicates)",
    )


def _cmd_pacs(a: argparse.Namespace) -> int:
    from medlens.artifacts.card import model_card, model_version
    from medlens.inference.predictor import Predictor
    from medlens.interop.pacs import round_trip

    pred = Predictor(a.model)
    card = model_card(pred.meta, pred.folder)
    about = {"name": pred.meta.name, "version": model_version(pred.meta, pred.folder),
             "title": card["title"]}  # fmt: skip
    if a.timeout <= 0:
        raise UsageError("--timeout must be > 0 seconds")
    res = round_trip(a.url, a.study, pred, about, card, store=not (a.no_store or a.dry_run),
                     limit=a.limit, timeout=a.timeout, force=a.force,
                     dry_run=a.dry_run)  # fmt: skip
    for line in res.lines:
        print(printable(line))
    print(
        f"{len(res.stored)} report(s) stored, {res.skipped} already there, {res.failed} "
        "image(s) could not be used" + (" (dry run: nothing stored)" if a.dry_run else "")
    )
    return 1 if res.failed and not (res.stored or res.skipped) and not a.dry_run else 0


def _add_compare(p: argparse.ArgumentParser) -> None:
    """compare runs side by side, or models on the same images with paired tests

    Without --data: print a table and write plots comparing run folders (their validation
    evaluation unless --split says otherwise). With --data FOLDER: score every model (bundled
    names, model or run folders; the first is the reference, the current model) on the same
    images and test each other model against it: McNemar for accuracy, DeLong for AUC, with
    the difference and its 95% interval. --promote-if-not-worse MARGIN exits 0 only when the
    candidate is non-inferior at that margin (1 otherwise), to gate a retrained model.
    """
    p.add_argument(
        "models",
        nargs="+",
        help="run folders; with --data also bundled model names or model folders (the first "
        "is the reference)",
    )
    p.add_argument(
        "--split", default=None, help="which evaluation of each run: val (default) or test"
    )
    p.add_argument(
        "--out",
        default=None,
        help="folder for compare.html and compare.csv (default: compare); with --data, "
        "where compare.json is written (default: nothing written)",
    )
    p.add_argument(
        "--data",
        metavar="FOLDER",
        help="score every model on this labelled folder (<root>/<class>/<image>) and add "
        "paired tests",
    )
    p.add_argument("--json", action="store_true", help="with --data: print one JSON object")
    p.add_argument(
        "--promote-if-not-worse",
        type=float,
        metavar="MARGIN",
        help="with --data and two models (current, candidate): exit 0 when the lower 95%% "
        "bound of (candidate - current) is >= -MARGIN for accuracy and AUC, else 1",
    )
    p.add_argument(
        "--skip-bad-images", action="store_true", help="skip unreadable images instead of stopping"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _cmd_compare(a: argparse.Namespace) -> int:
    from medlens.reporting.compare import compare_on_data, compare_runs, paired_table

    if a.data is None:
        if a.json or a.promote_if_not_worse is not None:
            raise UsageError(
                "--json and --promote-if-not-worse need --data FOLDER (the images every "
                "model is scored on)"
            )
        table, html = compare_runs(a.models, a.out or "compare", split=a.split or "val")
        print(table)
        print(f"wrote {html}")
        return 0
    if a.split is not None:
        raise UsageError("--split reads the runs' own evaluations; it cannot go with --data")
    res = compare_on_data(
        a.models,
        a.data,
        margin=a.promote_if_not_worse,
        skip_bad_images=a.skip_bad_images,
        progress=not a.quiet and not a.json,
    )
    if a.out:
        from medlens.fileio import write_json

        Path(a.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(a.out) / "compare.json", res)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(paired_table(res))
    if a.out:
        log.info("wrote %s", Path(a.out) / "compare.json")
    verdict = res["promotion"]
    if verdict is not None and not verdict["promote"]:
        if a.json:  # the JSON carries the verdict; say it on stderr too
            from medlens.reporting.compare import promotion_line

            print(promotion_line(verdict), file=sys.stderr)
        return 1
    return 0


def _add_monitor(p: argparse.ArgumentParser) -> None:
    """served models' drift, OOD flags and feedback, from the prediction record

    Per model and per day from the record `medlens serve` keeps (--db): predictions, images
    the OOD guard flagged, feedback and agreement, the predicted-label mix against the
    training prevalence, the prevalence estimated by EM (Saerens et al. 2002), and the drift
    of each class probability against the validation split (PSI, Kolmogorov-Smirnov), with
    the alerts raised.
    """
    p.add_argument("--db", default=None, metavar="URL",
                   help="the record (default: the one `medlens serve` uses)")  # fmt: skip
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="only these models (repeatable); default every model in the record")  # fmt: skip
    p.add_argument("--models", action="append", default=[], metavar="DIR",
                   help="model folders the served models came from, as given to serve")  # fmt: skip
    p.add_argument("--days", type=int, default=7, help="days back, today included; default 7")
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    p.add_argument("--fail-on-alert", action="store_true",
                   help="exit 1 when any alert is raised (for a scheduled check)")  # fmt: skip


def _monitor_text(rep: dict) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    lines = [f"{rep['model']}: {rep['predictions']} predictions since {rep['since'][:10]}, "
             f"{rep['ood_flagged']} flagged out-of-distribution ({pct(rep['ood_rate'])}), "
             f"{rep['feedback']} feedback (agreement {pct(rep['feedback_agreement'])})",
             f"  {'day':<10} {'n':>5} {'ood':>5} {'fb':>4} {'agree':>6} {'max PSI':>8} "
             f"{'min KS p':>9}  EM prevalence"]  # fmt: skip
    for d in rep["per_day"]:
        psi = max((d["psi"] or {}).values(), default=None)
        ks_p = min((v["p_value"] for v in (d["ks"] or {}).values()), default=None)
        em = d["em_prevalence"] or {}
        lines.append(
            f"  {d['day']:<10} {d['predictions']:>5} {pct(d['ood_rate']):>5} {d['feedback']:>4} "
            f"{pct(d['feedback_agreement']):>6} {'-' if psi is None else f'{psi:.2f}':>8} "
            f"{'-' if ks_p is None else f'{ks_p:.1e}':>9}  "
            + ", ".join(f"{k} {v:.0%}" for k, v in em.items())
        )
    lines += [f"  ALERT {a['signal']}: {a['message']}" for a in rep["alerts"]] or ["  no alert"]
    return "\n".join(lines)


def _cmd_monitor(a: argparse.Namespace) -> int:
    from medlens.artifacts.folders import find_models
    from medlens.monitoring.signals import monitoring_report
    from medlens.monitoring.store import open_store

    if a.days < 1:
        raise UsageError("--days must be >= 1")
    store = open_store(a.db, migrate_schema=False)
    folders = find_models(a.models)
    names = a.model or store.models()
    missing = [n for n in names if n not in folders]
    if missing:
        raise UsageError(
            f"no model folder for {', '.join(missing)}: pass the folders they were served "
            "from with --models DIR"
        )
    reports = [monitoring_report(store, n, folders[n], a.days) for n in names]
    if a.json:
        print(json.dumps({"db": store.url, "models": reports}, indent=1, default=str))
    else:
        print("\n\n".join(_monitor_text(r) for r in reports) or f"no predictions in {store.url}")
    return 1 if a.fail_on_alert and any(r["alerts"] for r in reports) else 0


def _add_feedback(p: argparse.ArgumentParser) -> None:
    """export clinicians' feedback as a data set to retrain on

    `medlens feedback export --db URL --out DIR [--images DIR]` writes DIR/feedback.csv (every
    feedback answer, with the model's and the clinician's label) and, with --images (the folder
    `medlens serve --keep-feedback-images` kept), the labelled images as an image folder per
    model, DIR/<model>/<label>/<prediction_id>.png, ready for `medlens train --init-from`.
    """
    p.add_argument("action", choices=["export"], metavar="action", help="what to do: export")
    p.add_argument("--db", default=None, metavar="URL",
                   help="the record (default: the one `medlens serve` uses)")  # fmt: skip
    p.add_argument("--out", required=True, help="folder for feedback.csv and the images")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="the --keep-feedback-images folder of the server")  # fmt: skip


def _cmd_feedback(a: argparse.Namespace) -> int:
    from medlens.monitoring.export import export_feedback
    from medlens.monitoring.store import open_store

    res = export_feedback(open_store(a.db, migrate_schema=False), a.out, a.images)
    print(f"wrote {res['csv']}: {res['feedback']} feedback answers, {res['images']} images")
    return 0


def _add_models(p: argparse.ArgumentParser) -> None:
    """list backbones and trained models

    List the backbone registry (with parameter counts), the bundled models and the models in
    --models folders.
    """
    p.add_argument(
        "--models",
        action="append",
        default=[],
        metavar="DIR",
        help="also list the model folders in DIR (as `medlens serve --models`)",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="print a Markdown table of the models' cards instead (stored size, decision rule, "
        "each split's figures with 95%% intervals): the model table of the README and "
        "docs/models.md",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="check each model folder's model.json against its schema (format version, every "
        "section's fields) instead: one line per problem, exit 2 when any model fails",
    )


def _check_models(model_dirs: list[str]) -> int:
    """``medlens models --check``: each listed model's ``model.json`` validated (see
    :mod:`medlens.artifacts.schema`); problems on stderr, one line each."""
    from medlens.artifacts.folders import find_models
    from medlens.artifacts.model import read_meta
    from medlens.errors import ModelLoadError

    found, failed = find_models(model_dirs), 0
    for name, folder in found.items():
        try:
            read_meta(folder)
        except ModelLoadError as e:
            failed += 1
            print(f"medlens models: error: {e}", file=sys.stderr)
        else:
            print(f"ok      {name:<20} {folder}")
    if failed:
        print(f"{failed} of {len(found)} model(s) failed the check")
        return EXIT_USAGE
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    from medlens.artifacts.folders import bundled_models_dir, find_models
    from medlens.artifacts.model import read_meta
    from medlens.modeling.registry import count_parameters, create_model, list_models, model_info

    if a.check:
        return _check_models(a.models)
    if a.table:
        from medlens.artifacts.card import models_table

        print(models_table(find_models(a.models)))
        return 0

    print("backbones (medlens train --model NAME):")
    for name in list_models():
        info = model_info(name)
        n = count_parameters(create_model(name, 1, 3, pretrained=False))
        print(f"  {name:<20} {n / 1e6:6.2f}M params  {info.description}")
    found = find_models(a.models)
    print("trained models (what to pass as `medlens predict --model`; `serve --models DIR` "
          "serves a folder's models by name):")  # fmt: skip
    if not found:
        print("  none bundled; train one with `medlens train --out RUN` and pass the run folder")
    for name, folder in found.items():
        meta = read_meta(folder)
        bundled = folder.parent == bundled_models_dir()
        ref = name if bundled else str(folder)  # predict finds bundled models by name only
        print(f"  {ref:<20} {meta.arch}  labels: {', '.join(meta.labels)}"
              + ("  (bundled)" if bundled else ""))  # fmt: skip
    print(
        "another disease: `medlens train --data YOUR_FOLDER --out "
        "runs/NAME`, `medlens export --model runs/NAME --bundle models/NAME --half`, then "
        "`medlens serve --models models/` (docs/development.md: Adding your own model)"
    )
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    """export a model to ONNX and write its model card

    Write model.onnx (checked against the torch network on random input), model_card.json
    and model_card.md into the model folder. Card fields (intended_use, limitations,
    modality, ...) are read from a `card` dict in model.json (a recipe's `card:` section).
    With --bundle, write an inference-only folder instead (model.json, model.onnx, ood.npz,
    card; no model.pt), its metrics re-measured on the shipped file: what `medlens serve
    --models` and the bundled models use. With several --model runs and --bundle, the folder
    is their ensemble: one ONNX graph averaging their logits and Grad-CAM maps, an OOD guard
    over every member's statistics, calibration refitted on the validation images they share.
    """
    p.add_argument(
        "--model",
        required=True,
        nargs="+",
        metavar="RUN",
        help="run folder or bundled model name; several runs, or a cross-validation folder "
        "(`medlens train --folds K`: its folds), with --bundle: an ensemble",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument(
        "--bundle",
        default=None,
        metavar="DEST",
        help="write an inference-only model folder DEST (its name is the model's "
        "name in the app) instead of adding files to the run",
    )
    p.add_argument(
        "--half",
        action="store_true",
        help="with --bundle: store weights as float16 (half the size; computation "
        "stays float32; metrics are re-measured after this step)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="with --bundle: store weight kernels as 8-bit integers with a scale per output "
        "channel (a quarter of float32's size, e.g. to ship an ensemble; computation stays "
        "float32; metrics are re-measured after this step)",
    )
    p.add_argument("--overwrite", action="store_true", help="with --bundle: replace DEST")
    p.add_argument(
        "--card",
        default=None,
        metavar="YAML",
        help="with --bundle: take the model-card text from this file's `card:` "
        "section (a recipe), over what the run recorded",
    )
    _add_operating_point(
        p,
        "with --bundle: chosen again on the shipped file's validation "
        "probabilities (default: the run's rule)",
    )
    p.add_argument(
        "--refit-ood",
        action="store_true",
        help="with --bundle: first fit the run's out-of-distribution guard again from "
        "its training data and splits (config.yaml), for runs trained before "
        "the guard took its current form",
    )


def _expand_folds(models: list[str]) -> str | list:
    """--model arguments with each cross-validation folder replaced by its fold runs (an
    ensemble of the folds); one plain run stays a single model."""
    from medlens.artifacts.folders import cv_members

    runs: list = []
    for model in models:
        folds = cv_members(model)
        runs.extend(folds if folds is not None else [model])
    return runs[0] if len(runs) == 1 else runs


def _cmd_export(a: argparse.Namespace) -> int:
    from medlens.artifacts.card import export_model
    from medlens.artifacts.onnx import OPSET

    if a.bundle:
        from medlens.inference.bundle import make_bundle

        runs = _expand_folds(a.model)
        if a.refit_ood:
            from medlens.artifacts.folders import resolve_model
            from medlens.training.guard_fit import refit_ood_guard

            for model in [runs] if isinstance(runs, str) else runs:
                refit_ood_guard(resolve_model(model))
        card = None
        if a.card:
            card = read_yaml(a.card, "--card").get("card")
            if not isinstance(card, dict):
                raise UsageError(f"--card {a.card}: no `card:` section in it")
        res = make_bundle(
            runs,
            a.bundle,
            half=a.half,
            int8=a.int8,
            overwrite=a.overwrite,
            card=card,
            operating_point=a.operating_point,
        )
        print(
            f"wrote {res['folder']} (model.onnx {res['onnx_bytes'] / 1e6:.1f} MB; largest "
            f"probability change against the run {res['max_prob_change']:.2e})"
        )
        return 0
    if a.half or a.int8 or a.overwrite or a.refit_ood or a.card or a.operating_point:
        raise UsageError(
            "--half, --int8, --overwrite, --card, --operating-point and --refit-ood go with "
            "--bundle DEST (`medlens calibrate --model M --out NEW --operating-point RULE` "
            "restates a model's rule)"
        )
    if len(a.model) > 1 or not isinstance(_expand_folds(a.model), str):
        raise UsageError(
            "several --model runs (or a cross-validation folder's folds) make an "
            "ensemble: give --bundle DEST too"
        )
    res = export_model(a.model[0], opset=a.opset or OPSET)
    print(
        f"wrote {res['onnx']} (max relative difference to torch "
        f"{res['relative_error']:.1e}), {res['card_json']}, {res['card_md']}"
    )
    return 0


def _add_serve(p: argparse.ArgumentParser) -> None:
    """web app and REST API

    Serve the diagnose page (/), the training dashboard (/dashboard), the REST API (/api/v1)
    and its docs (/docs) with uvicorn. Models: the bundled ones plus --models.
    """
    p.add_argument("--host", default="127.0.0.1", help="default %(default)s (this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default %(default)s")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes on the one port, each loading the models once (stateless: "
        "any process answers any request; the rate limit counts per process); default 1",
    )
    p.add_argument(
        "--models",
        action="append",
        default=[],
        metavar="DIR",
        help="a model/run folder, or a folder of them (repeatable)",
    )
    p.add_argument(
        "--no-bundled",
        action="store_true",
        help="serve only the --models folders, not the bundled models",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=20,
        help="refuse uploads larger than this (413); default %(default)s",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average each image's logits with its left-right mirror "
        "image's (about twice the compute; calibration was fitted without it)",
    )
    _add_serve_access(p)
    _add_serve_record(p)


def _add_serve_record(p: argparse.ArgumentParser) -> None:
    from medlens.monitoring import DATA_DIR_ENV

    g = p.add_argument_group("prediction record, feedback and monitoring")
    g.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help="the prediction record (SQLAlchemy URL): each prediction's id, time, model, "
        "version, the upload's sha256, label, probabilities, threshold, OOD verdict and latency "
        "(never the image, a file name or a DICOM field). Default: the SQLite file "
        f"records.db in ${DATA_DIR_ENV} (default ~/.local/share/medlens, which must be "
        "writable); postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB when several workers or "
        "machines share one record",
    )
    g.add_argument(
        "--no-record", action="store_true", help="keep no record (no feedback, no monitoring)"
    )
    g.add_argument(
        "--keep-days",
        type=float,
        default=365.0,
        help="delete recorded predictions (and their feedback) older than this; default "
        "%(default)s",
    )
    g.add_argument(
        "--keep-feedback-images",
        default=None,
        metavar="DIR",
        help="PRIVACY: keep patient images on disk. Every recorded upload's decoded pixels wait "
        "in DIR/pending/ (PNG named by the random prediction id; no DICOM header, but text "
        "burnt into the pixels stays) for 24 hours, and those that receive feedback are kept "
        "in DIR/kept/ until you delete them, for `medlens feedback export`. Off by default: "
        "no image is ever written",
    )


def _add_serve_access(p: argparse.ArgumentParser) -> None:
    """``medlens serve``'s access and abuse options (key, hosts, limits, timeouts)."""
    p.add_argument(
        "--api-key-file",
        metavar="F",
        help="require this key (the file's text, >= 16 characters): `Authorization: Bearer "
        "KEY` on the API, a login with it for the pages; or set MEDLENS_API_KEY. Required "
        "when --host is not a loopback address",
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a non-loopback --host without a key (only behind your own access control)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header name the server answers (repeatable); default: localhost and "
        "127.0.0.1 on a loopback --host, else the --host itself (any host on 0.0.0.0)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="prediction requests in flight per server process; more get a 503 with "
        "Retry-After (bounds the memory held by uploads); health checks and pages are never "
        "refused by it, and half-sent connections do not count; default %(default)s",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="close a connection whose request headers have not all arrived after this many "
        "seconds; default %(default)s",
    )
    p.add_argument(
        "--rate-limit",
        default="30/second",
        help="per-client request limit, e.g. 30/second or '20/second;600/minute' (429 past it), "
        "or off; default %(default)s",
    )


def _serve_security(a: argparse.Namespace):
    """The :class:`~medlens.serve.security.SecurityPolicy` of the serve flags."""
    from medlens.serve.security import (
        SecurityPolicy,
        allowed_hosts_for,
        is_loopback,
        parse_rate_limit,
        read_api_key,
    )

    key = read_api_key(a.api_key_file) if a.api_key_file else None
    if key is None and os.environ.get("MEDLENS_API_KEY"):
        key = os.environ["MEDLENS_API_KEY"].strip()
        if len(key) < 16:
            raise UsageError("MEDLENS_API_KEY: use a key of at least 16 characters")
    if key is None and not is_loopback(a.host) and not a.insecure_no_auth:
        raise UsageError(
            f"--host {a.host} makes the server reachable from the network: give "
            "--api-key-file F (or MEDLENS_API_KEY) so that only key holders can use it, or "
            "--insecure-no-auth if your own proxy controls access"
        )
    return SecurityPolicy(
        api_key=key,
        allowed_hosts=allowed_hosts_for(a.host, a.allowed_host),
        rate_limit=parse_rate_limit(a.rate_limit),
    )


def _check_port(host: str, port: int) -> None:
    """Refuse, in one line, an address the server could not listen on (a port in use, a host
    this machine does not have), before any model is loaded."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(
                    f"port {port} on {host} is in use (another medlens serve?); stop that "
                    "server or choose another --port"
                ) from None
            raise UsageError(
                f"cannot listen on {host}:{port} ({e.strerror}); choose another --host or --port"
            ) from None


def _cmd_serve(a: argparse.Namespace) -> int:
    from medlens.monitoring.store import default_db_url
    from medlens.serve import serve
    from medlens.serve.settings import ServeSettings

    _check_port(a.host, a.port)
    if a.no_record and (a.db or a.keep_feedback_images):
        raise UsageError("--no-record keeps no record: leave out --db and --keep-feedback-images")
    settings = ServeSettings(
        model_dirs=tuple(a.models),
        max_upload_bytes=int(a.max_upload_mb * 1024 * 1024),
        bundled=not a.no_bundled,
        tta=a.tta,
        log_level=a.log_level,
        max_in_flight=a.max_connections,
        security=_serve_security(a),
        record_url=None if a.no_record else (a.db or default_db_url()),
        keep_days=a.keep_days,
        feedback_images=a.keep_feedback_images,
    )
    serve(a.host, a.port, settings, header_timeout=a.header_timeout, processes=a.workers)
    return 0


def _add_bench(p: argparse.ArgumentParser) -> None:
    """benchmark inference, the web app under load and training speed

    Measure on this machine, in one run: network latency p50/p95 at batch 1 and throughput
    at batch 32 through eager torch, ONNX Runtime fp32 and (when the folder ships
    model.int8.onnx) int8; the web app under load (`medlens serve` on 127.0.0.1, N
    keep-alive connections posting one synthetic 1024x1024 JPEG: requests/s, p50/p95,
    errors); and, with --train-log, a finished run's training images/s and time to its best
    validation AUC. Writes bench-<time>.json/.csv and latest.json/.csv/.md into --out.
    """
    p.add_argument(
        "--model", default="pneumonia", help="run folder or bundled model name; default %(default)s"
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    p.add_argument(
        "--out", default="bench/results", help="folder for the result files; default %(default)s"
    )
    p.add_argument(
        "--n", type=int, default=50, help="measured batch-1 runs per engine; default %(default)s"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=20.0,
        help="seconds of measured web-app load (after --warmup); default %(default)s",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=3.0,
        help="seconds of unmeasured load first; default %(default)s",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="simultaneous connections of the load generator; default %(default)s",
    )
    p.add_argument(
        "--image", default=None, help="upload this image file instead of the synthetic JPEG"
    )
    p.add_argument(
        "--train-log",
        default=None,
        metavar="RUN",
        help="run folder whose training_metrics.csv and model.json give the "
        "training figures (nothing is retrained)",
    )
    p.add_argument(
        "--target-auc",
        type=float,
        default=None,
        help="with --train-log: also report the epoch time to this validation AUC",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads of torch and ONNX Runtime for the inference figures "
        "(default: each library's own, every core)",
    )
    p.add_argument(
        "--torch-model",
        default=None,
        metavar="RUN",
        help="time eager torch with this run's model.pt (for an inference-only "
        "--model such as a bundled one, which has no model.pt: the run it was "
        "exported from)",
    )
    p.add_argument("--no-inference", action="store_true", help="skip the inference figures")
    p.add_argument("--no-serve", action="store_true", help="skip the web-app load test")


def _cmd_bench(a: argparse.Namespace) -> int:
    from medlens.bench import run_bench, summary_table, write_results

    if a.n < 1 or a.duration <= 0 or a.concurrency < 1 or a.warmup < 0 or (a.threads or 1) < 1:
        raise UsageError(
            "--n, --concurrency and --threads must be >= 1, --duration > 0, --warmup >= 0"
        )
    image = Path(a.image).read_bytes() if a.image else None
    same = ("n", "duration", "concurrency", "train_log", "target_auc", "threads", "torch_model")
    res = run_bench(
        a.model,
        warmup_s=a.warmup,
        inference=not a.no_inference,
        serve=not a.no_serve,
        image=image,
        **{k: getattr(a, k) for k in same},  # options named as run_bench's parameters
    )
    paths = write_results(res, a.out)
    if a.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print(summary_table(res), end="")
    print(f"wrote {paths['json']} and {paths['latest_md']}", file=sys.stderr)
    return 0


COMMANDS = {
    "train": (_add_train, _cmd_train),
    "tune": (_add_tune, _cmd_tune),
    "evaluate": (_add_evaluate, _cmd_evaluate),
    "predict": (_add_predict, _cmd_predict),
    "explain": (_add_explain, _cmd_explain),
    "calibrate": (_add_calibrate, _cmd_calibrate),
    "audit": (_add_audit, _cmd_audit),
    "compare": (_add_compare, _cmd_compare),
    "monitor": (_add_monitor, _cmd_monitor),
    "feedback": (_add_feedback, _cmd_feedback),
    "pacs": (_add_pacs, _cmd_pacs),
    "models": (_add_models, _cmd_models),
    "export": (_add_export, _cmd_export),
    "serve": (_add_serve, _cmd_serve),
    "bench": (_add_bench, _cmd_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medlens", description="Train, evaluate, explain and serve medical image classifiers."
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="debug messages, and the full traceback when something fails",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add, _) in COMMANDS.items():
        # Each command's one-line help and description are its options function's docstring.
        summary, _, description = (add.__doc__ or "").partition("\n\n")
        add(sub.add_parser(name, help=summary, description=" ".join(description.split())))
    for p in sub.choices.values():  # `medlens train ... --debug` works too
        p.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="debug messages, and the full traceback when something fails",
        )
    return parser


def _configure_logging(debug: bool) -> None:
    """MedLens's messages go to stderr (stdout carries results: tables, CSV, JSON)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(name)s: %(message)s" if debug else "%(message)s")
    )
    root = logging.getLogger("medlens")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


def _run(args: argparse.Namespace) -> int:
    """Run a parsed command: 0 done, 2 a user error (one line), 1 a bug, 130 interrupted."""
    name = f"medlens {args.command}"
    try:
        return COMMANDS[args.command][1](args)
    except MedLensError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"{name}: error: {e.filename or e}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "medlens: interrupted; a training run can be continued with --resume", file=sys.stderr
        )
        return 130
    except ModuleNotFoundError as e:
        extra = EXTRA_OF_MODULE.get((e.name or "").split(".")[0])
        if extra is None:
            return _bug(args, e)
        print(f"{name}: error: this needs MedLens's `{extra}` extra (the package {e.name!r} is "
              f"not installed): pip install 'medlens[{extra}]'", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    except BrokenPipeError:  # `medlens models --table | head`: the reader left; not a bug
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _bug(args, e)
        # Every file is written atomically: nothing half-written is left behind.
        print(
            f"{name}: error: no space left on the disk while writing {e.filename or 'a file'}; "
            "free some space and run the command again"
            + (" (with --resume to continue the training run)" if args.command == "train" else ""),
            file=sys.stderr,
        )
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - a bug: say so briefly, traceback with --debug
        return _bug(args, e)


def _bug(args: argparse.Namespace, e: BaseException) -> int:
    """A bug: say so briefly; the traceback with --debug."""
    if args.debug:
        traceback.print_exception(e)
    print(
        f"medlens {args.command}: internal error ({type(e).__name__}: {e}). This is a bug in "
        "MedLens; run the command again with --debug for the traceback and report it.",
        file=sys.stderr,
    )
    return EXIT_BUG


def main(argv: list[str] | None = None) -> int:
    # Parse first: --help and usage errors should not wait for torch to import.
    args = build_parser().parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    if args.command in ("bench", "serve"):
        # Before torch loads its OpenMP runtime: idle torch threads that spin-wait (the
        # default) steal a core from ONNX Runtime running beside them (bench: ONNX p50
        # measured 14.8 ms with spinning, 9.95 ms without, same machine and model; the web
        # app runs torch preprocessing and ONNX Runtime in the same process).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.command != "serve":  # serve sets up logging with uvicorn's --log-level
        _configure_logging(args.debug)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
