"""GGUF files of the Qwen-Image DiT (city96 / QuantStack conversions, and our own ``convert --to gguf_*``).

Reading: tensors are memory-mapped by gguf-py's ``GGUFReader``; quantized ones go into ``GGUFLinear`` layers as raw
bytes (the model is never inflated), float ones (F32/F16/BF16: norms, biases, small layers) become ordinary
parameters in the target dtype. GGUF stores dimensions innermost-first (ggml ``ne`` order), so the logical torch
shape is the reverse, unless ComfyUI's ``comfy.gguf.orig_shape.<name>`` metadata says otherwise.
Writing streams one tensor at a time (tensor infos first, then data), so converting needs ~one tensor of RAM.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ...errors import CorruptFile, IncompatibleWeights, ModelNotFound, UnsupportedFormat
from .keymaps import CONFIG_METADATA_KEY, infer_dit_config, strip_dit_prefix

GGUF_MAGIC = b"GGUF"
ARCH = "qwen_image"
_GENERIC_ARCHES = (None, "", ARCH, "pig", "cow")  # 'pig'/'cow': city96's pre-arch-field conversions
_REQUIRED = ("img_in.weight", "txt_in.weight", "proj_out.weight", "transformer_blocks.0.attn.norm_q.weight")
WRITABLE_QTYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "F16", "BF16", "F32")
K_QTYPES = ("Q4_K", "Q5_K", "Q6_K")  # encoded by quant/kquant.py (gguf-py cannot quantize to K-types)

TensorEntry = tuple  # (qtype id: int, logical shape: tuple[int, ...], raw: np.ndarray)


# ---- reading ----------------------------------------------------------------------------------------------------

def _open_reader(path: Path):
    import gguf

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelNotFound(f"{path}: cannot read ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise UnsupportedFormat(f"{path}: not a GGUF file (magic {magic!r})")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OverflowError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CorruptFile(f"{path}: malformed or truncated GGUF file ({e})") from None


def _field(reader, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def read_gguf(path: str | os.PathLike) -> tuple[str | None, dict[str, TensorEntry], dict[str, Any]]:
    """Open a Qwen-Image DiT GGUF: ``(arch, {un-prefixed name: (qtype, shape, raw array)}, metadata)``.
    Raw arrays are read-only memory maps: uint8 blocks for quantized/BF16 tensors, float arrays otherwise."""
    from ..quant.gguf_linear import QTYPES

    path = Path(path)
    reader = _open_reader(path)
    size = path.stat().st_size
    arch = _field(reader, "general.architecture")
    if arch not in _GENERIC_ARCHES:  # checked before reading metadata: an LLM's vocabulary list is large
        raise IncompatibleWeights(f"{path}: GGUF architecture is {arch!r}, not Qwen-Image ({ARCH!r})")
    metadata = {k: _field(reader, k) for k in reader.fields if not k.startswith("GGUF.")}
    tensors: dict[str, TensorEntry] = {}
    for t in reader.tensors:
        qtype = int(t.tensor_type)
        if qtype not in QTYPES:
            raise UnsupportedFormat(f"{path}: tensor '{t.name}' has GGUF type {t.tensor_type.name}, not supported")
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise CorruptFile(f"{path}: tensor '{t.name}' lies outside the file (truncated download?)")
        orig = metadata.get(f"comfy.gguf.orig_shape.{t.name}")
        shape = tuple(int(v) for v in orig) if orig else tuple(int(v) for v in reversed(t.shape.tolist()))
        raw = t.data if QTYPES[qtype][1] > 1 or qtype == 30 else t.data.reshape(shape)
        tensors[strip_dit_prefix(t.name)] = (qtype, shape, raw)
    missing = [k for k in _REQUIRED if k not in tensors]
    if missing:
        raise IncompatibleWeights(
            f"{path}: not a Qwen-Image transformer GGUF (arch {arch!r}; missing {', '.join(missing)})"
        )
    return arch, tensors, metadata


def gguf_quant_summary(path: str | os.PathLike) -> str:
    """Dominant tensor type by element count among matrices (e.g. 'Q4_K'), for model listings."""
    from ..quant.gguf_linear import qtype_name

    _, tensors, _ = read_gguf(path)
    counts: Counter[str] = Counter()
    for qtype, shape, _raw in tensors.values():
        if len(shape) >= 2:
            n = 1
            for s in shape:
                n *= s
            counts[qtype_name(qtype)] += n
    return counts.most_common(1)[0][0] if counts else "F32"


def gguf_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a GGUF file (name, size, first and last MiB), like ``loading.fingerprint`` for safetensors."""
    import hashlib

    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(2**20))
        f.seek(max(0, size - 2**20))
        h.update(f.read(2**20))
    return h.hexdigest()[:16]


