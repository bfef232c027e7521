"""Small promises of the web pages: a way back from the API docs, run names kept off the
dashboard, metric labels that say which AUC they are."""

from __future__ import annotations

from fastapi.testclient import TestClient

from medlens.reporting.figures import METRIC_LABELS
from medlens.serve.app import create_app
from medlens.serve.dashboard import _curves_source, run_results


def test_the_api_docs_lead_back_to_the_app():
    client = TestClient(create_app([], bundled=True))
    html = client.get("/docs").text
    assert '<a href="/">&larr; MedLens: diagnose</a>' in html
    assert '<a href="/dashboard">training results</a>' in html
    assert "swagger-ui-bundle.js" in html  # still the Swagger UI page


def test_the_dashboard_names_no_internal_run():
    assert _curves_source("run brain-full") == "the model's own training run"
    text = _curves_source("member fold-0, the first of 4 (the others trained alike)")
    assert text == "the first of its 4 fold members (the others trained alike)"
    from medlens.artifacts.folders import find_models

    for name, folder in find_models().items():
        res = run_results(name, folder)
        assert "full" not in str(res["curves"]) and "fold-0" not in str(res["curves"]), name


def test_the_auc_label_says_it_is_macro_for_more_than_two_classes():
    assert "macro" in METRIC_LABELS["auc"]
