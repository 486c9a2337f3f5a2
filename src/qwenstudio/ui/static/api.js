// The only module that talks to the server: the public HTTP API, with the API key (if any) as a Bearer header.
// Images and the SSE stream go through fetch() too, so the key never has to ride in a URL.

const KEY_STORE = "qwenstudio.apiKey";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const getKey = () => localStorage.getItem(KEY_STORE) || "";
export const setKey = (key) => (key ? localStorage.setItem(KEY_STORE, key) : localStorage.removeItem(KEY_STORE));

let keyPrompt = null; // (reason) => Promise<boolean>: installed by the app; true when a key was entered
let pendingPrompt = null;
export function onKeyNeeded(fn) {
  keyPrompt = fn;
}

function askKey(message) {
  if (!keyPrompt) return Promise.resolve(false);
  pendingPrompt ??= keyPrompt(message).finally(() => (pendingPrompt = null));
  return pendingPrompt;
}

function withAuth(headers = {}) {
  const key = getKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

async function errorFrom(res) {
  let code = `http_${res.status}`;
  let message = `${res.status} ${res.statusText || "error"}`;
  try {
    const body = await res.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    /* not JSON: keep the status line */
  }
  return new ApiError(res.status, code, message);
}

/** fetch() with the key; on 401 ask for a key once and retry. Throws ApiError with the server's message. */
export async function request(path, { method = "GET", json, body, headers, signal, raw = false } = {}) {
  for (let attempt = 0; ; attempt++) {
    const init = { method, signal, headers: withAuth(headers) };
    if (json !== undefined) {
      init.body = JSON.stringify(json);
      init.headers["Content-Type"] = "application/json";
    } else if (body !== undefined) {
      init.body = body;
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "network", `cannot reach the server (${err.message})`);
    }
    if (res.status === 401 && attempt === 0) {
      const err = await errorFrom(res);
      if (await askKey(getKey() ? "That key was refused; enter a valid one." : err.message)) continue;
      throw err;
    }
    if (!res.ok) throw await errorFrom(res);
    if (raw) return res;
    const type = res.headers.get("content-type") || "";
    return type.includes("application/json") ? res.json() : res.text();
  }
}

export const get = (path, opts) => request(path, opts);
export const post = (path, json, opts = {}) => request(path, { ...opts, method: "POST", json });
export const del = (path) => request(path, { method: "DELETE" });

// ---- images: fetched with the key, shown through blob: URLs (cached per output URL) ----------------------------
const blobUrls = new Map();

export async function imageUrl(url) {
  if (!blobUrls.has(url)) {
    const pending = request(url, { raw: true })
      .then((res) => res.blob())
      .then((blob) => URL.createObjectURL(blob));
    blobUrls.set(url, pending);
    pending.catch(() => blobUrls.delete(url));
  }
  return blobUrls.get(url);
}

export function forgetImage(url) {
  const pending = blobUrls.get(url);
  blobUrls.delete(url);
  pending?.then((u) => URL.revokeObjectURL(u)).catch(() => {});
}

// ---- Server-Sent Events over fetch streaming ---------------------------------------------------------------------
const TERMINAL = new Set(["done", "failed", "cancelled"]);

function parseBlock(block) {
  const ev = { event: "message", data: "", id: null };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") ev.event = value;
    else if (field === "data") ev.data += (ev.data ? "\n" : "") + value;
    else if (field === "id") ev.id = value;
  }
  return ev;
}

/** Follow GET /api/jobs/{id}/events, calling onEvent(name, data) until a terminal event; reconnects with
 * Last-Event-ID when the stream drops. Resolves with the terminal event {event, data}. */
export async function followJob(jobId, onEvent, { signal } = {}) {
  let lastId = null;
  for (let tries = 0; tries < 20; tries++) {
    const headers = lastId !== null ? { "Last-Event-ID": lastId } : {};
    const res = await request(`/api/jobs/${encodeURIComponent(jobId)}/events`, { raw: true, headers, signal });
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (err) {
        if (err.name === "AbortError") throw err;
        break; // dropped: reconnect
      }
      if (chunk.done) break;
      buffer += chunk.value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const ev = parseBlock(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (!ev.data) continue;
        if (ev.id !== null) lastId = ev.id;
        const data = JSON.parse(ev.data);
        onEvent(ev.event, data);
        if (TERMINAL.has(ev.event)) {
          reader.cancel().catch(() => {});
          return { event: ev.event, data };
        }
      }
    }
    await new Promise((r) => setTimeout(r, 500));
  }
  throw new ApiError(0, "stream_lost", "lost the job's event stream; see the gallery for its outcome");
}
