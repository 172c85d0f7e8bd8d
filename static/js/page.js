// The one script every page loads. The Content-Security-Policy allows no inline script and no
// style attribute, so pages say what they need in data attributes and this wires it up.
import { drawFigures } from "./charts.js";
import { wireCopyButtons } from "./copy.js";
import { watchFederation } from "./federation.js";
import { watchLaunchForm } from "./launch.js";
import { watchRound } from "./round.js";

// Bars (progress, budget use) carry their width as data-bar-width, a percentage.
function drawBars() {
  for (const bar of document.querySelectorAll("[data-bar-width]")) {
    bar.style.width = `${Number(bar.dataset.barWidth)}%`;
  }
}

const page = document.body.dataset;
drawBars();
drawFigures();
wireCopyButtons();
const launchForm = document.getElementById("launch-form");
if (launchForm) watchLaunchForm(launchForm, document.getElementById("preview"));
if (page.watchRound) watchRound(Number(page.watchRound));
if (page.watchFederation) watchFederation(Number(page.watchFederation));
page.ready = "true";
