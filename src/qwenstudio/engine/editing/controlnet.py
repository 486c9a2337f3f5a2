"""Qwen-Image ControlNets from files: the InstantX union model (``QwenImageControlNetModel``) as a diffusers folder
(``config.json`` + safetensors) or as one safetensors file.

The published single files (``Qwen-Image-InstantX-ControlNet-Union.safetensors`` as ComfyUI's ``controlnet/``
folder holds it, or the repository's ``diffusion_pytorch_model.safetensors``) use the diffusers module names
(``img_in``, ``txt_in``, ``transformer_blocks.N.*``, ``controlnet_blocks.N``, ``controlnet_x_embedder``), possibly
behind a prefix. Their config is read from the header's ``config`` metadata when present, else inferred from the
shapes; the RoPE split (not in any weight) comes from the DiT it attaches to, which it must match anyway.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ...errors import IncompatibleWeights, InvalidRequest, ModelNotFound

_CONTROLNET_CLASSES = ("QwenImageControlNetModel",)
REAL_AXES_DIMS_ROPE = (16, 56, 56)  # Qwen-Image's split of its 128-dim heads
# An inpainting ControlNet (InstantX Qwen-Image-ControlNet-Inpainting) takes, per token, the masked image's packed
# latents (64) plus one (1 - mask) channel in 2x2 patches (4): ``extra_condition_channels=4``, the only layout the
# reference (``QwenImageControlNetInpaintPipeline.prepare_image_with_mask``) builds.
INPAINT_EXTRA_CHANNELS = 4


def is_controlnet_folder(path: Path) -> bool:
    """A diffusers model folder holding a Qwen-Image ControlNet (its ``config.json`` names the class)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("_class_name") in _CONTROLNET_CLASSES
    except (OSError, ValueError, AttributeError):
        return False


def _prefix(keys) -> str:
    for k in keys:
        if k.endswith("controlnet_x_embedder.weight"):
            return k[: -len("controlnet_x_embedder.weight")]
    raise IncompatibleWeights("not a Qwen-Image (InstantX) ControlNet: no controlnet_x_embedder weight; other "
                              "ControlNet kinds (DiffSynth model patches, union LoRAs) are not supported")


def infer_config(shapes: dict[str, tuple], metadata: dict | None = None, dit_config=None) -> dict:
    """``QwenImageControlNetModel`` kwargs from a state dict's shapes (keys without prefix)."""
    metadata = metadata or {}
    if metadata.get("config"):
        try:
            cfg = json.loads(metadata["config"])
            return {k: v for k, v in cfg.items() if not k.startswith("_")}
        except ValueError:
            pass
    need = ("img_in.weight", "txt_in.weight", "controlnet_x_embedder.weight", "transformer_blocks.0.attn.norm_q.weight")
    missing = [k for k in need if k not in shapes]
    if missing:
        raise IncompatibleWeights(f"not a Qwen-Image ControlNet: missing {', '.join(missing)}")
    inner, in_channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    patch = int(round((in_channels / 16) ** 0.5))
    if dit_config is not None and getattr(dit_config, "axes_dims_rope", None):
        axes = tuple(dit_config.axes_dims_rope)
    elif head_dim == sum(REAL_AXES_DIMS_ROPE):
        axes = REAL_AXES_DIMS_ROPE
    else:
        raise IncompatibleWeights(f"cannot infer the RoPE split of a ControlNet with {head_dim}-dim heads")
    return dict(patch_size=patch, in_channels=in_channels, out_channels=16, num_layers=max(layers) + 1,
                attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
                joint_attention_dim=shapes["txt_in.weight"][1], axes_dims_rope=axes,
                extra_condition_channels=shapes["controlnet_x_embedder.weight"][1] - in_channels)


