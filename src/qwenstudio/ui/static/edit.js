// Edit view: 1-3 input images (drop or pick), a mask painted over the first one (brush, erase, fill, clear),
// strength and pixel-aligned. Each image is uploaded as soon as it is added (POST /api/uploads: the server checks
// it and answers its content-hash id, or an error shown inline); "Edit" uploads the painted mask the same way and
// creates a native job (POST /api/jobs with the upload ids), followed in the same live panel as generations:
// queue position, progress with step count and ETA, previews, cancel; the results open in the detail dialog.

import * as api from "./api.js";
import { $, el, showError } from "./dom.js";
import { applyRequest, formRequest, nextSeed } from "./generate.js";
import { runJob } from "./live.js";

const MAX_IMAGES = 3;
const MASK_COLOR = "#ff3d71";
let files = []; // [{file, url, upload: Promise<ref|null>, ref}] ref = {id, width, height, format} once uploaded
let erase = false;
let painted = false;
let openOutput = null;
let running = false;

const canvas = () => $("mask-canvas");

// ---- inputs -------------------------------------------------------------------------------------------------------
/** POST /api/uploads with one part named "file"; resolves with {id, width, height, format}. */
export function uploadImage(blob, name) {
  const form = new FormData();
  form.append("file", blob, name);
  return api.request("/api/uploads", { method: "POST", body: form });
}

function uploadError(name, err) {
  return { message: `${name}: ${err.message}`, status: err.status, code: err.code };
}

function addFiles(list) {
  const images = [...list].filter((f) => f.type.startsWith("image/"));
  const room = MAX_IMAGES - files.length;
  showError($("edit-error"), images.length > room ? { message: `at most ${MAX_IMAGES} input images; extra ones were skipped` } : null);
  const added = images.slice(0, Math.max(0, room));
  if (added.length) $("edit-notice").hidden = true;
  for (const file of added) {
    const entry = { file, url: URL.createObjectURL(file), ref: null };
    entry.upload = uploadImage(file, file.name).then(
      (ref) => {
        entry.ref = ref;
        if (files.includes(entry)) renderThumbs(false);
        return ref;
      },
      (err) => {
        // refused by the server (not an image, too large, ...): its message inline, and the file leaves the list
        const i = files.indexOf(entry);
        if (i >= 0) removeFile(i);
        showError($("edit-error"), uploadError(file.name, err));
        return null;
      },
    );
    files.push(entry);
  }
  renderThumbs();
}

function removeFile(i) {
  URL.revokeObjectURL(files[i].url);
  const wasFirst = i === 0;
  files.splice(i, 1);
  renderThumbs(wasFirst);
}

function describe({ file, ref }, i) {
  const state = ref ? `${ref.width}×${ref.height} ${ref.format}` : "uploading…";
  return `${i + 1}. ${file.name} · ${state}`;
}

