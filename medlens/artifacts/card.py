"""Model cards (Mitchell et al., *Model Cards for Model Reporting*, FAT* 2019): JSON and Markdown."""

from __future__ import annotations

import json
import os
from pathlib import Path

from medlens.artifacts.folders import CARD_JSON, CARD_MD, MODEL_WEIGHTS, ONNX_FILE
from medlens.artifacts.model import ModelMeta, load_network, write_meta
from medlens.artifacts.onnx import OPSET, check_onnx, onnx_bytes
from medlens.evaluation.metrics import CI_METRICS, split_views
from medlens.fileio import atomic_write_bytes, atomic_write_text, sha256_file, write_json

# Fields a model.json may carry under "card" (all optional; empty placeholders otherwise).
CARD_FIELDS = (
    "title",
    "modality",
    "intended_use",
    "out_of_scope_use",
    "limitations",
    "ethical_considerations",
    "caveats",
    "contact",
    "license",
    "citation",
)


DISCLAIMER_HEAD = "Not a medical device: research software."
DISCLAIMER = (
    f"{DISCLAIMER_HEAD} Predictions must not be used for diagnosis without clinical "
    "validation on the population the model would serve."
)


def weights_sha256(meta: ModelMeta, folder: str | Path | None = None) -> str | None:
    """sha256 of ``model.pt``: recorded in ``model.json``, else hashed from the file."""
    digest = meta.weights_sha256
    if not digest and folder is not None and (Path(folder) / MODEL_WEIGHTS).exists():
        digest = sha256_file(Path(folder) / MODEL_WEIGHTS)
    return digest


def model_version(meta: ModelMeta, folder: str | Path | None = None) -> str:
    """Short version id: the first 12 hex digits of the sha256 of ``model.pt``."""
    return (weights_sha256(meta, folder) or "unknown")[:12]


def model_card(
    meta: ModelMeta, folder: str | Path | None = None, onnx_sha256: str | None = None
) -> dict:
    """The model card of a model as a dict (what ``model_card.json`` holds).

    Card fields (intended use, limitations, ...) come from a ``card`` dict in ``model.json``;
    missing ones are empty strings to fill in.
    """
    from medlens import __version__

    given = dict(meta.extra.get("card") or {})
    card = {k: given.pop(k, "") for k in CARD_FIELDS}
    card["title"] = card["title"] or meta.name or (Path(folder).name if folder else "model")
    weights = weights_sha256(meta, folder)
    out = {
        "name": meta.name or (Path(folder).name if folder else None),
        **{k: card[k] for k in ("title", "modality")},
        "version": (weights or "unknown")[:12],
        "task": "binary" if meta.binary else "multiclass",
        "labels": list(meta.labels),
        "architecture": meta.arch,
        "input": {
            "modality": card["modality"] or None,
            "size": meta.preprocess.image_size,
            "channels": meta.preprocess.channels,
        },
        "preprocessing": meta.preprocess.to_dict(),
        "calibration": {
            "method": "temperature scaling (Guo et al. 2017), fitted on validation",
            "temperature": meta.temperature,
        },
        "decision": (
            {
                "threshold": meta.threshold,
                "method": meta.threshold_method,
                "rule": f"predict {meta.labels[1]!r} when its probability >= threshold",
                "operating_point": meta.extra.get("operating_point"),
            }
            if meta.binary
            else {"threshold": None, "method": None, "rule": "predict the most probable class"}
        ),
        "metrics": meta.extra.get("metrics") or {},
        **{k: meta.extra[k] for k in ("site_calibration", "shortcut_audit") if meta.extra.get(k)},
        "training": _shareable(meta.extra.get("training") or {}),
        **{k: card[k] for k in CARD_FIELDS if k not in ("title", "modality")},
        "disclaimer": DISCLAIMER,
        "ood": meta.extra.get("ood"),
        "export": meta.extra.get("export"),
        "files": {
            ONNX_FILE: {"sha256": onnx_sha256} if onnx_sha256 else None,
            **({MODEL_WEIGHTS: {"sha256": weights}} if not _inference_only(folder) else {}),
        },
        "medlens_version": __version__,
    }
    for k, v in given.items():  # further fields the author put in the card; ours win
        out.setdefault(k, v)
    return out


def _short_path(path: str) -> str:
    """A path without the trainer's disk layout: its last two components."""
    return "/".join(Path(path).parts[-2:])


