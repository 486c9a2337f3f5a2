// Compare: one parameter, several values, the same seed and every other setting from the Generate form; the jobs
// run through the queue and fill an image grid with each cell's timing.

import * as api from "./api.js";
import { $, el, fmtSeconds, showError } from "./dom.js";
import { catalog, formRequest, nextSeed, setSeed } from "./generate.js";
import { finalImages } from "./live.js";

const MAX_CELLS = 12;
const SUGGEST = {
  steps: () => "4, 8, 20",
  cfg: () => "1, 2.5, 4",
  sampler: () => catalog.samplers.join(", "),
  scheduler: () => catalog.schedulers.slice(0, 4).join(", "),
  shift: () => "1, 2, 3",
  lora: () => "off, on",
};
const NUMERIC = new Set(["steps", "cfg", "shift"]);

function parseValues(param, text) {
  const values = text.split(",").map((v) => v.trim()).filter(Boolean);
  if (!values.length) throw new Error("enter at least one value");
  if (values.length > MAX_CELLS) throw new Error(`at most ${MAX_CELLS} values`);
  if (NUMERIC.has(param)) {
    const bad = values.find((v) => !isFinite(Number(v)));
    if (bad) throw new Error(`'${bad}' is not a number`);
    return values.map(Number);
  }
  if (param === "lora") {
    const bad = values.find((v) => !["on", "off"].includes(v));
    if (bad) throw new Error(`LoRA values are 'on' or 'off', not '${bad}'`);
  }
  return values;
}

function variant(base, param, value) {
  const body = { ...base };
  if (param === "lora") {
    if (value === "off") delete body.loras;
  } else {
    body[param] = param === "steps" ? Math.round(value) : value;
  }
  return body;
}

function cell(label) {
  const status = el("span", { class: "muted small-text" }, "queued");
  const media = el("div", { class: "cell-media" }, el("div", { class: "cell-placeholder" }));
  const node = el("figure", { class: "compare-cell" }, media, el("figcaption", {}, el("strong", {}, label), " ", status));
  return { node, media, status };
}

/** Submit one cell's job; resolves (once queued) with a promise that settles when the cell is filled. */
async function submitCell(body, c) {
  try {
    const job = await api.post("/api/jobs", body);
    return { done: followCell(job, c) };
  } catch (err) {
    c.status.textContent = err.message;
    c.node.classList.add("failed");
    return { done: Promise.resolve() };
  }
}

async function followCell(job, c) {
  try {
    const outcome = await api.followJob(job.id, (event, data) => {
      if (event === "queued") c.status.textContent = `queued #${data.position}`;
      else if (event === "progress") c.status.textContent = `step ${data.step}/${data.total}`;
    });
    if (outcome.event !== "done") {
      c.status.textContent = outcome.event === "failed" ? outcome.data.error.message : "cancelled";
      c.node.classList.add("failed");
      return;
    }
    const view = await api.get(`/api/jobs/${job.id}`);
    c.media.replaceChildren(...finalImages(outcome.data.outputs));
    c.status.textContent = fmtSeconds(view.finished_at - view.started_at);
    c.status.classList.add("timing");
  } catch (err) {
    c.status.textContent = err.message;
    c.node.classList.add("failed");
  }
}

async function run(ev) {
  ev.preventDefault();
  const errBox = $("compare-error");
  showError(errBox, null);
  const param = $("compare-param").value;
  let values;
  try {
    values = parseValues(param, $("compare-values").value);
    if (param === "lora" && !formRequest().loras) throw new Error("add a LoRA in the Generate view first");
  } catch (err) {
    return showError(errBox, err);
  }
  const base = { ...formRequest(), batch: 1, preview_every: 0 };
  base.seed = nextSeed();
  setSeed(base.seed, true); // same seed for every cell, and kept for the next run
  const grid = $("compare-grid");
  const cells = values.map((v) => cell(`${param} = ${v}`));
  grid.replaceChildren(
    el("p", { class: "muted small-text full" }, `seed ${base.seed} · ${base.width}×${base.height}`),
    ...cells.map((c) => c.node),
  );
  $("compare-run").disabled = true;
  try {
    const running = [];
    for (const [i, v] of values.entries()) running.push((await submitCell(variant(base, param, v), cells[i])).done);
    await Promise.all(running);
  } finally {
    $("compare-run").disabled = false;
  }
}

export function initCompare() {
  $("compare-form").addEventListener("submit", run);
  $("compare-param").addEventListener("change", () => ($("compare-values").value = SUGGEST[$("compare-param").value]()));
}
