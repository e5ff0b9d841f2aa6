// medarchive web page: sign-out with the CSRF header, and the slice viewer's controls.
// Loaded from /static/ (the Content-Security-Policy allows no inline script).
"use strict";

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.getAttribute("content") || "" : "";
}

function setUpSignOut() {
  const form = document.getElementById("sign-out");
  if (!form) return;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    fetch(form.action, {
      method: "POST", credentials: "same-origin",
      headers: {"X-CSRF-Token": csrfToken(), "Content-Type": "application/x-www-form-urlencoded"},
      body: new URLSearchParams(new FormData(form)),
    }).finally(() => { window.location.assign("/sign-in"); });
  });
}

function setUpViewer() {
  const viewer = document.getElementById("viewer");
  if (!viewer) return;
  const slices = Array.from(document.querySelectorAll("#slices li")).map((li) => ({
    sop: li.dataset.sop, frame: li.dataset.frame, label: li.textContent,
  }));
  const range = document.getElementById("slice");
  const label = document.getElementById("slice-label");
  const centre = document.getElementById("wc");
  const width = document.getElementById("ww");
  const preset = document.getElementById("preset");
  const panes = Array.from(viewer.querySelectorAll("img[data-pane]"));
  let pending = null;

  function windowQuery() {
    const c = parseFloat(centre.value), w = parseFloat(width.value);
    return Number.isFinite(c) && Number.isFinite(w) && w > 0 ? "?window=" + encodeURIComponent(c + "," + w) : "";
  }

  function update() {
    const index = Math.max(0, Math.min(slices.length - 1, parseInt(range.value, 10) || 0));
    const slice = slices[index];
    if (!slice) return;
    label.textContent = slice.label;
    const query = windowQuery();
    for (const img of panes) {
      const base = "/ui/images/" + encodeURIComponent(slice.sop) + "/" + slice.frame + "/" + img.dataset.pane + ".png";
      const url = base + (img.dataset.windowed === "yes" ? query : "");
      if (img.getAttribute("src") !== url) img.setAttribute("src", url);
    }
  }

  function later() {  // typing in the window inputs: one request per pause, not per key
    if (pending) clearTimeout(pending);
    pending = setTimeout(update, 150);
  }

  function step(by) {
    const next = Math.max(0, Math.min(slices.length - 1, (parseInt(range.value, 10) || 0) + by));
    if (String(next) !== range.value) { range.value = String(next); update(); }
  }

  range.addEventListener("input", update);
  centre.addEventListener("input", later);
  width.addEventListener("input", later);
  preset.addEventListener("change", () => {
    const [c, w] = preset.value ? preset.value.split(",") : ["", ""];
    centre.value = c;
    width.value = w;
    update();
  });
  viewer.querySelector(".panes").addEventListener("wheel", (event) => {
    event.preventDefault();
    step(event.deltaY > 0 ? 1 : -1);
  }, {passive: false});
  document.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement && event.target.type !== "range") return;
    if (event.target instanceof HTMLSelectElement) return;
    if (event.key === "ArrowRight" || event.key === "ArrowDown") { event.preventDefault(); step(1); }
    if (event.key === "ArrowLeft" || event.key === "ArrowUp") { event.preventDefault(); step(-1); }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setUpSignOut();
  setUpViewer();
});