def _shareable(training: dict) -> dict:
    """The training facts without the trainer's own disk layout: the data folder as its last
    two path components (``chest_xray/train``), and so the ``--data`` and ``--out`` values of
    the recorded command."""
    import shlex

    out = dict(training)
    data = training.get("data")
    if data and not data.startswith("npz:"):
        out["data"] = _short_path(data)
    if training.get("command"):
        words = shlex.split(training["command"])
        for i, w in enumerate(words[:-1]):
            if w in ("--data", "--out") and not words[i + 1].startswith("npz:"):
                words[i + 1] = _short_path(words[i + 1])
        out["command"] = shlex.join(words)
    return out


def _inference_only(folder: str | Path | None) -> bool:
    """A folder shipped without ``model.pt`` (a bundled model)."""
    return folder is not None and not (Path(folder) / MODEL_WEIGHTS).exists()


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _md_summary(card: dict) -> list[str]:
    decision = card["decision"]
    rule = decision["rule"]
    if decision["threshold"] is not None:
        rule += f" (threshold {_fmt(decision['threshold'], 4)}, {decision['method']})"
    pre = card["preprocessing"]
    warning = (card.get("training") or {}).get("warning")
    return [
        f"# Model card: {card['title']}",
        "",
        f"> {card['disclaimer']}",
        "",
        *([f"> **Warning: {warning}.**", ""] if warning else []),
        "| | |",
        "|---|---|",
        f"| name | `{card['name']}` |",
        f"| version | `{card['version']}` |",
        f"| task | {card['task']}: {', '.join(card['labels'])} |",
        f"| architecture | {card['architecture']} |",
        f"| input | {card['input']['modality'] or 'modality not stated'}, "
        f"{card['input']['size']} px, {card['input']['channels']} channel(s) |",
        f"| preprocessing | resize `{pre['resize']}`, mean {pre['mean']}, std {pre['std']} |",
        f"| calibration | temperature {_fmt(card['calibration']['temperature'], 4)} |",
        f"| decision | {rule} |",
        "",
    ]


_MD_TEXT_SECTIONS = (
    ("intended_use", "Intended use"),
    ("out_of_scope_use", "Out-of-scope use"),
    ("limitations", "Limitations"),
    ("ethical_considerations", "Ethical considerations"),
    ("caveats", "Caveats"),
)
_MD_METRICS = (*(k for k in CI_METRICS if k != "f2"), "ece", "brier")


def _md_evaluation(metrics: dict) -> list[str]:
    lines = ["## Evaluation (95% bootstrap intervals)", ""]
    if not metrics:
        lines += ["_No evaluation recorded in model.json._", ""]
    for view in split_views(metrics):
        m = view["metrics"]
        lines += [
            f"### {view['title']} (n = {m.get('n')})",
            "",
            f"{view['role'][0].upper()}{view['role'][1:]}.",
            "",
            *([f"> Warning: {view['warning']}", ""] if view["warning"] else []),
            "| metric | value | 95% CI |",
            "|---|---|---|",
        ]
        ci = m.get("ci") or {}
        for k in _MD_METRICS:
            if k in m:
                lo_hi = ci.get(k)
                interval = (
                    f"{_fmt(lo_hi[0])} – {_fmt(lo_hi[1])}" if lo_hi and None not in lo_hi else ""
                )
                lines.append(f"| {k} | {_fmt(m[k])} | {interval} |")
        lines.append("")
    return lines


