"""The typed sections of ``model.json`` and the JSON Schema they generate.

``model.json`` (see :mod:`medlens.artifacts.model`) holds a core (backbone, labels,
preprocessing, calibration) and sections that training, export, site calibration and the
shortcut audit add: ``training``, ``card``, ``metrics``, ``ood``, ``export``,
``operating_point``, ``ensemble``, ``shortcut_audit``, ``site_calibration``... Each has a
pydantic model here. Loading validates the file against them (:func:`validate_model_json`),
so a damaged or hand-edited file is refused with one line naming the field, and
``medlens models --check`` checks every listed model folder the same way.

Sections whose contents grew over MedLens versions allow fields they do not name
(``extra="allow"``), so files of older and newer MedLens of the same format version load;
the fields they name are checked (strictly: ``"0.9"`` is not a number).
``model.schema.json`` beside this module is :func:`json_schema` committed (a test keeps them
equal): for tools outside Python that read or write model folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "SCHEMA_FILE",
    "ModelJson",
    "PreprocessSection",
    "TrainingSection",
    "CardSection",
    "SplitMetrics",
    "OODSection",
    "ExportSection",
    "OperatingPointSection",
    "EnsembleMember",
    "ShortcutAuditSection",
    "SiteCalibrationSection",
    "json_schema",
    "first_problem",
]

SCHEMA_FILE = Path(__file__).with_name("model.schema.json")
"""The committed JSON Schema of ``model.json`` (:func:`json_schema`)."""

Number = float  # strict float accepts JSON integers too
Interval = list[float | None]


class _Section(BaseModel):
    """A ``model.json`` section: named fields are checked, others are kept."""

    model_config = ConfigDict(extra="allow", strict=True)


class PreprocessSection(_Section):
    """``preprocess``: see :class:`medlens.data.preprocess.Preprocess`."""

    image_size: int = Field(224, ge=8, le=2048)
    channels: Literal[1, 3] = 3
    mean: list[Number] = Field(default_factory=lambda: [0.5, 0.5, 0.5], min_length=1)
    std: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.25, 0.25, 0.25], min_length=1
    )
    resize: Literal["stretch", "pad", "crop"] = "stretch"
    grayscale: bool = False


class TrainingSection(_Section):
    """``training``: how the run was trained (``medlens train``)."""

    command: str | None = None
    data: str | None = None
    layout: str | None = None
    split_counts: dict[str, dict[str, int]] | None = None
    notes: list[str] | None = None
    epochs_run: int | None = Field(None, ge=0)
    stages: list[str] | None = None
    wall_seconds: Number | None = Field(None, ge=0)
    seed: int | None = None
    precision: str | None = None
    device: str | None = None
    warning: str | None = None
    init_weights: dict[str, Any] | None = None
    init_from: dict[str, Any] | None = None
    backbone_from: dict[str, Any] | None = None


class CardSection(_Section):
    """``card``: the model card's text fields (a recipe's ``card:``); others are kept."""

    title: str | None = None
    modality: str | None = None
    intended_use: str | None = None
    out_of_scope_use: str | None = None
    limitations: str | None = None
    ethical_considerations: str | None = None
    caveats: str | None = None
    contact: str | None = None
    license: str | None = None
    citation: str | None = None


class SplitMetrics(_Section):
    """One split's headline metrics (``metrics.<split>``)."""

    n: int | None = Field(None, ge=0)
    accuracy: Number | None = None
    balanced_accuracy: Number | None = None
    auc: Number | None = None
    sensitivity: Number | None = None
    specificity: Number | None = None
    f1: Number | None = None
    precision: Number | None = None
    ece: Number | None = None
    brier: Number | None = None
    ci: dict[str, Interval | None] | None = None
    threshold: Number | None = None
    support: dict[str, int] | None = None
    measured_on: str | None = None


class OODSection(_Section):
    """``ood``: the out-of-distribution guard (``ood.npz``) and its threshold."""

    method: str | None = None
    file: str | None = None
    stages: int | None = Field(None, ge=0)
    members: int | None = Field(None, ge=1)
    dim: int | None = Field(None, ge=0)
    threshold: Number | None = None
    quantile: Number | None = Field(None, ge=0, le=1)
    sha256: str | None = None
    recalibrated_on: str | None = None
    level_set_on: str | None = None
    flagged_val_share: Number | None = Field(None, ge=0, le=1)
    flagged_test_share: Number | None = Field(None, ge=0, le=1)


