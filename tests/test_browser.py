"""A real browser against a real server: Playwright for Python drives Debian's chromium.

The app runs under uvicorn on a free 127.0.0.1 port in a thread of this process. Playwright
never downloads a browser here: ``make test`` installs Debian's ``chromium`` when it is missing.
Outside CI the test skips (with a message) where chromium is absent; in CI (``CI`` set) it
must run.

``MEDLENS_SCREENSHOTS=1`` saves ``docs/screenshots/{diagnose,dashboard}.png``;
``MEDLENS_BROWSER_MODELS=DIR``, ``MEDLENS_BROWSER_MODEL=NAME`` and ``MEDLENS_BROWSER_IMAGE=FILE``
replace the tiny test model and image (the screenshots in docs/web-app.md use the bundled
models and real images).
"""

from __future__ import annotations

import math
import os
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_fixtures import BINARY, encode, served_models  # noqa: F401 - fixture

# starts outside processes or runs real models on real data (`make test-fast` leaves it out)
pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"

if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip(
        f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium); "
        "in CI this test runs",
        allow_module_level=True,
    )
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("playwright is not installed: pip install -e '.[test]'", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_models, tmp_path_factory):  # noqa: F811
    import uvicorn

    from medlens.monitoring.store import open_store
    from medlens.serve import create_app
    from medlens.serve.security import SecurityPolicy, allowed_hosts_for

    models = os.environ.get("MEDLENS_BROWSER_MODELS") or served_models
    # The policy `medlens serve` applies on 127.0.0.1 (Host allow-list, Origin check, the
    # Content-Security-Policy and other headers), so the pages are tested under it.
    policy = SecurityPolicy(allowed_hosts=allowed_hosts_for("127.0.0.1"), rate_limit=None)
    record = open_store(f"sqlite:///{tmp_path_factory.mktemp('record') / 'records.db'}")
    app = create_app(
        [models],
        bundled=bool(os.environ.get("MEDLENS_BROWSER_MODELS")),
        security=policy,
        record=record,
    )
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def page(server):
    base, _ = server
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        external, errors = [], []
        pg.on(
            "request",
            lambda r: None if r.url.startswith((base, "data:")) else external.append(r.url),
        )
        pg.on("pageerror", lambda e: errors.append(str(e)))
        # A script, style or image the Content-Security-Policy blocks is reported here.
        pg.on(
            "console",
            lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None,
        )
        pg.external, pg.errors = external, errors
        yield pg
        browser.close()


def _screenshot(pg, name: str, height: int | None = None) -> None:
    """The page (whole, or its top ``height`` px) into docs/screenshots/NAME.png."""
    if os.environ.get("MEDLENS_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        clip = {"x": 0, "y": 0, "width": 1280, "height": height} if height else None
        pg.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True, clip=clip)


