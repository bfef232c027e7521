// Training dashboard: draw the Plotly figure dicts (medlens.reporting.figures) the server
// embedded as JSON; the mode bar's camera downloads a figure as PNG.
(() => {
  "use strict";
  const blob = document.getElementById("figures");
  if (!blob) return;
  if (typeof Plotly === "undefined") {
    for (const div of document.querySelectorAll(".plot")) {
      div.textContent = "The plotting library (plotly.min.js) did not load; plots cannot be shown.";
    }
    return;
  }
  const figures = JSON.parse(blob.textContent);
  for (const [id, fig] of Object.entries(figures)) {
    const div = document.getElementById(id);
    if (!div) continue;
    // The same config as the figure loop of report.html (medlens/templates/_figures.html).
    Plotly.newPlot(div, fig.data, fig.layout, {
      responsive: true,
      displaylogo: false,
      modeBarButtonsToRemove: ["select2d", "lasso2d"],
      toImageButtonOptions: { format: "png", filename: id, scale: 2 },
    });
  }
})();