def _torch_tensors(tensors: Mapping[str, TensorEntry], model) -> Iterator[tuple[str, Any]]:
    """(name, torch tensor) one at a time: raw bytes for GGUFLinear weights, float tensors for everything else
    (a quantized tensor that is not a swapped Linear weight is dequantized here, once)."""
    import numpy as np
    import torch

    from ..quant.gguf_linear import FLOAT_QTYPES, GGUFLinear, dequantize

    quantized_layers = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    for name, (qtype, shape, raw) in tensors.items():
        data = torch.from_numpy(np.array(raw))  # copy out of the read-only memory map
        if name in quantized_layers:
            yield name, data
        elif qtype in FLOAT_QTYPES and qtype != 30:
            yield name, data.reshape(shape)
        else:
            yield name, dequantize(data, qtype, shape)


def load_dit_gguf(path: str | os.PathLike, *, device=None, dtype=None):
    """A ``QwenImageTransformer2DModel`` from a GGUF file, quantized layers kept quantized (see module doc).
    The config comes from our metadata key when present, else is inferred from tensor shapes."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from ..loading import build_empty, default_device, default_dtype, fill_module
    from ..quant.gguf_linear import swap_linears_to_gguf

    path = Path(path)
    _, tensors, metadata = read_gguf(path)
    try:
        config = infer_dit_config({k: v[1] for k, v in tensors.items()}, metadata)
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise IncompatibleWeights(f"{path}: cannot work out the transformer config ({e})") from None
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    model = build_empty(lambda: QwenImageTransformer2DModel.from_config(config))
    swap_linears_to_gguf(model, tensors)
    fill_module(model, _torch_tensors(tensors, model), dtype=dtype, device=device, name=f"transformer ({path})")
    return model.eval()


# ---- writing ----------------------------------------------------------------------------------------------------

def _source(src) -> tuple[dict, Any, Any]:
    """(config or None, keys, get(key) -> tensor) for a state dict, a diffusers folder or its transformer folder."""
    if isinstance(src, Mapping):
        return None, list(src.keys()), src.__getitem__
    from safetensors import safe_open

    from ..loading import component_files, read_json

    folder = Path(src)
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    config = read_json(folder / "config.json", "transformer config")
    index = {}
    for f in component_files(folder):
        with safe_open(str(f), framework="pt") as h:
            index.update(dict.fromkeys(h.keys(), f))

    def get(key: str):
        with safe_open(str(index[key]), framework="pt") as h:
            return h.get_tensor(key)

    return config, list(index), get


def _plan_qtype(key: str, shape: tuple[int, ...], qtype: str, keep_f32: tuple[str, ...]) -> str:
    """city96's convert policy: 1-D tensors (norms, biases) and ``keep_f32`` keys in F32; rows that are not whole
    blocks fall back to Q8_0 (K-types: what llama.cpp's quantizer does with odd-shaped rows) or F16."""
    from ..quant.gguf_linear import QTYPES, qtype_id

    if len(shape) <= 1 or any(s in key for s in keep_f32):
        return "F32"
    if shape[-1] % QTYPES[qtype_id(qtype)][1]:
        return "Q8_0" if qtype in K_QTYPES and shape[-1] % 32 == 0 else "F16"
    return qtype


def write_dit_gguf(
    src,
    dst: str | os.PathLike,
    qtype: str = "Q8_0",
    keep_f32: tuple[str, ...] = (),
    *,
    config: dict | None = None,
) -> Path:
    """Write the DiT as a GGUF (arch ``qwen_image``, un-prefixed diffusers names, config in metadata) from a state
    dict or a diffusers folder. ``qtype``: one of WRITABLE_QTYPES (K-types via quant/kquant.py, the rest via
    gguf-py). Written to a temp file, then renamed."""
    import gguf
    import numpy as np

    qtype = qtype.upper()
    if qtype not in WRITABLE_QTYPES:
        raise UnsupportedFormat(f"cannot write GGUF type {qtype}; supported: {', '.join(WRITABLE_QTYPES)}")
    folder_config, keys, get = _source(src)
    if config is None and folder_config is None:  # a bare state dict: sizes from shapes (our metadata wins later)
        folder_config = infer_dit_config({strip_dit_prefix(k): tuple(get(k).shape) for k in keys})
    config = config or folder_config
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=dst.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch=ARCH)
        w.add_string(CONFIG_METADATA_KEY, json.dumps(config))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        plan = []
        for k in keys:
            t = get(k)
            name, shape = strip_dit_prefix(k), tuple(t.shape)
            qt = gguf.GGMLQuantizationType[_plan_qtype(name, shape, qtype, keep_f32)]
            block, size = gguf.GGML_QUANT_SIZES[qt]
            nbytes = int(np.prod(shape)) // block * size
            if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                w.add_tensor_info(name, shape, np.float32 if qt == 0 else np.float16, nbytes)
            else:
                w.add_tensor_info(name, shape, np.float32, nbytes, raw_dtype=qt)
            plan.append((k, qt))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        from ..quant.kquant import quantize as kquantize

        for k, qt in plan:
            data = get(k).detach().to("cpu").float().numpy()
            w.write_tensor_data(kquantize(data, qt.name) if qt.name in K_QTYPES else gguf.quants.quantize(data, qt))
        w.close()
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


__all__ = [
    "ARCH",
    "WRITABLE_QTYPES",
    "gguf_fingerprint",
    "gguf_quant_summary",
    "load_dit_gguf",
    "read_gguf",
    "write_dit_gguf",
]
