"""Convert the Qwen-Image DiT between layouts: diffusers folder <-> ComfyUI single file, and to fp8 / fp8 scaled.

Tensors are streamed one at a time into a safetensors file whose header is planned up front, so converting the 20B
DiT needs about one tensor of RAM, not 40 GB. Output goes to a temporary name, is validated by reading it back
(header, tensor count, shapes, dtypes, and that a model built from the file's own config is fully covered) and only
then renamed into place, so a crash or a bad conversion never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import CorruptFile, IncompatibleWeights, InvalidRequest, ModelNotFound
from .keymaps import CONFIG_METADATA_KEY, strip_dit_prefix

TARGETS = ("comfy", "diffusers", "fp8", "fp8_scaled", "fp8_scaled_legacy", "int4")
COMFY_PREFIX = "model.diffusion_model."
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_ST_NAMES = {"uint8": "U8", "int8": "I8", "bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64",
             "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32"}


def _torch_dtype(name: str | None):
    import torch

    if name is None:
        return None
    name = _DTYPE_NAMES.get(name, name)
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise InvalidRequest(f"unknown dtype '{name}'")
    return dt


@dataclass
class _Entry:
    key: str
    dtype: Any
    shape: tuple[int, ...]
    produce: Callable[[], Any]


def write_safetensors_stream(path: Path, entries: list[_Entry], metadata: dict[str, str]) -> None:
    """Write a safetensors file tensor by tensor (header computed from the plan; data in plan order)."""
    import torch

    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        n = torch.empty(0, dtype=e.dtype).element_size()
        for d in e.shape:
            n *= d
        header[e.key] = {"dtype": _ST_NAMES[str(e.dtype).replace("torch.", "")], "shape": list(e.shape),
                         "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    if raw and len(raw) & 0xFF == 0x80:
        # Pad so the length's first byte is not 0x80: loading.read_safetensors_header mistakes that for pickle.
        raw += b" " * 8
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            t = e.produce()
            if t.dtype != e.dtype or tuple(t.shape) != e.shape:
                raise CorruptFile(f"{path}: internal error, '{e.key}' produced {t.dtype}{tuple(t.shape)}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str]) -> Path:
    """Atomically write an in-memory dict of tensors (small files: tests, TE/VAE exports) with the stream writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    entries = [_Entry(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors.items()]
    write_safetensors_stream(tmp, entries, metadata)
    os.replace(tmp, path)
    return path


class _DitSource:
    """Read-only view of a DiT in any safetensors layout, in native (un-prefixed) names, fp8 dequantized on read."""

    def __init__(self, src: Path):
        from ..loading import component_files, read_json
        from .detect import detect

        if src.is_dir():
            folder = src / "transformer" if (src / "transformer").is_dir() else src
            self.files = component_files(folder)
            self.config = {k: v for k, v in read_json(folder / "config.json", "transformer config").items()
                           if not k.startswith("_")}
        elif src.is_file():
            info = detect(src)
            if info.role != "dit" or info.container != "safetensors":
                raise IncompatibleWeights(f"{src}: not a Qwen-Image DiT safetensors file (detected {info.role})")
            if info.quant is not None and not info.quant.startswith("fp8"):
                raise InvalidRequest(f"{src}: a {info.quant} file cannot be a conversion source (4-bit weights do not "
                                     "convert back losslessly); convert from the bf16/fp8 file or diffusers folder")
            from .keymaps import infer_dit_config

            self.files = [src]
            self.config = infer_dit_config({strip_dit_prefix(k): s for k, s in info.shapes.items()}, info.metadata)
        else:
            raise ModelNotFound(f"conversion source not found: {src}")
        from safetensors import safe_open

        self.where: dict[str, tuple[Path, str]] = {}
        self.dtypes: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for p in self.files:
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    sl = f.get_slice(k)
                    nk = strip_dit_prefix(k)
                    self.where[nk] = (p, k)
                    self.shapes[nk] = tuple(sl.get_shape())
                    self.dtypes[nk] = _torch_dtype(_st_to_torch(sl.get_dtype()))
        from .comfy_quant import FP8_FORMATS, check_supported, is_side_tensor, layer_formats

        self.weights = [k for k in self.where if not is_side_tensor(k)]
        self.formats: dict[str, str] = {}  # native layer -> ComfyUI per-layer format (uint8-stored fp8 included)
        for p in self.files:
            from ..loading import read_safetensors_header

            header = read_safetensors_header(p)
            meta = header.pop("__metadata__", None) or {}
            found = layer_formats(p, header, meta)
            check_supported(found, str(p))
            self.formats.update({strip_dit_prefix(k): v for k, v in found.items()})
        self.fp8_views = {layer: _torch_dtype(FP8_FORMATS[f]) for layer, f in self.formats.items()}

    def _raw(self, key: str):
        from safetensors import safe_open

        p, k = self.where[key]
        with safe_open(str(p), framework="pt") as f:
            return f.get_tensor(k)

    def get(self, key: str):
        """The tensor as stored, except fp8 which comes back dequantized to fp32 (times its scale_weight)."""
        import torch

        from ..quant.fp8 import dequantize_fp8, is_fp8
        from .comfy_quant import WEIGHT_SCALE_SUFFIXES, side_key

        t = self._raw(key)
        layer = key.rsplit(".", 1)[0]
        if t.dtype == torch.uint8 and key.endswith(".weight") and layer in self.fp8_views:
            t = t.view(self.fp8_views[layer])
        if is_fp8(t.dtype):
            sk = side_key(self.where, layer, WEIGHT_SCALE_SUFFIXES)
            t = dequantize_fp8(t, self._raw(sk) if sk else None)
        return t

    def source_dtype(self):
        import torch

        from ..quant.fp8 import is_fp8

        counts: dict = {}
        for k in self.weights:
            n = 1
            for d in self.shapes[k]:
                n *= d
            dt = self.fp8_views.get(k.rsplit(".", 1)[0], self.dtypes[k]) if k.endswith(".weight") else self.dtypes[k]
            counts[dt] = counts.get(dt, 0) + n
        dt = max(counts, key=counts.get)
        return torch.bfloat16 if is_fp8(dt) else dt


def _st_to_torch(st: str) -> str:
    return {v: k for k, v in _ST_NAMES.items()}.get(st, st.lower())


def _plan(src: _DitSource, to: str, *, prefix: str, dtype, fp8_dtype, keep, scale_input: bool) -> list[_Entry]:
    """Entries in file order. ``fp8_scaled`` is ComfyUI's per-layer format (``weight_scale`` + ``comfy_quant`` on
    each fp8 layer only); ``fp8_scaled_legacy`` the older ``scale_weight`` + ``scaled_fp8`` marker layout."""
    import torch

    from ..quant.fp8 import keep_high_precision, quantize_fp8
    from .comfy_quant import encode_layer_conf

    entries: list[_Entry] = []
    fmt = str(fp8_dtype).replace("torch.", "")
    for k in sorted(src.weights):
        shape = src.shapes[k]
        if to == "int4" and _int4_layer(k, shape, keep):
            entries += _int4_entries(src, k, prefix)
            continue
        fp8 = (to in ("fp8", "fp8_scaled", "fp8_scaled_legacy") and k.endswith(".weight") and len(shape) == 2
               and not keep_high_precision(k, keep))
        if not fp8:
            entries.append(_Entry(prefix + k, dtype, shape, lambda k=k: src.get(k).to(dtype)))
            continue
        layer = k[: -len(".weight")]
        if to == "fp8_scaled":
            cache_pl: dict = {}

            def quant_pl(k=k, cache=cache_pl):
                q, s = quantize_fp8(src.get(k), True, fp8_dtype)
                cache["scale"] = s
                return q

            conf = encode_layer_conf({"format": fmt})
            entries.append(_Entry(prefix + k, fp8_dtype, shape, quant_pl))
            entries.append(_Entry(f"{prefix}{layer}.weight_scale", torch.float32, (), lambda c=cache_pl: c.pop("scale")))
            entries.append(_Entry(f"{prefix}{layer}.comfy_quant", torch.uint8, tuple(conf.shape), lambda c=conf: c))
            continue
        scaled = to == "fp8_scaled_legacy"
        cache: dict = {}

        def quant(k=k, cache=cache, scaled=scaled):
            q, s = quantize_fp8(src.get(k), scaled, fp8_dtype)
            cache["scale"] = s
            return q

        entries.append(_Entry(prefix + k, fp8_dtype, shape, quant))
        if scaled:  # after the weight in file order: its producer fills the cache
            entries.append(_Entry(f"{prefix}{layer}.scale_weight", torch.float32, (), lambda c=cache: c.pop("scale")))
            if scale_input:
                entries.append(_Entry(f"{prefix}{layer}.scale_input", torch.float32, (),
                                      lambda: torch.tensor(1.0, dtype=torch.float32)))
    if to == "fp8_scaled_legacy":  # older ComfyUI's marker for scaled-fp8 checkpoints; its dtype names the format
        entries.append(_Entry(prefix + "scaled_fp8", fp8_dtype, (0,), lambda: torch.empty(0, dtype=fp8_dtype)))
    return entries


def _int4_layer(key: str, shape: tuple[int, ...], keep: tuple[str, ...]) -> bool:
    from ..quant.fp8 import keep_high_precision
    from ..quant.int4 import GROUP_SIZE

    return key.endswith(".weight") and len(shape) == 2 and shape[1] % GROUP_SIZE == 0 and not keep_high_precision(
        key, keep)


def _int4_entries(src: _DitSource, key: str, prefix: str) -> list[_Entry]:
    """``<layer>.weight`` -> ``weight_int4`` / ``weight_scale`` / ``weight_zero`` (quantized once, on first use)."""
    import torch

    from ..quant.int4 import GROUP_SIZE, quantize_int4

    n, k = src.shapes[key]
    cache: dict = {}

    def part(i: int):
        if not cache:
            cache["q"] = list(quantize_int4(src.get(key)))
        out = cache["q"][i]
        if i == 2:
            cache.clear()
        return out

    base = prefix + key
    return [_Entry(base + "_int4", torch.uint8, (n, k // 2), lambda: part(0)),
            _Entry(base + "_scale", torch.bfloat16, (n, k // GROUP_SIZE), lambda: part(1)),
            _Entry(base + "_zero", torch.bfloat16, (n, k // GROUP_SIZE), lambda: part(2))]


def _validate_file(path: Path, entries: list[_Entry], config: dict | None = None) -> None:
    """Read the written file back: same tensors/shapes/dtypes as planned, detected as a DiT, and a model built from the
    file's own config finds every parameter in it with the right shape."""
    from diffusers import QwenImageTransformer2DModel

    from ..loading import build_empty, read_safetensors_header
    from .detect import detect
    from .keymaps import infer_dit_config

    header = read_safetensors_header(path)
    header.pop("__metadata__", None)
    want = {e.key: (_ST_NAMES[str(e.dtype).replace("torch.", "")], list(e.shape)) for e in entries}
    got = {k: (v["dtype"], v["shape"]) for k, v in header.items()}
    if got != want:
        bad = sorted(set(got.items()) ^ {(k, (d, tuple(s))) for k, (d, s) in want.items()}, key=str)[:3]
        raise CorruptFile(f"{path}: written file does not match the plan ({len(got)} vs {len(want)} tensors; {bad})")
    info = detect(path)
    if info.role != "dit":
        raise CorruptFile(f"{path}: written file is not detected as a DiT (role {info.role})")
    shapes = {strip_dit_prefix(k): s for k, s in info.shapes.items()}
    for k, s in list(shapes.items()):  # int4 layers: the logical weight shape of the packed codes
        if k.endswith(".weight_int4"):
            shapes[k[: -len("_int4")]] = (s[0], s[1] * 2)
    config = config or infer_dit_config(shapes, info.metadata)
    model = build_empty(lambda: QwenImageTransformer2DModel.from_config(config))
    for k, p in model.state_dict().items():
        if p.device.type == "meta" and tuple(shapes.get(k, ())) != tuple(p.shape):
            raise CorruptFile(f"{path}: parameter '{k}' missing or mis-shaped after conversion")


def convert(
    src: str | Path,
    dst: str | Path,
    to: str,
    *,
    dtype: str | None = None,
    fp8_dtype: str = "float8_e4m3fn",
    prefix: bool = True,
    scale_input: bool = False,
    keep: tuple[str, ...] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a Qwen-Image DiT. ``to``: "comfy" (single file, ``model.diffusion_model.`` prefix unless
    ``prefix=False``), "fp8" / "fp8_scaled" (ComfyUI's per-layer format) / "fp8_scaled_legacy" (``scaled_fp8``
    marker layout) (single file; layers on ``keep`` stay in ``dtype``, default bf16),
    "diffusers" (a transformer folder: config.json + diffusion_pytorch_model.safetensors). ``src``: a diffusers
    folder (or its transformer/ folder) or a single file. High-precision output keeps the source dtype unless
    ``dtype`` is given (fp8 sources become bf16). Returns ``dst``."""
    from ..quant.fp8 import FP8_DTYPES, FP8_KEEP_HIGH_PRECISION

    if to not in TARGETS:
        raise InvalidRequest(f"unknown conversion target '{to}'; valid: {', '.join(TARGETS)}")
    if fp8_dtype not in FP8_DTYPES:
        raise InvalidRequest(f"unknown fp8 dtype '{fp8_dtype}'; valid: {', '.join(FP8_DTYPES)}")
    if scale_input and to != "fp8_scaled_legacy":
        raise InvalidRequest(
            "scale_input is written only by the legacy layout (--to fp8_scaled_legacy): ComfyUI's per-layer format "
            "uses input_scale to quantize activations, and an uncalibrated 1.0 there would cost precision"
        )
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise InvalidRequest(f"{dst} already exists (pass overwrite=True to replace it)")
    source = _DitSource(src)
    out_dtype = _torch_dtype(dtype) or (source.source_dtype() if to in ("comfy", "diffusers") else _torch_dtype("bf16"))
    pre = COMFY_PREFIX if prefix and to != "diffusers" else ""
    entries = _plan(source, to, prefix=pre, dtype=out_dtype, fp8_dtype=FP8_DTYPES[fp8_dtype],
                    keep=FP8_KEEP_HIGH_PRECISION if keep is None else tuple(keep), scale_input=scale_input)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(source.config), "qwenstudio.converted_to": to,
                "qwenstudio.source": src.name}
    if to == "fp8_scaled":  # the same per-layer table in the header, names relative to the DiT (ComfyUI >= 0.3.7x)
        from .comfy_quant import METADATA_KEY, quantization_metadata

        layers = {e.key[len(pre): -len(".comfy_quant")]: {"format": fp8_dtype} for e in entries
                  if e.key.endswith(".comfy_quant")}
        metadata[METADATA_KEY] = quantization_metadata(layers)
    if to == "int4":
        metadata["qwenstudio.quant"] = "int4_g64"
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        if to == "diffusers":
            tmp.mkdir()
            weights = tmp / "diffusion_pytorch_model.safetensors"
            write_safetensors_stream(weights, entries, {"format": "pt"})
            config = {"_class_name": "QwenImageTransformer2DModel", **source.config}
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            _validate_file(weights, entries, source.config)
        else:
            write_safetensors_stream(tmp, entries, metadata)
            _validate_file(tmp, entries)
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
    return dst
