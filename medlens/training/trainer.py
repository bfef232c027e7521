"""Training: from a data folder to a calibrated model in a run folder.

:func:`train` loads and decodes the data (checked before the run folder is touched), builds
the preprocessing and the network, runs the stages (:mod:`medlens.training.stages`, each
through :func:`medlens.training.loop.fit`), then fits temperature scaling and the operating
threshold on the validation split only, fits the OOD guard, saves the model and evaluates
validation (and the carved test split, when there is one) with reports.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medlens.artifacts.folders import (
    CARD_JSON,
    CARD_MD,
    CHECKPOINT,
    CONFIG_YAML,
    EVAL_DIR,
    HISTORY_CSV,
    METRICS_JSON,
    MODEL_JSON,
    REPORT_HTML,
    ModelFolder,
)
from medlens.artifacts.model import ModelMeta, build_network, save_model
from medlens.config import TrainConfig
from medlens.errors import ConfigError, TrainError
from medlens.evaluation.calibration import T_MAX, calibrate, logits_to_probs
from medlens.evaluation.metrics import collapse_warning, headline_metrics
from medlens.evaluation.ood import StageGuard
from medlens.evaluation.operating_point import OperatingPoint, OperatingPointChoice
from medlens.fileio import write_yaml
from medlens.machine import usable_cores
from medlens.modeling.registry import model_info
from medlens.reporting.evaluate import write_evaluation
from medlens.tracking import NO_TRACKING, Tracker, summary_metrics
from medlens.training.batches import ModelInput
from medlens.training.device import resolve_device, resolve_precision, set_bn_momentum, set_seed
from medlens.training.distributed import barrier, launched, start, stop
from medlens.training.guard_fit import fit_ood_guard, float32_outputs, guard_summary
from medlens.training.init_from import (
    check_backbone_base,
    check_labels,
    check_settings,
    load_base_backbone,
    load_base_weights,
    open_base,
)
from medlens.training.loop import Checkpointer, Progress, fit
from medlens.training.stages import build_stage, stage_context, stage_names
from medlens.training.training_data import load_training_data

log = logging.getLogger(__name__)

Outputs = dict[str, tuple[torch.Tensor, np.ndarray]]
"""Held-out split -> (logits, OOD statistics) of the float32 pass."""


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    command: str | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    tracker: Tracker = NO_TRACKING,
) -> Path:
    """Train, calibrate, save and evaluate.

    Args:
        cfg: the settings. With ``resume``, those saved in the run's ``config.yaml`` (when
            there is one) replace them, except ``out`` and ``progress``.
        resume: continue the run in ``cfg.out`` from its checkpoint.
        overwrite: replace a run already in ``cfg.out``.
        command: the command line, recorded in ``model.json``.
        on_epoch: called with every epoch's history row (a tuner prunes a trial from it by
            raising).
        tracker: the MLflow run that gets the resolved settings, every epoch's row, the final
            metrics and the run's reports (:mod:`medlens.tracking`; by rank 0 alone).

    Returns:
        The run folder.

    Raises:
        TrainError: a setting that cannot be used, or an ``--out`` that holds a run.
        DataError: data that cannot be used (unreadable images, missing classes, ...).
    """
    return Trainer(
        cfg, resume=resume, overwrite=overwrite, command=command, on_epoch=on_epoch,
        tracker=tracker,
    ).run()  # fmt: skip


def _resumed_config(cfg: TrainConfig) -> TrainConfig:
    """The settings of the run in ``cfg.out`` (its ``config.yaml``, when there is one)."""
    folder = ModelFolder(cfg.out)
    if not folder.config.exists():
        return cfg
    # config.yaml also records resolved facts (classes, counts, ...); from_saved keeps the
    # settings.
    return TrainConfig.from_saved(
        {**folder.read_config(), "out": cfg.out, "progress": cfg.progress}
    )


def _prepare_out(
    cfg: TrainConfig, resume: bool, overwrite: bool
) -> tuple[ModelFolder, Path | None]:
    """The run folder: refused when it holds a run (unless resuming or overwriting), and where
    an overwritten run waits (beside it) until the new one is complete."""
    folder = ModelFolder(cfg.out)
    out = folder.path
    has_run = out.exists() and any(out.iterdir())
    if has_run and not (resume or overwrite):
        raise TrainError(
            f"{out} already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    if resume and not folder.checkpoint.exists():
        raise TrainError(f"--resume: {out} has no checkpoint ({CHECKPOINT.as_posix()}) to resume")
    previous = None
    if has_run and overwrite and not resume:
        previous = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
        out.rename(previous)
        log.info("--overwrite: the old run waits in %s until the new one is complete", previous)
    out.mkdir(parents=True, exist_ok=True)
    return folder, previous


class Trainer:
    """One training run, step by step; holds what the steps share.

    Args:
        cfg: the settings (replaced by the run's saved ones with ``resume``).
        resume: continue the run in ``cfg.out``.
        overwrite: replace a run already in ``cfg.out``.
        command: the command line, recorded in ``model.json``.
        on_epoch: called with every epoch's history row.
        tracker: the MLflow run logged to (:func:`train`).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool,
        overwrite: bool,
        command: str | None,
        on_epoch: Callable[[dict], None] | None = None,
        tracker: Tracker = NO_TRACKING,
    ):
        self.info = model_info(cfg.model)  # unknown model: clear error before anything is written
        # Every declared constraint (config.py), on the settings the run will use.
        self.cfg = (_resumed_config(cfg) if resume else cfg).validate()
        # --init-from: the base's network, input and labels, checked before any image is read.
        self.base = open_base(self.cfg.init_from) if self.cfg.init_from else None
        if self.base is not None:
            self.cfg = check_settings(self.cfg, self.base)
        # --backbone-from: another model's backbone under this run's own head, input and labels.
        self.backbone_base = None
        if self.cfg.backbone_from:
            if self.cfg.init_from or self.cfg.weights:
                raise ConfigError(
                    "--backbone-from and --init-from/--weights all set the starting weights; "
                    "pass one"
                )
            self.backbone_base = open_base(self.cfg.backbone_from, flag="--backbone-from")
            check_backbone_base(self.cfg.model, self.backbone_base)
        self.init_report: dict | None = None
        self.backbone_report: dict | None = None
        self.tracker = tracker
        OperatingPoint.parse(self.cfg.operating_point)  # a bad rule fails before any image
        size, smallest = self.cfg.image_size, self.info.min_image_size
        if size is not None and size < smallest:
            raise ConfigError(f"--image-size {size}: {self.cfg.model} needs at least {smallest} px")
        self.resume, self.overwrite, self.command = resume, overwrite, command
        self.on_epoch = on_epoch

    def run(self) -> Path:
        """All the steps; returns the run folder."""
        self._set_up()
        if self.base is not None:  # the new data's classes are the base's labels
            check_labels(self.cfg, self.base)
        # The data is loaded, checked and decoded before the run folder is touched.
        # The input (size, channels, mean/std, lr) is resolved in medlens.training.resolve.
        base_pre = self.base.meta.preprocess if self.base is not None else None
        self.data = load_training_data(self.cfg, self.info, self.pretrained, base_pre)
        if (
            not self.data.binary
            and OperatingPoint.parse(self.cfg.operating_point).rule != "balanced"
        ):
            raise ConfigError(
                f"--operating-point {self.cfg.operating_point}: these data have "
                f"{len(self.data.classes)} classes, and a model of more than two predicts the "
                "most probable class (balanced); other rules apply to two-class models"
            )
        self.pre = self.data.preprocess()
        self.to_input = ModelInput(self.pre)
        # Before the folder too: a --weights file that fits nothing stops the run here.
        self._build_network()
        if self.world.main:
            self.folder, previous = _prepare_out(self.cfg, self.resume, self.overwrite)
        else:  # under torchrun only rank 0 touches the run folder
            self.folder, previous = ModelFolder(self.cfg.out), None
        barrier()
        try:
            self._train_and_save()
        except BaseException:
            if previous is not None:  # the new run failed: the old one comes back
                shutil.rmtree(self.folder.path, ignore_errors=True)
                previous.rename(self.folder.path)
            raise
        if previous is not None:
            shutil.rmtree(previous)
        return self.folder.path

    def _train_and_save(self) -> None:
        self._report_data()
        if self.world.main:
            self._write_config()
        resume_state = self._start_progress()
        self._run_stages(resume_state)
        stop()  # the ranks part here; rank 0 alone calibrates, evaluates and saves
        if not self.world.main:
            return
        outputs = self._held_out_outputs()
        calibration = self._calibrate(outputs["val"][0])
        guard = self._fit_guard(outputs["val"][1])
        wall = time.time() - self.t_start
        meta = self._model_meta(*calibration, wall)
        _log_calibration(meta)
        summaries = self._evaluate(meta, outputs, guard)
        warning = collapse_warning(summaries["val"], meta.temperature, T_MAX)
        if warning:
            meta.extra["training"]["warning"] = warning
            log.warning("WARNING: %s", warning)
        save_model(self.folder.path, self.net, meta)
        _log_saved(self.folder.path, wall, summaries)
        _track_results(self.tracker, self.folder, summaries)

    def _set_up(self) -> None:
        """Threads, device, seeds and precision."""
        cfg = self.cfg
        self.t_start = time.time()
        self.device = resolve_device(cfg.device)
        if launched() and self.device.type == "cuda":  # one GPU per process
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        self.world = start(self.device)
        if cfg.threads or self.world.distributed:  # processes share the cores
            torch.set_num_threads(cfg.threads or max(1, usable_cores() // self.world.size))
        set_seed(cfg.seed)
        self.pretrained = cfg.pretrained and self.info.pretrained
        # Frozen (no-grad) passes use bf16 where the CPU (or GPU) has it: ~1.6x faster on CPU.
        # Backward passes stay float32 unless asked: on this CPU bf16 autocast makes
        # depthwise-conv training slower, not faster.
        self.dtype = resolve_precision(cfg.precision, self.device)
        self.train_dtype = self.dtype if cfg.precision == "bf16" else None

    def _report_data(self) -> None:
        """Log the data (and the images skipped); count the images used per split."""
        data = self.data
        if data.bad:
            log.warning(
                f"skipped {len(data.bad)} unreadable image(s) (--skip-bad-images): "
                + ", ".join(src for src, _ in data.bad[:10])
                + (" ..." if len(data.bad) > 10 else "")
            )
            data.dataset.notes.append(f"skipped {len(data.bad)} unreadable images")
        log.info(data.dataset.summary())
        self.split_counts = data.split_counts()

    def _write_config(self) -> None:
        """``config.yaml``: every setting, then what training resolved."""
        cfg, data = self.cfg, self.data
        resolved = cfg.to_dict()
        resolved.update(
            {
                "image_size": data.image_size,
                "channels": data.channels,
                "pretrained": self.pretrained,
                "lr": data.plan.lr,
                "precision_resolved": "bf16" if self.dtype else "fp32",
                "device_resolved": str(self.device),
                "preprocess": self.pre.to_dict(),
                "classes": data.classes,
                "split_counts": self.split_counts,
                "data_notes": data.dataset.notes,
                "torch_threads": torch.get_num_threads(),
                # torchrun: the global batch stays --batch-size (each process takes its share)
                "world_size": self.world.size,
                "global_batch_size": cfg.batch_size,
                "batch_size_per_process": max(1, cfg.batch_size // self.world.size),
            }
        )
        write_yaml(self.folder.config, resolved)
        self.tracker.log_params(resolved)

    def _build_network(self) -> None:
        """The network on its device, and the class weights of the loss."""
        cfg = self.cfg
        net = build_network(
            ModelMeta(
                arch=cfg.model, labels=self.data.classes, preprocess=self.pre, dropout=cfg.dropout
            ),
            pretrained=self.pretrained and self.base is None and self.backbone_base is None,
            weights=cfg.weights,
        )
        if self.base is not None:
            self.init_report = load_base_weights(net, self.base, self._sample_inputs)
        if self.backbone_base is not None:
            self.backbone_report = load_base_backbone(net, self.backbone_base, self._sample_inputs)
        self.weights_report = net.weights_report
        if cfg.bn_momentum is not None:
            set_bn_momentum(net, cfg.bn_momentum)
        # torch's stubs omit Module.to's memory_format (a documented keyword)
        self.net = net.to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        ytr = self.data.prepared["train"][1]
        counts = torch.bincount(ytr, minlength=len(self.data.classes)).float()
        weights = None
        if cfg.class_weights:
            weights = counts.sum() / (len(counts) * counts.clamp_min(1))
            weights = weights.to(self.device)
        self.weights = weights

    def _sample_inputs(self, n: int):
        """Network inputs of up to ``n`` training images spread over the split, in batches."""
        x = self.data.prepared["train"][0]
        idx = np.unique(np.linspace(0, len(x) - 1, min(n, len(x))).astype(int))
        for i in range(0, len(idx), 32):
            yield self.to_input(torch.as_tensor(x[idx[i : i + 32]]))

    def _epoch_done(self, row: dict) -> None:
        if self.world.main:
            self.tracker.log_epoch(row)
        if self.on_epoch is not None:
            self.on_epoch(row)

    def _start_progress(self) -> dict | None:
        """The history and finished stages so far; the checkpoint to resume, if any."""
        ckpt = Checkpointer(self.folder)
        resume_state = ckpt.load() if self.resume else None
        self.progress = Progress(self.folder, ckpt, on_epoch=self._epoch_done)
        if resume_state:
            self.progress.history = list(resume_state["history"])
            self.progress.stages_done = list(resume_state["stages_done"])
            self.net.load_state_dict(resume_state["net"])
        return resume_state

    def _run_stages(self, resume_state: dict | None) -> None:
        """Every stage not finished yet; a resumed one continues from its checkpoint."""
        cfg, prepared = self.cfg, self.data.prepared
        self.stages = stage_names(cfg, self.pretrained)
        ctx = stage_context(
            cfg,
            self.net,
            self.stages,
            to_input=self.to_input,
            x_train=prepared["train"][0],
            y_train=prepared["train"][1],
            x_val=prepared["val"][0],
            y_val=prepared["val"][1],
            device=self.device,
            dtype=self.dtype,
            train_dtype=self.train_dtype,
        )
        for name in self.stages:
            if name in self.progress.stages_done:
                continue
            log.info(
                "stage %s (each epoch's val_acc: the most probable class, before calibration; "
                "the figures after training use the calibrated probabilities and the chosen "
                "operating point)",
                name,
            )
            st = resume_state if (resume_state and resume_state.get("stage") == name) else None
            stage = build_stage(name, ctx)
            fit(
                stage,
                self.net,
                cfg,
                self.progress,
                weights=self.weights,
                binary=self.data.binary,
                resume_state=st,
            )
            resume_state = None

    def _held_out_outputs(self) -> Outputs:
        """One float32 pass per held-out split: logits (calibration, evaluation) and
        activation statistics (OOD guard) together.

        Calibration and evaluation run in float32, the precision prediction and serving use:
        bf16 autocast moves probabilities by up to ~0.25 on some images, so a threshold fitted
        on bf16 outputs would not be the one that serves.
        """
        self.net.set_trainable_stages(None)
        self.net.eval()
        outputs: Outputs = {}
        for split in ("val", "test"):
            if split in self.data.prepared and len(self.data.prepared[split][1]):
                x = self.data.prepared[split][0]
                outputs[split] = float32_outputs(self.net, x, self.to_input, self.device)
        return outputs

    def _calibrate(self, val_logits: torch.Tensor) -> tuple[float, OperatingPointChoice | None]:
        """Temperature, and for binary tasks the operating point (threshold with its
        intervals); fitted on the validation split only."""
        yva = self.data.prepared["val"][1].numpy()
        return calibrate(val_logits.numpy(), yva, self.data.binary, self.cfg.operating_point)

    def _fit_guard(self, val_stats: np.ndarray) -> StageGuard:
        """The OOD guard, fitted on clean training images and saved beside the model."""
        guard = fit_ood_guard(
            self.net,
            self.data.prepared["train"][0],
            self.data.prepared["train"][1].numpy(),
            val_stats,
            self.to_input,
            seed=self.cfg.seed,
            device=self.device,
        )
        guard.save(self.folder.ood)
        return guard

    def _model_meta(
        self, temperature: float, operating_point: OperatingPointChoice | None, wall: float
    ) -> ModelMeta:
        """The model's metadata, with where it came from (``training``) and its card."""
        cfg, ds = self.cfg, self.data.dataset
        meta = ModelMeta(
            arch=cfg.model,
            labels=ds.classes,
            preprocess=self.pre,
            temperature=temperature,
            dropout=cfg.dropout,
            name=cfg.name or self.folder.name,
        )
        meta.set_operating_point(operating_point)
        meta.extra["training"] = {
            "command": self.command,
            "data": str(cfg.data),
            "layout": ds.layout,
            "split_counts": self.split_counts,
            "notes": ds.notes,
            "epochs_run": len(self.progress.history),
            "stages": self.stages,
            "wall_seconds": round(wall, 1),
            "seed": cfg.seed,
            "precision": "bf16" if self.dtype else "fp32",
            "device": str(self.device),
        }
        if self.weights_report is not None:
            meta.extra["training"]["init_weights"] = self.weights_report.to_dict()
        if self.init_report is not None:
            meta.extra["training"]["init_from"] = self.init_report
        if self.backbone_report is not None:
            meta.extra["training"]["backbone_from"] = self.backbone_report
        if cfg.card:
            meta.extra["card"] = dict(cfg.card)
        return meta

    def _evaluate(self, meta: ModelMeta, outputs: Outputs, guard: StageGuard) -> dict:
        """``eval/<split>/`` reports; headline metrics and the guard's summary into ``meta``."""
        summaries = {}
        for split, (logits, _) in outputs.items():
            summaries[split] = write_evaluation(
                self.folder.eval_dir(split),
                meta,
                self.data.prepared[split][1].numpy(),
                logits_to_probs(logits.numpy(), meta.temperature),
                history=self.progress.history,
                title=f"{meta.name}: {split} split ({self.data.dataset.layout})",
                sources=self.data.sources[split],
            )
        meta.extra["metrics"] = {split: headline_metrics(m) for split, m in summaries.items()}
        test_stats = outputs["test"][1] if "test" in outputs else None
        meta.extra["ood"] = guard_summary(guard, test_stats, self.folder.ood)
        return summaries


def _log_calibration(meta: ModelMeta) -> None:
    msg = f"calibration: temperature {meta.temperature:.3f}"
    op = meta.operating_point
    if op:
        lo, hi = op.threshold_ci or (None, None)
        msg += (
            f"; operating point {op.rule}: threshold {meta.threshold:.4f} "
            f"[{lo:.4f}, {hi:.4f}], validation sensitivity {op.sensitivity:.3f}, "
            f"specificity {op.specificity:.3f}"
        )
    log.info(msg)
    if op and op.warning:
        log.warning("%s", op.warning)


def _log_saved(out: Path, wall: float, summaries: dict) -> None:
    log.info(
        f"saved model to {out} ({wall:.0f}s); calibrated, at the operating point: "
        + "; ".join(
            f"{s}: acc {m['accuracy']:.4f} "
            f"auc {m['auc'] if m['auc'] is None else round(m['auc'], 4)}"
            for s, m in summaries.items()
        )
    )


TRACKED_FILES = [CONFIG_YAML, MODEL_JSON, HISTORY_CSV, CARD_JSON, CARD_MD] + [
    f"{EVAL_DIR}/{split}/{name}"
    for split in ("val", "test")
    for name in (METRICS_JSON, REPORT_HTML)
]
"""A run folder's files a tracked run logs as artifacts (not the weights, not the per-image
predictions)."""


def _track_results(tracker: Tracker, folder: ModelFolder, summaries: dict) -> None:
    """The final metrics of each evaluated split with their intervals (``final_val_auc``,
    ``final_val_auc_ci_low``...) and the run's reports."""
    if not tracker.active:
        return
    for split, m in summaries.items():
        tracker.log_metrics(summary_metrics(m, prefix=f"final_{split}_"))
    tracker.log_artifacts(folder.path, TRACKED_FILES)
