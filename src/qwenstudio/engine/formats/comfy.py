"""Loaders for ComfyUI single files: ``diffusion_models/qwen_image*.safetensors`` (bf16/fp16/fp32, fp8, fp8 scaled),
``text_encoders/qwen_2.5_vl_7b*.safetensors`` and ``vae/qwen_image_vae.safetensors``.

Each file is identified by content (detect.py), its model built on the meta device from a config (inferred from
shapes, read from our metadata, or the real Qwen-Image default) and filled tensor by tensor. fp8 weights are never
upcast at load: their Linear layers become ``FP8Linear`` first. The tokenizer is not in any of these files; it is
found in a diffusers folder, a ComfyUI install or the Hugging Face cache.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ...errors import IncompatibleWeights, ModelNotFound, UnsupportedFormat
from ..loading import (
    Components,
    build_empty,
    default_device,
    default_dtype,
    fill_module,
    fingerprint,
    iter_safetensors,
    load_tokenizer,
    text_encoder_key_map,
)
from .detect import FileInfo, detect
from .keymaps import infer_dit_config, strip_dit_prefix

TEXT_ENCODER_CONFIG_METADATA_KEY = "qwenstudio.text_encoder_config"
VAE_CONFIG_METADATA_KEY = "qwenstudio.vae_config"

# Prefixes ComfyUI may put in front of the HF names of the Qwen2.5-VL text encoder: a bare ``qwen_2.5_vl_7b``
# file has none; CLIPSave / full checkpoints nest it under the SD1ClipModel name ``qwen25_7b`` and its
# ``transformer`` attribute (comfy/text_encoders/qwen_image.py, comfy/sd1_clip.py).
TE_PREFIXES = ("text_encoders.qwen25_7b.transformer.", "qwen25_7b.transformer.", "text_encoder.")
VAE_PREFIXES = ("first_stage_model.", "vae.")

# Qwen/Qwen-Image text_encoder/config.json (Qwen2.5-VL-7B-Instruct), in the transformers 5 nested layout.
QWEN25_VL_7B_CONFIG: dict = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen2_5_vl_text",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 128000,
        "max_window_layers": 28,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}

# Qwen/Qwen-Image vae/config.json (latents_mean/std are the class defaults, i.e. the real ones).
QWEN_IMAGE_VAE_CONFIG: dict = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}


def _scheduler_config() -> dict:
    from ..specs import QWEN_IMAGE_SCHEDULER_CONFIG

    return dict(QWEN_IMAGE_SCHEDULER_CONFIG)


def _expect(info: FileInfo, role: str, what: str) -> None:
    if info.role != role:
        found = "an unrecognised architecture" if info.role == "unknown" else f"a {info.role} file"
        raise IncompatibleWeights(
            f"{info.path}: expected a Qwen-Image {what} but this is {found} "
            f"({info.n_tensors} tensors, e.g. {', '.join(list(info.shapes)[:3])})"
        )
    if info.container != "safetensors":
        raise UnsupportedFormat(f"{info.path}: {info.container} {what} files are loaded by the GGUF loader, not here")


def _fp8_layers(model, info: FileInfo, key_map) -> dict[str, tuple[str, Any]]:
    """Module name -> (file key prefix, fp8 torch dtype) for every Linear whose weight is fp8 in the file: stored as
    F8_* or, in ComfyUI's per-layer format, as uint8 bytes of the fp8 format its ``comfy_quant`` names."""
    from torch import nn

    from ..loading import read_safetensors_header
    from ..quant.fp8 import FP8_DTYPES
    from .comfy_quant import FP8_FORMATS, check_supported, layer_formats

    fp8 = {"F8_E4M3": FP8_DTYPES["float8_e4m3fn"], "F8_E5M2": FP8_DTYPES["float8_e5m2"]}
    header = read_safetensors_header(info.path)
    header.pop("__metadata__", None)
    formats = layer_formats(info.path, header, info.metadata)
    check_supported(formats, str(info.path))
    modules = dict(model.named_modules())
    layers = {}
    for key, meta in header.items():
        if not key.endswith(".weight"):
            continue
        fpre = key[: -len(".weight")]
        if meta["dtype"] in fp8:
            dt = fp8[meta["dtype"]]
        elif meta["dtype"] == "U8" and fpre in formats:
            dt = FP8_DTYPES[FP8_FORMATS[formats[fpre]]]
        else:
            continue
        mkey = key_map(key)
        if mkey is not None and isinstance(modules.get(mkey[: -len(".weight")]), nn.Linear):
            layers[mkey[: -len(".weight")]] = (fpre, dt)
    return layers


