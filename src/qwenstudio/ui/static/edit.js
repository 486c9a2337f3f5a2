// Edit view: 1-3 input images (drop or pick), a mask painted over the first one (brush, erase, fill, clear),
// strength and pixel-aligned; submitted as multipart to the OpenAI-compatible POST /v1/images/edits.
// Whatever the server answers (a result, or e.g. 501 while editing is not available) is shown inline.

import * as api from "./api.js";
import { $, el, showError } from "./dom.js";
import { formRequest, nextSeed } from "./generate.js";

const MAX_IMAGES = 3;
const MASK_COLOR = "#ff3d71";
let files = []; // [{file, url}]
let erase = false;
let painted = false;

const canvas = () => $("mask-canvas");

// ---- inputs -------------------------------------------------------------------------------------------------------
function addFiles(list) {
  const images = [...list].filter((f) => f.type.startsWith("image/"));
  const room = MAX_IMAGES - files.length;
  showError($("edit-error"), images.length > room ? { message: `at most ${MAX_IMAGES} input images; extra ones were skipped` } : null);
  for (const file of images.slice(0, Math.max(0, room))) files.push({ file, url: URL.createObjectURL(file) });
  renderThumbs();
}

function removeFile(i) {
  URL.revokeObjectURL(files[i].url);
  const wasFirst = i === 0;
  files.splice(i, 1);
  renderThumbs(wasFirst);
}

function renderThumbs(resetMask = true) {
  $("edit-thumbs").replaceChildren(
    ...files.map(({ file, url }, i) =>
      el(
        "li",
        { class: "thumb-item" },
        el("img", { src: url, alt: `Input ${i + 1}: ${file.name}` }),
        el("span", { class: "small-text" }, `${i + 1}. ${file.name}`),
        el("button", { type: "button", class: "icon", "aria-label": `Remove ${file.name}`, onclick: () => removeFile(i) }, "✕"),
      ),
    ),
  );
  if (resetMask) loadMaskImage();
}

function loadMaskImage() {
  const has = files.length > 0;
  $("mask-stage").hidden = !has;
  $("mask-empty").hidden = has;
  if (!has) return;
  const img = $("mask-image");
  img.onload = () => {
    const c = canvas();
    c.width = img.naturalWidth;
    c.height = img.naturalHeight;
    painted = false;
  };
  img.src = files[0].url;
}

// ---- painting -----------------------------------------------------------------------------------------------------
function brushPx() {
  const c = canvas();
  const scale = c.width / c.getBoundingClientRect().width || 1;
  return Number($("mask-brush").value) * scale;
}

function pointAt(ev) {
  const c = canvas();
  const r = c.getBoundingClientRect();
  return [((ev.clientX - r.left) / r.width) * c.width, ((ev.clientY - r.top) / r.height) * c.height];
}

function stroke(from, to) {
  const ctx = canvas().getContext("2d");
  ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
  ctx.strokeStyle = MASK_COLOR;
  ctx.lineWidth = brushPx();
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(...from);
  ctx.lineTo(...to);
  ctx.stroke();
  if (!erase) painted = true;
}

function initPainting() {
  const c = canvas();
  let last = null;
  c.addEventListener("pointerdown", (ev) => {
    c.setPointerCapture(ev.pointerId);
    last = pointAt(ev);
    stroke(last, last);
    ev.preventDefault();
  });
  c.addEventListener("pointermove", (ev) => {
    if (!last) return;
    const p = pointAt(ev);
    stroke(last, p);
    last = p;
  });
  const end = () => (last = null);
  c.addEventListener("pointerup", end);
  c.addEventListener("pointercancel", end);
}

function setMode(toErase) {
  erase = toErase;
  $("mask-paint").setAttribute("aria-pressed", String(!erase));
  $("mask-erase").setAttribute("aria-pressed", String(erase));
}

function clearMask() {
  const c = canvas();
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  painted = false;
}

function fillMask() {
  const c = canvas();
  const ctx = c.getContext("2d");
  ctx.globalCompositeOperation = "source-over";
  ctx.fillStyle = MASK_COLOR;
  ctx.fillRect(0, 0, c.width, c.height);
  painted = true;
}

/** The mask as a PNG: white where painted (edit here), black elsewhere, at the first image's size. */
function maskBlob() {
  const src = canvas();
  const out = el("canvas", { width: src.width, height: src.height });
  const octx = out.getContext("2d");
  const pixels = src.getContext("2d").getImageData(0, 0, src.width, src.height);
  const d = pixels.data;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i + 3] > 0 ? 255 : 0;
    d[i] = d[i + 1] = d[i + 2] = v;
    d[i + 3] = 255;
  }
  octx.putImageData(pixels, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

// ---- submit -------------------------------------------------------------------------------------------------------
async function buildForm() {
  const base = formRequest();
  const form = new FormData();
  form.append("prompt", $("edit-prompt").value);
  if (base.model) form.append("model", base.model);
  form.append("n", "1");
  form.append("response_format", "b64_json");
  for (const { file } of files) form.append("image[]", file, file.name);
  if (painted) form.append("mask", await maskBlob(), "mask.png");
  form.append("strength", $("edit-strength").value);
  form.append("keep_size", $("edit-aligned").checked ? "true" : "false");
  for (const k of ["steps", "cfg", "sampler", "scheduler", "negative_prompt"]) if (base[k] !== undefined) form.append(k, String(base[k]));
  form.append("seed", String(nextSeed()));
  return form;
}

function showResults(data) {
  const items = (data?.data || []).map((d, i) =>
    el("figure", { class: "result" }, el("img", { src: d.b64_json ? `data:image/png;base64,${d.b64_json}` : d.url, alt: `Edit result ${i + 1}` })),
  );
  $("edit-images").replaceChildren(...items);
}

async function submit(ev) {
  ev.preventDefault();
  const errBox = $("edit-error");
  showError(errBox, null);
  if (!files.length) return showError(errBox, { message: "add at least one input image" });
  if (!$("edit-prompt").value.trim()) return showError(errBox, { message: "write an instruction" });
  const button = $("edit-run");
  button.disabled = true;
  button.textContent = "Editing…";
  try {
    showResults(await api.request("/v1/images/edits", { method: "POST", body: await buildForm() }));
  } catch (err) {
    showError(errBox, err);
  } finally {
    button.disabled = false;
    button.textContent = "Edit";
  }
}

export function initEdit() {
  const drop = $("edit-drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addFiles(e.dataTransfer.files);
  });
  $("edit-files").addEventListener("change", (e) => {
    addFiles(e.target.files);
    e.target.value = "";
  });
  $("mask-brush").addEventListener("input", (e) => ($("mask-brush-out").textContent = e.target.value));
  $("edit-strength").addEventListener("input", (e) => ($("edit-strength-out").textContent = Number(e.target.value).toFixed(2)));
  $("mask-paint").addEventListener("click", () => setMode(false));
  $("mask-erase").addEventListener("click", () => setMode(true));
  $("mask-clear").addEventListener("click", clearMask);
  $("mask-fill").addEventListener("click", fillMask);
  $("edit-form").addEventListener("submit", submit);
  $("edit-prompt").addEventListener("keydown", (e) => e.key === "Enter" && (e.ctrlKey || e.metaKey) && submit(e));
  initPainting();
}
