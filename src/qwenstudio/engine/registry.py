"""The models home: find every usable weights file under the configured model dirs, by content.

A models dir may follow the ComfyUI layout (``diffusion_models/`` or ``unet/``, ``text_encoders/`` or ``clip/``,
``vae/``, ``loras/``, ``controlnet/``), be an existing ComfyUI/SwarmUI ``models`` folder, hold diffusers folders, or
be a diffusers folder itself, or be a Hugging Face hub cache snapshot (``models--Org--Name/snapshots/<rev>/``, named
by its repo id ``Org/Name``). Each file's role comes from ``formats.detect`` (its keys), not from the folder it is
in or its extension; a model's variant comes from ``identity`` (a folder's ``model_index.json``, a file's name). Models and LoRAs are then referred to by *name* (a file's stem, a folder's name): remote
clients can only ever name things the registry found, never pass a path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import IncompatibleWeights, ModelNotFound, QwenStudioError

_NOT_WEIGHTS = {".json", ".txt", ".md", ".yaml", ".yml", ".png", ".jpg", ".jpeg", ".webp", ".html", ".py", ".lock"}
_MIN_WEIGHTS_BYTES = 1024
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # the stem of the file diffusers' save_pretrained writes
# Preferred auto-picks when several text encoders / VAEs are present: the files the official guides name.
_PREFERRED = {"text_encoder": ("qwen_2.5_vl_7b", "qwen2.5_vl", "qwen_2.5_vl"), "vae": ("qwen_image_vae",)}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # "diffusers", or a detected role: dit, text_encoder, vae, lora, controlnet
    path: Path = field(compare=False)
    container: str = "diffusers"  # diffusers | safetensors | gguf
    dtype: str = ""
    quant: str | None = None
    size_bytes: int = 0
    variant: str = field(default="", compare=False)  # diffusers folders and DiTs: the variant identity decided
    variant_reason: str = field(default="", compare=False)

    def public(self) -> dict:
        """What a remote client may see: no filesystem paths."""
        return {"name": self.name, "kind": self.kind, "format": self.container, "dtype": self.dtype,
                "quant": self.quant, "size_bytes": self.size_bytes, "variant": self.variant or None,
                "variant_reason": self.variant_reason or None}


class ModelRegistry:
    def __init__(self, dirs: Iterable[Path], aliases: dict[Path, str] | None = None):
        """``aliases``: folders named otherwise than by their directory (hub snapshots -> repo ids)."""
        self.aliases = {Path(k): v for k, v in (aliases or {}).items()}
        self.dirs = [Path(d).expanduser() for d in dirs]
        self.problems: list[tuple[Path, str]] = []  # files that were skipped, with the reason (pickle, corrupt ...)
        self._cached: tuple[tuple, list[ModelEntry]] | None = None

    def _signature(self) -> tuple:
        """Folder mtimes down to the files' parents: adding, removing or renaming a file changes it."""
        sig = []
        for root in self.dirs:
            for p in (root, *root.glob("*"), *root.glob("*/*")):
                if p.is_dir():
                    sig.append((str(p), p.stat().st_mtime_ns))
        return tuple(sig)

    def scan(self) -> list[ModelEntry]:
        """Every usable entry; re-read only when a models folder changed (LoRA lookups happen per request)."""
        sig = self._signature()
        if self._cached is not None and self._cached[0] == sig:
            return self._cached[1]
        entries = self._scan()
        self._cached = (sig, entries)
        return entries

    def _scan(self) -> list[ModelEntry]:
        from .formats.detect import detect
        from .identity import identify_folder, identify_name

        entries: dict[tuple[str, str], ModelEntry] = {}
        self.problems = []
        for root in self.dirs:
            if not root.is_dir():
                continue
            folders = _diffusers_folders(root)
            for folder in folders:
                name = self.aliases.get(folder, folder.name)
                ident = identify_folder(folder, name)
                e = ModelEntry(name, "diffusers", folder, "diffusers", "", None, _tree_size(folder), ident.variant,
                               ident.reason)
                entries.setdefault((e.kind, e.name), e)
            nets = _controlnet_folders(root, exclude=folders)
            for folder in nets:  # a ControlNet as a diffusers model folder: named after the folder
                e = ModelEntry(folder.name, "controlnet", folder, "diffusers", "", None, _tree_size(folder))
                entries.setdefault((e.kind, e.name), e)
            for path in _candidate_files(root, exclude=folders + nets):
                try:
                    info = detect(path)
                except QwenStudioError as err:
                    self.problems.append((path, str(err)))
                    continue
                if info.role == "unknown":
                    self.problems.append((path, "not a Qwen-Image component (unrecognised tensor names)"))
                    continue
                name = file_model_name(path)
                ident = identify_name(name) if info.role == "dit" else None
                e = ModelEntry(name, info.role, path, info.container, info.dtype, info.quant, info.size_bytes,
                               ident.variant if ident else "", ident.reason if ident else "")
                entries.setdefault((e.kind, e.name), e)
        return sorted(entries.values(), key=lambda e: (e.kind, e.name))

    def has(self, name: str, kinds: tuple[str, ...]) -> bool:
        return any(e.kind in kinds and e.name == name for e in self.scan())

    def find(self, name: str, kinds: tuple[str, ...]) -> ModelEntry:
        found = [e for e in self.scan() if e.kind in kinds and e.name == name]
        if not found:
            known = sorted({e.name for e in self.scan() if e.kind in kinds})
            # No directory names in the message: it may reach remote clients (they are in ``detail``).
            raise ModelNotFound(
                f"no {'/'.join(kinds)} named '{name}' in the models dirs; known: {', '.join(known) or 'none'}",
                detail={"dirs": [str(d) for d in self.dirs]},
            )
        return found[0]

    def pick(self, kind: str, name: str | None = None) -> ModelEntry:
        """A named component, or the best automatic choice of that kind (the officially named file first)."""
        if name is not None:
            return self.find(name, (kind,))
        candidates = [e for e in self.scan() if e.kind == kind]
        if not candidates:
            raise ModelNotFound(
                f"no {kind.replace('_', ' ')} file found in the models dirs (see `qwenstudio models`); put one in "
                f"<models>/{'text_encoders' if kind == 'text_encoder' else kind}/",
                detail={"dirs": [str(d) for d in self.dirs]},
            )
        prefs = _PREFERRED.get(kind, ())
        return sorted(candidates, key=lambda e: (not e.name.lower().startswith(prefs), e.quant is not None, e.name))[0]


