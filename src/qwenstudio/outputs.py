"""PNG output with reproducible metadata, written atomically.

Each PNG carries two text chunks: ``parameters`` in the A1111 form people paste between tools, and ``qwenstudio``,
the full JSON (single-image request + model identity + seed) that ``--from-image`` turns back into a request.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

JSON_KEY = "qwenstudio"


def _a1111_quote(value: Any) -> str:
    """A1111's infotext quoting: a value holding a comma, colon or newline is written as a JSON string."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(meta: dict[str, Any]) -> str:
    """The ``parameters`` text as A1111 writes it; LoRAs as A1111 carries them: ``<lora:name:weight>`` tags in the
    prompt line and ``Lora hashes: "name: hash, ..."`` (for LoRAs whose metadata entry has a ``hash``). Sampler and
    schedule are A1111's labels where it has them (checked with A1111's parser: tests/interop/test_a1111_peer.py)."""
    from .interop import a1111_sampler_label, a1111_schedule_label, lora_hashes_value, lora_prompt_tags

    r = meta["request"]
    prompt = r["prompt"] + (f" [magic:{r['magic']}]" if r.get("magic") else "")
    loras = [dict(lo) for lo in r.get("loras") or []]
    hashes = {lo.get("name"): lo.get("hash") for lo in meta.get("loras") or [] if isinstance(lo, dict)}
    for lo in loras:
        if hashes.get(lo["name"]):
            lo["hash"] = hashes[lo["name"]]
    if loras:
        prompt = f"{prompt} {lora_prompt_tags(loras)}"
    fields = {
        "Steps": r["steps"],
        "Sampler": a1111_sampler_label(r["sampler"]),  # A1111 reads its own labels only
        "Schedule type": a1111_schedule_label(r["scheduler"]),
        "CFG scale": r["cfg"],
        "Seed": r["seed"],
        "Size": f"{r['width']}x{r['height']}",
        "Model": meta.get("model", {}).get("name", ""),
        "Model hash": meta.get("model", {}).get("fingerprint", ""),
        "Shift": r.get("shift") if r.get("shift") is not None else "auto",
        "Noise": r["noise"],
        "Lora hashes": lora_hashes_value(loras),
        "Version": meta.get("generator", ""),
    }
    tail = ", ".join(f"{k}: {v if k == 'Lora hashes' else _a1111_quote(v)}" for k, v in fields.items()
                     if v is not None)
    return f"{prompt}\nNegative prompt: {r['negative_prompt']}\n{tail}"


def save_png(image, meta: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``image`` with both metadata chunks to ``path`` atomically (temp file in the same dir + rename), so a
    crash or full disk never leaves a partial file under the final name."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", a1111_parameters(meta))
    info.add_text(JSON_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; an output image is an ordinary readable file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Return the qwenstudio JSON of a PNG; for images from other tools (A1111/Forge, SwarmUI, ComfyUI) the request
    their settings map to, with ``pasted`` = what did not map and the warnings (``qwenstudio.interop``)."""
    from .interop import read_png_settings

    settings = read_png_settings(path)  # typed errors for unreadable files and files without metadata
    if settings.source == "qwenstudio":
        from PIL import Image

        with Image.open(path) as im:
            return json.loads(im.text[JSON_KEY])
    fields = dict(settings.fields)
    model = fields.pop("model", None)
    if settings.info.get("compat") and "compat" not in fields:  # a ComfyUI/SwarmUI render: reproduce it as they do
        fields["compat"] = settings.info["compat"]
    return {"request": fields, "model": {"name": model} if model else {}, "pasted": settings.to_dict()}


def parse_a1111(text: str) -> dict[str, Any]:
    """Parse an A1111-style ``parameters`` block into request fields (see ``qwenstudio.interop.a1111``)."""
    from .interop import parse_a1111_parameters

    fields = dict(parse_a1111_parameters(text).fields)
    fields.pop("model", None)
    return fields
