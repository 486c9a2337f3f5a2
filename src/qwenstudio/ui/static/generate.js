// Generate view: the request form (model defaults, sizes, sampling, seed, LoRA stack, presets) and running a job.

import * as api from "./api.js";
import { $, el, randomSeed, setOptions, showError } from "./dom.js";
import { runJob } from "./live.js";

const CUSTOM = "custom";
export const catalog = { models: [], loras: [], samplers: [], schedulers: [], limits: {} };
let seedLocked = false;
// Settings a loaded request carries that the form has no control for (compat, noise, cfg_norm, magic): sent with
// the next runs until "Defaults" or another model clears them, and listed next to the presets.
const CARRIED = ["compat", "noise", "cfg_norm", "magic"];
let carried = {};
let openOutput = null;

const field = (name) => $(`gen-${name}`);
const model = () => catalog.models.find((m) => m.id === field("model").value) || catalog.models[0];

// ---- catalog & defaults -------------------------------------------------------------------------------------------
export async function loadCatalog() {
  const data = await api.get("/api/models");
  Object.assign(catalog, {
    models: data.models || [],
    loras: data.loras || [],
    samplers: data.samplers || ["euler"],
    schedulers: data.schedulers || ["reference"],
    limits: data.limits || {},
  });
  // every servable model, with its variant and format; "loaded" = resident now (others load on first use)
  setOptions(field("model"), catalog.models.map((m) => [m.id, modelLabel(m)]));
  // "" = the model's default (or a LoRA recipe's): the server decides what is unset, never the form
  setOptions(field("sampler"), [["", "default"], ...catalog.samplers.map((s) => [s, s])]);
  setOptions(field("scheduler"), [["", "default"], ...catalog.schedulers.map((s) => [s, s])]);
  $("lora-names").replaceChildren(...catalog.loras.map((l) => el("option", { value: l.name || l.id })));
  applyDefaults();
  return catalog;
}

function modelLabel(m) {
  if (!m.ready) return `${m.id} (loading)`;
  const about = [m.variant, m.format].filter(Boolean).join(", ");
  return `${m.id}${about ? ` · ${about}` : ""}${m.resident ? " · loaded" : ""}`;
}

function fillAspects(m) {
  const entries = Object.entries(m.resolutions || {});
  setOptions(field("aspect"), [...entries.map(([name, [w, h]]) => [name, `${name} · ${w}×${h}`]), [CUSTOM, "Custom"]]);
}

/** Show the model's defaults as placeholders and clear the fields (on load, "Defaults" and a model change).
 * A field left empty is sent as unset, so the server's recipe decides it: a Lightning LoRA's 8 steps / CFG 1, a
 * preset's values or the model's defaults — the form never sends a pre-filled value the user did not choose. */
export function applyDefaults() {
  const m = model();
  if (!m) return;
  const d = m.defaults || {};
  carried = {};
  fillAspects(m);
  field("aspect").value = d.aspect && m.resolutions?.[d.aspect] ? d.aspect : CUSTOM;
  const show = (name, v, fallback = "") => {
    field(name).value = "";
    field(name).placeholder = v ?? fallback;
  };
  show("width", d.width);
  show("height", d.height);
  show("steps", d.steps);
  show("cfg", d.cfg);
  show("shift", d.shift, "auto");
  field("sampler").value = "";
  field("scheduler").value = "";
  field("sampler").options[0].textContent = `default (${d.sampler ?? "euler"})`;
  field("scheduler").options[0].textContent = `default (${d.scheduler ?? "reference"})`;
  show("negative", (d.negative_prompt || "").trim() || null, "");
}

function syncAspectFromSize() {
  const m = model();
  const w = Number(field("width").value);
  const h = Number(field("height").value);
  const match = Object.entries(m?.resolutions || {}).find(([, [rw, rh]]) => rw === w && rh === h);
  field("aspect").value = match ? match[0] : CUSTOM;
}

function applyAspect() {  // choosing an aspect is choosing its size
  const size = model()?.resolutions?.[field("aspect").value];
  if (size) [field("width").value, field("height").value] = size;
}

// ---- seed ---------------------------------------------------------------------------------------------------------
export function setSeed(seed, lock = seedLocked) {
  field("seed").value = seed ?? "";
  setLock(lock);
}

function setLock(on) {
  seedLocked = on;
  const b = field("lock");
  b.setAttribute("aria-pressed", String(on));
  b.title = on ? "Seed locked: kept between runs" : "Seed unlocked: a new one each run";
}

/** The seed for the next run: the locked one, or a fresh random one (shown in the field). */
export function nextSeed() {
  const cur = field("seed").value.trim();
  if (seedLocked && cur !== "") return Number(cur);
  const s = randomSeed();
  field("seed").value = s;
  return s;
}

// ---- LoRA stack ---------------------------------------------------------------------------------------------------
let loraCount = 0;

