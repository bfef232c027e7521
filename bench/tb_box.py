"""Tuberculosis model: sensitivity on TB images with and without a white anonymisation box.

About a quarter of the TB images of ``tb_xray`` carry a solid white box near the bottom edge and
no normal image does (see ../shared/data/README.md). A model that learnt the box would find boxed
TB images and miss the others. This splits the bundled model's carved test split (its recorded
``eval/test/predictions.csv``) by the audit's solid-rectangle feature and reports sensitivity at
the shipped operating point for each half, with 95% Wilson intervals.

    python bench/tb_box.py [--model tuberculosis] [--data ../shared/data/tb_xray/train]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rates import print_rates  # bench/rates.py (this script's folder)

from medlens.artifacts.folders import ModelFolder
from medlens.data.imaging import read_image
from medlens.evaluation.shortcuts import FEATURE_NAMES, image_features
from medlens.inference.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tuberculosis")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tb_xray" / "train"))
    ap.add_argument("--split", default="test")
    a = ap.parse_args()
    pred = Predictor(a.model)
    rec = ModelFolder(pred.folder).read_predictions(a.split, pred.labels)
    pos = pred.labels.index("tuberculosis")
    cells = FEATURE_NAMES.index("solid_bright_cells")
    groups: dict[str, list[bool]] = {"with a white box": [], "without a box": []}
    for path, y, p in zip(rec.paths, rec.y_true, rec.probs):
        if y != pos:
            continue
        img = read_image(Path(a.data) / path)
        boxed = image_features(img.pixels, img.source_format, img.notes)[cells] > 0
        hit = bool(p[pos] >= pred.meta.threshold)
        groups["with a white box" if boxed else "without a box"].append(hit)
    print(f"{a.model}, {a.split} split, threshold {pred.meta.threshold:.4f}")
    print_rates(groups, "TB images", "sensitivity")


if __name__ == "__main__":
    main()
