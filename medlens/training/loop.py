"""The epoch loop every stage shares (:func:`fit`).

Class-weighted loss, Adam/AdamW, ReduceLROnPlateau, early stopping, best-state keeping, one
``training_metrics.csv`` row per epoch and a resumable checkpoint after every epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from medlens.artifacts.folders import ModelFolder
from medlens.config import TrainConfig
from medlens.evaluation.calibration import logits_to_probs
from medlens.fileio import atomic_torch_save
from medlens.inference.runtime import autocast, compute_logits
from medlens.training.device import freeze_batch_norms
from medlens.training.distributed import gather_rows, sum_over_ranks, train_forward, world
from medlens.training.regularise import WeightAverage, mix_batch, smoothed_loss
from medlens.training.stages import Stage

log = logging.getLogger(__name__)


def quick_scores(logits: torch.Tensor, y: torch.Tensor, binary: bool) -> dict[str, float]:
    """Validation loss (unweighted), accuracy at argmax and AUC (NaN when undefined).

    Args:
        logits: validation logits.
        y: validation labels.
        binary: one logit per image.

    Returns:
        ``val_loss``, ``val_acc`` and ``val_auc``.
    """
    from sklearn.metrics import roc_auc_score

    probs = logits_to_probs(logits.numpy())
    pred = probs.argmax(1)
    yt = y.numpy()
    acc = float((pred == yt).mean())
    loss = float(smoothed_loss(logits, y, None, binary))
    try:
        auc = float(
            roc_auc_score(yt, probs[:, 1])
            if binary
            else roc_auc_score(
                yt, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1]))
            )
        )
    except ValueError:
        auc = float("nan")
    return {"val_loss": loss, "val_acc": acc, "val_auc": auc}


class Checkpointer:
    """A run's resumable checkpoint (:attr:`ModelFolder.checkpoint`)."""

    def __init__(self, folder: ModelFolder):
        self.last = folder.checkpoint
        if world().main:  # under torchrun only rank 0 writes into the run folder
            self.last.parent.mkdir(parents=True, exist_ok=True)

    def save(self, state: dict) -> None:
        """Replace the checkpoint (atomically: an interrupted save leaves the previous one);
        under torchrun only rank 0 writes."""
        if world().main:
            atomic_torch_save(state, self.last)

    def load(self) -> dict | None:
        """The checkpoint, or None when there is none."""
        if not self.last.exists():
            return None
        return torch.load(self.last, map_location="cpu", weights_only=True)


@dataclass
class Progress:
    """What a run has done: one history row per epoch and the stages it finished.

    Attributes:
        folder: the run folder (``training_metrics.csv`` is rewritten after every epoch).
        checkpointer: where every epoch and every finished stage are checkpointed.
    """

    folder: ModelFolder
    checkpointer: Checkpointer
    history: list[dict] = field(default_factory=list)
    stages_done: list[str] = field(default_factory=list)
    on_epoch: Callable[[dict], None] | None = None  # sees each row (e.g. a tuner's pruner)

    def add_row(self, row: dict) -> None:
        """Record an epoch (:data:`~medlens.artifacts.folders.HISTORY_COLUMNS`)."""
        self.history.append(row)
        if world().main:
            self.folder.write_history(self.history)
        if self.on_epoch is not None:
            self.on_epoch(row)

    def finish_stage(self, name: str, net: nn.Module) -> None:
        """Mark the stage complete so --resume skips it."""
        self.stages_done.append(name)
        self.checkpointer.save(
            {
                "stage": None,
                "epoch": -1,
                "stages_done": list(self.stages_done),
                "net": net.state_dict(),
                "history": self.history,
            }
        )