export function addLora(name = "", weight = 1) {
  const i = ++loraCount;
  const out = el("output", { for: `lora-w-${i}` }, Number(weight).toFixed(2));
  const slider = el("input", { id: `lora-w-${i}`, type: "range", min: "-2", max: "2", step: "0.05", value: String(weight), class: "lora-weight" });
  slider.addEventListener("input", () => (out.textContent = Number(slider.value).toFixed(2)));
  const row = el(
    "li",
    { class: "lora-row" },
    el("div", { class: "field grow" }, el("label", { for: `lora-n-${i}` }, "LoRA"),
      el("input", { id: `lora-n-${i}`, type: "text", list: "lora-names", value: name, class: "lora-name", placeholder: "name in the models dir", autocomplete: "off" })),
    el("div", { class: "field" }, el("label", { for: `lora-w-${i}` }, "Weight ", out), slider),
    el("button", { type: "button", class: "icon align-end", "aria-label": "Remove LoRA", title: "Remove", onclick: () => row.remove() }, "✕"),
  );
  $("lora-list").append(row);
  return row;
}

export function loraStack() {
  return [...document.querySelectorAll(".lora-row")]
    .map((row) => ({ name: row.querySelector(".lora-name").value.trim(), weight: Number(row.querySelector(".lora-weight").value) }))
    .filter((l) => l.name);
}

function setLoras(list) {
  $("lora-list").replaceChildren();
  for (const l of list || []) addLora(l.name, l.weight ?? 1);
}

// ---- request <-> form ---------------------------------------------------------------------------------------------
const num = (name) => {
  const v = field(name).value.trim();
  return v === "" ? undefined : Number(v);
};

/** The create-job body from the form (without seed handling: see nextSeed). */
export function formRequest() {
  const body = {
    model: field("model").value || undefined,
    prompt: field("prompt").value,
    width: num("width"),
    height: num("height"),
    steps: num("steps"),
    cfg: num("cfg"),
    shift: num("shift"),
    sampler: field("sampler").value || undefined,
    scheduler: field("scheduler").value || undefined,
    batch: num("batch"),
    seed: num("seed"),
  };
  const neg = field("negative").value;
  if (neg.trim()) body.negative_prompt = neg;
  const aspect = field("aspect").value;
  const chosen = aspect !== CUSTOM && aspect !== model()?.defaults?.aspect;
  if (body.width === undefined && body.height === undefined && chosen) body.aspect = aspect;
  const loras = loraStack();
  if (loras.length) body.loras = loras;
  Object.assign(body, carried);
  return body;
}

/** Fill the form from a (resolved) request, e.g. a gallery item's or a preset's params. */
export function applyRequest(req, modelId) {
  if (modelId && catalog.models.some((m) => m.id === modelId) && modelId !== field("model").value) {
    field("model").value = modelId;
    applyDefaults();
  }
  const set = (name, v) => v !== undefined && v !== null && (field(name).value = v);
  set("prompt", req.prompt);
  if (req.negative_prompt !== undefined) field("negative").value = (req.negative_prompt || "").trim();
  set("width", req.width);
  set("height", req.height);
  set("steps", req.steps);
  set("cfg", req.cfg);
  if ("shift" in req) field("shift").value = req.shift ?? "";
  set("sampler", req.sampler);
  set("scheduler", req.scheduler);
  set("batch", req.batch);
  if (req.seed !== undefined && req.seed !== null) setSeed(req.seed, true);
  if (req.loras) setLoras(req.loras.map((l) => (Array.isArray(l) ? { name: l[0], weight: l[1] } : l)));
  if (req.aspect && !req.width && model()?.resolutions?.[req.aspect]) {
    field("aspect").value = req.aspect;
    applyAspect();
  }
  carried = Object.fromEntries(CARRIED.filter((k) => req[k] !== undefined && req[k] !== null).map((k) => [k, req[k]]));
  syncAspectFromSize();
}

// ---- presets ------------------------------------------------------------------------------------------------------
let presets = [];

export async function loadPresets(selectId) {
  presets = (await api.get("/api/presets")).presets || [];
  setOptions($("preset-select"), [["", "—"], ...presets.map((p) => [p.id, p.name])], selectId ?? "");
}

function presetMessage(text, err) {
  const p = $("preset-msg");
  p.textContent = text;
  p.classList.toggle("error-text", Boolean(err));
}

function presetParams() {
  const body = formRequest();
  delete body.seed;
  if (seedLocked && field("seed").value !== "") body.seed = Number(field("seed").value);
  return Object.fromEntries(Object.entries(body).filter(([, v]) => v !== undefined && v !== ""));
}

async function savePreset() {
  const name = $("preset-name").value.trim();
  if (!name) return presetMessage("Give the preset a name first.", true);
  try {
    const p = await api.post("/api/presets", { name, params: presetParams() });
    await loadPresets(p.id);
    presetMessage(`Saved “${p.name}”.`);
  } catch (err) {
    presetMessage(err.message, true);
  }
}

