"""The compute dtype when the user does not choose one (``--dtype``), and why.

CUDA: bf16, what the weights are trained and shipped in. CPU: bf16 too when the CPU multiplies bf16 natively
(AVX512-BF16 or AMX: oneDNN runs a bf16 matmul 2.6x faster than fp32 on this kind of machine, measured on a
580x3072 @ 3072x12288 product) *and* the DiT's weights are stored in 16 bits or fewer as bf16/fp8/quantized blocks —
the published files are bf16 — so computing in fp32 would only upcast weights that carry no more precision, at twice
the memory. Otherwise (fp32 or fp16 files, CPUs without native bf16) fp32: an fp16 weight loses mantissa in bf16,
and emulated bf16 is slower than fp32. The VAE stays fp32 beside a bf16 DiT on a CPU: it is small, and decoding in
bf16 moved pixels by up to 5/255 on the shape-true bench where the bf16 DiT alone moved them by 2/255. The choice
and its reason are recorded in every image's metadata
(``model.dtype_reason``); ``--dtype float32`` gives the fp32 computation back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# safetensors dtypes whose values bf16 holds exactly (fp8) or that is bf16 itself
_BF16_EXACT = ("BF16", "F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class Precision:
    dtype: Any
    reason: str
    vae_dtype: Any = None  # None: the same as ``dtype``


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 / AMX on x86 (torch exposes no public query: the checks live under ``torch.cpu``, looked up
    defensively so a torch that renames them gives fp32, never an error)."""
    import torch

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, name, None)
        try:
            if check is not None and check():
                return True
        except (RuntimeError, AttributeError):
            continue
    return False


def stored_weight_kind(source) -> str:
    """How the DiT's weights are stored: ``bf16`` (bf16 or fp8 tensors: exact in bf16), ``quantized`` (GGUF, int4,
    SVDQuant blocks), ``fp16``, ``fp32`` or ``unknown`` (built in memory). From file headers only."""
    from ..errors import QwenStudioError

    try:
        return _stored_weight_kind(source)
    except QwenStudioError:  # a broken folder/file: the loader reports it, with its own message
        return "unknown"


def _stored_weight_kind(source) -> str:
    from .loading import component_files, read_safetensors_header

    dit = getattr(source, "dit", None)
    if dit is not None and dit.quant:
        return "fp8" if dit.quant.startswith("fp8") else "quantized"
    if dit is not None and dit.container == "gguf":  # unquantized GGUF: F16/BF16/F32 blocks
        return {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}.get(str(dit.dtype).upper(), "unknown")
    folder = getattr(source, "folder", None)
    files = [dit.path] if dit is not None else component_files(folder / "transformer") if folder else []
    by_dtype: dict[str, int] = {}
    for f in files:
        for key, info in read_safetensors_header(f).items():
            if key == "__metadata__":
                continue
            n = 1
            for d in info["shape"]:
                n *= d
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + n
    floats = {k: v for k, v in by_dtype.items() if k in ("F32", "F64", "F16", *_BF16_EXACT)}
    if not floats:
        return "quantized" if by_dtype else "unknown"
    main = max(floats, key=floats.get)
    return {"F32": "fp32", "F64": "fp32", "F16": "fp16"}.get(main, "bf16" if main == "BF16" else "fp8")


def default_precision(device, stored: str = "unknown", *, native_bf16: bool | None = None) -> Precision:
    """The compute dtype for ``device`` and weights stored as ``stored`` (see the module docstring)."""
    import torch

    if torch.device(device).type == "cuda":
        return Precision(torch.bfloat16, "bf16: the default on CUDA")
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    if stored in ("bf16", "fp8", "quantized") and native:
        return Precision(torch.bfloat16, f"bf16: the weights are stored as {stored} and this CPU multiplies bf16 "
                                         "natively; VAE in fp32 (--dtype float32 computes all in fp32)",
                         vae_dtype=torch.float32)
    why = ("the weights are stored in " + stored) if stored in ("fp32", "fp16") else (
        "this CPU has no native bf16" if not native else "the weights' precision is unknown")
    return Precision(torch.float32, f"fp32: {why}")
