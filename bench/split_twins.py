"""Held-out images that are copies of training images: how many, and what they do to a figure.

Patient grouping only sees file names; a picture saved twice under two names can train in one
copy and be tested in the other (:mod:`medlens.data.duplicates`). This carves the splits a
bundled model's recipe carves from DATA, finds the images of SPLIT with a near-identical image
in the training split, and reports the model's recorded accuracy on SPLIT (its
``eval/<split>/predictions.csv``) with and without such a twin, with 95% Wilson intervals.

    python bench/split_twins.py --model brain-tumor --data ../shared/data/brain_mri/train
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rates import print_rates  # bench/rates.py (this script's folder)

from medlens.artifacts.folders import ModelFolder
from medlens.data.cache import prepare_samples
from medlens.data.duplicates import thumbnails, twins
from medlens.inference.predictor import Predictor
from medlens.training.training_data import recipe_splits

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="brain-tumor")
    ap.add_argument("--recipe", help="default: recipes/<model>.yaml")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    a = ap.parse_args()
    pred = Predictor(a.model)
    recipe = a.recipe or ROOT / "recipes" / f"{a.model}.yaml"
    ds = recipe_splits(recipe, a.data)
    decoded = {
        s: prepare_samples(ds.splits[s], pred.meta.preprocess, progress=False, desc=s)
        for s in ("train", a.split)
    }
    found = twins(thumbnails(decoded[a.split].pixels), thumbnails(decoded["train"].pixels))
    held = [ds.splits[a.split][i].source for i in decoded[a.split].keep]
    root = os.path.abspath(a.data)
    has_twin = {
        os.path.relpath(os.path.abspath(s), root): bool(f >= 0) for s, f in zip(held, found)
    }
    rec = ModelFolder(pred.folder).read_predictions(a.split, pred.labels)
    if rec is None:
        raise SystemExit(f"{a.model} has no recorded {a.split} predictions")
    if pred.meta.binary:
        called = (rec.probs[:, 1] >= pred.meta.threshold).astype(int)
    else:
        called = rec.probs.argmax(1)
    right = called == rec.y_true
    groups: dict[str, list[bool]] = {"with a twin in train": [], "without": []}
    unmatched = 0
    for path, ok in zip(rec.paths, right):
        if path not in has_twin:
            unmatched += 1
            continue
        groups["with a twin in train" if has_twin[path] else "without"].append(bool(ok))
    print(f"{a.model}, {a.split} split of {a.data} ({len(held)} images; {len(found)} decoded)")
    print(f"{int((found >= 0).sum())} of {len(found)} have a near-identical image in train")
    if unmatched:
        print(f"{unmatched} recorded predictions are not in the recipe's {a.split} split")
    print_rates(groups, "images", "accuracy")


if __name__ == "__main__":
    main()
