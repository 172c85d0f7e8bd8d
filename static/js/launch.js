// The launch form: show the chosen mechanism's parameters, and refresh the privacy preview
// (rendered by the server from coordinator.privacy_preview) as the form changes.
const DEBOUNCE_MS = 250;

function showParams(form, paramsByMechanism) {
  const wanted = new Set(paramsByMechanism[form.elements.mechanism.value] || []);
  for (const row of form.querySelectorAll("[data-param-row]")) {
    const shown = wanted.has(row.dataset.paramRow);
    row.hidden = !shown;
    for (const input of row.querySelectorAll("input")) input.disabled = !shown;
  }
}

export function watchLaunchForm(form, panel) {
  const paramsByMechanism = JSON.parse(document.getElementById("mechanism-params").textContent);
  let timer = null;
  let latest = 0;
  const refresh = async () => {
    const request = ++latest;
    panel.dataset.state = "loading";
    const response = await fetch(form.dataset.previewUrl, {
      method: "POST",
      body: new FormData(form),
      headers: { "X-CSRFToken": form.elements.csrfmiddlewaretoken.value },
      credentials: "same-origin",
    });
    if (request !== latest) return; // a newer preview is on its way
    panel.innerHTML = response.ok ? await response.text() : `<p class="error-box">Preview failed (${response.status}).</p>`;
    panel.dataset.state = "fresh";
  };
  const schedule = () => {
    window.clearTimeout(timer);
    timer = window.setTimeout(refresh, DEBOUNCE_MS);
  };
  form.elements.mechanism.addEventListener("change", () => showParams(form, paramsByMechanism));
  form.addEventListener("input", schedule);
  form.addEventListener("change", schedule);
  showParams(form, paramsByMechanism);
  panel.dataset.state = "fresh";
}