def _load_with_fp8(model, info: FileInfo, *, dtype, device, name: str, key_map, optional=()) -> None:
    """Fill ``model`` from a (possibly fp8 / fp8 scaled, old or per-layer layout) safetensors file. fp8 Linear weights
    stay fp8 (with their fp32 scales); any other fp8 tensor is dequantized to ``dtype``; markers are skipped."""
    import torch
    from safetensors import safe_open

    from ..quant.fp8 import dequantize_fp8, is_fp8, swap_linears_to_fp8
    from .comfy_quant import INPUT_SCALE_SUFFIXES, WEIGHT_SCALE_SUFFIXES, is_side_tensor, side_key

    layers = _fp8_layers(model, info, key_map)
    swap_linears_to_fp8(model, set(layers), {m: dt for m, (_, dt) in layers.items()})
    handled: set[str] = set()
    with safe_open(str(info.path), framework="pt") as f:
        keys = set(f.keys())
        for mname, (fpre, dt) in layers.items():
            mod = model.get_submodule(mname)
            weight = f.get_tensor(fpre + ".weight")
            weight = weight.view(dt) if weight.dtype == torch.uint8 else weight
            mod.weight = torch.nn.Parameter(weight.to(device), requires_grad=False)
            handled.add(fpre + ".weight")
            for buf, suffixes in (("scale_weight", WEIGHT_SCALE_SUFFIXES), ("scale_input", INPUT_SCALE_SUFFIXES)):
                k = side_key(keys, fpre, suffixes)
                if k is not None:
                    mod.register_buffer(buf, f.get_tensor(k).to(device=device, dtype=torch.float32))
        # Scales of fp8 tensors that are not Linear weights are applied when dequantizing them below.
        scales = {k.rsplit(".", 1)[0]: f.get_tensor(k) for k in keys if k.endswith(WEIGHT_SCALE_SUFFIXES)}

    def tensors():
        for key, t in iter_safetensors([info.path]):
            if key in handled or is_side_tensor(key):
                continue
            if is_fp8(t.dtype):
                t = dequantize_fp8(t, scales.get(key.rsplit(".", 1)[0]) if key.endswith(".weight") else None)
            yield key, t

    fill_module(model, tensors(), dtype=dtype, device=device, name=name, key_map=key_map, optional=optional)


def _resolve(device, dtype):
    import torch

    device = torch.device(device or default_device())
    return device, dtype or default_dtype(device)


def load_dit_file(path: str | Path, *, device=None, dtype=None):
    """A ComfyUI Qwen-Image DiT single file (prefixed or not; bf16/fp16/fp32/fp8/fp8 scaled) -> transformer."""
    from diffusers import QwenImageTransformer2DModel

    info = detect(path)
    _expect(info, "dit", "diffusion model (DiT)")
    device, dtype = _resolve(device, dtype)
    if info.quant is not None and info.quant.startswith(("svdq_", "int4", "bnb_")):
        from .four_bit import load_dit_four_bit

        return load_dit_four_bit(info, device=device, dtype=dtype)
    shapes = {strip_dit_prefix(k): s for k, s in info.shapes.items()}
    try:
        config = infer_dit_config(shapes, info.metadata)
    except (KeyError, ValueError, IndexError) as e:
        raise IncompatibleWeights(f"{info.path}: cannot infer the DiT configuration (missing {e})") from None
    model = build_empty(lambda: QwenImageTransformer2DModel.from_config(config))
    _load_with_fp8(model, info, dtype=dtype, device=device, name=f"transformer ({info.path.name})",
                   key_map=strip_dit_prefix)
    return model.eval()


def _te_key_map(key: str) -> str | None:
    for p in TE_PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
            break
    if key.startswith("lm_head.") or key == "scaled_fp8":
        return None
    return text_encoder_key_map(key)


def _stored_config(info: FileInfo, key: str, default: dict) -> dict:
    """The config our writers store in the file's metadata, else the real model's (ComfyUI files carry none)."""
    raw = info.metadata.get(key)
    return json.loads(raw) if raw else default


