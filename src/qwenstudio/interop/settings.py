"""The result every pasted-settings parser returns, and the small helpers they share."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIZE_MULTIPLE = 16  # width/height of a Qwen-Image request


@dataclass
class PastedSettings:
    """Request fields read from another tool's output, and everything that did not become one.

    ``fields`` uses our request field names (plus ``model``: the model name as the tool wrote it) and only
    holds what maps exactly; ``unmapped`` lists what was there but has no equivalent here ("Hires upscale: 2");
    ``warnings`` say where a value was adjusted or a convention assumed; ``info`` keeps facts that are not request
    fields (hashes, the tool's version, ``compat``).  ``source``: qwenstudio, a1111, swarmui or comfyui.
    """

    fields: dict[str, Any] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"fields": self.fields, "unmapped": self.unmapped, "warnings": self.warnings, "source": self.source,
                "info": self.info}


def set_size(out: PastedSettings, key: str, value: Any, origin: str) -> None:
    """Width/height to the nearest multiple of 16 (ours must be), with a warning when that changes the value."""
    from ..engine.requests import nearest_multiple

    try:
        size = int(float(value))
    except (TypeError, ValueError):
        out.unmapped.append(f"{origin}: {value}")
        return
    if size <= 0:
        out.unmapped.append(f"{origin}: {value}")
        return
    rounded = nearest_multiple(size, SIZE_MULTIPLE)
    if rounded != size:
        out.warnings.append(f"{key} {size} rounded to {rounded} (a multiple of {SIZE_MULTIPLE})")
    out.fields[key] = rounded


def lora_name(raw: str, out: PastedSettings) -> str:
    """A LoRA as another tool names it (``folder/name.safetensors``) -> our registry name (the file's stem)."""
    name = raw.strip().replace("\\", "/")
    stem = name.rsplit("/", 1)[-1]
    for ext in (".safetensors", ".sft", ".ckpt", ".pt"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    if "/" in name:  # the folder is dropped (our LoRAs are named by file); the extension never mattered
        out.warnings.append(f"LoRA {raw!r} is looked up as {stem!r}")
    return stem


def tensor_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a safetensors file's tensor data (everything after the JSON header), hex.

    It is A1111's ``addnet`` hash (its ``Lora hashes`` write the first 12 characters) and SwarmUI's tensor hash
    (written as ``0x`` + this), so the same file has the same hash in all three tools whatever its metadata.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def a1111_short_hash(path: str | os.PathLike) -> str:
    """The 12-character hash A1111 writes in ``Lora hashes``."""
    return tensor_sha256(Path(path))[:12]


__all__ = ["PastedSettings", "a1111_short_hash", "lora_name", "set_size", "tensor_sha256"]
