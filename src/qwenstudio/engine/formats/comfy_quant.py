"""ComfyUI's per-layer quantization format (QUANTIZATION.md, ``comfy/quant_ops.py``), read and written.

Current ComfyUI marks each quantized Linear with ``<layer>.comfy_quant`` (a uint8 tensor holding JSON such as
``{"format": "float8_e4m3fn"}``) next to ``<layer>.weight`` (fp8, or uint8 bytes of fp8) and ``<layer>.weight_scale``
(fp32: real weight = ``weight.float() * weight_scale``), optionally ``<layer>.input_scale``; the same per-layer
table may sit in the safetensors metadata as ``_quantization_metadata`` = ``{"format_version", "layers": {...}}``.
Layers without an entry are plain high-precision weights, so a mixed file says exactly which layers are fp8 — unlike
the older ``scaled_fp8`` marker, which older ComfyUI applied to the whole model. Both layouts are read here; the old
one's ``scale_weight`` / ``scale_input`` are the same numbers under other names.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import CorruptFile, UnsupportedFormat

QUANT_CONF_SUFFIX = ".comfy_quant"
METADATA_KEY = "_quantization_metadata"
FORMAT_VERSION = "1.0"
# Format name -> fp8 torch dtype name; the other ComfyUI formats (nvfp4, mxfp8, int8_tensorwise, convrot_w4a4) need
# kernels or rotations this loader does not have and are refused by name.
FP8_FORMATS = {"float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2"}
# Every per-layer side tensor of either layout: never a model parameter of its own.
SIDE_SUFFIXES = (QUANT_CONF_SUFFIX, ".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale",
                 ".scale_weight", ".scale_input")
WEIGHT_SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
INPUT_SCALE_SUFFIXES = (".input_scale", ".scale_input")


def is_side_tensor(key: str) -> bool:
    """True for scales, per-layer configs and the ``scaled_fp8`` marker (bookkeeping, not weights)."""
    return key.endswith(SIDE_SUFFIXES) or key.endswith("scaled_fp8")


def encode_layer_conf(conf: dict):
    """``<layer>.comfy_quant`` as ComfyUI writes it: the JSON's UTF-8 bytes in a 1-D uint8 tensor."""
    import torch

    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def decode_layer_conf(tensor, *, where: str) -> dict:
    try:
        conf = json.loads(bytes(tensor.reshape(-1).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CorruptFile(f"{where}: '.comfy_quant' is not JSON") from None
    if not isinstance(conf, dict):
        raise CorruptFile(f"{where}: '.comfy_quant' is {type(conf).__name__}, not an object")
    return conf


def layer_formats(path: str | Path, keys, metadata: dict) -> dict[str, str]:
    """File layer prefix (e.g. ``model.diffusion_model.transformer_blocks.0.attn.to_q``) -> ComfyUI format name,
    from the per-layer ``comfy_quant`` tensors and the ``_quantization_metadata`` table (names there may omit the
    file's prefix). Empty for files of the older layout."""
    from safetensors import safe_open

    keys = list(keys)
    out: dict[str, str] = {}
    confs = [k for k in keys if k.endswith(QUANT_CONF_SUFFIX)]
    if confs:
        with safe_open(str(path), framework="pt") as f:
            for k in confs:
                conf = decode_layer_conf(f.get_tensor(k), where=f"{Path(path).name}: {k}")
                out[k[: -len(QUANT_CONF_SUFFIX)]] = str(conf.get("format"))
    raw = metadata.get(METADATA_KEY)
    if raw:
        try:
            layers = json.loads(raw)["layers"]
        except (ValueError, KeyError, TypeError):
            raise CorruptFile(f"{Path(path).name}: metadata '{METADATA_KEY}' has no 'layers' table") from None
        weights = {k[: -len(".weight")] for k in keys if k.endswith(".weight")}
        for name, conf in layers.items():
            fmt = str(conf.get("format")) if isinstance(conf, dict) else str(conf)
            hit = name if name in weights else next((w for w in weights if w.endswith("." + name)), None)
            if hit is not None:
                out.setdefault(hit, fmt)
    return out


def check_supported(formats: dict[str, str], where: str) -> None:
    bad = sorted({f for f in formats.values() if f not in FP8_FORMATS})
    if bad:
        layer = next(k for k, f in formats.items() if f == bad[0])
        raise UnsupportedFormat(
            f"{where}: ComfyUI quantization format {', '.join(bad)} (e.g. layer '{layer}') is not supported; "
            f"readable: {', '.join(FP8_FORMATS)} (and GGUF)"
        )


def side_key(keys, layer: str, suffixes: tuple[str, ...]) -> str | None:
    """The first of ``<layer><suffix>`` present in ``keys``."""
    return next((layer + s for s in suffixes if layer + s in keys), None)


def quantization_metadata(layers: dict[str, dict]) -> str:
    """The ``_quantization_metadata`` JSON for the safetensors header."""
    return json.dumps({"format_version": FORMAT_VERSION, "layers": layers})
