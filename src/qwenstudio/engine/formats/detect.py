"""What is this file? Decided by CONTENT (magic bytes, header, key names), never by its extension.

People download checkpoints under any name; a ``.safetensors`` may be a renamed pickle and a ``.ckpt`` may be
safetensors. Pickles are recognised from their first bytes and refused without ever being unpickled. The role
(DiT, text encoder, VAE, LoRA, ControlNet) comes from key names, so a file of another architecture is "unknown"
and loaders can name it in an IncompatibleWeights error instead of failing deep inside a model.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import CorruptFile, ModelNotFound, UnsupportedFormat
from ..loading import looks_like_pickle, read_safetensors_header
from .comfy_quant import is_side_tensor
from .keymaps import dit_prefix
from .nunchaku import svdquant_kind

ROLES = ("dit", "text_encoder", "vae", "lora", "controlnet", "unknown")

_ST_DTYPES = {
    "BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64",
    "F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2",
    "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool",
}
_LORA_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up", ".alpha", "hada_", "lokr_", "lora.down", "lora.up")


@dataclass
class FileInfo:
    """Summary of one weights file, cheap to compute (header only, no tensor data read)."""

    path: Path
    container: str  # "safetensors" | "gguf"
    role: str  # one of ROLES
    dtype: str  # dominant weight dtype: "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2", or a GGUF type ("Q4_K")
    quant: str | None  # "fp8", "fp8_scaled", a GGUF quant type name, or None
    prefix: str  # key prefix in front of the role's native names ("model.diffusion_model." ...)
    size_bytes: int
    n_tensors: int
    arch: str | None = None  # GGUF general.architecture
    metadata: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict, repr=False)  # key -> shape, as in the file


def detect(path: str | Path) -> FileInfo:
    """Identify a weights file by content. Pickle/zip → UnsupportedFormat; truncated/garbage → CorruptFile."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"weights file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF":
        return _detect_gguf(path, size)
    if looks_like_pickle(head, size):
        raise UnsupportedFormat(
            f"{path} is a pickle checkpoint; it is never unpickled. Convert it to safetensors "
            "(load it yourself in a trusted environment and save with safetensors.torch.save_file)."
        )
    header = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    dtypes = {k: v["dtype"] for k, v in header.items()}
    role, prefix = classify(shapes)
    dtype = _dominant_dtype({k: (_ST_DTYPES.get(dtypes[k], dtypes[k].lower()), _numel(s)) for k, s in shapes.items()})
    quant = None  # fp8 if any weight is fp8, even where bf16 embeddings dominate (small fp8 text encoders)
    if any(k.endswith(".comfy_quant") for k in shapes) or "_quantization_metadata" in metadata:
        quant = "fp8_scaled"  # ComfyUI's per-layer format (formats/comfy_quant.py); its loader checks each format
    elif any(dtypes[k].startswith("F8_") and not k.endswith("scaled_fp8") for k in shapes):
        scaled = any(k.endswith((".scale_weight", ".weight_scale", "scaled_fp8")) for k in shapes)
        quant = "fp8_scaled" if scaled else "fp8"
    four_bit = four_bit_kind(dtypes, shapes, metadata)
    if four_bit is not None:  # 4-bit files: name the format, not the container dtype of the packed codes
        quant, dtype = four_bit
    return FileInfo(path, "safetensors", role, dtype, quant, prefix, size, len(shapes), None, metadata, shapes)


def four_bit_kind(dtypes: dict[str, str], shapes: dict, metadata: dict) -> tuple[str, str] | None:
    """(quant, dtype) of a 4-bit safetensors DiT: nunchaku SVDQuant, our groupwise int4, bitsandbytes NF4/FP4."""
    svdq = svdquant_kind(dtypes, shapes)
    if svdq is not None:
        return svdq
    if any(k.endswith(".weight_int4") for k in shapes):
        return metadata.get("qwenstudio.quant", "int4_g64"), "int4"
    bnb = next((k.rsplit("bitsandbytes__", 1)[1] for k in shapes if ".quant_state.bitsandbytes__" in k), None)
    if bnb is not None:
        return f"bnb_{bnb}", bnb
    return None


def _detect_gguf(path: Path, size: int) -> FileInfo:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError/struct.error/IndexError on truncated or garbage files
        raise CorruptFile(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = None
    field_ = reader.fields.get("general.architecture")
    if field_ is not None:
        arch = bytes(field_.parts[field_.data[0]]).decode("utf-8", "replace")
    # GGUF stores dims fastest-first; reverse to the PyTorch order.
    shapes = {t.name: tuple(int(d) for d in reversed(list(t.shape))) for t in reader.tensors}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    role, prefix = classify(shapes)
    if arch and role == "unknown" and arch.lower().startswith("qwen_image"):
        role = "dit"
    dominant = _dominant_dtype({k: (types[k], _numel(s)) for k, s in shapes.items()})
    gguf_float = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
    dtype = gguf_float.get(dominant, dominant)
    quant = None if dominant in gguf_float else dominant
    return FileInfo(path, "gguf", role, dtype, quant, prefix, size, len(shapes), arch, {}, shapes)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _dominant_dtype(entries: dict[str, tuple[str, int]]) -> str:
    """The dtype holding most elements among matrix-like weights (ignores scales, norms and biases)."""
    counts: Counter = Counter()
    for key, (dt, n) in entries.items():
        if is_side_tensor(key):
            continue
        counts[dt] += n
    return counts.most_common(1)[0][0] if counts else "unknown"


_TE_RE = re.compile(r"^(.*?)(?:model\.(?:language_model\.)?layers\.\d+\.|visual\.blocks\.\d+\.|model\.visual\.blocks\.\d+\.)")
_VAE_CONV_IN = ("decoder.conv_in.weight", "decoder.conv1.weight", "encoder.conv_in.weight", "encoder.conv1.weight")


def classify(shapes: dict[str, tuple[int, ...]]) -> tuple[str, str]:
    """(role, prefix) from key names (and conv ranks for the VAE)."""
    keys = list(shapes)
    if any(m in k for k in keys for m in _LORA_MARKERS):
        return "lora", _common_prefix_before(keys, ("transformer_blocks.", "diffusion_model.", "lora_unet_"))
    if any("controlnet_blocks." in k or "controlnet_x_embedder" in k for k in keys):
        return "controlnet", ""
    prefix = dit_prefix(keys)
    if any(k.endswith("img_in.weight") for k in keys) and any(
        re.search(r"transformer_blocks\.\d+\.(attn\.to_q|img_mod)", k) for k in keys
    ):
        return "dit", prefix
    for k in keys:
        m = _TE_RE.match(k)
        if m and ("self_attn" in k or "attn.qkv" in k or "mlp" in k):
            return "text_encoder", m.group(1)
    for k in keys:
        for name in _VAE_CONV_IN:
            if k.endswith(name) and len(shapes[k]) == 5:  # Qwen/Wan VAE convs are causal 3D (5-D weights)
                return "vae", k[: -len(name)]
    return "unknown", ""


def _common_prefix_before(keys: list[str], anchors: tuple[str, ...]) -> str:
    for k in keys:
        for a in anchors:
            i = k.find(a)
            if i > 0:
                return k[:i]
    return ""

