// Training dashboard: draw the Plotly figures the server embedded as JSON.
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
    if (div) Plotly.newPlot(div, fig.data, fig.layout, { responsive: true, displaylogo: false });
  }
})();