def load_controlnet_file(path: Path, dit_config=None):
    """A ``QwenImageControlNetModel`` (fp32/CPU, eval) from one safetensors file."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import QwenImageControlNetModel
    from safetensors.torch import load_file

    from ..loading import read_safetensors_header

    header = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    prefix = _prefix(header)
    shapes = {k[len(prefix):]: tuple(v["shape"]) for k, v in header.items() if k.startswith(prefix)}
    cfg = infer_config(shapes, metadata, dit_config)
    with init_empty_weights():
        model = QwenImageControlNetModel(**cfg)
    state = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise IncompatibleWeights(f"{path.name}: ControlNet weights do not match the inferred config "
                                  f"(missing {missing[:3]}, unexpected {extra[:3]})")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def load_controlnet_source(path: Path, dit_config=None):
    """A folder (diffusers) or a single safetensors file -> ``QwenImageControlNetModel``."""
    from diffusers import QwenImageControlNetModel

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"no ControlNet folder (config.json + safetensors) at {path}",
                                code="controlnet_not_found")
        try:
            return QwenImageControlNetModel.from_pretrained(str(path), use_safetensors=True).eval()
        except (OSError, ValueError) as e:
            raise IncompatibleWeights(f"cannot load a Qwen-Image ControlNet from {path}: {e}") from None
    from ..formats.detect import detect

    info = detect(path)
    if info.role != "controlnet":
        raise IncompatibleWeights(f"'{path.name}' is a {info.role} file, not a ControlNet")
    if info.container != "safetensors":
        raise IncompatibleWeights(f"'{path.name}': ControlNets are loaded from safetensors only")
    return load_controlnet_file(path, dit_config)


def resolve_controlnet(engine, name: str) -> tuple[Path, str]:
    """A ControlNet name from the models home (``engine.registry``), or a path when the engine allows paths."""
    registry = getattr(engine, "registry", None)
    if registry is not None:
        try:
            entry = registry.find(name, ("controlnet",))
            return entry.path, entry.name
        except ModelNotFound as e:
            if not engine.allow_paths:
                raise ModelNotFound(str(e), code="controlnet_not_found", detail=e.detail) from None
    path = Path(name).expanduser()
    if engine.allow_paths and path.exists():
        return path, (path.name if path.is_dir() else path.stem)
    raise ModelNotFound(f"no ControlNet named '{name}' (put it in <models>/controlnet/"
                        f"{' or give its path' if engine.allow_paths else ''})", code="controlnet_not_found")


def controlnet_extra_channels(path: Path) -> int:
    """``extra_condition_channels`` of a ControlNet folder or file, read cheaply (config.json, or the safetensors
    header: its ``config`` metadata, else the embedder's input width minus the image input's)."""
    if path.is_dir():
        try:
            return int(json.loads((path / "config.json").read_text()).get("extra_condition_channels") or 0)
        except (OSError, ValueError, AttributeError, TypeError):
            return 0  # loading reports the broken folder
    from ..loading import read_safetensors_header

    header = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if metadata.get("config"):
        try:
            return int(json.loads(metadata["config"]).get("extra_condition_channels") or 0)
        except (ValueError, AttributeError, TypeError):
            pass
    prefix = _prefix(header)
    emb, img = header.get(prefix + "controlnet_x_embedder.weight"), header.get(prefix + "img_in.weight")
    if emb is None or img is None:
        return 0
    return int(emb["shape"][1]) - int(img["shape"][1])


def uses_inpaint_controlnet(req, extra: int, name: str | None) -> bool:
    """Whether ``req`` (an ``EditRequest`` on a base model that uses a ControlNet with ``extra`` extra condition
    channels) runs the ControlNet-inpaint mode; raises for combinations that cannot run.

    The mode: an image + a mask + an inpainting ControlNet (``extra > 0``). The net's control input is the image
    itself (masked) and the mask, so ``controls`` may be empty (scale 1, whole schedule) or hold one entry with the
    same image, whose scale/start/end apply. A ControlNet without extra channels keeps needing control images."""
    label = f"'{name}'" if name else "the attached ControlNet"
    if extra <= 0:
        if not req.controls:
            raise InvalidRequest(f"{label} needs control images (--control); only an inpainting ControlNet "
                                 "works from --image + --mask alone", code="missing_control")
        return False
    if extra != INPAINT_EXTRA_CHANNELS:
        raise IncompatibleWeights(f"{label} has {extra} extra condition channels; inpainting ControlNets with "
                                  f"{INPAINT_EXTRA_CHANNELS} (masked-image latents + one mask channel) are supported")
    if not req.images or req.mask is None:
        raise InvalidRequest(f"{label} is an inpainting ControlNet: give the --image to inpaint and a --mask",
                             code="missing_image")
    if len(req.controls) > 1:
        raise InvalidRequest(f"{label} is an inpainting ControlNet: it takes one control (the image itself)",
                             code="invalid_control")
    if req.controls and req.controls[0].image.sha256 != req.images[0].sha256:
        raise InvalidRequest(f"{label} is an inpainting ControlNet: its control image is the image being inpainted "
                             "(give the same file, or no --control)", code="invalid_control")
    return True


def check_controlnet_request(engine, original, req):
    """``Engine.prepare``'s ControlNet check (before any GPU work): a named net must resolve, and a request that
    runs the ControlNet-inpaint mode (named net, or ``controls`` with an attached one) gets ``strength`` 1.0 (it
    starts from pure noise, as the reference; another explicit strength is refused). Returns the request."""
    from dataclasses import replace

    if engine.spec.is_edit or not hasattr(req, "controls"):
        return req
    if req.controlnet:
        path, name = resolve_controlnet(engine, req.controlnet)
        extra = controlnet_extra_channels(path)
    elif req.controls and getattr(engine, "controlnet", None) is not None:
        name, extra = engine.controlnet_name, int(engine.controlnet.config.extra_condition_channels or 0)
    else:
        return req
    if not uses_inpaint_controlnet(req, extra, name):
        return req
    if getattr(original, "strength", None) not in (None, 1.0):
        raise InvalidRequest("strength does not apply with an inpainting ControlNet: it starts from pure noise",
                             code="invalid_strength")
    return replace(req, strength=1.0)
