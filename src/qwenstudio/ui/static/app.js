// Entry point: views (tabs, kept in the URL hash), the API key dialog, and wiring the views together.

import * as api from "./api.js";
import { $, showError } from "./dom.js";
import { initCompare } from "./compare.js";
import { applyEditRequest, initEdit } from "./edit.js";
import { initGallery, openOutput, refreshGallery } from "./gallery.js";
import { applyRequest, initGenerate, loadCatalog, loadPresets, setSeed } from "./generate.js";

const VIEWS = ["generate", "edit", "gallery", "compare"];

function showView(name) {
  if (!VIEWS.includes(name)) name = "generate";
  for (const v of VIEWS) $(`view-${v}`).hidden = v !== name;
  for (const tab of document.querySelectorAll(".tab")) {
    if (tab.dataset.view === name) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "gallery") refreshGallery();
}

// ---- API key ------------------------------------------------------------------------------------------------------
function askForKey(message) {
  const dialog = $("key-dialog");
  const input = $("key-input");
  input.value = "";
  showError($("key-error"), message ? { message } : null);
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const action = dialog.returnValue;
        if (action === "save" && input.value.trim()) {
          api.setKey(input.value.trim());
          resolve(true);
        } else {
          if (action === "forget") api.setKey("");
          resolve(false);
        }
      },
      { once: true },
    );
    dialog.returnValue = "";
    dialog.showModal();
    input.focus();
  });
}

async function changeKey() {
  if (await askForKey(api.getKey() ? "A key is saved in this browser; enter a new one to replace it." : "")) start();
}

// ---- start --------------------------------------------------------------------------------------------------------
async function start() {
  const status = $("server-status");
  try {
    const catalog = await loadCatalog();
    const ready = catalog.models.every((m) => m.ready);
    const loaded = catalog.models.filter((m) => m.resident !== false).map((m) => m.id);
    status.textContent = ready ? `ready · ${catalog.models.length} model(s), loaded: ${loaded.join(", ")}` : "loading model…";
    status.dataset.state = ready ? "ok" : "busy";
    showError($("global-error"), null);
    await loadPresets().catch(() => {});
    if (!$("view-gallery").hidden) refreshGallery();
  } catch (err) {
    status.textContent = err.status === 401 ? "API key needed" : "offline";
    status.dataset.state = "error";
    showError($("global-error"), err);
  }
}

function reuse(request, model, job) {
  if (request.images?.length) {
    applyEditRequest(request, model, job);
    showView("edit");
    $("edit-prompt").focus();
    return;
  }
  applyRequest(request, model);
  showView("generate");
  $("gen-prompt").focus();
}

function reuseSeed(seed) {
  setSeed(seed, true);
  showView("generate");
  $("gen-seed").focus();
}

function init() {
  api.onKeyNeeded(askForKey);
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  window.addEventListener("hashchange", () => showView(location.hash.slice(1)));
  $("key-button").addEventListener("click", changeKey);
  initGallery({ reuse, reuseSeed });
  initEdit({ openOutput });
  initCompare();
  initGenerate({ openOutput });
  showView(location.hash.slice(1) || "generate");
  start();
}

init();
