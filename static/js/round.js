// The live round page: task states, progress, streaming loss and throughput, evaluation results.
// The page is rendered with everything known so far; websocket events carry only what is new.
// What a site sends (metric names, its name) never becomes part of a selector: rows and cells are
// found by comparing their data attributes (withData), so a metric named `x"],body,[x="` is
// just a name that matches no cell.
import { traceFor } from "./charts.js";
import { connectLive, setBadge, withData } from "./live.js";

const CHARTS = new Map([
  ["train_loss", "loss-chart"],
  ["throughput", "throughput-chart"],
]);
const DICE = ["dice_et", "dice_wt", "dice_tc", "dice_mean"];
const FINAL = new Set(["done", "failed", "aborted"]);

function format(value, digits) {
  return Number(value).toFixed(digits);
}

function siteRow(rows, siteId) {
  return withData(document.querySelectorAll(rows), "siteId", String(siteId));
}

function cell(row, key, value) {
  return row ? withData(row.querySelectorAll("td"), key, value) : null;
}

function onMetrics(event) {
  const byName = new Map();
  for (const point of event.points) {
    if (!byName.has(point.name)) byName.set(point.name, []);
    byName.get(point.name).push(point);
  }
  for (const [name, points] of byName) {
    const chart = CHARTS.has(name) ? document.getElementById(CHARTS.get(name)) : null;
    if (chart && chart.data) {
      const index = traceFor(chart, event.site, name, event.site_name);
      window.Plotly.extendTraces(chart, { x: [points.map((p) => p.step)], y: [points.map((p) => p.value)] }, [index]);
    }
    const last = points[points.length - 1].value;
    const latest = cell(siteRow("#task-table tbody tr", event.site), "latest", name);
    if (latest) latest.textContent = format(last, name === "train_loss" ? 4 : 2);
    if (DICE.includes(name)) {
      const dice = cell(siteRow("#evaluation-table tbody tr", event.site), "dice", name);
      if (dice) {
        dice.textContent = format(last, 3);
        dice.dataset.value = last;
        updateFederated(name);
      }
    }
  }
}

// The case-weighted Dice over the sites shown, as the server computes it for the first render.
function updateFederated(name) {
  let weighted = 0;
  let weight = 0;
  for (const row of document.querySelectorAll("#evaluation-table tbody tr[data-site-id]")) {
    const dice = cell(row, "dice", name);
    const value = parseFloat(dice.dataset.value ?? dice.textContent);
    if (Number.isNaN(value)) continue;
    const cases = parseFloat(row.dataset.cases) || 1;
    weighted += cases * value;
    weight += cases;
  }
  const total = cell(document.querySelector("#evaluation-table tr[data-federated]"), "dice", name);
  if (total && weight > 0) total.textContent = format(weighted / weight, 3);
}

function onTask(event) {
  const row = withData(document.querySelectorAll("#task-table tbody tr"), "taskId", String(event.task));
  if (!row) return;
  setBadge(row.querySelector("[data-task-state]"), event.state);
  const percent = Math.round(100 * (Number(event.progress) || 0));
  row.querySelector("[data-progress-bar]").style.width = `${percent}%`;
  row.querySelector("[data-progress-text]").textContent = `${percent}%`;
  row.querySelector(".progress").setAttribute("aria-valuenow", String(percent));
  row.querySelector("[data-task-reason]").textContent = event.reason || "";
}

function onRound(event) {
  setBadge(document.querySelector("#round-summary [data-round-state]"), event.state);
  const reason = document.querySelector("[data-round-reason]");
  reason.textContent = event.reason || "";
  reason.hidden = !event.reason;
  const result = document.querySelector("[data-round-result]");
  if (event.state === "aggregating") result.textContent = "aggregating…";
  if (event.state === "done") result.textContent = "new version stored (reload to see it)";
  if (FINAL.has(event.state)) {
    const abort = document.querySelector("[data-abort-form]");
    if (abort) abort.remove();
  }
}

export function watchRound(roundId) {
  connectLive(`/ws/rounds/${roundId}/`, (event) => {
    if (event.round !== undefined && event.round !== roundId) return;
    if (event.type === "metrics") onMetrics(event);
    else if (event.type === "task.state") onTask(event);
    else if (event.type === "round.state") onRound(event);
  });
}