def _md_training(training: dict) -> list[str]:
    lines = ["## Training data", ""]
    if not training:
        return lines + ["_Not recorded._"]
    lines += [f"- data: `{training.get('data')}` ({training.get('layout')})"]
    if training.get("command"):
        lines.append(f"- command: `{training['command']}`")
    if training.get("wall_seconds") is not None:
        lines.append(
            f"- wall time: {training['wall_seconds']:.0f} s, seed "
            f"{training.get('seed')}, precision {training.get('precision')}"
        )
    for split, counts in (training.get("split_counts") or {}).items():
        lines.append(f"- {split}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    return lines + [f"- note: {n}" for n in training.get("notes") or []]


def _md_operating_point(card: dict) -> list[str]:
    decision, positive = card["decision"], card["labels"][1]
    op = decision.get("operating_point")
    head = (
        f"Threshold {_fmt(decision['threshold'], 4)} on the calibrated probability of {positive!r}"
    )
    if not op:
        return [f"{head}, chosen by {decision['method']}."]
    lo, hi = op["threshold_ci"]
    lines = [
        f"{head}: {op['description']}.",
        "",
        f"On the {op['n']} {op['measured_on']} images ({op['n_positive']} {positive}): threshold "
        f"95% interval {_fmt(lo, 4)} – {_fmt(hi, 4)}; sensitivity {_fmt(op['sensitivity'])} "
        f"({_fmt(op['sensitivity_ci'][0])} – {_fmt(op['sensitivity_ci'][1])}), specificity "
        f"{_fmt(op['specificity'])} ({_fmt(op['specificity_ci'][0])} – "
        f"{_fmt(op['specificity_ci'][1])}); bootstrap of those images.",
    ]
    if op.get("warning"):
        lines += ["", f"> Warning: {op['warning']}"]
    return lines


def _md_site(site: dict) -> list[str]:
    data = site.get("data") or {}
    lines = [
        f"Calibrated on {site.get('date')} from base model `{site.get('base_model')}` "
        f"(version `{site.get('base_version')}`, model.json sha256 "
        f"`{str(site.get('base_model_json_sha256'))[:12]}...`) with {data.get('images')} "
        f"labelled site images ({', '.join(f'{c} {n}' for c, n in (data.get('per_class') or {}).items())}) "
        f"from `{data.get('folder')}`; the network is unchanged.",
        "",
        "| metric | base model | site calibration (cross-fitted) |",
        "|---|---|---|",
    ]
    before, after = site.get("before") or {}, site.get("after") or {}
    for k in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc", "ece"):
        cells = []
        for m in (before, after):
            ci = (m.get("ci") or {}).get(k)
            cells.append(_fmt(m.get(k)) + (f" ({_fmt(ci[0])} – {_fmt(ci[1])})" if ci else ""))
        lines.append(f"| {k} | {cells[0]} | {cells[1]} |")
    return lines


def _md_audit(a: dict) -> list[str]:
    return [
        f"{a['verdict']} (`medlens audit`, {a['n']} images of `{a['data']}`; details in "
        f"[{a['file']}]({a['file']}).)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| no-anatomy baseline AUC (size, format, borders, boxes, marks) | {a['baseline_auc']:.3f} |",
        f"| model AUC | {a['model_auc']:.3f} |",
        f"| model AUC, central anatomy masked | {a['centre_masked_auc']:.3f} |",
        f"| model AUC, border masked | {a['border_masked_auc']:.3f} |",
        "| Grad-CAM mass in the central region (the box inside the outer 15%, 49% of the area) | "
        + ("n/a" if a["cam_centre_share"] is None else f"{a['cam_centre_share']:.1%}")
        + " |",
    ]


def _md_notes(card: dict) -> list[str]:
    """Operating point, OOD guard, export, licence and citation (each only when known)."""
    lines = []
    if card["decision"]["threshold"] is not None:
        lines += ["", "## Operating point", "", *_md_operating_point(card)]
    if card.get("site_calibration"):
        lines += ["", "## Site calibration", "", *_md_site(card["site_calibration"])]
    if card.get("shortcut_audit"):
        lines += ["", "## Shortcut audit", "", *_md_audit(card["shortcut_audit"])]
    ood = card.get("ood")
    if ood:
        lines += [
            "",
            "## Out-of-distribution guard",
            "",
            f"{ood.get('method')} (up to {ood.get('dim')} principal components per "
            f"block); an image is flagged when its score exceeds "
            + (
                f"1, i.e. when on average the {ood['members']} members score it above their "
                f"own thresholds (each the {ood.get('quantile')} quantile of its validation "
                "images' scores)."
                if ood.get("members")
                else f"{_fmt(ood.get('threshold'), 3)}, the {ood.get('quantile')} quantile of "
                "the validation images' scores."
            )
            + " Flagged images get a warning instead of a confident answer.",
        ]
    export = card.get("export")
    if export:
        lines += [
            "",
            "## Export",
            "",
            f"Weights: {export.get('weights')}; the metrics above were measured on the "
            f"shipped `{export.get('metrics_measured_on')}` (largest probability change "
            f"against the training run: {_fmt(export.get('max_probability_change'), 4)}).",
        ]
    for key, title in (("license", "Licence"), ("citation", "Citation")):
        if card.get(key):
            lines += ["", f"## {title}", "", card[key]]
    return lines


def model_card_markdown(card: dict) -> str:
    """Render :func:`model_card` as Markdown."""
    lines = _md_summary(card)
    for key, title in _MD_TEXT_SECTIONS:
        lines += [f"## {title}", "", card.get(key) or "_Not stated yet._", ""]
    lines += _md_evaluation(card.get("metrics") or {})
    lines += _md_training(card.get("training") or {})
    lines += _md_notes(card)
    lines += ["", "## Files", ""]
    for name, f in card["files"].items():
        lines.append(f"- `{name}`: sha256 `{f['sha256']}`" if f else f"- `{name}`: not exported")
    return "\n".join(lines) + "\n"


def export_model(ref: str | os.PathLike, opset: int = OPSET, rtol: float = 1e-4) -> dict:
    """``medlens export``: write ``model.onnx``, ``model_card.json`` and ``model_card.md``.

    Args:
        ref: a model folder (a ``medlens train`` run) or a bundled model name.

    Returns:
        ``{"folder", "onnx", "card_json", "card_md", "relative_error"}``.
    """
    from medlens.artifacts.folders import resolve_model

    folder = resolve_model(ref)
    net, meta = load_network(folder)
    meta.extra["weights_sha256"] = weights_sha256(meta, folder)
    blob = onnx_bytes(net, meta, opset)
    err = check_onnx(net, blob, meta, rtol=rtol)
    atomic_write_bytes(folder / ONNX_FILE, blob)
    write_card(folder, meta)
    return {
        "folder": folder,
        "onnx": folder / ONNX_FILE,
        "card_json": folder / CARD_JSON,
        "card_md": folder / CARD_MD,
        "relative_error": err,
    }


def write_card(folder: str | Path, meta: ModelMeta) -> dict:
    """``model.json``, ``model_card.json`` and ``model_card.md`` of a model folder from ``meta``
    (the card records the sha256 of the folder's ``model.onnx``, where it has one)."""
    folder = Path(folder)
    write_meta(folder, meta)
    onnx = folder / ONNX_FILE
    card = model_card(meta, folder, onnx_sha256=sha256_file(onnx) if onnx.exists() else None)
    write_json(folder / CARD_JSON, card)
    atomic_write_text(folder / CARD_MD, model_card_markdown(card))
    return card


TABLE_START = "<!-- model-table:start (generated by `medlens models --table`; do not edit) -->"
TABLE_END = "<!-- model-table:end -->"


def models_table(folders: dict[str, Path]) -> str:
    """A Markdown table of models from their cards: what is stored, the operating point, and
    each evaluated split's accuracy, AUC and (two classes) sensitivity and specificity with 95%
    intervals, carved test first. The model table of the README (and of docs/models.md) is
    this text, so they cannot disagree."""
    rows = [
        "| model | stored | decision | shortcut audit | split (n) | accuracy | AUC | sensitivity "
        "| specificity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, folder in folders.items():
        card = json.loads((Path(folder) / CARD_JSON).read_text())
        size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
        export = card.get("export") or {}
        members = (card.get("ood") or {}).get("members")
        stored = (
            f"{size / 2**20:.1f} MiB, "
            + (
                "int8"
                if "int8" in str(export.get("weights"))
                else "float16"
                if "float16" in str(export.get("weights"))
                else "float32"
            )  # fmt: skip
            + (f", {members}-member ensemble" if members else "")
        )
        decision = card["decision"]
        rule = (
            f"`{decision['method']}` (p >= {decision['threshold']:.3g})"
            if decision["threshold"] is not None
            else "most probable class"
        )
        first = True
        for view in split_views(card.get("metrics") or {}):
            m = view["metrics"]
            cells = [_with_ci(m, k) for k in ("accuracy", "auc", "sensitivity", "specificity")]
            if decision["threshold"] is None:  # macro averages mean little in this table
                cells[2:] = ["", ""]
            head = [f"`{name}`", stored, rule, _audit_cell(card)] if first else [""] * 4
            rows.append(
                "| " + " | ".join([*head, f"{view['title']} ({m.get('n')})", *cells]) + " |"
            )
            first = False
    return "\n".join(rows)


def _audit_cell(card: dict) -> str:
    """The shortcut audit's level and figures, or "not audited"."""
    a = card.get("shortcut_audit")
    if not a:
        return "not audited"
    return (
        f"{a['level']}: no-anatomy AUC {a['baseline_auc']:.2f}, border masked "
        f"{a['border_masked_auc']:.2f}, centre masked {a['centre_masked_auc']:.2f}"
    )


def _with_ci(m: dict, key: str) -> str:
    v, ci = m.get(key), (m.get("ci") or {}).get(key)
    if v is None:
        return "n/a"
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else "")
