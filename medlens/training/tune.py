"""Hyperparameter search with Optuna: ``medlens tune``.

Each trial trains a run (``OUT/trial-N``) with settings drawn by Optuna's TPE sampler from the
search space over a base configuration (defaults, ``--config``, typed flags), and is scored by
the calibrated validation AUC of that run (patient-grouped validation split), or the mean
validation AUC over ``--folds K`` grouped folds. Single-split trials report their validation
AUC after every epoch, so the median pruner stops unpromising ones early. The study lives in
``OUT/study.db`` (SQLite): running the command again continues it up to ``--trials``, and
``optuna`` tools can inspect it. The best trial is written as a recipe (``OUT/best.yaml``);
``OUT/trials.csv`` and ``OUT/tune.html`` (table and plot) show every trial.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import yaml

from medlens.artifacts.folders import (
    BEST_YAML,
    CV_JSON,
    STUDY_DB,
    TRIALS_CSV,
    TUNE_HTML,
    ModelFolder,
)
from medlens.config import RECORDED_FACTS, TrainConfig
from medlens.errors import ConfigError, TrainError
from medlens.fileio import atomic_write_text, write_csv
from medlens.modeling.registry import model_info
from medlens.reporting.report import write_tune_report
from medlens.tracking import NO_TRACKING, Tracker
from medlens.training.cv import train_folds
from medlens.training.trainer import train

__all__ = ["DEFAULT_SPACE", "tune", "check_space"]

log = logging.getLogger(__name__)

# setting: {"low", "high", "log"} for numbers (ints when both bounds are ints) or {"choices"}
DEFAULT_SPACE = {
    "lr": {"low": 1e-4, "high": 3e-3, "log": True},
    "weight_decay": {"low": 1e-5, "high": 1e-3, "log": True},
    "dropout": {"low": 0.1, "high": 0.5},
    "label_smoothing": {"low": 0.0, "high": 0.2},
    "unfreeze": {"low": 1, "high": 4},
    "finetune_lr_scale": {"low": 0.03, "high": 0.3, "log": True},
}


def check_space(space: dict) -> dict:
    """Refuse names that are not settings and ranges that are not ranges.

    Raises:
        ConfigError: the space is malformed.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"data", "out", "fold", "folds"}
    for name, spec in space.items():
        if name not in names or not isinstance(spec, dict):
            raise ConfigError(
                f"search space: {name!r} is not a training setting; known: {sorted(names)}"
            )
        if "choices" in spec:
            if not spec["choices"]:
                raise ConfigError(f"search space: {name}: choices is empty")
        elif not {"low", "high"} <= set(spec) or not spec["low"] < spec["high"]:
            raise ConfigError(f"search space: {name}: give low < high, or choices")
    return space


def _default_space(base: TrainConfig) -> dict:
    """:data:`DEFAULT_SPACE`, without the fine-tuning settings where nothing is fine-tuned."""
    finetunes = (
        base.transfer == "finetune" and base.pretrained and model_info(base.model).pretrained
    )
    drop = set() if finetunes else {"unfreeze", "finetune_lr_scale"}
    return {k: v for k, v in DEFAULT_SPACE.items() if k not in drop}


def _suggest(trial, space: dict) -> dict:
    params = {}
    for name, spec in space.items():
        if "choices" in spec:
            params[name] = trial.suggest_categorical(name, list(spec["choices"]))
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            params[name] = trial.suggest_int(
                name, spec["low"], spec["high"], log=spec.get("log", False)
            )
        else:
            params[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                               log=spec.get("log", False))  # fmt: skip
    return params


def _objective(base: TrainConfig, space: dict, out: Path, tracker: Tracker = NO_TRACKING):
    import optuna

    def run(trial: optuna.Trial) -> float:
        # With tracking, each trial is a nested MLflow run (trial-N) of the study's run.
        with tracker.child(f"trial-{trial.number}") as trial_tracker:
            return _trial(trial, base, space, out, trial_tracker)

    return run


def _trial(trial, base: TrainConfig, space: dict, out: Path, tracker: Tracker) -> float:
    import optuna

    params = _suggest(trial, space)
    cfg = dataclasses.replace(base, out=str(out / f"trial-{trial.number}"), **params)
    cfg.validate()
    if cfg.folds:
        folder = train_folds(cfg, overwrite=True, tracker=tracker)  # it writes cv.json
        value = json.loads((folder / CV_JSON).read_text())["mean"].get("auc")
    else:

        def report(row: dict) -> None:
            if row.get("val_auc") is not None:
                trial.report(row["val_auc"], int(row["epoch"]))  # epochs of every stage
                if trial.should_prune():
                    tracker.set_tags({"medlens.pruned": "true"})
                    raise optuna.TrialPruned()

        run = ModelFolder(train(cfg, overwrite=True, on_epoch=report, tracker=tracker))
        value = (run.read_metrics("val") or {}).get("auc")
    if value is None or math.isnan(value):
        raise optuna.TrialPruned("no validation AUC (one class in the validation split)")
    return float(value)


