// One websocket per page: session-authenticated, reconnecting with backoff, events to a handler.
const REFUSED = new Set([4401, 4403]);

function setStatus(state) {
  document.body.dataset.live = state;
  for (const badge of document.querySelectorAll("[data-live-status]")) {
    badge.textContent = state === "connected" ? "live" : state;
    badge.classList.toggle("on", state === "connected");
  }
}

export function connectLive(path, onEvent) {
  let delay = 1000;
  const open = () => {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${window.location.host}${path}`);
    socket.addEventListener("open", () => {
      delay = 1000;
      setStatus("connected");
    });
    socket.addEventListener("message", (message) => {
      try {
        onEvent(JSON.parse(message.data));
      } catch (error) {
        console.error("could not handle live event", error);
      }
    });
    socket.addEventListener("close", (event) => {
      if (REFUSED.has(event.code)) {
        setStatus("refused");
        return;
      }
      setStatus("reconnecting");
      window.setTimeout(open, delay);
      delay = Math.min(delay * 2, 30000);
    });
  };
  setStatus("connecting");
  open();
}

// The first of ``elements`` whose data attribute ``key`` equals ``value``: how pages find the row
// or cell an event is about, without building a selector from the event's data.
export function withData(elements, key, value) {
  for (const element of elements) {
    if (element.dataset[key] === value) return element;
  }
  return null;
}

// Text for innerHTML, shown as the text it is.
export function escapeHtml(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

export function setBadge(element, state) {
  if (!element) return;
  const word = String(state).replace(/[^a-z_]/g, "");
  element.className = element.className.replace(/\bstate-\S+/g, "").trim() + ` state-${word}`;
  element.textContent = state;
}

export function showNotice(html) {
  const notice = document.querySelector("[data-live-notice]");
  if (!notice) return;
  notice.innerHTML = html;
  notice.hidden = false;
}
