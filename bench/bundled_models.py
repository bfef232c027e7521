"""The bundled models' figures for the README: validation and carved-test metrics with their
95% intervals (as re-measured on the shipped files at export, read from ``model.json``) and
the out-of-distribution guard's flag rates (measured here on ``../shared/data``).

    python bench/bundled_models.py                  # both tables, Markdown, on stdout
    python bench/bundled_models.py --skip-ood       # metrics only (no data needed)

Own rate: the model's validation split, carved as its recipe carves it; other tasks: ``-n``
random images of each other task's training data (seed 1), as ``tests/test_bundled.py`` does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medlens.artifacts.folders import bundled_models_dir
from medlens.inference.predictor import Predictor
from medlens.reporting.ood_rates import flag_rate, sample_files
from medlens.training.training_data import recipe_splits

ROOT = Path(__file__).resolve().parents[1]
# bundled model -> its data under ../shared/data
DATA = {
    "pneumonia": "chest_xray/train",
    "brain-tumor": "brain_mri/train",
    "covid": "covid_xray/train",
    "pharyngitis": "pharyngitis",
    "tuberculosis": "tb_xray/train",
    "covid-ct": "covid_ct/train",
}
KEYS = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ece")


def _cell(m: dict, key: str) -> str:
    value = m.get(key)
    if value is None:
        return "—"
    ci = (m.get("ci") or {}).get(key)
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else "")


def metrics_table() -> str:
    rows = [
        "| model | split | n | " + " | ".join(KEYS) + " | T | threshold |",
        "|---|---|---|" + "---|" * (len(KEYS) + 2),
    ]
    for name in DATA:
        meta = json.loads((bundled_models_dir() / name / "model.json").read_text())
        for split, m in (meta.get("metrics") or {}).items():
            label = split + (" (out-of-fold)" if m.get("measured_on") else "")
            thr = meta.get("threshold")
            rows.append(
                f"| `{name}` | {label} | {m['n']} | "
                + " | ".join(_cell(m, k) for k in KEYS)
                + f" | {meta['temperature']:.2f} | {'argmax' if thr is None else f'{thr:.3f}'} |"
            )
    return "\n".join(rows)


def ood_table(data: Path, n: int) -> str:
    rows = [
        "| model | own val | " + " | ".join(DATA) + " |",
        "|---|---|" + "---|" * len(DATA),
    ]
    for name, folder in DATA.items():
        pred = Predictor(name)
        ds = recipe_splits(ROOT / "recipes" / f"{name}.yaml", data / folder)
        own = ds.splits["val"]
        cells = [f"{flag_rate(pred, own):.1%} ({len(own)})"]
        for other, other_folder in DATA.items():
            if other == name:
                cells.append("—")
            else:
                cells.append(f"{flag_rate(pred, sample_files(data / other_folder, n, 1)):.1%}")
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("-n", type=int, default=120, help="images of each other task")
    ap.add_argument("--skip-ood", action="store_true", help="metrics only")
    a = ap.parse_args()
    print(metrics_table())
    if not a.skip_ood:
        print()
        print(ood_table(a.data, a.n))


if __name__ == "__main__":
    main()
