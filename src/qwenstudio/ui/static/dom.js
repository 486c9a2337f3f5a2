// Small DOM helpers shared by the views. Text always goes in through textContent (never innerHTML).

export const $ = (id) => document.getElementById(id);

/** el("button", {class: "x", onclick: fn, type: "button"}, "text", child...) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (k in node && typeof v !== "string") node[k] = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function showError(box, err) {
  if (!err) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  const status = err.status ? ` (${err.status}${err.code ? ` ${err.code}` : ""})` : "";
  box.textContent = `${err.message || err}${status}`;
  box.hidden = false;
}

export function setOptions(select, values, selected) {
  select.replaceChildren(
    ...values.map((v) => {
      const [value, label] = Array.isArray(v) ? v : [v, v];
      return el("option", { value }, label);
    }),
  );
  if (selected !== undefined && selected !== null) select.value = String(selected);
}

export const fmtSeconds = (s) => (s == null || !isFinite(s) ? "" : s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`);

export const randomSeed = () => {
  const buf = new Uint32Array(1);
  crypto.getRandomValues(buf);
  return buf[0];
};

/** An <img> that loads its src through a promise (blob URLs fetched with the key). */
export function asyncImg(srcPromise, alt = "") {
  const img = el("img", { alt, decoding: "async", class: "loading" });
  srcPromise
    .then((src) => {
      img.src = src;
      img.classList.remove("loading");
    })
    .catch(() => {
      img.alt = `${alt} (failed to load)`;
      img.classList.add("broken");
    });
  return img;
}

export function downloadUrl(url, filename) {
  const a = el("a", { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
}
