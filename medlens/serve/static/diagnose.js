// Diagnose page: upload images to the JSON API and show the answers. Every text from the
// server is set with textContent (never innerHTML). Nothing is stored: results live in this
// page's memory, and the batch CSV is made in the browser.
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const picker = $("model-picker");
  if (!picker) return; // no models loaded
  const INFO = JSON.parse($("model-info").textContent);
  // McIsaac score -> share of patients (3 years and older) testing positive for group A
  // streptococcus in Fine, Nizet & Mandl, Arch Intern Med 2012;172:847 (206,870 patients).
  const MCISAAC = { 0: 8, 1: 14, 2: 23, 3: 37, 4: 55 };
  let batchRows = [];

  function chosen() {
    const r = picker.querySelector("input[name=model]:checked");
    return r ? r.value : null;
  }

  function modelTitle(name) {
    const r = picker.querySelector(`input[value="${CSS.escape(name)}"]`);
    return r ? r.closest("label").querySelector(".model-title").textContent : name;
  }

  function showCard() {
    document.querySelectorAll(".model-card").forEach((s) => {
      s.hidden = s.dataset.model !== chosen();
    });
  }

  function clearImages() {
    // Never leave the previous patient's pictures in place: drop them, not just hide them.
    for (const id of ["original", "cam"]) $(id).removeAttribute("src");
    document.querySelector("#result .images").hidden = true;
  }

  function clearResult() {
    $("result").hidden = true;
    $("batch").hidden = true;
    $("error").hidden = true;
    $("status").textContent = "";
    $("context").hidden = true;
    clearImages();
  }

  function showError(text) {
    $("result").hidden = true;
    $("status").textContent = "";
    $("error").textContent = text;
    $("error").hidden = false;
  }

  function pct(p) {
    return (100 * p).toFixed(1) + "%";
  }

  function bars(r) {
    const box = $("probabilities");
    box.replaceChildren();
    const classes = Object.keys(r.probabilities);
    for (const [cls, p] of Object.entries(r.probabilities)) {
      const row = document.createElement("div");
      row.className = "bar-row" + (cls === r.label ? " predicted" : "");
      const name = document.createElement("span");
      name.className = "bar-name";
      name.textContent = cls;
      const track = document.createElement("div");
      track.className = "bar-track";
      const fill = document.createElement("div");
      fill.className = "bar-fill";
      fill.style.width = pct(p);
      track.appendChild(fill);
      if (r.threshold !== null && cls === classes[classes.length - 1]) {
        // Binary models decide at the threshold, not at 50%: mark it on the positive bar.
        const mark = document.createElement("div");
        mark.className = "bar-threshold";
        mark.style.left = pct(r.threshold);
        mark.title = `decision threshold ${pct(r.threshold)}`;
        mark.setAttribute("aria-label", mark.title);
        track.appendChild(mark);
      }
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = pct(p);
      row.append(name, track, value);
      box.appendChild(row);
    }
    $("threshold").textContent = r.threshold === null
      ? "Decision rule: the most probable class."
      : `Decision threshold: ${classes[1]} is predicted when its calibrated probability is at least ${pct(r.threshold)}.`;
  }

  // The guard's verdict as a band, as the command line words it (medlens.evaluation.ood):
  // typical (<= 0.9x the flag level), near the level, borderline (1-1.5x), out of distribution.
  function oodBand(ood) {
    if (!ood || ood.flag === null || ood.flag === undefined) return "no check";
    if (ood.ratio === null || ood.ratio === undefined) return ood.flag ? "flagged" : "no";
    const x = `${Number(ood.ratio).toFixed(2)}x`;
    if (!ood.flag) return ood.ratio <= 0.9 ? `${x}: typical` : `${x}: near the flag level`;
    return ood.ratio <= 1.5 ? `${x}: borderline, flagged` : `${x}: out of distribution`;
  }

  function oodText(ood) {
    const level = ood.ratio === null || ood.ratio === undefined
      ? Number(ood.score).toFixed(2)
      : Number(ood.ratio).toFixed(2) + " times the level at which images are flagged (1 = the level; the model's own validation images stay below it 97.5% of the time)" + (ood.ratio <= 1.5 ? ": borderline" : "");
    return `Out-of-distribution score ${level}. Check the image and the model: is this the right kind of image for it?`;
  }

  function render(r, fileName, model) {
    $("result-file").textContent = `File: ${fileName} · model: ${modelTitle(model)}`;
    bars(r);
    const ood = r.ood || { flag: null, score: null, ratio: null };
    const flagged = ood.flag === true;
    // A flagged image gets no verdict in the normal style: say so plainly, grey the bars.
    $("result").classList.toggle("ood", flagged);
    $("result-heading").textContent = flagged ? "Not assessed: " : "Prediction: ";
    $("result-label").textContent = flagged
      ? `this image is unlike the images the model was trained on (the model's output, not to be trusted, would be ${r.label})`
      : r.label;
    $("ood-warning").hidden = !flagged;
    $("ood-warning").textContent = flagged ? oodText(ood) : "";
    $("ood-none").hidden = ood.flag !== null;
    const notes = $("notes");
    notes.replaceChildren();
    for (const n of r.notes || []) {
      const li = document.createElement("li");
      li.textContent = "Note: " + n;
      notes.appendChild(li);
    }
    clearImages();
    if (r.cam_png_base64) {
      $("original").src = "data:image/png;base64," + r.image_png_base64;
      $("cam").src = "data:image/png;base64," + r.cam_png_base64;
      document.querySelector("#result .images").hidden = false;
    }
    showDicom(r.dicom || {});
    $("version").textContent = r.version;
    $("elapsed").textContent = r.elapsed_ms;
    $("when").textContent = new Date().toLocaleString();
    setupContext(r, model, flagged);
    setupFeedback(r, model);
    $("status").textContent = "";
    $("error").hidden = true;
    $("result").hidden = false;
  }

  // ------------------------------------------------------------------ feedback
  // "Was this right?": the clinician's label goes to the prediction record by the
  // prediction's random id (no image, no file name). Hidden when the server keeps no record.
  let feedbackFor = null;

  function setupFeedback(r, model) {
    feedbackFor = r.prediction_id ? { id: r.prediction_id, label: r.label } : null;
    $("feedback").hidden = !feedbackFor;
    $("fb-status").textContent = "";
    $("fb-comment").value = "";
    const select = $("fb-label");
    select.replaceChildren();
    for (const label of Object.keys(r.probabilities || {})) {
      if (label === r.label) continue;
      const o = document.createElement("option");
      o.value = label;
      o.textContent = label;
      select.appendChild(o);
    }
    for (const b of ["fb-yes", "fb-no"]) $(b).disabled = !feedbackFor;
  }

  async function sendFeedback(label) {
    if (!feedbackFor) return;
    const body = { prediction_id: feedbackFor.id, label };
    const comment = $("fb-comment").value.trim();
    if (comment) body.comment = comment;
    $("fb-status").textContent = "Sending…";
    let res, payload = null;
    try {
      res = await fetch("/api/v1/feedback", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      payload = await res.json();
    } catch (err) {
      $("fb-status").textContent = `Not sent: the server could not be reached (${err.message}).`;
      return;
    }
    if (!res.ok) {
      $("fb-status").textContent = `Not sent: ${payload && payload.detail ? payload.detail : res.status}`;
      return;
    }
    for (const b of ["fb-yes", "fb-no"]) $(b).disabled = true;
    $("fb-status").textContent = `Thank you: recorded as ${payload.label}` +
      (payload.agrees ? " (agrees with the model)." : " (disagrees with the model).") +
      (payload.image_kept ? " The image was kept for retraining." : "");
  }

  $("fb-yes").addEventListener("click", () => feedbackFor && sendFeedback(feedbackFor.label));
  $("fb-no").addEventListener("click", () => sendFeedback($("fb-label").value));

  // ------------------------------------------------------------------ DICOM and documents
  const FACT_NAMES = {
    Modality: "Modality", ViewPosition: "View position", BodyPartExamined: "Body part",
    PhotometricInterpretation: "Photometric interpretation", BitsStored: "Bits stored",
    Rows: "Rows", Columns: "Columns",
  };
  let lastUpload = null; // {file, model}: kept in this page's memory only

  function showDicom(facts) {
    const list = $("dicom-list");
    list.replaceChildren();
    for (const [key, value] of Object.entries(facts)) {
      const dt = document.createElement("dt");
      dt.textContent = FACT_NAMES[key] || key;
      const dd = document.createElement("dd");
      dd.textContent = String(value);
      list.append(dt, dd);
    }
    const isDicom = Object.keys(facts).length > 0;
    $("dicom-facts").hidden = !isDicom;
    $("get-sr").hidden = !isDicom;
    $("download-status").textContent = "";
  }

  async function download(format) {
    if (!lastUpload) return;
    const { file, model } = lastUpload;
    $("download-status").textContent = "Preparing…";
    const body = new FormData();
    body.append("file", file);
    let res;
    try {
      res = await fetch(`/api/v1/models/${encodeURIComponent(model)}/predict?format=${format}`, { method: "POST", body });
    } catch (err) {
      $("download-status").textContent = `The server could not be reached (${err.message}).`;
      return;
    }
    if (!res.ok) {
      let detail = `${res.status} ${res.statusText}`;
      try { detail = (await res.json()).detail || detail; } catch (err) { /* not JSON */ }
      $("download-status").textContent = `Not available: ${detail}`;
      return;
    }
    const blob = await res.blob();
    const disposition = res.headers.get("Content-Disposition") || "";
    const match = /filename="([^"]+)"/.exec(disposition);
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = match ? match[1] : `medlens-result.${format === "fhir" ? "json" : "dcm"}`;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
    $("download-status").textContent = "";
  }

  // ------------------------------------------------------------------ clinical context
  let current = null; // {r, info}

  function setupContext(r, model, flagged) {
    const info = INFO[model];
    const lr = info && info.lr;
    current = { r, info };
    $("context").hidden = !lr || flagged;
    if (!lr || flagged) return;
    $("pretest-label").textContent = info.labels[1];
    $("mcisaac").hidden = info.clinical_score !== "mcisaac";
    if (info.clinical_score === "mcisaac") updateMcIsaac();
    updatePostTest();
  }

  function updateMcIsaac() {
    let score = Number($("mc-age").value);
    document.querySelectorAll("#mcisaac .mc").forEach((c) => { if (c.checked) score += 1; });
    const p = MCISAAC[Math.max(0, Math.min(4, score))];
    $("mc-result").textContent = `Score ${score}: in a large US study, ${p}% of patients with this score tested positive for group A streptococcus (Fine et al. 2012). Used below as the pre-test probability.`;
    $("pretest").value = p;
    updatePostTest();
  }

  function fmtLr(v) {
    return v === null ? "not finite (no false results of this kind on that split)" : v.toFixed(2);
  }

  function updatePostTest() {
    if (!current || !current.info || !current.info.lr) return;
    const { r, info } = current;
    const lr = info.lr;
    const positive = r.label === info.labels[1];
    const ratio = positive ? lr.positive : lr.negative;
    const pre = Number($("pretest").value) / 100;
    const ci = positive ? lr.positive_ci : lr.negative_ci;
    const ciText = ci ? `, 95% CI ${ci[0].toFixed(2)} to ${ci[1].toFixed(2)}` : "";
    const basis = `Likelihood ratio of a ${positive ? "positive" : "negative"} result: ${fmtLr(ratio)}${ciText} (sensitivity ${lr.sensitivity.toFixed(3)}, specificity ${lr.specificity.toFixed(3)} at the threshold, measured on the model's ${lr.title.toLowerCase()}, n = ${lr.n}). ${lr.note ? lr.note[0].toUpperCase() + lr.note.slice(1) + "." : ""}`;
    const assumptions = " Assumes the likelihood ratio holds in your population (the same spectrum of disease and images), that the image is of the kind the model was trained on, and that the pre-test probability does not already count what the image shows." + (info.clinical_score === "mcisaac" ? " The McIsaac score estimates group A streptococcus, while this model was trained on photographs labelled pharyngitis or not (any cause), and tonsillar exudate counts in both: the post-test figure is optimistic and for teaching only." : "");
    $("context-basis").textContent = basis + assumptions;
    const empty = $("pretest").value === "";
    $("posttest").classList.toggle("muted", empty);
    if (empty) {
      $("posttest").textContent = "Enter the pre-test probability (0.1% to 99.9%) to see the post-test probability.";
      return;
    }
    if (!(pre > 0 && pre < 1)) {
      $("posttest").textContent = "Enter a pre-test probability between 0.1% and 99.9%.";
      return;
    }
    if (ratio === null) {
      $("posttest").textContent = "No post-test probability: the likelihood ratio is not finite on the split it was measured on.";
      return;
    }
    const post = postTest(pre, ratio);
    const range = ci ? `; 95% CI ${pct(postTest(pre, ci[0]))} to ${pct(postTest(pre, ci[1]))} from the likelihood ratio's interval` : "";
    $("posttest").textContent = `Post-test probability of ${info.labels[1]}: ${pct(post)} (pre-test ${pct(pre)}, ${positive ? "positive" : "negative"} result${range}).`;
  }

  function postTest(pre, ratio) {
    const odds = (pre / (1 - pre)) * ratio;
    return odds / (1 + odds);
  }

  // ------------------------------------------------------------------ requests
  async function ask(file, model, explain) {
    const body = new FormData();
    body.append("file", file);
    const url = `/api/v1/models/${encodeURIComponent(model)}/predict?explain=${explain}`;
    let res;
    try {
      res = await fetch(url, { method: "POST", body });
    } catch (err) {
      return { error: `The server could not be reached (${err.message}). Is medlens serve still running?` };
    }
    let payload = null;
    try {
      payload = await res.json();
    } catch (err) {
      payload = null;
    }
    if (!res.ok) {
      const detail = payload && payload.detail ? payload.detail : `${res.status} ${res.statusText}`;
      return { error: `The image could not be analysed: ${detail}` };
    }
    return { result: payload };
  }

  async function diagnose(file, model) {
    clearResult();
    $("status").textContent = `Analysing ${file.name}…`;
    const got = await ask(file, model, $("explain").checked);
    if (got.error) {
      lastUpload = null;
      showError(got.error);
    } else {
      lastUpload = { file, model };
      render(got.result, file.name, model);
    }
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }

  async function diagnoseMany(files, model) {
    clearResult();
    batchRows = [];
    const body = $("batch-table").querySelector("tbody");
    body.replaceChildren();
    $("batch-heading").textContent = `Results for ${files.length} images`;
    $("batch-model").textContent = `Model: ${modelTitle(model)}. Open a file alone for its Grad-CAM map and clinical context.`;
    $("batch").hidden = false;
    let done = 0;
    for (const file of files) {
      $("status").textContent = `Analysing ${file.name} (${done + 1} of ${files.length})…`;
      const got = await ask(file, model, false);
      const tr = document.createElement("tr");
      cell(tr, file.name);
      if (got.error) {
        cell(tr, "error", "err");
        cell(tr, got.error);
        cell(tr, "");
        batchRows.push({ file: file.name, error: got.error });
      } else {
        const r = got.result;
        const flagged = r.ood && r.ood.flag === true;
        cell(tr, flagged ? `not assessed (would be ${r.label})` : r.label, flagged ? "ood" : "");
        cell(tr, Object.entries(r.probabilities).map(([c, p]) => `${c} ${pct(p)}`).join(", "));
        cell(tr, oodBand(r.ood), flagged ? "ood" : "");
        batchRows.push({ file: file.name, r });
      }
      body.appendChild(tr);
      done += 1;
    }
    $("status").textContent = `${done} images analysed.`;
  }

  function csvQuote(v) {
    // Text a spreadsheet would run as a formula (a file named "=HYPERLINK(...).png") starts
    // with an apostrophe (OWASP CSV injection); numbers stay numbers; as the server's CSVs.
    let s = v === null || v === undefined ? "" : String(v);
    if (typeof v === "string" && /^[=+\-@\t\r]/.test(s)) s = "'" + s;
    return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  }

  function downloadCsv() {
    const model = chosen();
    const labels = INFO[model] ? INFO[model].labels : [];
    const head = ["path", "label", ...labels.map((c) => `p_${c}`), "threshold", "ood_flag", "ood_score", "ood_ratio", "error"];
    const lines = [head.join(",")];
    for (const row of batchRows) {
      const r = row.r;
      const values = r
        ? [row.file, r.label, ...labels.map((c) => r.probabilities[c]), r.threshold,
           r.ood ? r.ood.flag : null, r.ood ? r.ood.score : null, r.ood ? r.ood.ratio : null, null]
        : [row.file, null, ...labels.map(() => null), null, null, null, null, row.error];
      lines.push(values.map(csvQuote).join(","));
    }
    const blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `medlens-${model}-predictions.csv`;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  function handle(files) {
    const list = Array.from(files || []);
    if (!list.length) return;
    const model = chosen();
    if (!model) {
      showError("Choose the model for this image first (step 1): each model reads one kind of image.");
      return;
    }
    if (list.length === 1) diagnose(list[0], model);
    else diagnoseMany(list, model);
  }

  // The form never submits itself: uploads go through fetch (no inline handler: the
  // Content-Security-Policy allows only this file's script).
  $("diagnose-form").addEventListener("submit", (e) => e.preventDefault());
  picker.addEventListener("change", (e) => {
    if (e.target.name !== "model") return;
    showCard();
    clearResult();
  });
  showCard();
  document.querySelectorAll("#mcisaac .mc, #mc-age").forEach((el) => el.addEventListener("change", updateMcIsaac));
  $("pretest").addEventListener("input", updatePostTest);
  $("print").addEventListener("click", () => window.print());
  $("batch-csv").addEventListener("click", downloadCsv);
  $("get-fhir").addEventListener("click", () => download("fhir"));
  $("get-sr").addEventListener("click", () => download("dicom-sr"));

  const drop = $("drop-zone");
  const input = $("file");
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => handle(e.dataTransfer && e.dataTransfer.files));
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  input.addEventListener("change", () => {
    handle(input.files);
    input.value = ""; // choosing the same file again triggers another analysis
  });
})();
