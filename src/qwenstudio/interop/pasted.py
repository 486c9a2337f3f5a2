"""One entry point for settings made elsewhere: ``read_pasted_settings(png_path_or_text)``.

Recognises, by content: our own PNGs (the ``qwenstudio`` JSON chunk: exact), SwarmUI (``parameters`` holding
``{"sui_image_params": ...}``), ComfyUI (a ``prompt`` chunk with the API graph), A1111/Forge (``parameters``
text); for pasted text the same formats (JSON or A1111 text).  JPEG/WebP from A1111 and SwarmUI keep the same
text in EXIF UserComment, which is read too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest
from .a1111 import extract_lora_tags, parse_a1111_parameters
from .comfy_workflow import parse_comfy_prompt
from .settings import PastedSettings
from .swarmui import parse_swarmui_metadata

OWN_KEY = "qwenstudio"  # outputs.JSON_KEY
_EXIF_USER_COMMENT = 0x9286
_EXIF_IFD = 0x8769


def _image_texts(path: Path) -> dict[str, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            texts = {str(k): v for k, v in (getattr(im, "text", None) or {}).items() if isinstance(v, str)}
            if not texts:
                comment = im.getexif().get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
                if isinstance(comment, bytes):
                    if comment[:8] == b"UNICODE\0":
                        body = comment[8:]
                        comment = body.decode("utf-16-be" if body[:1] == b"\0" else "utf-16-le", "replace")
                    else:
                        comment = comment[8:].decode("utf-8", "replace") if comment[:5] == b"ASCII" else \
                            comment.decode("utf-8", "replace")
                if isinstance(comment, str) and comment.strip("\0 "):
                    texts["parameters"] = comment.strip("\0")
    except (OSError, UnidentifiedImageError) as e:
        raise InvalidRequest(f"{path}: not a readable image ({e})", code="invalid_image") from None
    return texts


def _own(meta: Any) -> PastedSettings:
    if not isinstance(meta, dict) or not isinstance(meta.get("request"), dict):
        raise InvalidRequest("its qwenstudio metadata has no request", code="invalid_metadata")
    fields = dict(meta["request"])
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    if model.get("name"):
        fields.setdefault("model", model["name"])
    return PastedSettings(fields=fields, source="qwenstudio",
                          info={k: model[k] for k in ("variant", "fingerprint") if model.get(k)})


def _from_json(data: Any) -> PastedSettings:
    if isinstance(data, dict) and "sui_image_params" in data:
        return parse_swarmui_metadata(data)
    if isinstance(data, dict) and isinstance(data.get("request"), dict):
        return _own(data)
    if isinstance(data, dict) and data and all(isinstance(n, dict) and "class_type" in n for n in data.values()):
        return parse_comfy_prompt(data)
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        raise InvalidRequest("this is a ComfyUI UI-format workflow (nodes/links); settings are read from the API-format "
                             "graph a ComfyUI PNG carries in its 'prompt' chunk", code="unmapped_workflow")
    raise InvalidRequest("JSON that is neither SwarmUI metadata, a ComfyUI graph nor qwenstudio metadata",
                         code="invalid_metadata")


def parse_pasted_text(text: str) -> PastedSettings:
    """Settings from text: JSON (SwarmUI metadata, a ComfyUI API graph, our metadata) or A1111 parameters."""
    stripped = text.strip()
    if not stripped:
        raise InvalidRequest("no settings in an empty text", code="invalid_metadata")
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"settings look like JSON but do not parse: {e}", code="invalid_metadata") from None
        return _from_json(data)
    return parse_a1111_parameters(stripped)


def read_png_settings(path: str | os.PathLike) -> PastedSettings:
    """Settings from an image file another tool (or we) wrote."""
    path = Path(path)
    texts = _image_texts(path)
    if OWN_KEY in texts:
        try:
            return _own(json.loads(texts[OWN_KEY]))
        except json.JSONDecodeError:
            raise InvalidRequest(f"{path}: its qwenstudio metadata is not valid JSON", code="invalid_metadata") from None
    if "parameters" in texts:
        return parse_pasted_text(texts["parameters"])
    if "prompt" in texts:
        try:
            graph = json.loads(texts["prompt"])
        except json.JSONDecodeError:
            raise InvalidRequest(f"{path}: its ComfyUI 'prompt' chunk is not JSON", code="invalid_metadata") from None
        return parse_comfy_prompt(graph)
    if "workflow" in texts:
        raise InvalidRequest(f"{path}: has only a ComfyUI UI workflow, no API 'prompt' graph to read settings from",
                             code="unmapped_workflow")
    raise InvalidRequest(f"{path}: has no generation metadata (no 'qwenstudio', 'parameters' or 'prompt' text)",
                         code="no_metadata")


def read_pasted_settings(source: str | os.PathLike) -> PastedSettings:
    """A PNG/JPEG/WebP path, or pasted text -> ``PastedSettings(fields, unmapped, warnings, source, info)``.

    A ``str`` is a path when it names an existing file (one line, no tags), else settings text.
    """
    if isinstance(source, os.PathLike):
        return read_png_settings(source)
    if not isinstance(source, str):
        raise InvalidRequest("settings must be a file path or text", code="invalid_metadata")
    if "\n" not in source and len(source) < 4096 and not source.lstrip().startswith("{") and os.path.isfile(source):
        return read_png_settings(source)
    return parse_pasted_text(source)


__all__ = ["extract_lora_tags", "parse_pasted_text", "read_pasted_settings", "read_png_settings"]