def test_diagnose_upload_shows_label_probabilities_and_grad_cam(
    server, page, tmp_path, image_factory
):
    base, app = server
    image = os.environ.get("MEDLENS_BROWSER_IMAGE")
    page.goto(base + "/")
    if image:
        upload = Path(image)
    else:
        upload = tmp_path / "bright.png"
        upload.write_bytes(encode(Image.fromarray(image_factory("bright", seed=11, size=96))))
    name = os.environ.get("MEDLENS_BROWSER_MODEL", BINARY)
    page.check(f'input[name=model][value="{name}"]')
    labels = app.state.models[name].predictor.labels
    page.set_input_files("#file", str(upload))
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    # What the served model says of this image, to compare the page with (whether a synthetic
    # image falls under the guard's learnt level depends on the CPU's rounding: both cases are
    # checked, each against the model's own verdict).
    from medlens.data.imaging import read_image

    ref = app.state.models[name].predictor.predict_pixels([read_image(upload).pixels])[0]
    flagged = ref.ood["flag"] is True
    shown = page.text_content("#result-label")
    if flagged:
        assert f"would be {ref.label}" in shown and page.is_visible("#ood-warning")
        label = ref.label
    else:
        label = shown
    assert label in labels and label == ref.label
    assert page.text_content("#result-file").startswith(f"File: {upload.name} · model:")
    rows = page.query_selector_all("#probabilities .bar-row")
    assert [r.query_selector(".bar-name").text_content() for r in rows] == labels
    values = [float(r.query_selector(".bar-value").text_content().rstrip("%")) for r in rows]
    assert sum(values) == pytest.approx(100, abs=0.2)
    assert page.text_content("#result .bar-row.predicted .bar-name") == label
    # The binary decision threshold is marked on the positive class's bar, at its value.
    marks = page.query_selector_all("#probabilities .bar-threshold")
    threshold = app.state.models[name].predictor.meta.threshold
    if threshold is not None:
        assert len(marks) == 1 and rows[-1].query_selector(".bar-threshold") is not None
        left = page.eval_on_selector(
            "#probabilities .bar-threshold",
            "m => m.getBoundingClientRect().left - m.parentElement.getBoundingClientRect().left",
        )
        width = page.eval_on_selector("#probabilities .bar-track", "t => t.clientWidth")
        assert left == pytest.approx(threshold * width - 1, abs=2)
    else:
        assert marks == []
    page.wait_for_function("document.getElementById('cam').naturalWidth > 0")
    assert page.eval_on_selector("#cam", "i => i.naturalWidth") == 224
    assert page.eval_on_selector("#original", "i => i.naturalWidth") == 224
    # The model has a guard: a warning exactly when it flags the image, and never the "no
    # out-of-distribution check" note.
    assert not page.is_visible("#ood-none") and page.is_visible("#ood-warning") == flagged
    assert page.is_visible(f'.model-card[data-model="{name}"]')
    if not image:
        assert label == "PNEUMONIA"  # the tiny model learnt that a bright disc is positive
    _screenshot(page, "diagnose")

    # A bad upload is explained in words on the page, and the next good one works.
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    assert "is not an image" in page.text_content("#error")
    assert not page.is_visible("#result")
    page.set_input_files("#file", str(upload))
    page.wait_for_selector("#result:not([hidden])")
    assert page.is_visible("#cam")

    # Without Grad-CAM, the next result must not sit beside the previous image's pictures.
    page.uncheck("#explain")
    other = tmp_path / "dark.png"
    other.write_bytes(encode(Image.fromarray(image_factory("dark", seed=12, size=96))))
    page.set_input_files("#file", str(other))
    page.wait_for_function("document.getElementById('original').getAttribute('src') === null")
    page.wait_for_selector("#result:not([hidden])")
    assert not page.is_visible("#result .images") and not page.is_visible("#cam")
    assert page.eval_on_selector("#cam", "i => i.getAttribute('src')") is None
    page.check("#explain")
    assert page.errors == [] and page.external == []


def test_an_out_of_distribution_image_gets_no_verdict(server, page, tmp_path):
    base, app = server
    page.goto(base + "/")
    page.check(f'input[name=model][value="{BINARY}"]')
    noise = tmp_path / "noise.png"
    rng = np.random.default_rng(5)
    noise.write_bytes(encode(Image.fromarray(rng.integers(0, 256, (96, 96), dtype=np.uint8))))
    page.set_input_files("#file", str(noise))
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    assert "ood" in page.eval_on_selector("#result", "e => e.className")
    assert page.text_content("#result-heading").startswith("Not assessed")
    label = page.text_content("#result-label")
    assert label.startswith("this image is unlike the images the model was trained on")
    warning = page.text_content("#ood-warning")
    assert (
        page.is_visible("#ood-warning") and "times the level at which images are flagged" in warning
    )
    grey = page.eval_on_selector(
        "#result .bar-row.predicted .bar-fill", "e => getComputedStyle(e).backgroundColor"
    )
    assert grey == "rgb(196, 196, 196)"
    assert page.errors == []


