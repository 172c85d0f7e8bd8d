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

// A name as plotly draws it literally: its markup characters as the entities plotly decodes.
export function plotlyText(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

// The index of the trace for one site's metric, adding an empty trace when the site has none yet.
// plotly reads a trace name as markup: a site's name goes in escaped, as coordinator/charts.py
// does for the first render, so a site named `<a href=...>` is drawn as text, not as a link.
export function traceFor(element, site, metric, siteName) {
  let index = element.data.findIndex((trace) => trace.meta && trace.meta.site === site);
  if (index < 0) {
    const name = plotlyText(siteName);
    window.Plotly.addTraces(element, { type: "scatter", mode: "lines", name, x: [], y: [], meta: { site, metric } });
    index = element.data.length - 1;
  }
  return index;
}
