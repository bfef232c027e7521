"""Tests for medlens.training.regularise: label smoothing, mixup, weight averaging."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medlens.training.regularise import WeightAverage, mix_batch, smoothed_loss
from medlens.training.trainer import train


def test_binary_label_smoothing_moves_the_targets_towards_one_half():
    logits, y = torch.tensor([[2.0], [-1.0]]), torch.tensor([1, 0])
    got = smoothed_loss(logits, y, None, binary=True, smoothing=0.2)
    want = F.binary_cross_entropy_with_logits(logits.view(-1), torch.tensor([0.9, 0.1]))
    torch.testing.assert_close(got, want)
    assert smoothed_loss(logits, y, None, True) == F.binary_cross_entropy_with_logits(
        logits.view(-1), y.float()
    )


def test_multiclass_label_smoothing_is_cross_entropys_own():
    logits, y = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.arange(5) % 3
    w = torch.tensor([1.0, 2.0, 0.5])
    torch.testing.assert_close(
        smoothed_loss(logits, y, w, False, 0.1), F.cross_entropy(logits, y, w, label_smoothing=0.1)
    )


def test_mixup_mixes_each_image_with_a_shuffled_one_reproducibly():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    mixed, perm, lam = mix_batch(x, 0.4, torch.Generator().manual_seed(3))
    assert 0.0 <= lam <= 1.0 and sorted(perm.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    again = mix_batch(x, 0.4, torch.Generator().manual_seed(3))
    assert again[2] == lam and torch.equal(again[1], perm)


def test_weight_average_follows_the_exponential_rule_and_swaps_back():
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    avg = WeightAverage(net, decay=0.5)
    for w in (3.0, 5.0):
        with torch.no_grad():
            net.weight.fill_(w)
        avg.update()
    # AveragedModel copies the first update, then ema = 0.5 * ema + 0.5 * w: 3, then 4.
    with avg.applied():
        assert float(net.weight.detach()) == pytest.approx(4.0)
    assert float(net.weight.detach()) == 5.0


@pytest.mark.slow
def test_training_with_every_regulariser_runs_and_records_them(tmp_path, synthetic_data,
                                                               train_config):  # fmt: skip
    out = train(
        train_config(synthetic_data, tmp_path / "r", label_smoothing=0.1, mixup=0.2, ema=0.9)
    )
    cfg = (out / "config.yaml").read_text()
    assert "label_smoothing: 0.1" in cfg and "mixup: 0.2" in cfg and "ema: 0.9" in cfg
    metrics = json.loads((out / "eval" / "val" / "metrics.json").read_text())
    assert metrics["auc"] >= 0.9  # the synthetic classes stay separable
    plain = train(train_config(synthetic_data, tmp_path / "p"))
    assert (out / "model.pt").read_bytes() != (plain / "model.pt").read_bytes()
