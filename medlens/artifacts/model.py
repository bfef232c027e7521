"""The trained-model format and the run folder's small files, written atomically.

A model is a folder with:

* ``model.json`` - everything needed to rebuild and use it: backbone name, labels,
  preprocessing spec, calibration temperature, operating threshold, metrics, provenance.
* ``model.pt`` - the ``state_dict`` only, so it loads with ``torch.load(weights_only=True)``
  and no pickled code ever runs.

A run folder (``medlens train --out RUN``) is such a model folder plus ``config.yaml``,
``training_metrics.csv``, ``checkpoints/`` and evaluation reports.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from pydantic import BaseModel, ValidationError

from medlens.artifacts.folders import CARD_JSON, MODEL_JSON, MODEL_WEIGHTS, ONNX_FILE
from medlens.artifacts.schema import (
    CardSection,
    EnsembleMember,
    ExportSection,
    ModelJson,
    OODSection,
    OperatingPointSection,
    SplitMetrics,
    TrainingSection,
    first_problem,
)
from medlens.data.preprocess import Preprocess
from medlens.errors import ModelLoadError
from medlens.fileio import atomic_torch_save, sha256_file, write_json
from medlens.modeling.classifier import Classifier
from medlens.modeling.registry import create_model

if TYPE_CHECKING:
    from medlens.evaluation.operating_point import OperatingPointChoice

_S = TypeVar("_S", bound=BaseModel)

FORMAT_VERSION = 1
"""The ``format_version`` this MedLens writes and the newest it reads (a file without one is
format 1)."""


def _view(cls: type[_S], value: object) -> _S | None:
    return None if value is None else cls.model_validate(value, strict=False)


@dataclass
class ModelMeta:
    """Contents of ``model.json``.

    ``extra`` stores the sections (:mod:`medlens.artifacts.schema`) as they are written, in
    their order; read them through the typed properties (``meta.training``, ``meta.ood``,
    ``meta.metrics``...), which return validated copies.
    """

    arch: str
    labels: list[str]
    preprocess: Preprocess
    temperature: float = 1.0
    threshold: float | None = None  # binary only: predict labels[1] when p >= threshold
    threshold_method: str | None = None
    dropout: float = 0.3
    name: str | None = None
    extra: dict = field(default_factory=dict)  # metrics, data provenance, card fields, ood

    def set_operating_point(self, op: OperatingPointChoice | None) -> None:
        """The threshold, its rule and the record of how it was chosen
        (:func:`~medlens.evaluation.operating_point.choose_operating_point`); None: the most
        probable class (multi-class)."""
        if op is None:
            self.threshold, self.threshold_method = None, None
            self.extra.pop("operating_point", None)
            return
        self.threshold, self.threshold_method = float(op["threshold"]), str(op["rule"])
        self.extra["operating_point"] = op

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the weights (``model.pt``; an ensemble: of its members' hashes)."""
        return self.extra.get("weights_sha256") or None

    @property
    def version(self) -> str | None:
        """The short version id: the first 12 hex digits of :attr:`weights_sha256`."""
        return (self.weights_sha256 or "")[:12] or None

    @property
    def training(self) -> TrainingSection | None:
        return _view(TrainingSection, self.extra.get("training"))

    @property
    def card(self) -> CardSection | None:
        return _view(CardSection, self.extra.get("card"))

    @property
    def metrics(self) -> dict[str, SplitMetrics]:
        """Headline metrics by split (``{}`` when none were recorded)."""
        return {k: SplitMetrics.model_validate(v, strict=False)
                for k, v in (self.extra.get("metrics") or {}).items()}  # fmt: skip

    @property
    def ood(self) -> OODSection | None:
        return _view(OODSection, self.extra.get("ood"))

    @property
    def export(self) -> ExportSection | None:
        return _view(ExportSection, self.extra.get("export"))

    @property
    def operating_point(self) -> OperatingPointSection | None:
        """How the threshold was chosen (two-class models); see :meth:`set_operating_point`."""
        return _view(OperatingPointSection, self.extra.get("operating_point"))

    @property
    def ensemble(self) -> list[EnsembleMember]:
        """The members of an ensemble bundle (``[]`` for a single model)."""
        return [EnsembleMember.model_validate(m, strict=False)
                for m in self.extra.get("ensemble") or []]  # fmt: skip

    @property
    def binary(self) -> bool:
        return len(self.labels) == 2

    @property
    def num_outputs(self) -> int:
        return 1 if self.binary else len(self.labels)

    def to_dict(self) -> dict:
        d = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "arch": self.arch,
            "labels": list(self.labels),
            "task": "binary" if self.binary else "multiclass",
            "preprocess": self.preprocess.to_dict(),
            "temperature": self.temperature,
            "threshold": self.threshold,
            "threshold_method": self.threshold_method,
            "dropout": self.dropout,
        }
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str | Path = MODEL_JSON) -> ModelMeta:
        """The meta of a parsed ``model.json``, validated (:func:`validate_model_json`);
        ``source``: the file, named in errors."""
        validate_model_json(d, source)
        core = {
            "format_version",
            "name",
            "arch",
            "labels",
            "task",
            "preprocess",
            "temperature",
            "threshold",
            "threshold_method",
            "dropout",
        }
        try:
            return cls(
                arch=d["arch"],
                labels=list(d["labels"]),
                preprocess=Preprocess.from_dict(d["preprocess"]),
                temperature=float(d.get("temperature", 1.0)),
                threshold=d.get("threshold"),
                threshold_method=d.get("threshold_method"),
                dropout=float(d.get("dropout", 0.3)),
                name=d.get("name"),
                extra={k: v for k, v in d.items() if k not in core},
            )
        except KeyError as e:
            raise ModelLoadError(
                f"{source} lacks the field {e.args[0]!r}; re-export the model "
                "with `medlens train` or `medlens export`"
            ) from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(
                f"{source} has an invalid value ({e}); the file is damaged: copy the model "
                "folder again or retrain it"
            ) from None


