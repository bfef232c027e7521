"""The typed sections of ``model.json`` and its JSON Schema (issue 25, item 1).

Every bundled ``model.json`` validates and round-trips byte for byte through the one writer
(:func:`medlens.artifacts.model.write_meta`); a file from a newer MedLens (a higher
``format_version``) or with a broken section is refused with one line naming the field, on
load, by ``medlens models --check`` and by ``medlens predict``; the committed
``model.schema.json`` is the one the models generate.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlens.artifacts.folders import bundled_models_dir, find_models
from medlens.artifacts.model import FORMAT_VERSION, read_meta, write_meta
from medlens.artifacts.schema import SCHEMA_FILE, ModelJson, OODSection, schema_text
from medlens.cli import main
from medlens.errors import ModelLoadError

BUNDLED = sorted(find_models(bundled=True))


def _model_json(name: str) -> Path:
    return bundled_models_dir() / name / "model.json"


def _edited(tmp_path: Path, name: str = "pneumonia", **changes) -> Path:
    """A folder holding only the bundled model's ``model.json``, with ``changes`` applied
    (a value of None removes the key)."""
    d = json.loads(_model_json(name).read_text())
    for key, value in changes.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    folder = tmp_path / f"{name}-edited"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps(d, indent=2))
    return folder


def test_six_bundled_models():
    assert BUNDLED == ["brain-tumor", "covid", "covid-ct", "pharyngitis", "pneumonia",
                       "tuberculosis"]  # fmt: skip


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_json_validates_and_round_trips_byte_identically(name, tmp_path):
    path = _model_json(name)
    ModelJson.model_validate(json.loads(path.read_text()))
    meta = read_meta(path.parent)
    write_meta(tmp_path, meta)
    assert (tmp_path / "model.json").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("name", BUNDLED)
def test_typed_sections_read_the_bundled_files(name):
    d = json.loads(_model_json(name).read_text())
    meta = read_meta(_model_json(name).parent)
    assert meta.weights_sha256 == d["weights_sha256"]
    assert meta.version == d["weights_sha256"][:12]
    assert isinstance(meta.ood, OODSection) and meta.ood.quantile == d["ood"]["quantile"]
    assert meta.ood.sha256 == d["ood"]["sha256"]
    assert meta.training.split_counts == d["training"]["split_counts"]
    assert {k: m.auc for k, m in meta.metrics.items()} == {
        k: m["auc"] for k, m in d["metrics"].items()
    }
    assert meta.export.from_run == d["export"]["from_run"]
    assert meta.card.title == d["card"]["title"]
    assert [m.run for m in meta.ensemble] == [m["run"] for m in d.get("ensemble", [])]
    op = meta.operating_point
    assert (op is None) == ("operating_point" not in d)
    if op is not None:
        assert op.rule == meta.threshold_method and op.threshold == meta.threshold


def test_committed_schema_is_the_generated_one():
    assert SCHEMA_FILE.read_text() == schema_text(), (
        "medlens/artifacts/model.schema.json is stale: regenerate it with `python -c 'from "
        "medlens.artifacts.schema import SCHEMA_FILE, schema_text; "
        "SCHEMA_FILE.write_text(schema_text())'`"
    )


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_files_pass_the_committed_schema_outside_python(name):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.validate(json.loads(_model_json(name).read_text()), schema)
    bad = {**json.loads(_model_json(name).read_text()), "labels": "NORMAL"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_a_missing_format_version_is_format_1(tmp_path):
    folder = _edited(tmp_path, format_version=None)
    assert read_meta(folder).labels == ["NORMAL", "PNEUMONIA"]


def _one_line(message: str) -> str:
    assert "\n" not in message.strip(), message
    return message


def test_a_future_format_version_is_refused_with_one_clear_line(tmp_path):
    folder = _edited(tmp_path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(ModelLoadError) as e:
        read_meta(folder)
    msg = _one_line(str(e.value))
    assert str(folder / "model.json") in msg
    assert f"written by a newer MedLens (format {FORMAT_VERSION + 1}; this one reads up to " \
        f"{FORMAT_VERSION})" in msg  # fmt: skip
    assert "pip install -U medlens" in msg


BROKEN = [
    ({"ood": {"quantile": "high"}}, "ood.quantile"),
    ({"labels": "NORMAL"}, "labels"),
    ({"preprocess": {"image_size": -3}}, "preprocess.image_size"),
    ({"metrics": []}, "metrics"),
    ({"format_version": "2"}, "format_version"),
    ({"temperature": "1.3"}, "temperature"),
    ({"ensemble": [{"run": 3, "arch": "cnn"}]}, "ensemble.0.run"),
    ({"operating_point": {"rule": "balanced"}}, "operating_point.threshold"),
]


@pytest.mark.parametrize("change, field", BROKEN)
def test_a_broken_section_is_refused_with_one_line_naming_the_field(change, field, tmp_path):
    folder = _edited(tmp_path, **change)
    with pytest.raises(ModelLoadError) as e:
        read_meta(folder)
    msg = _one_line(str(e.value))
    assert str(folder / "model.json") in msg and repr(field) in msg
    assert "copy the model folder again" in msg or "re-export" in msg


def test_a_missing_required_field_names_it(tmp_path):
    with pytest.raises(ModelLoadError, match="lacks the field 'arch'"):
        read_meta(_edited(tmp_path, arch=None))


def test_unknown_sections_and_fields_are_kept(tmp_path):
    d = json.loads(_model_json("pneumonia").read_text())
    folder = _edited(tmp_path, future_section={"a": 1}, ood={**d["ood"], "future_field": [1, 2]})
    meta = read_meta(folder)
    assert meta.extra["future_section"] == {"a": 1}
    assert meta.ood.future_field == [1, 2]  # type: ignore[attr-defined]


def test_the_writer_refuses_a_meta_that_would_not_load(tmp_path):
    meta = read_meta(_model_json("pneumonia").parent)
    meta.extra["ood"] = {**meta.extra["ood"], "quantile": "high"}
    with pytest.raises(ModelLoadError, match="'ood.quantile'"):
        write_meta(tmp_path, meta)
    assert not (tmp_path / "model.json").exists()


def test_models_check_passes_the_bundled_models(capsys):
    assert main(["models", "--check"]) == 0
    out = capsys.readouterr().out
    assert all(f"ok      {name}" in out for name in BUNDLED)


def test_models_check_reports_each_broken_model_in_one_line(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    future = _edited(models, name="pneumonia", format_version=FORMAT_VERSION + 1)
    broken = _edited(models, name="covid-ct", ood={"quantile": "high"})
    assert main(["models", "--check", "--models", str(models)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert any(str(future / "model.json") in x and "newer MedLens" in x for x in lines)
    assert any(str(broken / "model.json") in x and "'ood.quantile'" in x for x in lines)
    assert "2 of 8 model(s) failed the check" in out  # the six bundled ones pass


def test_predict_refuses_a_future_model_with_one_line(tmp_path, capsys):
    folder = _edited(tmp_path, format_version=FORMAT_VERSION + 1)
    img = tmp_path / "x.png"
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(img)
    assert main(["predict", "--model", str(folder), str(img)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "newer MedLens" in err and "pip install -U medlens" in err
