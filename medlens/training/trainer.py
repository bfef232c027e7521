"""Training: from a data folder to a calibrated model in a run folder.

Stages (all share :func:`_fit`: class-weighted loss, Adam/AdamW, ReduceLROnPlateau,
early stopping, best-checkpoint keeping, ``training_metrics.csv``, resumable checkpoints):

* ``head`` - pretrained backbones: the backbone is frozen, its pooled features are computed
  once and the head (batch norm, dropout, dense) trains on them in seconds.
* ``finetune`` - the top ``unfreeze`` backbone stages train with a lower learning rate. The
  frozen stages below them are run once over ``aug_copies`` augmented copies of the training
  images and their activations cached, so an epoch costs only the top stages.
* ``full`` - everything trains on augmented images (models from scratch, or ``--transfer
  full``).

Then temperature scaling and the operating threshold are fitted on the validation split only,
the model is saved, and validation (and the carved test split, when there is one) are
evaluated with reports.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medlens.artifacts.folders import HISTORY_COLUMNS, OOD_FILE, headline_metrics
from medlens.artifacts.model import ModelMeta, build_network, save_model
from medlens.config import TrainConfig
from medlens.data.augment import augment
from medlens.data.cache import is_colour, prepare_samples
from medlens.data.preprocess import Preprocess, compute_mean_std
from medlens.errors import TrainError
from medlens.evaluation.calibration import logits_to_probs
from medlens.fileio import atomic_torch_save, write_csv, write_yaml
from medlens.inference.runtime import _autocast, compute_logits, logits_and_stats
from medlens.modeling.registry import IMAGENET_MEAN, IMAGENET_STD, model_info


def bf16_supported() -> bool:
    """bfloat16 autocast pays off on CPUs with AMX or AVX-512 BF16."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(
            f"--device {name}: torch {torch.__version__} sees no CUDA device; "
            "use --device cpu (or auto)"
        )
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise TrainError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise TrainError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return dev


def resolve_precision(precision: str, device: torch.device | None = None) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device is not None and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if bf16_supported() else None


