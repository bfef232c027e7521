// Diagnose page: upload an image to the JSON API and show the answer. Every text from the
// server is set with textContent (never innerHTML).
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const select = $("model");
  if (!select) return; // no models loaded

  function showCard() {
    document.querySelectorAll(".model-card").forEach((s) => {
      s.hidden = s.dataset.model !== select.value;
    });
  }

  function clearImages() {
    // Never leave the previous patient's pictures in place: drop them, not just hide them.
    for (const id of ["original", "cam"]) $(id).removeAttribute("src");
    document.querySelector("#result .images").hidden = true;
  }

  function clearResult() {
    $("result").hidden = true;
    $("error").hidden = true;
    $("status").textContent = "";
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

  function render(r, fileName) {
    $("result-file").textContent = `File: ${fileName} · model: ${select.options[select.selectedIndex].text}`;
    $("result-label").textContent = r.label;
    const bars = $("probabilities");
    bars.replaceChildren();
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
      bars.appendChild(row);
    }
    $("threshold").textContent = r.threshold === null
      ? "Decision rule: the most probable class."
      : `Decision threshold: ${classes[1]} is predicted when its calibrated probability is at least ${pct(r.threshold)}.`;
    const ood = r.ood || { flag: null, score: null, ratio: null };
    const flagged = ood.flag === true;
    // A flagged image gets no verdict in the normal style: say so plainly, grey the bars.
    $("result").classList.toggle("ood", flagged);
    $("result-heading").textContent = flagged ? "Not assessed: " : "Prediction: ";
    $("result-label").textContent = flagged
      ? `this image is unlike the images the model was trained on (the model's output, not to be trusted, would be ${r.label})`
      : r.label;
    $("ood-warning").hidden = !flagged;
    $("ood-warning").textContent = flagged
      ? `Out-of-distribution score ${ood.ratio === null || ood.ratio === undefined ? Number(ood.score).toFixed(2) : Number(ood.ratio).toFixed(1) + " times the level at which images are flagged (1 = the level; the model's own validation images stay below it 97.5% of the time)"}. Check the image and the model: is this the right kind of image for it?`
      : "";
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
    $("version").textContent = r.version;
    $("elapsed").textContent = r.elapsed_ms;
    $("status").textContent = "";
    $("error").hidden = true;
    $("result").hidden = false;
  }

  async function diagnose(file) {
    clearResult();
    $("status").textContent = `Analysing ${file.name}…`;
    const body = new FormData();
    body.append("file", file);
    const url = `/api/v1/models/${encodeURIComponent(select.value)}/predict?explain=${$("explain").checked}`;
    let res;
    try {
      res = await fetch(url, { method: "POST", body });
    } catch (err) {
      showError(`The server could not be reached (${err.message}). Is medlens serve still running?`);
      return;
    }
    let payload = null;
    try {
      payload = await res.json();
    } catch (err) {
      payload = null;
    }
    if (!res.ok) {
      const detail = payload && payload.detail ? payload.detail : `${res.status} ${res.statusText}`;
      showError(`The image could not be analysed: ${detail}`);
      return;
    }
    render(payload, file.name);
  }

  // The form never submits itself: uploads go through fetch (no inline handler: the
  // Content-Security-Policy allows only this file's script).
  const form = document.getElementById("diagnose-form");
  if (form) form.addEventListener("submit", (e) => e.preventDefault());
  select.addEventListener("change", () => { showCard(); clearResult(); });
  showCard();

  const drop = $("drop-zone");
  const input = $("file");
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => {
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f) diagnose(f);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  input.addEventListener("change", () => {
    if (input.files[0]) diagnose(input.files[0]);
    input.value = ""; // choosing the same file again triggers another analysis
  });
})();
