"""Turn what the user typed after ``--model`` into loadable files, plan memory for them, and load them.

``tiny`` → the built-in random model; a registry name — a diffusers folder's name, a hub repo id
(``Qwen/Qwen-Image-Edit-2509``, from the Hugging Face cache) or a DiT file's stem (``qwen_image_fp8_e4m3fn``) — or,
for local callers, a path. A single-file DiT takes its text encoder, VAE and tokenizer from separate files in the
models dirs (named or picked), or, when there are none, from a diffusers folder there (the common "GGUF DiT + the
official folder" setup). The variant comes from ``identity`` (``--variant`` overrides it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Settings
from ..errors import ModelNotFound
from .identity import Identity, hub_snapshots, identify_folder, identify_name
from .registry import ModelEntry, ModelRegistry, file_model_name, require_role, transformer_folder_file


@dataclass(frozen=True)
class ModelSource:
    name: str
    identity: Identity
    folder: Path | None = None  # a diffusers folder, or ...
    dit: ModelEntry | None = None  # ... single files
    text_encoder: ModelEntry | None = None
    vae: ModelEntry | None = None
    companions: Path | None = None  # a diffusers folder giving the TE/VAE/tokenizer of a single-file DiT
    search_dirs: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def variant(self) -> str:
        return self.identity.variant


def registry_for(settings: Settings, extra_dirs=()) -> ModelRegistry:
    """The models home: extra dirs, ``QWENSTUDIO_MODELS_DIR``, ``<home>/models`` and the HF hub cache's snapshots."""
    snapshots = hub_snapshots()
    return ModelRegistry([*map(Path, extra_dirs), *settings.models_dirs, settings.home / "models", *snapshots],
                         aliases=snapshots)


def resolve(model: str | Path, registry: ModelRegistry, settings: Settings, *, text_encoder: str | None = None,
            vae: str | None = None, allow_paths: bool = True) -> ModelSource:
    from .. import __version__

    name = str(model)
    if name == "tiny":
        from ..testing.tiny import TinySpec, write_diffusers_folder

        folder = write_diffusers_folder(settings.cache_dir / f"tiny-{__version__}", TinySpec())
        return ModelSource("tiny", Identity("tiny", "the built-in tiny model"), folder=folder)
    path = Path(name).expanduser()
    if registry.has(name, ("diffusers", "dit")):  # names (incl. repo ids "Org/Name") before paths
        entry = registry.find(name, ("diffusers", "dit"))
        if entry.kind == "diffusers":
            return ModelSource(entry.name, identify_folder(entry.path, entry.name), folder=entry.path)
    elif allow_paths and ("/" in name or "\\" in name or path.exists()):
        if not path.exists():
            raise ModelNotFound(f"model '{name}' not found: give a diffusers folder, a DiT file, a name from "
                                "`qwenstudio models`, or 'tiny'")
        if path.is_dir():
            weights = transformer_folder_file(path)  # a transformer folder alone: its file is the DiT
            if weights is None:
                return ModelSource(path.name, identify_folder(path), folder=path)
            path = weights
        from .formats.detect import detect

        info = detect(path)
        entry = ModelEntry(file_model_name(path), info.role, path, info.container, info.dtype, info.quant,
                           info.size_bytes)
        registry = ModelRegistry([path.parent, path.parent.parent, *registry.dirs], aliases=registry.aliases)
    else:
        entry = registry.find(name, ("diffusers", "dit"))  # raises ModelNotFound listing the known names
    require_role(entry, ("dit",))
    ident = identify_name(entry.name)
    dirs = [*registry.dirs, *(e.path for e in registry.scan() if e.kind == "diffusers")]
    try:
        te, vae_entry = registry.pick("text_encoder", text_encoder), registry.pick("vae", vae)
    except ModelNotFound:
        companions = _companion_folder(registry) if text_encoder is None and vae is None else None
        if companions is None:
            raise
        warnings.warn(f"'{entry.name}': no separate text encoder/VAE files; using those of the diffusers folder "
                      f"'{companions.name}'", stacklevel=2)
        return ModelSource(entry.name, ident, dit=entry, companions=companions.path, search_dirs=tuple(dirs))
    return ModelSource(entry.name, ident, dit=entry, text_encoder=te, vae=vae_entry, search_dirs=tuple(dirs))


def identify_model(model: str | Path, *, settings: Settings | None = None, models_dirs=(), variant: str | None = None,
                   allow_paths: bool = True) -> tuple[str, Identity]:
    """(the model's name, its identity) without loading anything: what ``Engine.load`` would choose."""
    settings = settings or Settings.from_env()
    source = resolve(model, registry_for(settings, models_dirs), settings, allow_paths=allow_paths) \
        if str(model) != "tiny" else ModelSource("tiny", Identity("tiny", "the built-in tiny model"))
    if variant:
        return source.name, Identity(variant, f"chosen with --variant {variant}")
    return source.name, source.identity