function renderThumbs(resetMask = true) {
  $("edit-thumbs").replaceChildren(
    ...files.map((entry, i) =>
      el(
        "li",
        { class: entry.ref ? "thumb-item" : "thumb-item uploading" },
        el("img", { src: entry.url, alt: `Input ${i + 1}: ${entry.file.name}` }),
        el("span", { class: "small-text", title: entry.ref ? `upload ${entry.ref.id}` : "" }, describe(entry, i)),
        el("button", { type: "button", class: "icon", "aria-label": `Remove ${entry.file.name}`, onclick: () => removeFile(i) }, "✕"),
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
  img.onerror = () => {}; // a file the browser cannot decode: the server's refusal of its upload says why
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
/** The create-job body: the Generate view's model and sampling settings, this view's inputs and edit fields. */
function jobBody(imageIds, maskId) {
  const base = formRequest();
  const body = { prompt: $("edit-prompt").value, images: imageIds };
  for (const k of ["model", "steps", "cfg", "shift", "sampler", "scheduler", "negative_prompt", "loras"]) if (base[k] !== undefined) body[k] = base[k];
  if (maskId) body.mask = maskId;
  body.strength = Number($("edit-strength").value);
  body.keep_size = $("edit-aligned").checked;
  body.seed = nextSeed();
  body.preview_every = Math.max(1, Math.round((body.steps || 20) / 10));
  return body;
}

/** Wait for the images' uploads and upload the mask; the ids, or null when something was refused (shown inline). */
async function uploadInputs() {
  const refs = await Promise.all(files.map((f) => f.upload));
  if (refs.some((r) => !r) || !files.length) return null; // a refused file was removed and its error shown
  let maskId;
  if (painted) {
    try {
      maskId = (await uploadImage(await maskBlob(), "mask.png")).id;
    } catch (err) {
      showError($("edit-error"), uploadError("mask", err));
      return null;
    }
  }
  return { images: refs.map((r) => r.id), mask: maskId };
}

async function submit(ev) {
  ev.preventDefault();
  if (running) return;
  const errBox = $("edit-error");
  showError(errBox, null);
  if (!files.length) return showError(errBox, { message: "add at least one input image" });
  if (!$("edit-prompt").value.trim()) return showError(errBox, { message: "write an instruction" });
  const button = $("edit-run");
  running = true;
  button.disabled = true;
  button.textContent = "Uploading…";
  try {
    const inputs = await uploadInputs();
    if (!inputs) return;
    $("edit-notice").hidden = true;
    button.textContent = "Editing…";
    const ui = { live: $("edit-live"), images: $("edit-images"), meta: $("edit-meta"), onOpen: openOutput };
    const outcome = await runJob(jobBody(inputs.images, inputs.mask), ui);
    if (outcome?.event === "failed") showError(errBox, outcome.data.error);
  } catch (err) {
    showError(errBox, err);
  } finally {
    running = false;
    button.disabled = false;
    button.textContent = "Edit";
  }
}

// ---- reuse --------------------------------------------------------------------------------------------------------
const refText = (r) => `${r.width}×${r.height} ${r.format?.toUpperCase() ?? ""}`.trim();

/** Fill the Edit view (and the Generate view's shared settings) from an edit job's stored request. The stored
 * inputs are {sha256, width, height, format} refs; the API has no route to read an upload back, so the images are
 * named in a notice and must be picked again (the same file uploads to the same id). */
export function applyEditRequest(req, modelId, job) {
  const { prompt, images, mask, strength, keep_size: keepSize, controls, ...shared } = req;
  delete shared.width; // an edit's size follows its input (keep_size) or the model's edit area, never the form
  delete shared.height;
  delete shared.aspect;
  applyRequest(shared, modelId);
  $("edit-prompt").value = prompt ?? "";
  if (strength !== undefined && strength !== null) {
    $("edit-strength").value = String(strength);
    $("edit-strength-out").textContent = Number($("edit-strength").value).toFixed(2);
  }
  if (keepSize !== undefined && keepSize !== null) $("edit-aligned").checked = Boolean(keepSize);
  const wanted = (images || []).map((r) => r.sha256);
  const have = files.map((f) => f.ref?.id);
  const same = wanted.length > 0 && wanted.length === have.length && wanted.every((id, i) => id === have[i]);
  const list = (images || []).map(refText).join(", ");
  const what = `${images?.length || 0} input image${images?.length === 1 ? "" : "s"} (${list})${mask ? " and its mask" : ""}`;
  const from = job ? `edit job ${job.id.slice(0, 8)}` : "the edit job";
  $("edit-notice").textContent = same
    ? `Settings restored from ${from}. The images above are the same ones it used${mask ? "; paint the mask again" : ""}.`
    : `Settings restored from ${from}. Its ${what} cannot be shown here (the server offers no way to read uploads back): pick the images${mask ? " and paint the mask" : ""} again.`;
  $("edit-notice").hidden = false;
}

/** Wire the view once; `open(output, jobId)` shows a result's detail dialog. */
export function initEdit({ openOutput: open } = {}) {
  openOutput = open;
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
