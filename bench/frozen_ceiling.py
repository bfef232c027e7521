"""What frozen ImageNet features can tell apart on a data set: grouped cross-validated AUC.

A binary recipe's train and validation splits are pooled (its carved test split stays out),
every image goes once through a pretrained backbone (and once mirrored; the two feature
vectors are averaged), each chosen stage's output is average-pooled, and a standardised
logistic regression is cross-validated over patient-grouped, class-stratified folds (several
shuffles, AUC of the pooled out-of-fold scores, averaged). When fine-tuning does not beat this
figure, the backbone's ImageNet features set the ceiling of what the recipe can learn from
these images, and a target far above it needs other pretraining or other data.

    python bench/frozen_ceiling.py --recipe recipes/covid-ct.yaml \
        --data ../shared/data/covid_ct/train --size 224 320 --stages 1 3,2,1 5,4,3,2
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from medlens.config import merge_settings
from medlens.data.cache import prepare_samples
from medlens.data.preprocess import Preprocess
from medlens.fileio import read_yaml
from medlens.modeling.registry import IMAGENET_MEAN, IMAGENET_STD, create_model
from medlens.training.training_data import load_splits

C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)


def stage_features(net, x: torch.Tensor, stages: list[int]) -> torch.Tensor:
    """Average-pooled outputs of the backbone stages ``stages``, counted from the top (1: the
    last stage)."""
    if min(stages) < 1 or max(stages) > len(net.backbone):
        raise SystemExit(f"--stages {stages}: count from the top, 1 to {len(net.backbone)}")
    outs = []
    h = x
    for stage in net.backbone:
        h = stage(h)
        outs.append(h)
    return torch.cat([outs[-s].mean((2, 3)) for s in stages], 1)


def features(model: str, pixels: np.ndarray, pre: Preprocess, stages: list[int]) -> np.ndarray:
    net = create_model(model, 1, 3, pretrained=True).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), 16):
            x = pre.normalize(torch.from_numpy(np.ascontiguousarray(pixels[i : i + 16])))
            f = stage_features(net, x, stages) + stage_features(net, x.flip(-1), stages)
            out.append((f / 2).numpy())
    return np.concatenate(out)


def grouped_cv_auc(x: np.ndarray, y: np.ndarray, groups: np.ndarray, c: float, folds: int,
                   shuffles: int) -> float:  # fmt: skip
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    aucs = []
    for seed in range(shuffles):
        scores = np.zeros(len(y))
        cv = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        for tr, te in cv.split(x, y, groups):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
            clf.fit(x[tr], y[tr])
            scores[te] = clf.predict_proba(x[te])[:, 1]
        aucs.append(roc_auc_score(y, scores))
    return float(np.mean(aucs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True, help="a binary recipe: its splits and resize")
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--size", type=int, nargs="+", default=[224])
    ap.add_argument("--stages", nargs="+", default=["1"],
                    help="backbone stages per feature set, counted from the top (1: the last), "
                         "comma-separated: 1 3,2,1")  # fmt: skip
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--shuffles", type=int, default=3)
    a = ap.parse_args()
    # the recipe's settings over the defaults: its splits, resize and grey conversion
    cfg = merge_settings(read_yaml(a.recipe, "the recipe"), {"data": a.data, "out": "-"},
                         source=a.recipe)  # fmt: skip
    ds = load_splits(cfg)
    if len(ds.classes) != 2:
        raise SystemExit(f"{a.recipe}: a binary recipe is needed, got classes {ds.classes}")
    pool = ds.splits["train"] + ds.splits.get("val", [])
    y = np.array([s.label for s in pool])
    groups = np.array([s.patient or s.source for s in pool])
    print(f"{len(pool)} images ({np.bincount(y).tolist()} per class {ds.classes}), "
          f"{len(set(groups))} groups; carved test split left out; "
          f"{a.folds} grouped folds x {a.shuffles} shuffles")  # fmt: skip
    print("| model | size | stages | features | " + " | ".join(f"C={c}" for c in C_GRID) + " |")
    print("|---|---|---|---|" + "---|" * len(C_GRID))
    for size in a.size:
        pre = Preprocess(image_size=size, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         resize=cfg.resize, grayscale=cfg.grayscale)  # fmt: skip
        prepared = prepare_samples(pool, pre, progress=False)
        if len(prepared.keep) != len(pool):
            raise SystemExit(f"{len(pool) - len(prepared.keep)} images could not be decoded")
        for spec in a.stages:
            stages = [int(s) for s in spec.split(",")]
            t0 = time.time()
            x = features(a.model, prepared.pixels, pre, stages)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                aucs = [grouped_cv_auc(x, y, groups, c, a.folds, a.shuffles) for c in C_GRID]
            print(f"| {a.model} | {size} | {spec} | {x.shape[1]} | "
                  + " | ".join(f"{v:.3f}" for v in aucs) + f" |  ({time.time() - t0:.0f} s)",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
