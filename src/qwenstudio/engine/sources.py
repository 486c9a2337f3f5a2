"""Turn what the user typed after ``--model`` into loadable files, plan memory for them, and load them.

``tiny`` → the built-in random model; a path (local callers only) → a diffusers folder or a DiT file; otherwise a
registry name: a diffusers folder's name or a DiT file's stem (``qwen_image_fp8_e4m3fn``), with the text encoder,
VAE and tokenizer picked from the models dirs unless named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import Settings
from ..errors import ModelNotFound
from .registry import ModelEntry, ModelRegistry, guess_variant, require_role


@dataclass(frozen=True)
class ModelSource:
    name: str
    variant: str
    folder: Path | None = None  # a diffusers folder, or ...
    dit: ModelEntry | None = None  # ... single files
    text_encoder: ModelEntry | None = None
    vae: ModelEntry | None = None
    search_dirs: tuple[Path, ...] = field(default_factory=tuple)


def registry_for(settings: Settings, extra_dirs=()) -> ModelRegistry:
    return ModelRegistry([*map(Path, extra_dirs), *settings.models_dirs, settings.home / "models"])


def resolve(model: str | Path, registry: ModelRegistry, settings: Settings, *, text_encoder: str | None = None,
            vae: str | None = None, allow_paths: bool = True) -> ModelSource:
    from .. import __version__

    name = str(model)
    if name == "tiny":
        from ..testing.tiny import TinySpec, write_diffusers_folder

        folder = write_diffusers_folder(settings.cache_dir / f"tiny-{__version__}", TinySpec())
        return ModelSource("tiny", "tiny", folder=folder)
    path = Path(name).expanduser()
    looks_like_path = allow_paths and ("/" in name or "\\" in name or path.exists())
    if looks_like_path:
        if not path.exists():
            raise ModelNotFound(f"model '{name}' not found: give a diffusers folder, a DiT file, a name from "
                                "`qwenstudio models`, or 'tiny'")
        if path.is_dir():
            return ModelSource(path.name, guess_variant(path.name), folder=path)
        from .formats.detect import detect

        info = detect(path)
        entry = ModelEntry(path.stem, info.role, path, info.container, info.dtype, info.quant, info.size_bytes)
        registry = ModelRegistry([path.parent, path.parent.parent, *registry.dirs])
    else:
        entry = registry.find(name, ("diffusers", "dit"))
        if entry.kind == "diffusers":
            return ModelSource(entry.name, guess_variant(entry.name), folder=entry.path)
    require_role(entry, ("dit",))
    te, vae_entry = registry.pick("text_encoder", text_encoder), registry.pick("vae", vae)
    dirs = [*registry.dirs, *(e.path for e in registry.scan() if e.kind == "diffusers")]
    return ModelSource(entry.name, guess_variant(entry.name), dit=entry, text_encoder=te, vae=vae_entry,
                       search_dirs=tuple(dirs))


def component_sizes(source: ModelSource, itemsize: int) -> dict[str, int]:
    """Resident bytes per component, from headers only (GGUF: its file size, it stays quantized)."""
    from .loading import check_diffusers_folder, component_files
    from .memory import safetensors_resident_bytes

    def size(files, skip=()):
        return safetensors_resident_bytes(files, itemsize, skip_prefixes=skip)

    if source.folder is not None:
        check_diffusers_folder(source.folder)
        return {
            "transformer": size(component_files(source.folder / "transformer")),
            "text_encoder": size(component_files(source.folder / "text_encoder"), ("lm_head.",)),
            "vae": size(component_files(source.folder / "vae")),
        }
    dit = source.dit.size_bytes if source.dit.container == "gguf" else size([source.dit.path])
    return {"transformer": dit, "text_encoder": size([source.text_encoder.path], ("lm_head.",)),
            "vae": size([source.vae.path])}


def load_source(source: ModelSource, *, device, dtype, keep_lm_head: bool = False):
    from .loading import load_diffusers_folder

    if source.folder is not None:
        return load_diffusers_folder(source.folder, device=device, dtype=dtype, keep_lm_head=keep_lm_head)
    from .formats.comfy import find_tokenizer, load_single_files

    components = load_single_files(source.dit.path, source.text_encoder.path, source.vae.path,
                                   find_tokenizer(list(source.search_dirs)), device=device, dtype=dtype)
    components.identity = {**components.identity, "name": source.name, "quant": source.dit.quant}
    return components