class ExportSection(_Section):
    """``export``: how the bundle was exported (``medlens export --bundle``)."""

    from_run: str | None = None
    weights: str | None = None
    metrics_measured_on: str | None = None
    curves: str | None = None
    max_probability_change: Number | None = Field(None, ge=0)


class OperatingPointSection(_Section):
    """``operating_point``: a two-class model's threshold and how it was chosen
    (:func:`medlens.evaluation.operating_point.choose_operating_point`)."""

    rule: str
    description: str | None = None
    threshold: Number
    threshold_ci: Interval | None = None
    sensitivity: Number | None = None
    sensitivity_ci: Interval | None = None
    specificity: Number | None = None
    specificity_ci: Interval | None = None
    n: int | None = Field(None, ge=0)
    n_positive: int | None = Field(None, ge=0)
    n_negative: int | None = Field(None, ge=0)
    measured_on: str | None = None
    warning: str | None = None


class EnsembleMember(_Section):
    """One member of an ensemble bundle (``ensemble[i]``)."""

    run: str
    arch: str
    weights_sha256: str | None = None


class ShortcutAuditSection(_Section):
    """``shortcut_audit``: the figures of ``medlens audit --record``."""

    level: str | None = None
    verdict: str | None = None
    baseline_auc: Number | None = None
    model_auc: Number | None = None
    centre_masked_auc: Number | None = None
    border_masked_auc: Number | None = None
    cam_centre_share: Number | None = None
    n: int | None = Field(None, ge=0)
    data: str | None = None
    file: str | None = None


class SiteCalibrationSection(_Section):
    """``site_calibration`` / ``operating_point_restated``: the model this one was derived
    from (``medlens calibrate``) and its figures before and after."""

    base_model: str | None = None
    base_version: str | None = None
    base_model_json_sha256: str | None = None
    date: str | None = None
    operating_point: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


class ModelJson(_Section):
    """The whole of ``model.json``."""

    model_config = ConfigDict(
        extra="allow",
        strict=True,
        title="MedLens model.json",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    format_version: int = Field(1, ge=1)
    name: str | None = None
    arch: str
    labels: list[str] = Field(min_length=2)
    task: Literal["binary", "multiclass"] | None = None
    preprocess: PreprocessSection
    temperature: Number = Field(1.0, gt=0)
    threshold: Number | None = Field(None, ge=0, le=1)
    threshold_method: str | None = None
    dropout: Number = Field(0.3, ge=0, lt=1)
    weights_sha256: str | None = None
    training: TrainingSection | None = None
    card: CardSection | None = None
    metrics: dict[str, SplitMetrics] | None = None
    ood: OODSection | None = None
    export: ExportSection | None = None
    operating_point: OperatingPointSection | None = None
    ensemble: list[EnsembleMember] | None = None
    ensemble_calibration: str | None = None
    shortcut_audit: ShortcutAuditSection | None = None
    site_calibration: SiteCalibrationSection | None = None
    operating_point_restated: SiteCalibrationSection | None = None


def json_schema() -> dict:
    """The JSON Schema of ``model.json``, generated from :class:`ModelJson`."""
    return ModelJson.model_json_schema()


def schema_text() -> str:
    """:func:`json_schema` as ``model.schema.json`` holds it."""
    return json.dumps(json_schema(), indent=2) + "\n"


def first_problem(e: ValidationError) -> tuple[str, str]:
    """``(field, what is wrong)`` of the first error of ``e``: ``("ood.quantile", "Input
    should be a valid number, got 'high'")``; more errors are counted."""
    errors = e.errors(include_url=False)
    err = errors[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    what = err["msg"]
    if err["type"] != "missing":
        shown = json.dumps(err.get("input"), default=str)
        what += f", got {shown if len(shown) <= 40 else shown[:37] + '...'}"
    if len(errors) > 1:
        what += f"; {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''}"
    return where, what
