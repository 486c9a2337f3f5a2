// Compare: an XYZ grid — up to three parameters with several values each, one shared seed and every other setting
// from the Generate form. The server queues one ordinary job per cell (POST /api/grids, as `qwenstudio grid`), so
// each cell shows its own progress and timing; the grid (every cell's exact request and outputs) can be exported.

import * as api from "./api.js";
import { $, downloadUrl, el, fmtSeconds, showError } from "./dom.js";
import { catalog, formRequest, nextSeed, setSeed } from "./generate.js";
import { finalImages } from "./live.js";

const AXES = ["", "-y", "-z"]; // id suffixes of the X, Y and Z rows
const SUGGEST = {
  steps: () => "4, 8, 20",
  cfg: () => "1, 2.5, 4",
  sampler: () => catalog.samplers.join(", "),
  scheduler: () => catalog.schedulers.slice(0, 4).join(", "),
  shift: () => "1, 2, 3",
  seed: () => "1, 2, 3",
  lora: () => "off, on",
  prompt_sr: () => "",
};
const NUMERIC = new Set(["steps", "cfg", "shift", "seed"]);
let lastGrid = null;

function parseValues(param, text, base) {
  const values = text.split(",").map((v) => v.trim()).filter(Boolean);
  if (!values.length) throw new Error(`${param}: enter at least one value`);
  if (NUMERIC.has(param)) {
    const bad = values.find((v) => !isFinite(Number(v)));
    if (bad) throw new Error(`${param}: '${bad}' is not a number`);
    return values.map(Number);
  }
  if (param === "lora") {
    const bad = values.find((v) => !["on", "off"].includes(v));
    if (bad) throw new Error(`LoRA values are 'on' or 'off', not '${bad}'`);
    if (!base.loras) throw new Error("add a LoRA in the Generate view first");
    return values.map((v) => (v === "on" ? base.loras : []));
  }
  if (param === "prompt_sr" && !base.prompt.includes(values[0])) {
    throw new Error(`prompt S/R: '${values[0]}' is not in the prompt (the first value is searched, each replaces it)`);
  }
  return values;
}

function cell(label) {
  const status = el("span", { class: "muted small-text" }, "queued");
  const media = el("div", { class: "cell-media" }, el("div", { class: "cell-placeholder" }));
  const node = el("figure", { class: "compare-cell" }, media, el("figcaption", {}, el("strong", {}, label), " ", status));
  return { node, media, status };
}

async function followCell(jobId, c) {
  try {
    const outcome = await api.followJob(jobId, (event, data) => {
      if (event === "queued") c.status.textContent = `queued #${data.position}`;
      else if (event === "progress") c.status.textContent = `step ${data.step}/${data.total}`;
    });
    if (outcome.event !== "done") {
      c.status.textContent = outcome.event === "failed" ? outcome.data.error.message : "cancelled";
      c.node.classList.add("failed");
      return;
    }
    const view = await api.get(`/api/jobs/${jobId}`);
    c.media.replaceChildren(...finalImages(outcome.data.outputs));
    c.status.textContent = fmtSeconds(view.finished_at - view.started_at);
    c.status.classList.add("timing");
  } catch (err) {
    c.status.textContent = err.message;
    c.node.classList.add("failed");
  }
}

/** One table per Z value: X values across, Y values down. Returns {job id: cell} for following. */
function layout(grid) {
  const [xs, ys = { labels: [""] }, zs = { labels: [""] }] = grid.axes;
  const byIndex = new Map(grid.cells.map((c) => [c.index.join(","), c]));
  const cells = [];
  const blocks = zs.labels.map((zl, iz) => {
    const head = el("tr", {}, el("th", {}), ...xs.labels.map((x) => el("th", { scope: "col" }, x)));
    const rows = ys.labels.map((yl, iy) =>
      el("tr", {}, el("th", { scope: "row" }, yl), ...xs.labels.map((_, ix) => {
        const c = byIndex.get([ix, iy, iz].join(","));
        const ui = cell(c.labels.join(" · "));
        cells.push([c.job.id, ui]);
        return el("td", {}, ui.node);
      })));
    return el("section", { class: "compare-block" }, zl ? el("h3", {}, zl) : "",
      el("table", { class: "compare-table" }, head, ...rows));
  });
  return { blocks, cells };
}

async function run(ev) {
  ev.preventDefault();
  const errBox = $("compare-error");
  showError(errBox, null);
  const base = { ...formRequest(), batch: 1 };
  let axes;
  try {
    axes = AXES.map((s) => [$(`compare-param${s}`).value, $(`compare-values${s}`).value])
      .filter(([param]) => param)
      .map(([param, text]) => ({ name: param, values: parseValues(param, text, base) }));
    const names = axes.map((a) => a.name);
    if (new Set(names).size !== names.length) throw new Error("each parameter can be on one axis only");
  } catch (err) {
    return showError(errBox, err);
  }
  if (!axes.some((a) => a.name === "seed")) {
    base.seed = nextSeed();
    setSeed(base.seed, true); // same seed for every cell, and kept for the next run
  }
  const { model, prompt, ...rest } = base;
  if (axes.some((a) => a.name === "lora")) delete rest.loras;
  $("compare-run").disabled = true;
  try {
    const grid = await api.post("/api/grids", { prompt, model, axes, base: rest, preview_every: 0 });
    lastGrid = grid.id;
    $("compare-export").hidden = false;
    const { blocks, cells } = layout(grid);
    const size = base.width ? `${base.width}×${base.height}` : "default size";
    $("compare-grid").replaceChildren(
      el("p", { class: "muted small-text full" }, `${grid.cells.length} images · ${base.seed !== undefined ? `seed ${base.seed}` : "seed axis"} · ${size}`),
      ...blocks,
    );
    await Promise.all(cells.map(([id, ui]) => followCell(id, ui)));
  } catch (err) {
    showError(errBox, err);
  } finally {
    $("compare-run").disabled = false;
  }
}

async function exportGrid() {
  if (!lastGrid) return;
  const view = await api.get(`/api/grids/${lastGrid}`);
  const url = URL.createObjectURL(new Blob([JSON.stringify(view, null, 1)], { type: "application/json" }));
  downloadUrl(url, `grid-${lastGrid}.json`);
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export function initCompare() {
  $("compare-form").addEventListener("submit", run);
  $("compare-export").addEventListener("click", () => exportGrid().catch((err) => showError($("compare-error"), err)));
  for (const s of AXES) {
    const select = $(`compare-param${s}`);
    select.addEventListener("change", () => ($(`compare-values${s}`).value = select.value ? SUGGEST[select.value]() : ""));
  }
}