def load_text_encoder_file(path: str | Path, *, device=None, dtype=None, config: dict | None = None):
    """ComfyUI ``qwen_2.5_vl_7b*.safetensors`` (HF names, maybe fp8 scaled) -> Qwen2_5_VLForConditionalGeneration.
    Config: ``config`` if given, else the one stored in our metadata, else the real Qwen2.5-VL-7B."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    info = detect(path)
    _expect(info, "text_encoder", "text encoder (Qwen2.5-VL)")
    device, dtype = _resolve(device, dtype)
    cfg = Qwen2_5_VLConfig.from_dict(config or _stored_config(info, TEXT_ENCODER_CONFIG_METADATA_KEY,
                                                                QWEN25_VL_7B_CONFIG))
    model = build_empty(lambda: Qwen2_5_VLForConditionalGeneration(cfg))
    # The LM head is never used to encode prompts (and ComfyUI files may lack it): skip it.
    _load_with_fp8(model, info, dtype=dtype, device=device, name=f"text_encoder ({info.path.name})",
                   key_map=_te_key_map, optional=("lm_head.",))
    return model.eval()


# ---- VAE: ComfyUI/Wan 2.1 names <-> diffusers AutoencoderKLQwenImage names -----------------------------------------

_RESNET_TO_WAN = (("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
                  ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))
_TOP_TO_WAN = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}


def _resnet_to_wan(rest: str) -> str:
    for a, b in _RESNET_TO_WAN:
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest


def vae_key_to_comfy(key: str, num_res_blocks: int) -> str:
    """diffusers ``AutoencoderKLQwenImage`` parameter name -> the Wan 2.1 name ComfyUI files use. Decoder blocks are
    flattened: up block b holds ``num_res_blocks + 1`` residual blocks then one resample (except the last), so the
    flat index is ``b * (num_res_blocks + 2) + r`` (what diffusers' ``convert_wan_vae_to_diffusers`` hard-codes for
    num_res_blocks=2)."""
    for a, b in _TOP_TO_WAN.items():
        if key.startswith(a):
            return b + key[len(a):]
    side, _, rest = key.partition(".")
    if rest.startswith("conv_in."):
        return f"{side}.conv1.{rest[len('conv_in.'):]}"
    if rest.startswith("norm_out."):
        return f"{side}.head.0.{rest[len('norm_out.'):]}"
    if rest.startswith("conv_out."):
        return f"{side}.head.2.{rest[len('conv_out.'):]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        return f"{side}.middle.{2 * int(m.group(1))}.{_resnet_to_wan(m.group(2))}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
        return f"{side}.middle.1.{m.group(1)}"
    if m := re.match(r"down_blocks\.(\d+)\.(.*)", rest):
        return f"{side}.downsamples.{m.group(1)}.{_resnet_to_wan(m.group(2))}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        idx = int(m.group(1)) * (num_res_blocks + 2) + int(m.group(2))
        return f"{side}.upsamples.{idx}.{_resnet_to_wan(m.group(3))}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest):
        idx = int(m.group(1)) * (num_res_blocks + 2) + num_res_blocks + 1
        return f"{side}.upsamples.{idx}.{m.group(2)}"
    return key


def load_vae_file(path: str | Path, *, device=None, dtype=None, config: dict | None = None):
    """ComfyUI ``qwen_image_vae.safetensors`` (Wan 2.1 names; diffusers names also accepted) -> AutoencoderKLQwenImage."""
    from diffusers import AutoencoderKLQwenImage

    info = detect(path)
    _expect(info, "vae", "VAE")
    device, dtype = _resolve(device, dtype)
    config = config or _stored_config(info, VAE_CONFIG_METADATA_KEY, QWEN_IMAGE_VAE_CONFIG)
    model = build_empty(lambda: AutoencoderKLQwenImage.from_config(config))
    nrb = model.config.num_res_blocks
    table = {vae_key_to_comfy(k, nrb): k for k in model.state_dict()}
    table.update({k: k for k in model.state_dict()})  # files already in diffusers names

    def key_map(key: str) -> str | None:
        for p in VAE_PREFIXES:
            if key.startswith(p):
                key = key[len(p):]
                break
        return table.get(key, key)

    fill_module(model, iter_safetensors([info.path]), dtype=dtype, device=device,
                name=f"vae ({info.path.name})", key_map=key_map)
    return model.eval()


# ---- tokenizer and the whole set ------------------------------------------------------------------------------------

def _is_tokenizer_dir(d: Path) -> bool:
    return d.is_dir() and ((d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()))


def _hf_hub_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def find_tokenizer(search_dirs=()) -> Path:
    """The Qwen2 tokenizer folder: each search dir itself, its ``tokenizer/`` and ``*/tokenizer/`` (diffusers folders),
    a ComfyUI install's ``comfy/text_encoders/qwen25_tokenizer/``, the HF cache of Qwen/Qwen-Image, and finally the
    Qwen2.5 tokenizer shipped with qwenstudio (``bundled_tokenizer``), so a ComfyUI-only user never has to hunt."""
    for d in map(Path, search_dirs):
        patterns = [d, d / "tokenizer", *sorted(d.glob("*/tokenizer")),
                    d / "comfy" / "text_encoders" / "qwen25_tokenizer",
                    *sorted(d.glob("*/comfy/text_encoders/qwen25_tokenizer"))]
        for c in patterns:
            if _is_tokenizer_dir(c):
                return c
    snapshots = _hf_hub_dir() / "models--Qwen--Qwen-Image" / "snapshots"
    for c in sorted(snapshots.glob("*/tokenizer")):
        if _is_tokenizer_dir(c):
            return c
    return bundled_tokenizer()


BUNDLED_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


def bundled_tokenizer() -> Path:
    """Qwen2.5's tokenizer files (Apache-2.0, the files every Qwen-Image text encoder uses), shipped in the package
    (``qwenstudio/data/qwen25_tokenizer``, vocab and merges gzip-compressed: 1.8 MB instead of 4.4 MB) and unpacked
    once into the qwenstudio cache; token ids are checked against an independent BPE in tests."""
    import gzip
    import os
    import shutil
    import tempfile
    from importlib.resources import files

    from ... import __version__
    from ...config import Settings

    src = Path(str(files("qwenstudio") / "data" / "qwen25_tokenizer"))
    dst = Settings.from_env().cache_dir / f"qwen25_tokenizer-{__version__}"
    if _is_tokenizer_dir(dst) and all((dst / n).is_file() for n in BUNDLED_TOKENIZER_FILES):
        return dst
    if not all((src / n).is_file() or (src / f"{n}.gz").is_file() for n in BUNDLED_TOKENIZER_FILES):
        raise ModelNotFound(f"the bundled tokenizer is missing from the installation ({src}); reinstall qwenstudio")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=dst.parent))
    try:
        for name in BUNDLED_TOKENIZER_FILES:
            if (src / f"{name}.gz").is_file():
                with gzip.open(src / f"{name}.gz", "rb") as fin, open(tmp / name, "wb") as fout:
                    shutil.copyfileobj(fin, fout)
            else:
                shutil.copyfile(src / name, tmp / name)
        os.replace(tmp, dst)
    except OSError:
        if not _is_tokenizer_dir(dst):  # another process won the race only if dst is complete
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def dit_format_name(quant: str | None) -> str:
    """The ``format`` a single-file DiT's metadata states: its 4-bit family, else "comfy"."""
    for prefix, name in (("svdq_", "nunchaku"), ("int4", "int4"), ("bnb_", "bitsandbytes")):
        if quant is not None and quant.startswith(prefix):
            return name
    return "comfy"


