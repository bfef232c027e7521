"""How a model holds up when its own validation images are acquired differently: the
validation split (carved as the recipe carves it) under synthetic acquisition shifts.

    python bench/shift_robustness.py --model pneumonia --recipe recipes/pneumonia.yaml \\
        --data ../shared/data/chest_xray/train [--model /tmp/old/pneumonia ...]

For each model and each shift: accuracy and balanced accuracy at the model's operating point,
AUC (macro one-vs-rest), and the share the OOD guard flags. The shifts act on the prepared
8-bit images: exposure (gamma 0.6 / 1.6, contrast x0.6), sharpness (Gaussian blur sigma 1.5
px; unsharp mask), resolution (down to half size and back), JPEG quality 30 and Gaussian noise
(sigma 12 grey levels). They are not the held-out test sets (which the project never sees);
they ask whether a model leans on the source's exact look. Validation images only: nothing
here chooses anything on a test split.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image, ImageFilter

from medlens.data.cache import prepare_samples
from medlens.evaluation.metrics import compute_metrics
from medlens.inference.predictor import Predictor
from medlens.training.training_data import recipe_splits


def _pil_each(x: np.ndarray, fn) -> np.ndarray:
    out = np.empty_like(x)
    for i, img in enumerate(x):  # (C, S, S) uint8
        chw = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        res = np.asarray(fn(Image.fromarray(chw)))
        out[i] = res[None] if img.shape[0] == 1 else res.transpose(2, 0, 1)
    return out


def _jpeg(im: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=30)
    return Image.open(io.BytesIO(buf.getvalue())).convert(im.mode)


def _half(im: Image.Image) -> Image.Image:
    w, h = im.size
    return im.resize((w // 2, h // 2), Image.BILINEAR).resize((w, h), Image.BILINEAR)


SHIFTS = {
    "none": lambda x: x,
    "gamma 0.6": lambda x: (255 * (x / 255.0) ** 0.6).round().astype(np.uint8),
    "gamma 1.6": lambda x: (255 * (x / 255.0) ** 1.6).round().astype(np.uint8),
    "contrast x0.6": lambda x: (128 + 0.6 * (x.astype(np.float32) - 128)).round().astype(np.uint8),
    "blur 1.5 px": lambda x: _pil_each(x, lambda im: im.filter(ImageFilter.GaussianBlur(1.5))),
    "unsharp mask": lambda x: _pil_each(x, lambda im: im.filter(ImageFilter.UnsharpMask(2, 150))),
    "half resolution": lambda x: _pil_each(x, _half),
    "JPEG q30": lambda x: _pil_each(x, _jpeg),
    "noise 12": lambda x: np.clip(
        x + np.random.default_rng(0).normal(0, 12, x.shape), 0, 255
    ).astype(np.uint8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="model folder or name")
    ap.add_argument("--recipe", required=True, help="the recipe that carved the split")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="val")
    a = ap.parse_args()
    ds = recipe_splits(a.recipe, a.data)
    samples = ds.splits[a.split]
    print(f"{a.split} split of {a.data}: {len(samples)} images")
    print("| model | shift | accuracy | balanced acc. | AUC | OOD flagged |")
    print("|---|---|---|---|---|---|")
    for ref in a.model:
        pred = Predictor(ref)
        res = prepare_samples(samples, pred.pre, progress=False, workers=2)
        y = np.array([samples[i].label for i in res.keep])
        for name, shift in SHIFTS.items():
            outs = pred.predict_prepared(shift(res.pixels))
            probs = np.array([[p.probabilities[c] for c in pred.labels] for p in outs])
            m = compute_metrics(y, probs, pred.labels, pred.meta.threshold, n_bootstrap=0)
            flagged = np.mean([bool(p.ood["flag"]) for p in outs])
            print(
                f"| `{ref}` | {name} | {m['accuracy']:.3f} | {m['balanced_accuracy']:.3f} | "
                f"{m['auc']:.4f} | {flagged:.1%} |"
            )


if __name__ == "__main__":
    main()
