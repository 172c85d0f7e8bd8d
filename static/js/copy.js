// Copy buttons: <button data-copy="element-id"> copies that element's text.
async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // Fall through to the selection-based copy below.
    }
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  return copied;
}

export function wireCopyButtons(root = document) {
  for (const button of root.querySelectorAll("[data-copy]")) {
    const label = button.textContent;
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      const copied = await copyText(source.textContent.trim());
      window.getSelection().selectAllChildren(source);
      button.textContent = copied ? "Copied" : "Select and copy";
      button.dataset.copied = copied ? "true" : "false";
      window.setTimeout(() => {
        button.textContent = label;
      }, 2500);
    });
  }
}