def load_single_files(
    dit: str | Path,
    text_encoder: str | Path,
    vae: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    device=None,
    dtype=None,
    vae_dtype=None,
) -> Components:
    """Three ComfyUI files + a tokenizer -> Components (identity format "comfy", or "gguf" for a GGUF DiT);
    ``vae_dtype``: the VAE's dtype when it differs from the rest."""
    device, dtype = _resolve(device, dtype)
    paths = [Path(dit), Path(text_encoder), Path(vae)]
    if tokenizer_dir is None or not _is_tokenizer_dir(Path(tokenizer_dir)):
        dirs = [Path(tokenizer_dir)] if tokenizer_dir is not None else []
        dirs += [p.parent for p in paths] + [p.parent.parent for p in paths]
        tokenizer_dir = find_tokenizer(list(dict.fromkeys(dirs)))
    tokenizer = load_tokenizer(Path(tokenizer_dir))  # fail fast, before the big files
    dit_info = detect(paths[0])
    is_gguf = dit_info.container == "gguf"
    if is_gguf:
        from .gguf import gguf_fingerprint, load_dit_gguf

        transformer = load_dit_gguf(paths[0], device=device, dtype=dtype)
    else:
        transformer = load_dit_file(paths[0], device=device, dtype=dtype)
    te = load_text_encoder_file(paths[1], device=device, dtype=dtype)
    vae_model = load_vae_file(paths[2], device=device, dtype=vae_dtype or dtype)
    identity = {
        "name": paths[0].stem,
        "format": "gguf" if is_gguf else dit_format_name(dit_info.quant),
        "class": "QwenImagePipeline",
        "files": [p.stem for p in paths],  # names, never paths: identity ends up in metadata and API responses
        "tokenizer": "bundled Qwen2.5" if Path(tokenizer_dir) == bundled_tokenizer() else "found beside the models",
        "fingerprint": gguf_fingerprint(paths[0]) if is_gguf else fingerprint(paths),
    }
    return Components(transformer=transformer, vae=vae_model, text_encoder=te,
                      tokenizer=tokenizer, scheduler_config=_scheduler_config(),
                      device=device, dtype=dtype, identity=identity)
