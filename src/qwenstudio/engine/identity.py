"""Which variant a model is, decided in one function, by content where the content can tell.

A diffusers folder says what it is: ``model_index.json``'s ``_class_name`` (QwenImagePipeline /
QwenImageEditPipeline / QwenImageEditPlusPipeline ...) and the transformer config (``zero_cond_t``: Edit-2511).
Folder names are not trusted for that — a Hugging Face cache snapshot is named by a commit hash, and users rename
folders. What content cannot tell — Qwen-Image vs -2512 (same architecture), a merged Lightning checkpoint, and
anything about a single DiT file (Edit and base DiTs have the same tensors) — comes from the name, and the reason
says so; ``--variant`` overrides everything. ``Engine.load``, every CLI command, ``qwenstudio models`` and the
server call ``identify_*`` and record ``Identity.reason`` in the metadata.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

EDIT_PLUS_CLASSES = ("QwenImageEditPlusPipeline",)
EDIT_CLASSES = ("QwenImageEditPipeline", "QwenImageEditInpaintPipeline")
BASE_CLASSES = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline",
                "QwenImageControlNetPipeline", "QwenImageControlNetInpaintPipeline")
TINY_MARKER = "qwenstudio_tiny.json"  # written by qwenstudio.testing.tiny: the built-in random test model


@dataclass(frozen=True)
class Identity:
    variant: str
    reason: str  # human-readable: why this variant ("model_index: QwenImageEditPlusPipeline; zero_cond_t")
    guessed: bool = False  # True when only a name (or nothing) decided: say so in a warning


def identify_folder(folder: Path, name: str | None = None) -> Identity:
    """A diffusers folder by its ``model_index.json`` and transformer config; ``name`` (default: the folder's)
    only for what content cannot tell (2512, a merged Lightning recipe)."""
    name = name or folder.name
    try:
        index = json.loads((folder / "model_index.json").read_text())
        cls = str(index.get("_class_name", ""))
    except (OSError, ValueError):
        cls = ""
    zero_cond_t = bool(_transformer_config(folder).get("zero_cond_t", False))
    tiny = (folder / TINY_MARKER).is_file()
    if cls in EDIT_PLUS_CLASSES:
        family, why = ("tiny-edit-2511" if tiny else "qwen-image-edit-2511") if zero_cond_t else \
            ("tiny-edit-plus" if tiny else "qwen-image-edit-2509"), f"model_index: {cls}"
        if zero_cond_t:
            why += "; transformer zero_cond_t"
    elif cls in EDIT_CLASSES:
        family, why = ("tiny-edit" if tiny else "qwen-image-edit"), f"model_index: {cls}"
    elif cls in BASE_CLASSES:
        family, why = ("tiny" if tiny else "qwen-image"), f"model_index: {cls}"
    else:
        ident = identify_name(name)
        return Identity(ident.variant, f"model_index class {cls or 'missing'!r} not known; {ident.reason}", True)
    if tiny:
        return Identity(family, why + " (qwenstudio tiny test model)")
    return _refine_by_name(family, why, name)


def identify_name(name: str) -> Identity:
    """A single DiT file (or a folder without a known class): only its name can say Edit/2509/2511/2512."""
    n = name.lower().replace("_", "-")
    if n == "tiny" or n.startswith("tiny-"):
        return Identity("tiny", "the built-in tiny model")
    if "edit" in n:
        family = next((f"qwen-image-edit-{v}" for v in ("2509", "2511") if v in n), "qwen-image-edit")
        return _refine_by_name(family, f"name '{name}' says {family}", name, guessed=True)
    if "2512" in n:
        return _refine_by_name("qwen-image-2512", f"name '{name}' says 2512", name, guessed=True)
    return _refine_by_name("qwen-image", f"no variant in the name '{name}': qwen-image (use --variant to choose)",
                           name, guessed=True)


def _refine_by_name(family: str, why: str, name: str, guessed: bool = False) -> Identity:
    """2512 and merged Lightning checkpoints have the architecture of their base: only the name tells."""
    from .specs import SPECS

    n = name.lower().replace("_", "-")
    if family == "qwen-image" and "2512" in n:
        family, why = "qwen-image-2512", why + "; name says 2512"
    if "lightning" in n:
        m = re.search(r"(\d+)-?steps?", n)
        steps = int(m.group(1)) if m else 8
        lightning = f"{family}-lightning-{steps}step"
        if lightning in SPECS:
            return Identity(lightning, why + f"; name says Lightning {steps}-step", guessed)
    return Identity(family, why, guessed)


def _transformer_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    import os

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def hub_snapshots(cache: Path | None = None) -> dict[Path, str]:
    """Every model repo's current snapshot in the hub cache -> its repo id (``Qwen/Qwen-Image-Edit-2509``).

    The snapshot is the one ``refs/main`` names, else the most recently written one."""
    cache = cache or hf_hub_cache()
    out: dict[Path, str] = {}
    if not cache.is_dir():
        return out
    for repo in sorted(cache.glob("models--*")):
        snaps = repo / "snapshots"
        if not snaps.is_dir():
            continue
        ref = repo / "refs" / "main"
        chosen = None
        if ref.is_file():
            rev = ref.read_text().strip()
            if (snaps / rev).is_dir():
                chosen = snaps / rev
        if chosen is None:
            dirs = [d for d in snaps.iterdir() if d.is_dir()]
            if not dirs:
                continue
            chosen = max(dirs, key=lambda d: d.stat().st_mtime)
        out[chosen] = repo.name[len("models--"):].replace("--", "/", 1)
    return out
