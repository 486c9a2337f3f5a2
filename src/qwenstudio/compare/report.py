"""HTML and Markdown pages for grids and comparisons.

Self-contained on purpose: one file with inline CSS and no script or web font, images referenced by relative path
(so the folder can be zipped, moved or served as is and opens offline), and the exact request of every image
written next to it (the PNG carries it too).
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK SC",sans-serif;margin:24px;
color:#1d2330;background:#fafbfc}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:28px 0 6px;border-top:1px solid #dde2ea;padding-top:14px}
.meta{color:#556;max-width:1100px}.meta code{background:#eef1f5;padding:0 3px;border-radius:3px}
table{border-collapse:collapse;margin:10px 0}th,td{border:1px solid #d5dbe4;padding:5px 9px;text-align:left;
vertical-align:top}th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.cells{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;width:260px;background:#fff;border:1px solid #d5dbe4;
border-radius:6px;padding:6px}figure img{width:100%;height:auto;display:block;border-radius:3px;background:#eee}
img.small{image-rendering:pixelated}figcaption{font-size:12px;margin-top:4px}
.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}.na{color:#778}
details{font-size:12px;margin-top:4px}pre{white-space:pre-wrap;word-break:break-all;background:#f3f5f8;
padding:6px;border-radius:4px;max-height:260px;overflow:auto}blockquote{margin:6px 0;padding:6px 10px;
border-left:3px solid #b8c3d3;background:#fff;max-width:1100px}.expected li{font-family:ui-monospace,monospace}
.grid td{background:#fff}.grid th.row{white-space:nowrap}
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def _img(src: str, alt: str, request: dict) -> str:
    small = " class=\"small\"" if max(request.get("width") or 0, request.get("height") or 0) < 256 else ""
    return f"<img src=\"{escape(src)}\" alt=\"{escape(alt)}\" loading=\"lazy\"{small}>"


def _request_details(rec: dict, extra: str = "") -> str:
    req = json.dumps(rec["request"], ensure_ascii=False, indent=1)
    model = rec.get("model", {})
    who = escape(f"{model.get('name', '')} ({model.get('variant', '')}, {model.get('format', '')})")
    return (f"<details><summary>request</summary>{extra}<div>model: {who}</div>"
            f"<pre class=\"request\">{escape(req)}</pre></details>")


# Verdicts are ✅/❌ in JSON and Markdown; the HTML page uses ✓/✗, which every text font has (emoji fonts are often
# missing on servers and in headless browsers).
_MARK = {"✅": ("ok", "✓ pass"), "❌": ("bad", "✗ fail")}


def _mark(v: str) -> str:
    cls, text = _MARK.get(v, ("na", v))
    return f"<span class=\"{cls}\">{escape(text)}</span>"


def _verdict_html(text: dict | None) -> str:
    if not text:
        return "<span class=\"na\">text: not scored</span>"
    v = text["verdict"]
    cls, label = _MARK.get(v, ("na", "no text asked" if v == "—" else v))
    cer = "" if text.get("cer") is None else f" · CER {text['cer']:.2f}"
    return f"<span class=\"{cls}\">text {escape(label)}{cer}</span>"


def _ocr_details(text: dict | None) -> str:
    if not text or not text.get("strings"):
        return ""
    rows = "".join(
        f"<tr><td>{escape(s['expected'])}</td><td>{escape(s['found'])}</td><td class=\"num\">{s['cer']:.2f}</td>"
        f"<td>{_mark(s['verdict'])}</td></tr>" for s in text["strings"])
    return (f"<table><tr><th>expected</th><th>closest OCR match</th><th>CER</th><th></th></tr>{rows}</table>"
            f"<div>OCR read: {escape(text.get('ocr_text') or '(nothing)')}</div>")


# ---- grid ------------------------------------------------------------------------------------------------------
def grid_html(manifest: dict[str, Any]) -> str:
    axes = manifest["axes"]
    cells = {tuple(c["index"]): c for c in manifest["cells"]}
    xs = axes[0]["labels"]
    ys = axes[1]["labels"] if len(axes) > 1 else [""]
    zs = axes[2]["labels"] if len(axes) > 2 else [""]
    parts = [f"<h1>Grid: {escape(', '.join(a['axis'] + ' = ' + a['name'] for a in axes))}</h1>",
             (f"<p class=\"meta\">prompt: <b>{escape(manifest['prompt'])}</b><br>model "
             f"<code>{escape(manifest['model'])}</code>{_shared_seed(manifest)} · {len(manifest['cells'])} images · "
             f"<a href=\"grid.png\">contact sheet (grid.png)</a> · <a href=\"grid.json\">grid.json</a></p>")]
    for iz, zl in enumerate(zs):
        if zl:
            parts.append(f"<h2>{escape(axes[2]['name'])}: {escape(zl)}</h2>")
        head = "".join(f"<th>{escape(x)}</th>" for x in xs)
        rows = []
        for iy, yl in enumerate(ys):
            tds = []
            for ix in range(len(xs)):
                c = cells.get((ix, iy, iz))
                if c is None:
                    tds.append("<td></td>")
                    continue
                alt = " · ".join(c["labels"])
                tds.append(f"<td><figure>{_img(c['image'], alt, c['request'])}<figcaption>{escape(alt)}<br>"
                           f"seed {c['request']['seed']} · NFE {c['nfe']} · {c['seconds']:.2f}s</figcaption>"
                           f"{_request_details(c)}</figure></td>")
            rows.append(f"<tr><th class=\"row\">{escape(yl)}</th>{''.join(tds)}</tr>")
        parts.append(f"<table class=\"grid\"><tr><th></th>{head}</tr>{''.join(rows)}</table>")
    return _page("qwenstudio grid", "\n".join(parts))


def _shared_seed(manifest: dict) -> str:
    seeds = {c["request"]["seed"] for c in manifest["cells"]}
    return f" · seed {seeds.pop()} (shared)" if len(seeds) == 1 else f" · {len(seeds)} seeds"


def grid_markdown(manifest: dict[str, Any]) -> str:
    axes = manifest["axes"]
    cells = {tuple(c["index"]): c for c in manifest["cells"]}
    xs = axes[0]["labels"]
    ys = axes[1]["labels"] if len(axes) > 1 else [""]
    zs = axes[2]["labels"] if len(axes) > 2 else [""]
    out = [f"# Grid: {', '.join(a['axis'] + ' = ' + a['name'] for a in axes)}", "",
           f"Prompt: {manifest['prompt']}", "", (f"Model `{manifest['model']}`{_shared_seed(manifest)}; "
           f"contact sheet: [grid.png](grid.png)"), ""]
    for iz, zl in enumerate(zs):
        if zl:
            out += [f"## {axes[2]['name']}: {zl}", ""]
        out.append("| | " + " | ".join(_md(x) for x in xs) + " |")
        out.append("|---" * (len(xs) + 1) + "|")
        for iy, yl in enumerate(ys):
            row = []
            for ix in range(len(xs)):
                c = cells.get((ix, iy, iz))
                row.append("" if c is None else f"![{_md(' · '.join(c['labels']))}]({c['image']})<br>"
                           f"{c['seconds']:.2f}s, NFE {c['nfe']}")
            out.append(f"| {_md(yl)} | " + " | ".join(row) + " |")
        out.append("")
    out += ["## Requests", ""]
    for c in manifest["cells"]:
        out += [f"- `{c['image']}`: `{json.dumps(c['request'], ensure_ascii=False)}`"]
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---- compare ---------------------------------------------------------------------------------------------------
def _gib(n: int | None) -> str:
    return "—" if not n else f"{n / 2**30:.2f} GiB"


def _rate(passed: int, total: int) -> str:
    return "—" if not total else f"{passed}/{total} ({100 * passed / total:.0f}%)"


def compare_html(data: dict[str, Any]) -> str:
    s = data["summary"]
    variants = data["variants"]
    by_key = {(r["variant"], r["case"], r["seed"]): r for r in data["results"]}
    parts = [f"<h1>{escape(data['title'])}</h1>", f"<p class=\"meta\">{_meta_html(data)}</p>",
             "<h2>Summary</h2>", _summary_table_html(s, variants), "<h2>Text accuracy by category</h2>",
             _category_table_html(s, variants)]
    for case in data["cases"]:
        section = " · " + escape(case["section"]) if case.get("section") else ""
        parts.append(f"<h2 id=\"{escape(case['id'])}\">{escape(case['id'])} <span class=\"na\">· "
                     f"{escape(case.get('category') or '')}{section}</span></h2>")
        parts.append(f"<blockquote>{escape(case['prompt'])}</blockquote>")
        exp = case.get("expected") or []
        if exp:
            parts.append("<div>expected text" + (" (suite override)" if case.get("expect_override") else "")
                         + ":</div><ul class=\"expected\">" + "".join(f"<li>{escape(e)}</li>" for e in exp) + "</ul>")
        for note in case.get("notes", []):
            parts.append(f"<div class=\"na\">note: {escape(note)}</div>")
        if case.get("report_marks"):
            marks = " · ".join(f"{escape(v['label'])} {_mark(m)}" for v, m in zip(data.get("suite_variants", []),
                                                                             case["report_marks"]))
            parts.append(f"<div class=\"na\">the reference report's verdicts: {marks}</div>")
        for seed in data["seeds"]:
            figs = []
            for v in variants:
                r = by_key.get((v["label"], case["id"], seed))
                if r is None:
                    figs.append(f"<figure><figcaption>{escape(v['label'])}: not run yet</figcaption></figure>")
                    continue
                cap = (f"<b>{escape(v['label'])}</b><br>seed {seed} · NFE {r['nfe']} · {r['seconds']:.2f}s/image"
                       f"<br>{r['request']['width']}×{r['request']['height']} · {_verdict_html(r.get('text'))}")
                figs.append(f"<figure>{_img(r['image'], v['label'], r['request'])}<figcaption>{cap}</figcaption>"
                            f"{_request_details(r, _ocr_details(r.get('text')))}</figure>")
            parts.append(f"<div class=\"cells\">{''.join(figs)}</div>")
    return _page(data["title"], "\n".join(parts))


def _meta_html(data: dict) -> str:
    o = data.get("ocr")
    ocr = (f"text verdicts by OCR (<code>{escape(o['engine'])}</code>): ✓ pass when every expected string's character "
           f"error rate is ≤ {o['max_cer']:g} after normalisation ({escape(o['normalisation'])})") if o else \
        "text not scored (--no-ocr)"
    bits = [f"suite <code>{escape(data['suite']['name'])}</code>"
            + (f" — {escape(data['suite']['source'])}" if data["suite"].get("source") else ""),
            (f"{len(data['cases'])} prompts × {len(data['variants'])} variants × seeds "
             f"{', '.join(map(str, data['seeds']))} = {data['summary']['images']} images"), ocr,
            "peak memory: " + escape(data["summary"]["memory_kind"])]
    bits += [escape(n) for n in data.get("notes", [])]
    return "<br>".join(bits)


def _summary_table_html(s: dict, variants: list[dict]) -> str:
    rows = []
    for v in variants:
        m = s["variants"][v["label"]]
        rows.append(f"<tr><td><b>{escape(v['label'])}</b><br><code>{escape(v['spec'])}</code></td>"
                    f"<td class=\"num\">{escape(m['nfe'])}</td><td class=\"num\">{m['images']}</td>"
                    f"<td class=\"num\">{_num(m['mean_seconds'])}</td><td class=\"num\">{_speedup(m['speedup'])}</td>"
                    f"<td class=\"num\">{_gib(m['peak_memory_bytes'])}</td>"
                    f"<td class=\"num\">{_rate(m['text_passed'], m['text_scored'])}</td>"
                    f"<td class=\"num\">{_rate(m['strings_passed'], m['strings_scored'])}</td></tr>")
    return ("<table><tr><th>variant</th><th>NFE</th><th>images</th><th>mean s/image</th><th>speed-up vs first</th>"
            "<th>peak memory</th><th>text pass (images)</th><th>text pass (strings)</th></tr>" + "".join(rows)
            + "</table>")


def _category_table_html(s: dict, variants: list[dict]) -> str:
    head = "".join(f"<th>{escape(v['label'])}</th>" for v in variants)
    rows = []
    for cat, per in s["categories"].items():
        tds = "".join(f"<td class=\"num\">{_rate(*per.get(v['label'], (0, 0)))}</td>" for v in variants)
        rows.append(f"<tr><td>{escape(cat)}</td>{tds}</tr>")
    return f"<table><tr><th>category</th>{head}</tr>{''.join(rows)}</table>"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _speedup(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def compare_markdown(data: dict[str, Any]) -> str:
    s = data["summary"]
    variants = data["variants"]
    by_key = {(r["variant"], r["case"], r["seed"]): r for r in data["results"]}
    o = data.get("ocr")
    out = [f"# {data['title']}", "",
           f"Suite `{data['suite']['name']}`: {len(data['cases'])} prompts × {len(variants)} variants × seeds "
           f"{', '.join(map(str, data['seeds']))} = {s['images']} images. "
           + (f"Text verdicts by OCR (`{o['engine']}`): ✅ when every expected string's CER ≤ {o['max_cer']:g} after "
              f"normalisation ({o['normalisation']})." if o else "Text not scored."), ""]
    out += [f"- {n}" for n in data.get("notes", [])] + [""]
    out += ["## Summary", "", ("| variant | NFE | images | mean s/image | speed-up vs first | peak memory | "
            "text pass (images) | text pass (strings) |"), "|---|---|---|---|---|---|---|---|"]
    for v in variants:
        m = s["variants"][v["label"]]
        out.append(f"| {_md(v['label'])} (`{_md(v['spec'])}`) | {m['nfe']} | {m['images']} | "
                   f"{_num(m['mean_seconds'])} | {_speedup(m['speedup'])} | {_gib(m['peak_memory_bytes'])} | "
                   f"{_rate(m['text_passed'], m['text_scored'])} | {_rate(m['strings_passed'], m['strings_scored'])} |")
    out += ["", "## Text accuracy by category", "", "| category | " + " | ".join(_md(v["label"]) for v in variants)
            + " |", "|---" * (len(variants) + 1) + "|"]
    for cat, per in s["categories"].items():
        out.append(f"| {_md(cat)} | " + " | ".join(_rate(*per.get(v["label"], (0, 0))) for v in variants) + " |")
    out.append("")
    for case in data["cases"]:
        out += [f"## {case['id']} ({case.get('category') or ''})", "", f"> {_md(case['prompt'])}", ""]
        if case.get("expected"):
            out += ["Expected text: " + ", ".join(f"`{_md(e)}`" for e in case["expected"]), ""]
        out += [f"Note: {n}" for n in case.get("notes", [])]
        out += ["| seed | " + " | ".join(_md(v["label"]) for v in variants) + " |", "|---" * (len(variants) + 1) + "|"]
        for seed in data["seeds"]:
            row = []
            for v in variants:
                r = by_key.get((v["label"], case["id"], seed))
                if r is None:
                    row.append("not run")
                    continue
                t = r.get("text") or {}
                row.append(f"![{_md(v['label'])}]({r['image']})<br>NFE {r['nfe']}, {r['seconds']:.2f}s, "
                           f"text {t.get('verdict', 'n/a')}")
            out.append(f"| {seed} | " + " | ".join(row) + " |")
        out += ["", "<details><summary>requests</summary>", ""]
        for seed in data["seeds"]:
            for v in variants:
                r = by_key.get((v["label"], case["id"], seed))
                if r is not None:
                    out.append(f"- `{r['image']}`: `{json.dumps(r['request'], ensure_ascii=False)}`")
        out += ["", "</details>", ""]
    return "\n".join(out) + "\n"