def set_seed(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_bn_momentum(net: nn.Module, momentum: float) -> int:
    """Set every batch-norm layer's momentum; returns how many layers were set.

    MONAI's EfficientNet keeps TensorFlow's momentum (0.01): fine-tuning every layer on a few
    hundred images then leaves the running statistics mostly ImageNet's."""
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in layers:
        m.momentum = momentum
    return len(layers)


def loss_fn(
    logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, binary: bool
) -> torch.Tensor:
    """Class-weighted BCE (binary, one logit) or cross-entropy (multi-class)."""
    if binary:
        logits = logits.view(-1)
        w = None if weights is None else weights[y]
        return F.binary_cross_entropy_with_logits(logits, y.float(), weight=w)
    return F.cross_entropy(logits, y, weight=weights)


def _quick_scores(logits: torch.Tensor, y: torch.Tensor, binary: bool) -> dict:
    from sklearn.metrics import roc_auc_score

    probs = logits_to_probs(logits.numpy())
    pred = probs.argmax(1)
    yt = y.numpy()
    acc = float((pred == yt).mean())
    loss = float(loss_fn(logits, y, None, binary))
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


@dataclass
class Stage:
    """One stage of training: what trains, on what, for how long."""

    name: str
    module: nn.Module  # put in train()/eval() mode per epoch
    forward: Callable[[torch.Tensor], torch.Tensor]  # inputs -> logits
    params: list
    train_batches: Callable[[int, torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    n_train: int
    val_x: object
    val_transform: Callable | None
    val_y: torch.Tensor
    epochs: int
    lr: float
    dtype: torch.dtype | None
    device: torch.device | None = None


class _Checkpointer:
    def __init__(self, run: Path):
        self.dir = run / "checkpoints"
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    def save(self, state: dict) -> None:
        atomic_torch_save(state, self.last)

    def load(self) -> dict | None:
        if not self.last.exists():
            return None
        return torch.load(self.last, map_location="cpu", weights_only=True)


def _fit(
    stage: Stage,
    net: nn.Module,
    cfg: TrainConfig,
    weights,
    binary: bool,
    history: list[dict],
    ckpt: _Checkpointer,
    stages_done: list[str],
    resume_state: dict | None,
    log,
) -> None:
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(stage.params, lr=stage.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.3, patience=max(1, cfg.patience // 2)
    )
    best_score, best_state, bad_epochs, start_epoch = -math.inf, None, 0, 0
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * len(stages_done))
    if resume_state is not None and resume_state.get("stage") == stage.name:
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        best_score = resume_state["best_score"]
        best_state = resume_state["best_state"]
        bad_epochs = resume_state["bad_epochs"]
        start_epoch = resume_state["epoch"] + 1
        gen.set_state(resume_state["generator"])
        log(f"resuming stage {stage.name} at epoch {start_epoch + 1}")
    for epoch in range(start_epoch, stage.epochs):
        t0 = time.time()
        stage.module.train()
        total, correct, loss_sum = 0, 0, 0.0
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=stage.n_train,
                desc=f"{stage.name} {epoch + 1}/{stage.epochs}",
                unit="img",
                leave=False,
                file=sys.stderr,
            )
        for xb, yb in stage.train_batches(epoch, gen):
            with _autocast(stage.dtype, stage.device):
                logits = stage.forward(xb)
            logits = logits.float()
            loss = loss_fn(logits, yb, weights, binary)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
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
        stage.module.eval()
        val_logits = compute_logits(
            stage.forward,
            stage.val_x,
            dtype=stage.dtype,
            transform=stage.val_transform,
            device=stage.device,
        )
        scores = _quick_scores(val_logits, stage.val_y, binary)
        row = {
            "epoch": len(history) + 1,
            "stage": stage.name,
            "train_loss": round(loss_sum / max(total, 1), 6),
            "train_acc": round(correct / max(total, 1), 6),
            "val_loss": round(scores["val_loss"], 6),
            "val_acc": round(scores["val_acc"], 6),
            "val_auc": None if math.isnan(scores["val_auc"]) else round(scores["val_auc"], 6),
            "lr": opt.param_groups[0]["lr"],
            "seconds": round(time.time() - t0, 2),
        }
        history.append(row)
        write_csv(Path(cfg.out) / "training_metrics.csv", history, HISTORY_COLUMNS)
        score = (
            -scores["val_loss"]
            if cfg.monitor == "val_loss" or math.isnan(scores["val_auc"])
            else scores["val_auc"] - 1e-3 * scores["val_loss"]
        )
        improved = score > best_score
        if improved:
            best_score, bad_epochs = score, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            bad_epochs += 1
        sched.step(scores["val_loss"])
        log(
            f"[{stage.name}] epoch {epoch + 1}/{stage.epochs}  loss {row['train_loss']:.4f}  "
            f"acc {row['train_acc']:.3f}  val_loss {row['val_loss']:.4f}  "
            f"val_acc {row['val_acc']:.3f}  val_auc {scores['val_auc']:.4f}  "
            f"lr {row['lr']:.2g}  {row['seconds']:.1f}s" + ("  *" if improved else "")
        )
        stop = bad_epochs >= cfg.patience
        ckpt.save(
            {
                "stage": stage.name,
                "epoch": epoch,
                "stages_done": list(stages_done),
                "net": net.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "best_score": best_score,
                "best_state": best_state,
                "bad_epochs": bad_epochs,
                "generator": gen.get_state(),
                "history": history,
                "finished": stop,
            }
        )
        if stop:
            log(f"[{stage.name}] early stop: no improvement in {cfg.patience} epochs")
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    stages_done.append(stage.name)
    # Mark the stage complete so --resume skips it.
    ckpt.save(
        {
            "stage": None,
            "epoch": -1,
            "stages_done": list(stages_done),
            "net": net.state_dict(),
            "history": history,
        }
    )


def _prepare_out(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path:
    out = Path(cfg.out)
    has_run = out.exists() and any(out.iterdir())
    if has_run and not (resume or overwrite):
        raise TrainError(
            f"{out} already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    if resume and not (out / "checkpoints" / "last.pt").exists():
        raise TrainError(f"--resume: {out} has no checkpoint (checkpoints/last.pt) to resume")
    if has_run and overwrite and not resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log=print,
    command: str | None = None,
) -> Path:
    """Train, calibrate, save and evaluate. Returns the run folder."""
    from medlens.data import datasets as mdata
    from medlens.evaluation.calibration import choose_threshold, fit_temperature

    info = model_info(cfg.model)  # unknown model: clear error before anything is written
    if cfg.transfer not in ("frozen", "finetune", "full"):
        raise TrainError(f"--transfer must be frozen, finetune or full, got {cfg.transfer!r}")
    if cfg.bn_momentum is not None and not 0.0 < cfg.bn_momentum <= 1.0:
        raise TrainError(f"--bn-momentum must be in (0, 1], got {cfg.bn_momentum}")
    if cfg.optimizer not in ("adam", "adamw"):
        raise TrainError(f"--optimizer must be adam or adamw, got {cfg.optimizer!r}")
    out = Path(cfg.out)
    if resume:
        import yaml

        saved = out / "config.yaml"
        if saved.exists():
            old = yaml.safe_load(saved.read_text())
            # config.yaml also records resolved facts (classes, counts, ...); keep the settings.
            known = {f.name for f in fields(TrainConfig)}
            old = {k: v for k, v in old.items() if k in known}
            old.update({"out": cfg.out, "progress": cfg.progress})
            cfg = TrainConfig.from_dict(old)
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    set_seed(cfg.seed)
    pretrained = cfg.pretrained and info.pretrained
    # Frozen (no-grad) passes use bf16 where the CPU (or GPU) has it: ~1.6x faster on CPU.
    # Backward passes stay float32 unless asked: on this CPU bf16 autocast makes
    # depthwise-conv training slower, not faster.
    dtype = resolve_precision(cfg.precision, device)
    train_dtype = dtype if cfg.precision == "bf16" else None

    # -- data (validated before the run folder is touched) ------------------------------
    ds = mdata.load_dataset(
        cfg.data,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
        patient_regex=cfg.patient_regex,
    )
    if "train" not in ds.splits or "val" not in ds.splits:
        raise TrainError(f"{cfg.data}: could not form train and validation splits")
    for split in ("train", "val"):
        present = {s.label for s in ds.splits[split]}
        if len(present) < len(ds.classes):
            missing = [ds.classes[i] for i in range(len(ds.classes)) if i not in present]
            raise TrainError(
                f"the {split} split has no images of class(es) {missing}; add "
                "images or lower --val-fraction/--test-fraction"
            )
    binary = len(ds.classes) == 2
    size = cfg.image_size or info.default_image_size
    if cfg.channels is None:
        if pretrained or info.fixed_in_channels == 3:
            channels = 3
        else:
            probe = ds.splits["train"][:: max(1, len(ds.splits["train"]) // 64)][:64]
            channels = 3 if any(_probe_colour(s) for s in probe) else 1
    else:
        channels = cfg.channels
    geometry = Preprocess(
        image_size=size,
        channels=channels,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        resize=cfg.resize,
        grayscale=cfg.grayscale,
    )
    prepared, sources, bad = {}, {}, []
    for split, samples in ds.splits.items():
        res = prepare_samples(
            samples,
            geometry,
            cache_dir=cfg.cache_dir,
            progress=cfg.progress,
            desc=f"decode {split}",
        )
        prepared[split] = (res.pixels, torch.tensor([samples[i].label for i in res.keep]))
        sources[split] = [samples[i].source for i in res.keep]
        bad += res.errors
    if bad and not cfg.skip_bad_images:
        lines = "\n".join(f"  {src}: {why}" for src, why in bad)
        raise mdata.DataError(
            f"{len(bad)} unreadable image(s); fix or remove them, or pass "
            f"--skip-bad-images:\n{lines}"
        )
    out = _prepare_out(cfg, resume, overwrite)
    if bad:
        log(
            f"skipped {len(bad)} unreadable image(s) (--skip-bad-images): "
            + ", ".join(src for src, _ in bad[:10])
            + (" ..." if len(bad) > 10 else "")
        )
        ds.notes.append(f"skipped {len(bad)} unreadable images")
    log(ds.summary())
    # Counts of the images actually used (after --skip-bad-images).
    split_counts = {
        split: {c: int((y == i).sum()) for i, c in enumerate(ds.classes)}
        for split, (_, y) in prepared.items()
    }

    if pretrained:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if channels == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    else:
        mean, std = compute_mean_std(prepared["train"][0])
    pre = Preprocess(
        image_size=size,
        channels=channels,
        mean=tuple(mean),
        std=tuple(std),
        resize=cfg.resize,
        grayscale=cfg.grayscale,
    )
    aug = cfg.augment

    resolved = asdict(cfg)
    resolved.update(
        {
            "image_size": size,
            "channels": channels,
            "pretrained": pretrained,
            "lr": cfg.lr or 1e-3,
            "precision_resolved": "bf16" if dtype else "fp32",
            "device_resolved": str(device),
            "preprocess": pre.to_dict(),
            "classes": ds.classes,
            "split_counts": split_counts,
            "data_notes": ds.notes,
            "torch_threads": torch.get_num_threads(),
        }
    )
    write_yaml(out / "config.yaml", resolved)

    # -- model and loss ------------------------------------------------------------------
    net = build_network(
        ModelMeta(arch=cfg.model, labels=ds.classes, preprocess=pre, dropout=cfg.dropout),
        pretrained=pretrained,
    )
    if cfg.bn_momentum is not None:
        set_bn_momentum(net, cfg.bn_momentum)
    net = net.to(device, memory_format=torch.channels_last)
    ytr = prepared["train"][1]
    counts = torch.bincount(ytr, minlength=len(ds.classes)).float()
    weights = (counts.sum() / (len(counts) * counts.clamp_min(1))) if cfg.class_weights else None
    if weights is not None:
        weights = weights.to(device)

    ckpt = _Checkpointer(out)
    resume_state = ckpt.load() if resume else None
    history: list[dict] = list(resume_state["history"]) if resume_state else []
    stages_done: list[str] = list(resume_state["stages_done"]) if resume_state else []
    if resume_state:
        net.load_state_dict(resume_state["net"])

    xtr, xva = prepared["train"][0], prepared["val"][0]
    yva = prepared["val"][1]
    lr = cfg.lr or 1e-3

    def to_input(b: torch.Tensor) -> torch.Tensor:
        return pre.normalize(b).contiguous(memory_format=torch.channels_last)

    def image_batches(x_uint8, y, augmenting: bool):
        def batches(epoch, gen):
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                if len(idx) < 2:  # batch norm cannot train on one sample
                    continue
                xb = torch.from_numpy(np.ascontiguousarray(x_uint8[idx.numpy()]))
                xb = pre.to_unit(xb.to(device, non_blocking=True))
                if augmenting:
                    xb = augment(xb, aug, gen)
                yield (
                    pre.standardize(xb).contiguous(memory_format=torch.channels_last),
                    y[idx].to(device),
                )

        return batches

    def tensor_batches(x, y, copies: int = 1):
        # x: (copies*N, ...) cached activations; each epoch uses one augmented copy.
        n = len(y)

        def batches(epoch, gen):
            base = (epoch % copies) * n
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                if len(idx) < 2:
                    continue
                yield x[base + idx].to(device, non_blocking=True).float(), y[idx].to(device)

        return batches

    stages = []
    if pretrained and cfg.transfer in ("frozen", "finetune"):
        stages.append("head")
        if cfg.transfer == "finetune" and cfg.unfreeze > 0:
            stages.append("finetune")
    else:
        stages.append("full")

    cut_cache: dict = {}

    def cut_activations(n_top: int, copies: int):
        """Frozen-prefix activations of the training set (copy 0 clean, the rest augmented)
        and of the validation set, computed once and shared by the head and finetune stages."""
        if cut_cache.get("key") != (n_top, copies):
            prefix = nn.Sequential(*list(net.backbone)[: len(net.backbone) - n_top]).eval()
            gen = torch.Generator().manual_seed(cfg.seed + 77)
            t0 = time.time()
            acts = []
            for c in range(copies):

                def aug_input(b, _c=c):
                    u = pre.to_unit(b)
                    if _c > 0:
                        u = augment(u, aug, gen)
                    return pre.standardize(u).contiguous(memory_format=torch.channels_last)

                acts.append(
                    compute_logits(prefix, xtr, dtype=dtype, transform=aug_input, device=device).to(
                        torch.bfloat16
                    )
                )
            ava = compute_logits(prefix, xva, dtype=dtype, transform=to_input, device=device)
            log(
                f"cached frozen activations {tuple(ava.shape[1:])} of {copies} cop"
                f"{'y' if copies == 1 else 'ies'} of the training set in {time.time() - t0:.1f}s"
            )
            cut_cache.update(key=(n_top, copies), train=torch.cat(acts), val=ava)
        return cut_cache["train"], cut_cache["val"]

    n_top = min(cfg.unfreeze, len(net.backbone) - 1) if "finetune" in stages else 0
    copies = max(1, cfg.aug_copies) if "finetune" in stages and aug.enabled else 1
    for name in stages:
        if name in stages_done:
            continue
        log(f"stage {name}")
        st = resume_state if (resume_state and resume_state.get("stage") == name) else None
        if name == "head":
            net.set_trainable_stages(0)
            net.eval()
            atr, ava = cut_activations(n_top, copies)
            top = nn.Sequential(*list(net.backbone)[len(net.backbone) - n_top :])

            def pooled(a):
                return net.head.pooled(top(a.float()))

            ftr = compute_logits(pooled, atr[: len(ytr)], dtype=dtype, device=device)
            fva = compute_logits(pooled, ava, dtype=dtype, device=device)
            stage = Stage(
                "head",
                net.head,
                net.head.classify,
                list(net.head.parameters()),
                tensor_batches(ftr, ytr),
                len(ytr),
                fva,
                None,
                yva,
                cfg.head_epochs,
                lr,
                None,
                device,
            )
        elif name == "finetune":
            net.set_trainable_stages(n_top)
            atr, ava = cut_activations(n_top, copies)
            top = nn.Sequential(*list(net.backbone)[len(net.backbone) - n_top :], net.head)
            stage = Stage(
                "finetune",
                top,
                top,
                [p for p in top.parameters() if p.requires_grad],
                tensor_batches(atr, ytr, copies),
                len(ytr),
                ava,
                None,
                yva,
                cfg.epochs,
                lr * cfg.finetune_lr_scale,
                train_dtype,
                device,
            )
        else:
            net.set_trainable_stages(None)
            stage = Stage(
                "full",
                net,
                net,
                list(net.parameters()),
                image_batches(xtr, ytr, aug.enabled),
                len(ytr),
                xva,
                to_input,
                yva,
                cfg.epochs,
                lr,
                train_dtype,
                device,
            )
        _fit(stage, net, cfg, weights, binary, history, ckpt, stages_done, st, log)
        resume_state = None

    # -- calibrate and choose the operating point on validation only -------------------
    net.set_trainable_stages(None)
    net.eval()
    # Calibration and evaluation run in float32, the precision prediction and serving use:
    # bf16 autocast moves probabilities by up to ~0.25 on some images, so a threshold fitted
    # on bf16 outputs would not be the one that serves.
    # One float32 pass per held-out split gives the logits (calibration, evaluation) and the
    # activation statistics (OOD guard) together.
    n_out = net.num_outputs
    outputs = {}
    for split in ("val", "test"):
        if split in prepared and len(prepared[split][1]):
            o = compute_logits(
                lambda b: logits_and_stats(net, b),
                prepared[split][0],
                dtype=None,
                transform=to_input,
                device=device,
            )
            outputs[split] = (o[:, :n_out], o[:, n_out:].numpy())
    val_logits, val_stats = outputs["val"]
    temperature = float(fit_temperature(val_logits.numpy(), yva.numpy()))
    val_probs = logits_to_probs(val_logits.numpy(), temperature)
    threshold, method = None, None
    if binary:
        choice = choose_threshold(
            yva.numpy(), val_probs[:, 1], method="youden", target_sensitivity=cfg.target_sensitivity
        )
        threshold, method = float(choice["threshold"]), choice["method"]
    guard = fit_ood_guard(net, xtr, ytr.numpy(), val_stats, to_input, seed=cfg.seed, device=device)
    guard.save(out / OOD_FILE)
    wall = time.time() - t_start
    meta = ModelMeta(
        arch=cfg.model,
        labels=ds.classes,
        preprocess=pre,
        temperature=temperature,
        threshold=threshold,
        threshold_method=method,
        dropout=cfg.dropout,
        name=cfg.name or out.name,
    )
    meta.extra.update(
        {
            "training": {
                "command": command,
                "data": str(cfg.data),
                "layout": ds.layout,
                "split_counts": split_counts,
                "notes": ds.notes,
                "epochs_run": len(history),
                "stages": stages,
                "wall_seconds": round(wall, 1),
                "seed": cfg.seed,
                "precision": "bf16" if dtype else "fp32",
                "device": str(device),
            },
        }
    )
    if cfg.card:
        meta.extra["card"] = dict(cfg.card)
    log(
        f"calibration: temperature {temperature:.3f}"
        + (f", threshold {threshold:.4f} ({method})" if binary else "")
    )

    from medlens.reporting.evaluate import write_evaluation

    summaries = {}
    for split, (logits, _) in outputs.items():
        summaries[split] = write_evaluation(
            out / "eval" / split,
            meta,
            prepared[split][1].numpy(),
            logits_to_probs(logits.numpy(), temperature),
            history=history,
            title=f"{meta.name}: {split} split ({ds.layout})",
            sources=sources[split],
        )
    meta.extra["metrics"] = {split: headline_metrics(m) for split, m in summaries.items()}
    meta.extra["ood"] = guard.summary(OOD_FILE)
    if "test" in outputs:
        meta.extra["ood"]["flagged_test_share"] = round(
            float(np.mean([o["flag"] for o in guard(outputs["test"][1])])), 4
        )
    save_model(out, net, meta)
    log(
        f"saved model to {out} ({wall:.0f}s); "
        + "; ".join(
            f"{s}: acc {m['accuracy']:.4f} auc {m['auc'] if m['auc'] is None else round(m['auc'], 4)}"
            for s, m in summaries.items()
        )
    )
    return out


def fit_ood_guard(
    net,
    xtr,
    ytr: np.ndarray,
    val_stats: np.ndarray,
    to_input,
    *,
    max_train: int = 2000,
    seed: int = 0,
    device: torch.device | None = None,
):
    """Fit the out-of-distribution guard (:class:`medlens.ood.StageGuard`) of a trained
    network: statistics of (up to ``max_train``, stratified at random) clean training images,
    threshold from the validation images' statistics ``val_stats``; float32, as served."""
    from medlens.evaluation.ood import fit_stage_guard

    net.eval()
    idx = np.arange(len(ytr))
    if len(idx) > max_train:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_train, replace=False))
    n_out = net.num_outputs
    stats = compute_logits(
        lambda b: logits_and_stats(net, b), xtr[idx], dtype=None, transform=to_input, device=device
    )[:, n_out:].numpy()
    return fit_stage_guard(
        stats, ytr[idx], val_stats, net.stat_widths(next(net.parameters()).shape[1])
    )


def refit_ood_guard(run: str | Path, log=print):
    """Fit a run's out-of-distribution guard again, from the same data and splits as its
    training (``config.yaml``: data, seed, fractions, patient regex), and rewrite ``ood.npz``
    and the ``ood`` entry of ``model.json``. For runs trained before the guard took its current
    form; the network, calibration and metrics are untouched."""
    import yaml

    from medlens.artifacts.folders import MODEL_JSON, OOD_FILE
    from medlens.artifacts.model import load_network
    from medlens.data import datasets as mdata
    from medlens.fileio import write_json

    run = Path(run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    cfg = TrainConfig.from_dict(
        {k: v for k, v in saved.items() if k in {f.name for f in fields(TrainConfig)}}
    )
    net, meta = load_network(run)
    net.eval()
    pre = meta.preprocess
    ds = mdata.load_dataset(
        cfg.data,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
        patient_regex=cfg.patient_regex,
        classes=meta.labels,
    )
    prepared = {}
    for split, samples in ds.splits.items():
        res = prepare_samples(samples, pre, progress=False, desc=split)
        prepared[split] = (res.pixels, np.array([samples[i].label for i in res.keep]))

    def to_input(b):
        return pre.normalize(b).contiguous(memory_format=torch.channels_last)

    def stats_of(x):
        return compute_logits(lambda b: logits_and_stats(net, b), x, transform=to_input)[
            :, net.num_outputs :
        ].numpy()

    xtr, ytr = prepared["train"]
    guard = fit_ood_guard(net, xtr, ytr, stats_of(prepared["val"][0]), to_input, seed=cfg.seed)
    guard.save(run / OOD_FILE)
    meta.extra["ood"] = guard.summary(OOD_FILE)
    if "test" in prepared and len(prepared["test"][1]):
        meta.extra["ood"]["flagged_test_share"] = round(
            float(np.mean([o["flag"] for o in guard(stats_of(prepared["test"][0]))])), 4
        )
    write_json(run / MODEL_JSON, meta.to_dict())
    log(f"refitted {run / OOD_FILE}: {meta.extra['ood']}")
    return guard


def _probe_colour(sample) -> bool:
    """Colour check for channel auto-detection; unreadable files are reported later."""
    from medlens.errors import ImageReadError

    try:
        return is_colour(sample.load())
    except (ImageReadError, OSError, ValueError):
        return False