def fit(
    stage: Stage,
    net: nn.Module,
    cfg: TrainConfig,
    progress: Progress,
    *,
    weights: torch.Tensor | None,
    binary: bool,
    resume_state: dict | None = None,
) -> None:
    """Train one stage until its epochs run out or early stopping; keep its best state.

    Args:
        stage: what trains.
        net: the whole network (its state is what is kept and checkpointed).
        cfg: the settings (optimizer, weight decay, patience, monitor, seed, progress).
        progress: the run's history and finished stages; updated.
        weights: per-class loss weights, or None.
        binary: one logit per image.
        resume_state: a checkpoint to continue, when it is of this stage.
    """
    run = _StageFit(stage, net, cfg, progress, weights, binary)
    if resume_state is not None and resume_state.get("stage") == stage.name:
        run.restore(resume_state)
        log.info(f"resuming stage {stage.name} at epoch {run.start_epoch + 1}")
    for epoch in range(run.start_epoch, stage.epochs):
        if run.epoch(epoch):
            log.info(f"[{stage.name}] early stop: no improvement in {cfg.patience} epochs")
            break
    if run.best_state is not None:
        net.load_state_dict(run.best_state)
    progress.finish_stage(stage.name, net)


class _StageFit:
    """One stage's optimiser, scheduler, early-stopping state and generator."""

    def __init__(self, stage: Stage, net: nn.Module, cfg: TrainConfig, progress: Progress,
                 weights: torch.Tensor | None, binary: bool) -> None:  # fmt: skip
        self.stage, self.net, self.cfg, self.progress = stage, net, cfg, progress
        self.weights, self.binary = weights, binary
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.opt = opt_cls(stage.params, lr=stage.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, mode="min", factor=0.3, patience=max(1, cfg.patience // 2)
        )
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_score, self.bad_epochs, self.start_epoch = -math.inf, 0, 0
        self.gen = torch.Generator().manual_seed(cfg.seed + 1000 * len(progress.stages_done))
        self.average = WeightAverage(stage.module, cfg.ema) if cfg.ema else None
        # Under torchrun: through DistributedDataParallel, which averages the gradients.
        self.forward = train_forward(stage.module, stage.forward)

    def restore(self, state: dict) -> None:
        """Continue from an epoch checkpoint of this stage."""
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.best_score = state["best_score"]
        self.best_state = state["best_state"]
        self.bad_epochs = state["bad_epochs"]
        self.start_epoch = state["epoch"] + 1
        self.gen.set_state(state["generator"])
        # Exact continuation: dropout draws from torch's global generator, and an EMA run's
        # average is part of the state (checkpoints of older runs lack both).
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        if self.average is not None and state.get("average") is not None:
            self.average.average.load_state_dict(state["average"])

    def epoch(self, epoch: int) -> bool:
        """Train, validate, record and checkpoint one epoch; True: stop early."""
        stage, cfg = self.stage, self.cfg
        t0 = time.time()
        loss_sum, correct, total = self._train(epoch)
        stage.module.eval()
        # With --ema, the averaged weights are validated and kept; training goes on with its own.
        averaged = self.average.applied() if self.average else contextlib.nullcontext()
        with averaged:
            val_logits = gather_rows(self._val_logits, len(stage.val_y))
            scores = quick_scores(val_logits, stage.val_y, self.binary)
            improved = self._keep_if_best(scores)
        row = {
            "epoch": len(self.progress.history) + 1,
            "stage": stage.name,
            "train_loss": round(loss_sum / max(total, 1), 6),
            "train_acc": round(correct / max(total, 1), 6),
            "val_loss": round(scores["val_loss"], 6),
            "val_acc": round(scores["val_acc"], 6),
            "val_auc": None if math.isnan(scores["val_auc"]) else round(scores["val_auc"], 6),
            "lr": self.opt.param_groups[0]["lr"],
            "seconds": round(time.time() - t0, 2),
        }
        self.progress.add_row(row)
        if epoch + 1 >= (self.cfg.warmup_epochs if stage.name != "head" else 0):
            self.sched.step(scores["val_loss"])  # not while the rate still warms up
        log.info(
            f"[{stage.name}] epoch {epoch + 1}/{stage.epochs}  loss {row['train_loss']:.4f}  "
            f"acc {row['train_acc']:.3f}  val_loss {row['val_loss']:.4f}  "
            f"val_acc {row['val_acc']:.3f}  val_auc {scores['val_auc']:.4f}  "
            f"lr {row['lr']:.2g}  {row['seconds']:.1f}s" + ("  *" if improved else "")
        )
        stop = self.bad_epochs >= cfg.patience
        self.progress.checkpointer.save(self._checkpoint(epoch, stop))
        return stop

    def _val_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Validation logits of the images ``idx`` (this rank's share under torchrun)."""
        stage = self.stage
        x = stage.val_x
        part = x[idx.numpy()] if not isinstance(x, torch.Tensor) else x[idx]
        return compute_logits(stage.forward, part, dtype=stage.dtype,
                              transform=stage.val_transform, device=stage.device)  # fmt: skip

    def _train(self, epoch: int) -> tuple[float, int, int]:
        """One pass over the training batches: (loss sum, correct, images)."""
        stage, binary = self.stage, self.binary
        stage.module.train()
        if self.cfg.freeze_bn:
            freeze_batch_norms(stage.module)
        total, correct, loss_sum = 0, 0, 0.0
        bar = self._progress_bar(epoch)
        warm = self.cfg.warmup_epochs if stage.name != "head" else 0
        share = max(1.0, stage.n_train / world().size)  # this rank's images per epoch
        for xb, yb in stage.train_batches(epoch, self.gen):
            if epoch < warm:
                ramp = min(1.0, (epoch + (total + len(yb)) / share) / warm)
                for group in self.opt.param_groups:
                    group["lr"] = stage.lr * ramp
            loss, logits = self._loss(xb, yb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.average is not None:
                self.average.update()
            n = len(yb)
            total += n
            loss_sum += float(loss.detach()) * n
            pred = (logits.view(-1) > 0).long() if binary else logits.argmax(1)
            correct += int((pred == yb).sum())
            if bar is not None:
                bar.update(n)
                bar.set_postfix(loss=f"{loss_sum / total:.4f}", acc=f"{correct / total:.3f}")
        if bar is not None:
            bar.close()
        loss_sum, n_correct, n_total = sum_over_ranks([loss_sum, correct, total])
        return loss_sum, int(n_correct), int(n_total)  # the counts stay ints (sum_over_ranks)

    def _loss(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of one batch (label smoothing, mixup) and its logits."""
        cfg, stage = self.cfg, self.stage
        perm, lam = None, 1.0
        if cfg.mixup:
            xb, perm, lam = mix_batch(xb, cfg.mixup, self.gen)
        with autocast(stage.dtype, stage.device):
            logits = self.forward(xb)
        logits = logits.float()
        loss = smoothed_loss(logits, yb, self.weights, self.binary, cfg.label_smoothing)
        if perm is not None:
            other = smoothed_loss(logits, yb[perm], self.weights, self.binary, cfg.label_smoothing)
            loss = lam * loss + (1 - lam) * other
        return loss, logits

    def _progress_bar(self, epoch: int):  # a tqdm bar, or None
        if not self.cfg.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.stage.n_train,
            desc=f"{self.stage.name} {epoch + 1}/{self.stage.epochs}",
            unit="img",
            leave=False,
            file=sys.stderr,
        )

    def _keep_if_best(self, scores: dict[str, float]) -> bool:
        """Early-stopping bookkeeping; keeps a copy of the best state. True: improved."""
        score = (
            -scores["val_loss"]
            if self.cfg.monitor == "val_loss" or math.isnan(scores["val_auc"])
            else scores["val_auc"] - 1e-3 * scores["val_loss"]
        )
        if score > self.best_score:
            self.best_score, self.bad_epochs = score, 0
            self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    def _checkpoint(self, epoch: int, stop: bool) -> dict:
        return {
            "stage": self.stage.name,
            "epoch": epoch,
            "stages_done": list(self.progress.stages_done),
            "net": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "best_score": self.best_score,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "average": self.average.average.state_dict() if self.average is not None else None,
            "history": self.progress.history,
            "finished": stop,
        }