def _companion_folder(registry: ModelRegistry) -> ModelEntry | None:
    """A diffusers folder whose text encoder/VAE can serve a single-file DiT (base-model folders first: the
    text encoder and VAE are the same across the family)."""
    folders = [e for e in registry.scan() if e.kind == "diffusers"
               and all((e.path / c).is_dir() for c in ("text_encoder", "vae", "tokenizer"))]
    folders.sort(key=lambda e: ("edit" in e.variant, e.name))
    return folders[0] if folders else None


def component_sizes(source: ModelSource, itemsize: int, quant: str | None = None) -> dict[str, int]:
    """Resident bytes per component, from headers only (GGUF: quantized blocks as stored)."""
    return {name: fp.total for name, fp in component_footprints(source, itemsize, quant).items()}


def component_footprints(source: ModelSource, itemsize: int, quant: str | None = None) -> dict:
    """Each component's ``Footprint`` (bytes, blocks, largest layer, widths) from its headers only. ``quant``: the
    DiT's ``--quant``, so a quantize-on-load run is sized as it will run (the text encoder and VAE stay as stored)."""
    from .footprints import footprint_from_tensors, gguf_tensors, safetensors_tensors
    from .loading import check_diffusers_folder, component_files

    def fp(name, files, skip=()):
        q = quant if name == "transformer" else None
        return footprint_from_tensors(safetensors_tensors(files, itemsize, skip_prefixes=skip, quant=q), name)

    if source.folder is not None:
        check_diffusers_folder(source.folder)
        return {
            "transformer": fp("transformer", component_files(source.folder / "transformer")),
            "text_encoder": fp("text_encoder", component_files(source.folder / "text_encoder"), ("lm_head.",)),
            "vae": fp("vae", component_files(source.folder / "vae")),
        }
    dit = (footprint_from_tensors(gguf_tensors(source.dit.path, itemsize), "transformer")
           if source.dit.container == "gguf" else fp("transformer", [source.dit.path]))
    if source.companions is not None:
        return {"transformer": dit,
                "text_encoder": fp("text_encoder", component_files(source.companions / "text_encoder"), ("lm_head.",)),
                "vae": fp("vae", component_files(source.companions / "vae"))}
    return {"transformer": dit, "text_encoder": fp("text_encoder", [source.text_encoder.path], ("lm_head.",)),
            "vae": fp("vae", [source.vae.path])}


def load_source(source: ModelSource, *, device, dtype, keep_lm_head: bool = False, vae_dtype=None):
    """``vae_dtype``: the VAE's own dtype when it differs (fp32 beside a bf16 DiT on a CPU: engine/precision.py)."""
    from .loading import load_diffusers_folder

    if source.folder is not None:
        components = load_diffusers_folder(source.folder, device=device, dtype=dtype, keep_lm_head=keep_lm_head,
                                           vae_dtype=vae_dtype)
        components.identity = {**components.identity, "name": source.name}
        return components
    if source.companions is not None:
        return _load_dit_with_folder(source, device=device, dtype=dtype, vae_dtype=vae_dtype)
    from .formats.comfy import find_tokenizer, load_single_files

    components = load_single_files(source.dit.path, source.text_encoder.path, source.vae.path,
                                   find_tokenizer(list(source.search_dirs)), device=device, dtype=dtype,
                                   vae_dtype=vae_dtype)
    components.identity = {**components.identity, "name": source.name, "quant": source.dit.quant}
    return components


def _load_dit_with_folder(source: ModelSource, *, device, dtype, vae_dtype=None):
    import torch

    from .formats.comfy import dit_format_name, load_dit_file
    from .formats.gguf import load_dit_gguf
    from .loading import Components, fingerprint, load_folder_companions

    device = torch.device(device)
    parts = load_folder_companions(source.companions, device=device, dtype=dtype, vae_dtype=vae_dtype)
    path = source.dit.path
    if source.dit.container == "gguf":
        from .formats.gguf import gguf_fingerprint

        transformer, fp = load_dit_gguf(path, device=device, dtype=dtype), gguf_fingerprint(path)
    else:
        transformer, fp = load_dit_file(path, device=device, dtype=dtype), fingerprint([path])
    identity = {"name": source.name,
                "format": "gguf" if source.dit.container == "gguf" else dit_format_name(source.dit.quant),
                "class": "QwenImagePipeline", "files": [path.stem], "components_from": source.companions.name,
                "quant": source.dit.quant, "fingerprint": fp}
    return Components(transformer=transformer, device=device, dtype=dtype, identity=identity, **parts)