def _diffusers_folders(root: Path) -> list[Path]:
    if (root / "model_index.json").is_file():
        return [root]
    out = []
    for sub in (root, root / "diffusers"):
        if sub.is_dir():
            out += [p for p in sorted(sub.iterdir()) if p.is_dir() and (p / "model_index.json").is_file()]
    return out


def _controlnet_folders(root: Path, exclude: list[Path]) -> list[Path]:
    """Diffusers model folders (``config.json`` naming a Qwen-Image ControlNet class) up to three levels down."""
    from .editing.controlnet import is_controlnet_folder

    out = []
    for depth_glob in ("*/config.json", "*/*/config.json", "*/*/*/config.json"):
        for cfg in sorted(root.glob(depth_glob)):
            folder = cfg.parent
            if any(d == folder or d in folder.parents for d in exclude) or folder.name.startswith("."):
                continue
            if is_controlnet_folder(folder):
                out.append(folder)
    return out


def _candidate_files(root: Path, exclude: list[Path]) -> list[Path]:
    """Regular files up to three levels down (ComfyUI's role folders and their subfolders), minus diffusers
    folders and obvious non-weights (docs, images)."""
    out = []
    for depth_glob in ("*", "*/*", "*/*/*"):
        for p in sorted(root.glob(depth_glob)):
            if any(d == p or d in p.parents for d in exclude):
                continue
            if p.name.startswith(".") or not p.is_file() or p.suffix.lower() in _NOT_WEIGHTS:
                continue
            if p.stat().st_size < _MIN_WEIGHTS_BYTES:
                continue
            out.append(p)
    return out


def file_model_name(path: Path) -> str:
    """A weights file's model name: its stem, except a diffusers component file (``diffusion_pytorch_model
    .safetensors``, e.g. a bitsandbytes DiT saved by ``save_pretrained``), named after its folder (the pipeline's
    when that folder is ``transformer/``): its own stem says nothing and repeats."""
    if path.stem != DIFFUSERS_WEIGHTS:
        return path.stem
    folder = path.parent
    return folder.parent.name if folder.name == "transformer" and folder.parent.name else folder.name


def transformer_folder_file(folder: Path) -> Path | None:
    """The one weights file of a diffusers *transformer* folder (``config.json`` naming the Qwen-Image DiT class
    beside ``diffusion_pytorch_model.safetensors``, no ``model_index.json``): what ``save_pretrained`` of a
    transformer alone writes, e.g. after diffusers' bitsandbytes quantizer. None for anything else."""
    import json

    weights, config = folder / f"{DIFFUSERS_WEIGHTS}.safetensors", folder / "config.json"
    if (folder / "model_index.json").exists() or not (weights.is_file() and config.is_file()):
        return None
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return weights if class_name == "QwenImageTransformer2DModel" else None


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def require_role(entry: ModelEntry, kinds: tuple[str, ...]) -> None:
    if entry.kind not in kinds:
        raise IncompatibleWeights(f"'{entry.name}' is a {entry.kind} file, not a {'/'.join(kinds)}")