def test_was_this_right_sends_feedback_that_monitoring_counts(
    server, page, tmp_path, image_factory
):
    """The result's "Was this right?" control: a clinician's other label goes to the record
    (through the same Origin check as uploads), and the Monitoring page counts it."""
    base, app = server
    page.goto(base + "/")
    page.check(f'input[name=model][value="{BINARY}"]')
    upload = tmp_path / "dark.png"
    upload.write_bytes(encode(Image.fromarray(image_factory("dark", seed=4, size=96))))
    page.set_input_files("#file", str(upload))
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    assert page.is_visible("#feedback")
    labels = app.state.models[BINARY].predictor.labels
    options = page.eval_on_selector_all("#fb-label option", "os => os.map(o => o.value)")
    assert len(options) == len(labels) - 1 and set(options) < set(labels)
    before = app.state.recorder.store.feedback_rows(BINARY)
    page.select_option("#fb-label", options[0])
    page.fill("#fb-comment", "second reader disagrees")
    page.click("#fb-no")
    page.wait_for_selector("#fb-status:has-text('Thank you')", timeout=30_000)
    assert f"recorded as {options[0]} (disagrees" in page.text_content("#fb-status")
    assert page.is_disabled("#fb-yes") and page.is_disabled("#fb-no")
    rows = app.state.recorder.store.feedback_rows(BINARY)
    assert len(rows) == len(before) + 1 and rows[-1]["label"] == options[0]
    assert rows[-1]["comment"] == "second reader disagrees" and rows[-1]["agrees"] is False
    page.goto(base + "/monitoring")
    section = page.locator(f"#monitor-{BINARY}")
    assert int(section.locator('[data-count="feedback"]').text_content()) == len(rows)
    assert page.errors == [] and page.external == []


def test_a_fresh_page_shows_no_image_boxes(server, page):
    base, _ = server
    page.goto(base + "/")
    assert not page.is_visible("#result") and not page.is_visible("#result .images")
    hidden = page.eval_on_selector("#result .images", "e => getComputedStyle(e).display")
    assert hidden == "none"  # the `hidden` attribute wins over `.images { display: flex }`


def test_dashboard_renders_plotly_plots(server, page):
    base, _ = server
    page.goto(base + "/dashboard")
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
    plots = page.query_selector_all(".js-plotly-plot")
    assert len(plots) >= 4  # accuracy, loss, ROC, confusion (+ comparison)
    assert all(p.query_selector("svg.main-svg") for p in plots)
    assert page.query_selector("#comparison .js-plotly-plot") is not None
    titles = page.eval_on_selector_all(
        ".js-plotly-plot .gtitle", "ts => ts.map(t => t.textContent)"
    )
    assert {
        "Accuracy per epoch",
        "Loss per epoch",
        "ROC curve (carved test split)",
        "Confusion matrix (carved test split)",
    } <= set(titles)
    assert "Classification report" in page.text_content("main")
    _screenshot(page, "dashboard", height=1500)
    assert page.errors == [] and page.external == []