def validate_model_json(d: object, source: str | Path = MODEL_JSON) -> None:
    """Check a parsed ``model.json`` against its schema (:class:`~medlens.artifacts.schema.
    ModelJson`): a ``format_version`` this MedLens reads, and every known section's fields.

    Raises:
        ModelLoadError: one line naming ``source``, the field and what to do.
    """
    version = d.get("format_version", 1) if isinstance(d, dict) else 1
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ModelLoadError(
            f"{source} was written by a newer MedLens (format {version}; this one reads up to "
            f"{FORMAT_VERSION}): upgrade MedLens (pip install -U medlens)"
        )
    try:
        ModelJson.model_validate(d)
    except ValidationError as e:
        where, what = first_problem(e)
        if e.errors()[0]["type"] == "missing":
            raise ModelLoadError(
                f"{source} lacks the field {where!r}; re-export the model "
                "with `medlens train` or `medlens export`"
            ) from None
        raise ModelLoadError(
            f"{source}: field {where!r} is invalid ({what}); the file is damaged or was "
            "edited: copy the model folder again, or re-export or retrain the model"
        ) from None


def build_network(
    meta: ModelMeta, pretrained: bool = False, weights: str | os.PathLike | None = None
) -> Classifier:
    """The network ``meta`` describes; ``pretrained``/``weights``: see :func:`create_model`."""
    return create_model(
        meta.arch,
        num_outputs=meta.num_outputs,
        in_channels=meta.preprocess.channels,
        pretrained=pretrained,
        dropout=meta.dropout,
        weights=weights,
    )


def write_meta(folder: str | Path, meta: ModelMeta) -> None:
    """Write ``model.json`` of ``meta`` into ``folder`` (atomically): the one writer of the
    file. It is validated first (:func:`validate_model_json`), so what is written loads.

    Raises:
        ModelLoadError: ``meta`` would not make a valid file (naming the field).
    """
    path = Path(folder) / MODEL_JSON
    d = meta.to_dict()
    validate_model_json(json.loads(json.dumps(d, allow_nan=False)), f"{path} (being written)")
    write_json(path, d)


def save_model(folder: str | Path, net: Classifier, meta: ModelMeta) -> None:
    """Write ``model.pt`` then ``model.json`` (the json last: it marks a complete model)."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_torch_save(state, folder / MODEL_WEIGHTS)
    had, old = "weights_sha256" in meta.extra, meta.extra.get("weights_sha256")
    meta.extra["weights_sha256"] = sha256_file(folder / MODEL_WEIGHTS)  # keeps its place
    try:
        write_meta(folder, meta)
    except BaseException:  # meta as it was: the file was not written
        if had:
            meta.extra["weights_sha256"] = old
        else:
            del meta.extra["weights_sha256"]
        raise


def read_meta(folder: str | os.PathLike) -> ModelMeta:
    path = Path(folder) / MODEL_JSON
    try:
        return ModelMeta.from_dict(json.loads(path.read_text()), source=path)
    except FileNotFoundError:
        raise ModelLoadError(
            f"{folder} is not a trained model: {MODEL_JSON} is missing "
            "(train one with `medlens train --out RUN` or name a bundled "
            "model; `medlens models` lists them)"
        ) from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None


def check_file(path: Path, expected: str | None, recorded_in: Path) -> None:
    """Refuse a model file whose sha256 differs from the one recorded at save or export (a
    flipped bit or a replaced file would otherwise load and answer wrongly). Nothing recorded
    (an older folder): nothing to compare.

    Raises:
        ModelLoadError: naming the file.
    """
    if not expected or not path.exists():
        return
    got = sha256_file(path)
    if got != expected:
        raise ModelLoadError(
            f"{path} is damaged or was replaced: its sha256 {got[:12]}... differs from the "
            f"{expected[:12]}... recorded in {recorded_in}; copy the model folder again, or "
            "re-export or retrain it"
        )


def check_onnx_file(folder: Path) -> None:
    """``model.onnx`` against the sha256 its model card records (written with it by export)."""
    card = folder / CARD_JSON
    if not card.exists():
        return
    try:
        recorded = json.loads(card.read_text())["files"][ONNX_FILE]["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ModelLoadError(
            f"{card} does not record the sha256 of {ONNX_FILE} (damaged or edited); re-export "
            f"the model (`medlens export --model {folder}`)"
        ) from None
    check_file(folder / ONNX_FILE, recorded, card)


def load_network(folder: str | Path, meta: ModelMeta | None = None) -> tuple[Classifier, ModelMeta]:
    """Rebuild the network of a model folder and load its weights (``weights_only=True``)."""
    folder = Path(folder)
    meta = meta or read_meta(folder)
    net = build_network(meta, pretrained=False)
    wpath = folder / MODEL_WEIGHTS
    if not wpath.exists():
        raise ModelLoadError(f"{wpath} is missing; the model folder is incomplete")
    check_file(wpath, meta.weights_sha256, folder / MODEL_JSON)
    try:
        state = torch.load(wpath, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickled code, not a torch file
        raise ModelLoadError(
            f"{wpath} cannot be read as model weights ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}); the file is damaged or not a MedLens "
            "model.pt: copy the model folder again or retrain it"
        ) from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(
            f"{wpath} does not match architecture {meta.arch!r} in "
            f"{MODEL_JSON}: {str(e).splitlines()[0]}"
        ) from None
    return net.eval(), meta