def tune(base: TrainConfig, out: str | Path, *, trials: int, space: dict | None = None,
         seed: int = 0, recipe: dict | None = None, tracker: Tracker = NO_TRACKING) -> dict:  # fmt: skip
    """Run (or continue) the study in ``out`` until it holds ``trials`` finished trials.

    Args:
        base: the configuration every trial starts from (its ``out`` is replaced).
        out: the study folder.
        trials: finished (complete or pruned) trials the study should hold.
        space: the search space (default :data:`DEFAULT_SPACE`).
        seed: the sampler's seed.
        recipe: the settings given in a recipe or on the command line, kept in ``best.yaml``.
        tracker: the MLflow run of the study: the base settings, the best value and trial,
            ``best.yaml``, ``trials.csv`` and ``tune.html``; each trial a nested run.

    Returns:
        ``{"best_value", "best_params", "best_trial", "trials"}``.
    """

    space = check_space(dict(space or _default_space(base)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = _open_study(out / STUDY_DB, seed)
    done = sum(t.state.is_finished() for t in study.trials)
    if done < trials:
        study.optimize(_objective(base, space, out, tracker), n_trials=trials - done,
                       catch=(ConfigError,))  # fmt: skip
    else:
        log.warning(
            "%s already holds %d finished trial(s), --trials %d: nothing to run (ask for more "
            "trials to continue the study)", out / STUDY_DB, done, trials,
        )  # fmt: skip
    result = _write_results(study, out, recipe or {})
    if tracker.active:
        tracker.log_params({**base.to_dict(), "trials": trials, "search_space": space})
        tracker.log_metrics(
            {"best_value": result["best_value"], "best_trial": result["best_trial"]}
        )
        tracker.log_artifacts(out, [BEST_YAML, TRIALS_CSV, TUNE_HTML])
    return result


def _open_study(db: Path, seed: int):
    """The study in ``db`` (created when missing). A file that is not a readable study (damaged,
    truncated, locked, a folder, another program's database) is a :class:`TrainError` that
    names it and says what to do, not a database traceback."""
    import optuna
    import sqlalchemy.exc

    # Optuna's own INFO lines ("A new study created in RDB ...", one per trial) would repeat on
    # stderr what MedLens reports itself; its warnings still show.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if db.exists() and not db.is_file():
        raise TrainError(
            f"{db} is a folder, not a study database; remove it or choose another --out"
        )
    try:
        return optuna.create_study(
            study_name="medlens",
            storage=f"sqlite:///{db}",
            load_if_exists=True,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
        )
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, RuntimeError,
            ValueError, KeyError) as e:  # fmt: skip
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise TrainError(
            f"{db} cannot be opened as a MedLens study ({type(e).__name__}: {why}); it is "
            "damaged, locked by another process, or not a study: move it away to start a new "
            "study, or wait for the other process"
        ) from None


def _write_results(study, out: Path, recipe: dict) -> dict:
    import optuna

    rows = [
        {"trial": t.number, "state": t.state.name.lower(),
         "value": t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
         "seconds": round(t.duration.total_seconds(), 1) if t.duration else None, **t.params}
        for t in study.trials
    ]  # fmt: skip
    params = sorted({k for t in study.trials for k in t.params})
    write_csv(out / TRIALS_CSV, rows, ["trial", "state", "value", "seconds", *params])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    result = {"trials": rows, "best_trial": None, "best_value": None, "best_params": None}
    if complete:
        best = study.best_trial
        result.update(best_trial=best.number, best_value=best.value, best_params=best.params)
        keep = {k: v for k, v in recipe.items() if k not in ("data", "out", *RECORDED_FACTS)}
        text = (f"# medlens tune: trial {best.number} of {len(study.trials)}, validation AUC "
                f"{best.value:.4f}\n" + yaml.safe_dump({**keep, **best.params}, sort_keys=False))  # fmt: skip
        atomic_write_text(out / BEST_YAML, text)
    write_tune_report(out / TUNE_HTML, rows, params, result)
    return result