def test_swagger_ui_renders_offline(server, page):
    base, _ = server
    page.goto(base + "/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "MedLens" in page.text_content(".swagger-ui .info .title")
    page.wait_for_selector(".opblock-summary-path")
    paths = page.eval_on_selector_all(
        ".opblock-summary-path", "es => es.map(e => e.getAttribute('data-path'))"
    )
    assert {"/healthz", "/api/v1/models", "/api/v1/models/{name}/predict"} <= set(paths)
    assert page.errors == [] and page.external == []


def _wait(page, js: str, timeout: float = 30) -> None:
    """Poll a JavaScript expression (``wait_for_function`` evaluates strings, which the
    page's Content-Security-Policy forbids once it has to poll)."""
    deadline = time.time() + timeout
    while not page.evaluate(js):
        assert time.time() < deadline, f"timed out waiting for {js}"
        time.sleep(0.05)


def _pick(page, base, name=BINARY):
    page.goto(base + "/")
    page.check(f'input[name=model][value="{name}"]')


def _png(tmp_path, image_factory, kind: str, seed: int) -> Path:
    path = tmp_path / f"{kind}-{seed}.png"
    path.write_bytes(encode(Image.fromarray(image_factory(kind, seed=seed, size=96))))
    return path


def test_no_model_is_chosen_for_the_user_and_tab_skips_the_hidden_input(
    server, page, tmp_path, image_factory
):
    base, _ = server
    page.goto(base + "/")
    assert page.eval_on_selector_all("input[name=model]:checked", "rs => rs.length") == 0
    page.set_input_files("#file", str(_png(tmp_path, image_factory, "bright", 1)))
    page.wait_for_selector("#error:not([hidden])")
    assert "Choose the model for this image first" in page.text_content("#error")
    assert not page.is_visible("#result")
    # Keyboard: from the last model, Tab reaches the drop zone (Enter opens the file
    # chooser), never the invisible file input.
    page.focus("input[name=model]")
    order = []
    for _ in range(4):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.name"))
    assert "drop-zone" in order and "file" not in order


def test_batch_upload_gives_a_table_and_a_csv(server, page, tmp_path, image_factory):
    import csv

    base, app = server
    _pick(page, base)
    files = [_png(tmp_path, image_factory, k, s) for k, s in (("bright", 21), ("dark", 22))]
    bad = tmp_path / "letter.png"
    bad.write_bytes(b"not an image at all")
    page.set_input_files("#file", [str(f) for f in [*files, bad]])
    page.wait_for_selector("#batch-table tbody tr:nth-child(3)", timeout=60_000)
    page.wait_for_selector("text=3 images analysed.")
    rows = page.eval_on_selector_all(
        "#batch-table tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))"
    )
    assert [r[0] for r in rows] == [f.name for f in files] + ["letter.png"]
    assert rows[2][1] == "error" and "is not an image" in rows[2][2]
    assert not page.is_visible("#result") and page.is_visible("#batch")
    with page.expect_download() as dl:
        page.click("#batch-csv")
    with open(dl.value.path(), newline="") as f:
        got = list(csv.DictReader(f))
    labels = app.state.models[BINARY].predictor.labels
    assert list(got[0]) == ["path", "label", *[f"p_{c}" for c in labels], "threshold",
                            "ood_flag", "ood_score", "ood_ratio", "error"]  # fmt: skip
    pred = app.state.models[BINARY].predictor
    for row, f in zip(got, files):  # the same numbers as the model gives directly
        from medlens.data.imaging import read_image

        ref = pred.predict_pixels([read_image(f).pixels])[0]
        assert row["path"] == f.name and row["label"] == ref.label and row["error"] == ""
        for c in labels:
            assert float(row[f"p_{c}"]) == pytest.approx(ref.probabilities[c], abs=1e-5)
        assert float(row["threshold"]) == pytest.approx(ref.threshold)
        assert float(row["ood_ratio"]) == pytest.approx(ref.ood["ratio"], abs=0.011)
    # the table shows the guard's ratio and band, as the command line does
    assert all(re.match(r"\d+\.\d\dx: (typical|near the flag level|borderline, flagged|out of "
                        r"distribution)$", r[3]) for r in rows[:2]), rows  # fmt: skip
    assert got[2]["label"] == "" and "is not an image" in got[2]["error"]
    assert page.errors == [] and page.external == []


def test_the_browser_csv_neutralises_formula_file_names(server, page, tmp_path, image_factory):
    import csv
    import shutil as sh

    base, _ = server
    _pick(page, base)
    files = []
    for i, name in enumerate(("=1+1.png", "-minus.png")):
        src = _png(tmp_path, image_factory, "bright", 60 + i)
        files.append(tmp_path / name)
        sh.copyfile(src, files[-1])
    page.set_input_files("#file", [str(f) for f in files])
    page.wait_for_selector("#batch-table tbody tr:nth-child(2)", timeout=60_000)
    page.wait_for_selector("text=2 images analysed.")
    with page.expect_download() as dl:
        page.click("#batch-csv")
    with open(dl.value.path(), newline="") as f:
        got = [r["path"] for r in csv.DictReader(f)]
    assert got == ["'=1+1.png", "'-minus.png"]


def test_pre_test_to_post_test_probability(server, page, tmp_path, image_factory):
    from medlens.evaluation.metrics import likelihood_ratios

    base, app = server
    card = app.state.models[BINARY].card
    saved = card["metrics"]
    # The tiny model is perfect on its few test images (infinite LR+): give it figures a real
    # model has, so that both ratios are finite (LR+ 4.5, LR- 0.125).
    card["metrics"] = {**saved, "test": {**saved["test"], "sensitivity": 0.9, "specificity": 0.8}}
    lr = likelihood_ratios(card["metrics"])
    assert lr["positive"] == pytest.approx(4.5) and lr["negative"] == pytest.approx(0.125)
    card["clinical_score"] = "mcisaac"  # as the pharyngitis card says
    try:
        _pick(page, base)
        page.set_input_files("#file", str(_png(tmp_path, image_factory, "bright", 31)))
        page.wait_for_selector("#context:not([hidden])")
        label = page.text_content("#result-label")
        ratio = lr["positive"] if label == card["labels"][1] else lr["negative"]
        assert ratio is not None
        # McIsaac: fever, no cough, age 3-14 -> score 3 -> 37% (Fine et al. 2012).
        boxes = page.query_selector_all("#mcisaac .mc")
        boxes[0].check()
        boxes[1].check()
        page.select_option("#mc-age", "1")
        assert page.input_value("#pretest") == "37"
        assert page.text_content("#mc-result").startswith("Score 3: in a large US study, 37%")
        positive = label == card["labels"][1]
        ci = lr["positive_ci"] if positive else lr["negative_ci"]
        # the log-method interval from the split's counts (Simel et al. 1991), recomputed here
        n_neg, n_pos = list(card["metrics"]["test"]["support"].values())
        tp, tn = round(0.9 * n_pos), round(0.8 * n_neg)
        a, na, b, nb = (
            (tp, n_pos, n_neg - tn, n_neg) if positive else (n_pos - tp, n_pos, tn, n_neg)
        )
        if min(a, b, na - a, nb - b) == 0:
            a, b, na, nb = a + 0.5, b + 0.5, na + 1, nb + 1
        se = math.sqrt(1 / a - 1 / na + 1 / b - 1 / nb)
        point = (a / na) / (b / nb)
        assert ci == pytest.approx(
            [point * math.exp(-1.96 * se), point * math.exp(1.96 * se)], rel=1e-4
        )

        def post(pre, r):
            odds = pre / (1 - pre) * r
            return f"{100 * odds / (1 + odds):.1f}%"

        for pre in (0.37, 0.05):
            page.fill("#pretest", f"{100 * pre:g}")
            text = page.text_content("#posttest")
            assert text.startswith(
                f"Post-test probability of {card['labels'][1]}: {post(pre, ratio)}"
            )
            assert f"95% CI {post(pre, ci[0])} to {post(pre, ci[1])} from the likelihood" in text
        basis = page.text_content("#context-basis")
        assert f"{ratio:.2f}, 95% CI {ci[0]:.2f} to {ci[1]:.2f}" in basis
        assert "Likelihood ratios move between hospitals" in basis
        assert f"measured on the model's {lr['title'].lower()}, n = {lr['n']}" in basis
        assert "Assumes the likelihood ratio holds in your population" in basis
        assert "group A streptococcus" in basis  # the McIsaac caveat
        page.fill("#pretest", "0")
        assert page.text_content("#posttest").startswith("Enter a pre-test probability")
    finally:
        card.pop("clinical_score")
        card["metrics"] = saved


def test_phone_width_layout_and_one_page_print(server, page, tmp_path, image_factory):
    base, _ = server
    page.set_viewport_size({"width": 390, "height": 844})
    try:
        _pick(page, base)
        page.set_input_files("#file", str(_png(tmp_path, image_factory, "bright", 41)))
        page.wait_for_selector("#result:not([hidden])")
        _wait(page, "document.getElementById('cam').naturalWidth > 0")
        for url in ("/", "/dashboard"):
            if url != "/":
                page.goto(base + url)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"{url} is {width} px wide on a 390 px screen"
        page.goto(base + "/")
        page.check(f'input[name=model][value="{BINARY}"]')
        overflow = page.eval_on_selector_all(
            ".model-card:not([hidden]), .model-card:not([hidden]) *",
            "es => es.filter(e => e.scrollWidth > e.clientWidth + 1 && "
            "getComputedStyle(e).overflowX !== 'auto').map(e => e.tagName + '.' + e.className)",
        )
        assert overflow == []  # the card's text stays inside its border
        # numbers in the card's tables are never broken inside a figure
        broken = page.eval_on_selector_all(
            ".model-card:not([hidden]) table.metrics td",
            "es => es.filter(e => getComputedStyle(e).overflowWrap === 'anywhere').length",
        )
        assert broken == 0
        # several files at once: the batch table says how to reach its off-screen columns
        files = [str(_png(tmp_path, image_factory, "bright", 43 + i)) for i in range(2)]
        page.set_input_files("#file", files)
        page.wait_for_selector("#batch-table tbody tr:nth-child(2)", timeout=60_000)
        assert page.is_visible("#batch .scroll-hint")
        assert "scroll it sideways" in page.text_content("#batch .scroll-hint")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        page.set_viewport_size({"width": 1280, "height": 900})
    # Printing a result: one A4 page holding the image, the map, the result and the card.
    page.set_input_files("#file", str(_png(tmp_path, image_factory, "bright", 42)))
    page.wait_for_selector("#result:not([hidden])")
    _wait(page, "document.getElementById('cam').naturalWidth > 0")
    page.emulate_media(media="print")
    try:
        assert not page.is_visible("#diagnose-form") and page.is_visible("#cam")
        nowrap = page.eval_on_selector_all(
            f'.model-card[data-model="{BINARY}"] table.metrics td',
            "es => es.every(e => getComputedStyle(e).whiteSpace === 'nowrap')",
        )
        assert nowrap  # printed figures do not wrap mid-number
        assert page.is_visible(f'.model-card[data-model="{BINARY}"]')
        assert page.is_visible(".disclaimer") and page.text_content("#when") != ""
        pdf = page.pdf(format="A4", print_background=True)
        if os.environ.get("MEDLENS_SCREENSHOTS"):
            page.set_viewport_size({"width": 718, "height": 1000})
            _screenshot(page, "print")
            page.set_viewport_size({"width": 1280, "height": 900})
    finally:
        page.emulate_media(media="screen")
    import re

    pages = len(re.findall(rb"/Type\s*/Page[^s]", pdf))
    assert pages == 1, f"the printed result takes {pages} A4 pages"


def test_a_dicom_upload_shows_its_header_facts_and_offers_sr_and_fhir(
    server, page, tmp_path, image_factory
):
    import io
    import json

    import pydicom
    from dicom_fixtures import PATIENT_ID, dicom_xray, to_bytes

    base, _ = server
    _pick(page, base)
    ds = dicom_xray(np.full((64, 64), 200, np.uint8))
    path = tmp_path / "chest.dcm"
    path.write_bytes(to_bytes(ds))
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#dicom-facts:not([hidden])", timeout=60_000)
    facts = page.text_content("#dicom-list")
    assert "ModalityDX" in facts and "View positionPA" in facts and "Body partCHEST" in facts
    body = page.text_content("body")
    assert PATIENT_ID not in body and "Testpatient" not in body  # identifiers never shown
    with page.expect_download() as dl:
        page.click("#get-fhir")
    report = json.loads(Path(dl.value.path()).read_text())
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "preliminary"
    with page.expect_download() as dl:
        page.click("#get-sr")
    sr = pydicom.dcmread(io.BytesIO(Path(dl.value.path()).read_bytes()))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == ds.StudyInstanceUID
    assert dl.value.suggested_filename == f"{sr.SOPInstanceUID}.dcm"
    # A PNG next: no DICOM facts, no SR button, and the FHIR result still on offer.
    page.set_input_files("#file", str(_png(tmp_path, image_factory, "bright", 51)))
    page.wait_for_selector("#result:not([hidden])")
    _wait(page, "document.getElementById('dicom-facts').hidden === true")
    assert not page.is_visible("#get-sr") and page.is_visible("#get-fhir")
    assert page.errors == [] and page.external == []


def test_report_html_prints_cleanly(page, trained_run):
    report = trained_run / "eval" / "test" / "report.html"
    page.goto(report.as_uri())
    _wait(page, "document.querySelectorAll('.js-plotly-plot').length > 0")
    page.emulate_media(media="print")
    try:
        styles = page.evaluate(
            "[getComputedStyle(document.querySelector('section')).breakInside,"
            " getComputedStyle(document.querySelector('.plot')).height,"
            " getComputedStyle(document.body).backgroundColor]"
        )
        assert styles == ["avoid", "300px", "rgb(255, 255, 255)"]
        pdf = page.pdf(format="A4")
    finally:
        page.emulate_media(media="screen")
    assert pdf.startswith(b"%PDF")