function loadPreset() {
  const p = presets.find((x) => x.id === $("preset-select").value);
  if (!p) return presetMessage("Pick a preset.", true);
  const params = { ...p.params };
  for (const [key, box] of [["prompt", "prompt"], ["negative_prompt", "negative"]]) {
    // SwarmUI presets: {value} stands for what the user has typed (SwarmUI's ApplyStringEdit)
    if (typeof params[key] === "string" && params[key].includes("{value}")) {
      params[key] = params[key].replaceAll("{value}", field(box).value);
    }
  }
  applyRequest(params, params.model);
  presetMessage(`Loaded “${p.name}”.`);
}

/** "Load settings from an image": upload it, read what it carries (GET /api/uploads/{id}/settings) and fill the
 * form; what did not map is listed, never guessed. */
async function settingsFromImage(ev) {
  const file = ev.target.files[0];
  ev.target.value = "";
  if (!file) return;
  try {
    const form = new FormData();
    form.append("file", file, file.name);
    const up = await api.request("/api/uploads", { method: "POST", body: form });
    const res = await api.get(`/api/uploads/${up.id}/settings`);
    const { model: modelName, ...fields } = res.fields || {};
    applyRequest(fields, modelName);
    const notes = [...(res.warnings || [])];
    if (modelName && !catalog.models.some((m) => m.id === modelName)) notes.push(`model ${modelName} is not served here`);
    const kept = Object.entries(carried).map(([k, v]) => `${k} ${v}`);
    if (kept.length) notes.push(`also sent: ${kept.join(", ")}`);
    presetMessage(`Loaded the ${res.source} settings of ${file.name}.` +
      (res.unmapped?.length ? ` Not mapped: ${res.unmapped.join(", ")}.` : "") +
      (notes.length ? ` Note: ${notes.join("; ")}.` : ""));
  } catch (err) {
    presetMessage(err.message, true);
  }
}

async function importPreset(ev) {
  const file = ev.target.files[0];
  ev.target.value = "";
  if (!file) return;
  try {
    const json = JSON.parse(await file.text());
    const res = await api.post("/api/presets/import/swarmui", json);
    await loadPresets(res.preset.id);
    const all = res.presets || [res]; // a SwarmUI "Export All" file holds many presets
    const skipped = all.flatMap((p) => p.unmapped || []);
    const notes = all.flatMap((p) => p.warnings || []);
    presetMessage(`Imported ${all.map((p) => `“${p.preset.name}”`).join(", ")}.` +
      (skipped.length ? ` Not mapped: ${skipped.join(", ")}.` : "") + (notes.length ? ` Note: ${notes.join("; ")}.` : ""));
  } catch (err) {
    presetMessage(err instanceof SyntaxError ? `Not a JSON file: ${err.message}` : err.message, true);
  }
}

// ---- run ----------------------------------------------------------------------------------------------------------
async function run(ev) {
  ev?.preventDefault();
  showError($("gen-error"), null);
  const body = formRequest();
  body.seed = nextSeed();
  body.preview_every = Math.max(1, Math.round((body.steps || 20) / 10));
  $("gen-run").disabled = true;
  try {
    const ui = { live: $("gen-live"), images: $("gen-images"), meta: $("gen-meta"), onOpen: openOutput };
    const outcome = await runJob(body, ui);
    if (outcome?.event === "failed") showError($("gen-error"), outcome.data.error);
  } catch (err) {
    showError($("gen-error"), err);
  } finally {
    $("gen-run").disabled = false;
  }
}

/** Wire the form once; `open(output, jobId)` shows a result's detail dialog. */
export function initGenerate({ openOutput: open }) {
  openOutput = open;
  $("gen-form").addEventListener("submit", run);
  $("gen-form").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("gen-run").disabled) run(e);
  });
  field("model").addEventListener("change", applyDefaults);
  field("reset").addEventListener("click", applyDefaults);
  field("aspect").addEventListener("change", applyAspect);
  field("width").addEventListener("input", syncAspectFromSize);
  field("height").addEventListener("input", syncAspectFromSize);
  field("dice").addEventListener("click", () => setSeed(randomSeed(), true));
  // a typed seed is the seed: it stays until cleared (empty = a random one each run) or unlocked
  field("seed").addEventListener("input", () => setLock(field("seed").value.trim() !== ""));
  field("lock").addEventListener("click", () => setLock(!seedLocked));
  $("lora-add").addEventListener("click", () => addLora().querySelector("input").focus());
  $("preset-save").addEventListener("click", savePreset);
  $("preset-load").addEventListener("click", loadPreset);
  $("preset-import").addEventListener("change", importPreset);
  $("settings-from-image").addEventListener("change", settingsFromImage);
  setLock(false);
}
