"""The out-of-distribution guard of a trained network: fitted after training, or again later.

Its statistics come from the float32 pass every inference path shares
(:func:`medlens.inference.runtime.compute_logits` with
:func:`~medlens.inference.runtime.logits_and_stats`), so the guard sees what serving sees.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch

from medlens.artifacts.folders import OOD_FILE, ModelFolder
from medlens.config import TrainConfig
from medlens.data.preprocess import Preprocess
from medlens.evaluation.ood import StageGuard
from medlens.fileio import sha256_file
from medlens.inference.runtime import compute_logits, logits_and_stats
from medlens.modeling.classifier import Classifier
from medlens.training.batches import ModelInput
from medlens.training.training_data import load_splits

log = logging.getLogger(__name__)


def float32_outputs(
    net: Classifier,
    x: np.ndarray | torch.Tensor,
    transform: ModelInput,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Logits and activation statistics of images in one float32 pass, as served.

    Args:
        net: the network, in eval mode.
        x: uint8 images ``(N, C, S, S)``.
        transform: uint8 batch -> network input.
        device: where the pass runs (None: the CPU).

    Returns:
        Logits ``(N, num_outputs)`` and statistics ``(N, D)``.
    """
    o = compute_logits(
        partial(logits_and_stats, net), x, dtype=None, transform=transform, device=device
    )
    return o[:, : net.num_outputs], o[:, net.num_outputs :].numpy()


def fit_ood_guard(
    net: Classifier,
    xtr: np.ndarray,
    ytr: np.ndarray,
    val_stats: np.ndarray,
    to_input: ModelInput,
    *,
    max_train: int = 2000,
    seed: int = 0,
    device: torch.device | None = None,
) -> StageGuard:
    """Fit the out-of-distribution guard of a trained network.

    Statistics of (up to ``max_train``, stratified at random) clean training images, the
    threshold from the validation images' statistics ``val_stats``; float32, as served.

    Args:
        net: the trained network.
        xtr: uint8 training images.
        ytr: their labels.
        val_stats: validation statistics (:func:`float32_outputs`).
        to_input: uint8 batch -> network input.
        max_train: at most this many training images.
        seed: draws the training images used when there are more.
        device: where the pass runs.

    Returns:
        The guard (:class:`medlens.evaluation.ood.StageGuard`).
    """
    from medlens.evaluation.ood import fit_stage_guard

    net.eval()
    idx = np.arange(len(ytr))
    if len(idx) > max_train:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_train, replace=False))
    _, stats = float32_outputs(net, xtr[idx], to_input, device)
    return fit_stage_guard(
        stats, ytr[idx], val_stats, net.stat_widths(next(net.parameters()).shape[1])
    )


def guard_summary(
    guard: StageGuard, test_stats: np.ndarray | None = None, saved: Path | None = None
) -> dict:
    """The ``ood`` entry of ``model.json``; with the share of test images it flags.

    Args:
        guard: the fitted guard.
        test_stats: statistics of the test split, when there is one.
        saved: the guard's ``ood.npz``, whose sha256 is recorded (checked at load).

    Returns:
        The summary.
    """
    summary = guard.summary(OOD_FILE)
    if saved is not None:
        summary["sha256"] = sha256_file(saved)
    if test_stats is not None:
        summary["flagged_test_share"] = round(
            float(np.mean([o["flag"] for o in guard(test_stats)])), 4
        )
    return summary


def refit_ood_guard(run: str | Path) -> StageGuard:
    """Fit a run's out-of-distribution guard again and rewrite it.

    Uses the same data and splits as its training (``config.yaml``: data, seed, fractions,
    patient regex) and rewrites ``ood.npz`` and the ``ood`` entry of ``model.json``. For runs
    trained before the guard took its current form; the network, calibration and metrics are
    untouched.

    Args:
        run: the run folder.

    Returns:
        The new guard.
    """
    from medlens.artifacts.model import load_network, write_meta

    folder = ModelFolder(run)
    cfg = TrainConfig.from_saved(folder.read_config())
    net, meta = load_network(folder.path)
    net.eval()
    prepared = _decode_splits(cfg, meta.preprocess, meta.labels)
    to_input = ModelInput(meta.preprocess)
    xtr, ytr = prepared["train"]
    _, val_stats = float32_outputs(net, prepared["val"][0], to_input)
    guard = fit_ood_guard(net, xtr, ytr, val_stats, to_input, seed=cfg.seed)
    guard.save(folder.ood)
    test_stats = None
    if "test" in prepared and len(prepared["test"][1]):
        test_stats = float32_outputs(net, prepared["test"][0], to_input)[1]
    meta.extra["ood"] = guard_summary(guard, test_stats, folder.ood)
    write_meta(folder.path, meta)
    log.info(f"refitted {folder.ood}: {meta.extra['ood']}")
    return guard


def _decode_splits(cfg: TrainConfig, pre: Preprocess, labels: list[str]) -> dict:
    """The run's splits (:func:`~medlens.training.training_data.load_splits`, folds included),
    decoded at the model's geometry: split -> (uint8 images, labels)."""
    from medlens.data.cache import prepare_samples

    ds = load_splits(cfg, classes=labels)
    prepared = {}
    for split, samples in ds.splits.items():
        res = prepare_samples(samples, pre, progress=False, desc=split)
        prepared[split] = (res.pixels, np.array([samples[i].label for i in res.keep]))
    return prepared
