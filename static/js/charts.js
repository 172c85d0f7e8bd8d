// Draws the figures a page embeds as JSON (built server-side by coordinator/charts.py).
const CONFIG = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"] };

export function drawFigures(root = document) {
  for (const element of root.querySelectorAll("[data-figure]")) {
    const source = document.getElementById(element.dataset.figure);
    if (!source) continue;
    const figure = JSON.parse(source.textContent);
    window.Plotly.newPlot(element, figure.data, figure.layout, CONFIG);
    element.dataset.drawn = "true";
  }
}

// The index of the trace for one site's metric, adding an empty trace when the site has none yet.
export function traceFor(element, site, metric, name) {
  let index = element.data.findIndex((trace) => trace.meta && trace.meta.site === site);
  if (index < 0) {
    window.Plotly.addTraces(element, { type: "scatter", mode: "lines", name, x: [], y: [], meta: { site, metric } });
    index = element.data.length - 1;
  }
  return index;
}
