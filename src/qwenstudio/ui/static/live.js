// Live job display: submit, then follow the job's SSE stream (queue position, progress with step count and ETA,
// preview images), with a cancel button; on success the final images replace the previews.

import * as api from "./api.js";
import { asyncImg, el, fmtSeconds } from "./dom.js";

function liveParts(box) {
  const q = (sel) => box.querySelector(sel);
  return {
    status: q("[id$=status]"),
    steps: q("[id$=steps]"),
    eta: q("[id$=eta]"),
    bar: q("progress"),
    cancel: q("button"),
  };
}

function showImages(container, srcs, { preview = false } = {}) {
  container.replaceChildren(
    ...srcs.map((src, i) => {
      const img = typeof src === "string" ? el("img", { src, alt: `Preview ${i + 1}` }) : src;
      if (preview) img.classList.add("preview");
      return el("figure", { class: "result" }, img);
    }),
  );
}

export function finalImages(outputs, onOpen) {
  return outputs.map((o, i) => {
    const img = asyncImg(api.imageUrl(o.url), `Result ${i + 1}, seed ${o.metadata?.seed ?? ""}`);
    return onOpen ? el("button", { type: "button", class: "image-button", onclick: () => onOpen(o), "aria-label": `Open result ${i + 1}` }, img) : img;
  });
}

/** Create a job from `body` and follow it in `ui` ({live, images, meta}). Resolves with the terminal event. */
export async function runJob(body, ui) {
  const parts = liveParts(ui.live);
  const job = await api.post("/api/jobs", body);
  ui.live.hidden = false;
  ui.live.dataset.state = "queued";
  parts.status.textContent = job.position ? `Queued · position ${job.position}` : "Queued";
  parts.steps.textContent = "";
  parts.eta.textContent = "";
  parts.bar.removeAttribute("value"); // indeterminate until the first step
  parts.cancel.hidden = false;
  parts.cancel.disabled = false;
  ui.meta.textContent = "";
  const started = performance.now();

  const cancel = async () => {
    parts.cancel.disabled = true;
    parts.status.textContent = "Cancelling…";
    try {
      await api.post(`/api/jobs/${job.id}/cancel`);
    } catch (err) {
      parts.status.textContent = err.message;
    }
  };
  parts.cancel.onclick = cancel;

  const outcome = await api.followJob(job.id, (event, data) => {
    if (event === "queued") parts.status.textContent = `Queued · position ${data.position}`;
    else if (event === "started") {
      ui.live.dataset.state = "running";
      parts.status.textContent = "Running";
    } else if (event === "progress") {
      parts.bar.max = data.total;
      parts.bar.value = data.step;
      parts.steps.textContent = `step ${data.step} / ${data.total}`;
      parts.eta.textContent = data.eta != null ? `ETA ${fmtSeconds(data.eta)}` : "";
      if (!parts.cancel.disabled) parts.status.textContent = "Running";
    } else if (event === "preview" && data.images?.length) {
      showImages(ui.images, data.images.map((b64) => `data:image/png;base64,${b64}`), { preview: true });
    }
  });

  ui.live.dataset.state = outcome.event;
  parts.cancel.hidden = true;
  const took = fmtSeconds((performance.now() - started) / 1000);
  if (outcome.event === "done") {
    parts.bar.max = 1;
    parts.bar.value = 1;
    parts.status.textContent = `Done in ${took}`;
    parts.eta.textContent = "";
    showImages(ui.images, finalImages(outcome.data.outputs, ui.onOpen && ((o) => ui.onOpen(o, job.id))));
    const seeds = outcome.data.outputs.map((o) => o.metadata?.seed).filter((s) => s !== undefined);
    // an edit's output size is the input's (keep_size) and may differ from the model's grid in the request
    const size = outcome.data.outputs[0]?.metadata?.size || job.request;
    const strength = job.request.images?.length && job.request.strength != null ? ` · strength ${job.request.strength}` : "";
    ui.meta.textContent = `${size.width}×${size.height} · ${job.request.steps} steps${strength} · seed ${seeds.join(", ")}`;
  } else if (outcome.event === "cancelled") {
    parts.status.textContent = "Cancelled";
  } else {
    parts.status.textContent = "Failed";
  }
  return { ...outcome, job };
}
