// The federation pages, live: round states and new model versions as they happen.
import { connectLive, escapeHtml, setBadge, showNotice, withData } from "./live.js";

export function watchFederation(federationId) {
  connectLive(`/ws/federations/${federationId}/`, (event) => {
    const rows = document.querySelectorAll("tr[data-round-id]");
    const row = event.round !== undefined ? withData(rows, "roundId", String(event.round)) : null;
    if (event.type === "round.state") {
      if (row) {
        setBadge(row.querySelector("[data-round-state]"), event.state);
      } else {
        showNotice(`Round ${Number(event.number)} is ${escapeHtml(event.state)}. <a href="/rounds/${Number(event.round)}/">Open it</a> or <a href="">reload</a>.`);
      }
    } else if (event.type === "version.created" && row) {
      row.querySelector("[data-round-result]").textContent = `v${Number(event.number)}`;
      showNotice(`Model version v${Number(event.number)} is ready. <a href="">Reload</a> for the updated charts.`);
    } else if (event.type === "budget.changed") {
      showNotice(`A budget changed. <a href="">Reload</a> to see the new balances.`);
    }
  });
}
