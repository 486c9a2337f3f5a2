// Gallery: finished jobs' outputs (paged, newest first, searchable by prompt) from GET /api/jobs; a dialog with the
// full image and every parameter, and reuse settings / reuse seed / download / delete.

import * as api from "./api.js";
import { $, asyncImg, downloadUrl, el, fmtSeconds, showError } from "./dom.js";

const PAGE = 12; // jobs per page
let offset = 0;
let total = 0;
let query = "";
let current = null; // {output, job} shown in the dialog
let actions = { reuse: () => {}, reuseSeed: () => {} };

function thumb(output, job) {
  const label = `${job.request.prompt.slice(0, 80)} (seed ${output.metadata?.seed ?? "?"})`;
  return el(
    "button",
    { type: "button", class: "thumb", title: job.request.prompt, "aria-label": `Open: ${label}`, onclick: () => openDetail(output, job) },
    asyncImg(api.imageUrl(output.url), label),
    el("span", { class: "thumb-caption" }, job.request.prompt),
  );
}

export async function refreshGallery() {
  const grid = $("gallery-grid");
  showError($("gallery-error"), null);
  try {
    const params = new URLSearchParams({ status: "done", limit: PAGE, offset });
    if (query) params.set("q", query);
    const data = await api.get(`/api/jobs?${params}`);
    total = data.total;
    if (offset > 0 && offset >= total) {
      offset = Math.max(0, total - PAGE);
      return refreshGallery();
    }
    const items = data.jobs.flatMap((job) => job.outputs.map((o) => thumb(o, job)));
    grid.replaceChildren(...(items.length ? items : [el("p", { class: "placeholder muted" }, query ? "No results for that search." : "Nothing generated yet.")]));
    const pages = Math.max(1, Math.ceil(total / PAGE));
    $("gallery-page").textContent = `page ${Math.floor(offset / PAGE) + 1} of ${pages}`;
    $("gallery-count").textContent = `${total} job${total === 1 ? "" : "s"}`;
    $("gallery-prev").disabled = offset === 0;
    $("gallery-next").disabled = offset + PAGE >= total;
  } catch (err) {
    showError($("gallery-error"), err);
  }
}

function paramRows(output, job) {
  const m = output.metadata || {};
  const r = m.request || job.request;
  const rows = [
    ["Prompt", r.prompt],
    ["Negative", (r.negative_prompt || "").trim() || "—"],
    ["Model", `${job.model}${m.model?.variant ? ` (${m.model.variant})` : ""}`],
    ["Size", m.size ? `${m.size.width}×${m.size.height}` : `${r.width}×${r.height}`],
    ["Steps", r.steps],
    ["CFG", r.cfg],
    ["Sampler", `${r.sampler} / ${r.scheduler}`],
    ["Shift", r.shift ?? "auto"],
    ["Seed", m.seed ?? r.seed],
    ["LoRAs", (r.loras || []).map((l) => `${l.name ?? l[0]} × ${l.weight ?? l[1]}`).join(", ") || "—"],
    ["Created", new Date(job.created_at * 1000).toLocaleString()],
  ];
  if (r.images?.length) {
    const ref = (i) => `${i.width}×${i.height} ${i.format ?? ""}`.trim();
    rows.splice(
      4,
      0,
      ["Edit", m.mode ?? "edit"],
      ["Inputs", r.images.map(ref).join(", ")],
      ["Mask", r.mask ? ref(r.mask) : "—"],
      ["Strength", r.strength ?? "default"],
      ["Keep size", r.keep_size ? "yes" : "no"],
    );
  }
  if (job.started_at && job.finished_at) rows.push(["Time", fmtSeconds(job.finished_at - job.started_at)]);
  for (const [k, v] of Object.entries(m.timings || {})) rows.push([`  ${k}`, `${v} s`]);
  return rows;
}

export function openDetail(output, job) {
  current = { output, job };
  const dialog = $("detail");
  showError($("detail-error"), null);
  const img = $("detail-img");
  img.removeAttribute("src");
  img.alt = job.request.prompt;
  api.imageUrl(output.url).then((src) => current?.output === output && (img.src = src)).catch((err) => showError($("detail-error"), err));
  $("detail-title").textContent = `Seed ${output.metadata?.seed ?? ""}`;
  $("detail-params").replaceChildren(...paramRows(output, job).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
  resetDelete();
  if (!dialog.open) dialog.showModal();
}

function resetDelete() {
  const b = $("detail-delete");
  b.dataset.armed = "";
  b.textContent = "Delete";
}

async function deleteCurrent() {
  const b = $("detail-delete");
  if (!b.dataset.armed) {
    b.dataset.armed = "1";
    b.textContent = "Click again to delete the job";
    return;
  }
  try {
    await api.del(`/api/jobs/${current.job.id}`);
    current.job.outputs.forEach((o) => api.forgetImage(o.url));
    $("detail").close();
    await refreshGallery();
  } catch (err) {
    showError($("detail-error"), err);
  }
}

async function download() {
  const { output, job } = current;
  try {
    const src = await api.imageUrl(output.url);
    downloadUrl(src, `qwenstudio-${job.id.slice(0, 8)}-${output.metadata?.seed ?? output.index}.png`);
  } catch (err) {
    showError($("detail-error"), err);
  }
}

/** Open the dialog for a job's output (from the Generate view's results). */
export async function openOutput(output, jobId) {
  const job = await api.get(`/api/jobs/${jobId}`);
  openDetail(job.outputs.find((o) => o.id === output.id) || output, job);
}

export function initGallery(opts) {
  actions = { ...actions, ...opts };
  $("gallery-search").addEventListener("submit", (e) => {
    e.preventDefault();
    query = $("gallery-q").value.trim();
    offset = 0;
    refreshGallery();
  });
  $("gallery-prev").addEventListener("click", () => ((offset = Math.max(0, offset - PAGE)), refreshGallery()));
  $("gallery-next").addEventListener("click", () => ((offset += PAGE), refreshGallery()));
  $("detail-reuse").addEventListener("click", () => {
    const { output, job } = current;
    $("detail").close();
    actions.reuse(output.metadata?.request || job.request, job.model, job);
  });
  $("detail-seed").addEventListener("click", () => {
    const { output, job } = current;
    $("detail").close();
    actions.reuseSeed(output.metadata?.seed ?? job.request.seed);
  });
  $("detail-download").addEventListener("click", download);
  $("detail-delete").addEventListener("click", deleteCurrent);
  $("detail").addEventListener("close", () => (current = null));
}
