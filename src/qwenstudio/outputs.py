"""PNG output with reproducible metadata, written atomically.

Each PNG carries two text chunks: ``parameters`` in the A1111 form people paste between tools, and ``qwenstudio``,
the full JSON (single-image request + model identity + seed) that ``--from-image`` turns back into a request.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .errors import InvalidRequest

JSON_KEY = "qwenstudio"


def a1111_parameters(meta: dict[str, Any]) -> str:
    r = meta["request"]
    prompt = r["prompt"] + (f" [magic:{r['magic']}]" if r.get("magic") else "")
    fields = {
        "Steps": r["steps"],
        "Sampler": r["sampler"],
        "Schedule type": r["scheduler"],
        "CFG scale": r["cfg"],
        "Seed": r["seed"],
        "Size": f"{r['width']}x{r['height']}",
        "Model": meta.get("model", {}).get("name", ""),
        "Model hash": meta.get("model", {}).get("fingerprint", ""),
        "Shift": r.get("shift") if r.get("shift") is not None else "auto",
        "Noise": r["noise"],
        "Version": meta.get("generator", ""),
    }
    tail = ", ".join(f"{k}: {v}" for k, v in fields.items())
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
    """Return the qwenstudio JSON of a PNG; for PNGs from other tools, a request parsed from ``parameters``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
    except (OSError, UnidentifiedImageError) as e:
        raise InvalidRequest(f"{path}: not a readable image ({e})") from None
    if JSON_KEY in text:
        try:
            return json.loads(text[JSON_KEY])
        except json.JSONDecodeError:
            raise InvalidRequest(f"{path}: its qwenstudio metadata is not valid JSON") from None
    if "parameters" in text:
        return {"request": parse_a1111(text["parameters"]), "model": {}}
    raise InvalidRequest(f"{path}: has no generation metadata (no 'qwenstudio' or 'parameters' text chunk)")


_A1111_KEYS = {"Steps": ("steps", int), "CFG scale": ("cfg", float), "Seed": ("seed", int),
               "Sampler": ("sampler", str), "Schedule type": ("scheduler", str), "Shift": ("shift", float)}


def parse_a1111(text: str) -> dict[str, Any]:
    """Parse an A1111-style ``parameters`` block into request fields (unknown keys are ignored)."""
    lines = text.strip().split("\n")
    tail = lines.pop() if lines and re.search(r"\bSteps: \d+", lines[-1]) else ""
    neg_idx = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt:")), None)
    prompt = "\n".join(lines[:neg_idx] if neg_idx is not None else lines)
    req: dict[str, Any] = {"prompt": prompt}
    if neg_idx is not None:
        req["negative_prompt"] = "\n".join(lines[neg_idx:])[len("Negative prompt:"):].strip()
    for key, value in re.findall(r"([A-Za-z][A-Za-z ]*?): ([^,]+)", tail):
        key = key.strip()
        if key == "Size" and "x" in value:
            w, h = value.split("x", 1)
            req["width"], req["height"] = int(w), int(h)
        elif key in _A1111_KEYS:
            name, conv = _A1111_KEYS[key]
            try:
                req[name] = conv(value.strip())
            except ValueError:
                continue
    return req
