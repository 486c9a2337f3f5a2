"""``--quant nf4``: bitsandbytes NF4 applied to a loaded float DiT, as diffusers' bitsandbytes quantizer does it.

What ``QwenImageTransformer2DModel.from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPE, llm_int8_skip_modules=KEEP))`` builds: every
``nn.Linear`` outside ``KEEP`` becomes ``bnb.nn.Linear4bit(compute_dtype=DTYPE, compress_statistics=False,
quant_type="nf4")`` whose weight is ``bnb.nn.Params4bit(w, requires_grad=False, **template.__dict__).to(device)``
(diffusers' ``create_quantized_param``): absmax per block of 64, no double quantization, uint8 storage. ``KEEP`` is
our weight keep-list (the small sensitive layers every other quantizer here keeps bf16; diffusers' default keeps
none). Why bitsandbytes and not our own NF4: it is the format NF4 users already have, with its kernels.

Where it runs: CUDA, and the CPU with bitsandbytes >= 0.47 (the first release whose README marks 4-bit as supported
on x86-64 CPUs; 0.46 called it partial). diffusers refuses its bitsandbytes quantizer without a GPU; we differ
because bitsandbytes itself runs these layers on the CPU (quantize, dequantize and matmul kernels in
``bitsandbytes/backends/cpu``), so an NF4 file is usable, and testable, on any x86/arm CPU. Other devices (mps,
xpu) are refused: not run here. One CPU detail: on AVX512-bf16 CPUs bitsandbytes >= 0.49 repacks a layer's codes
in place on its first forward for a fused kernel that computes in bf16 whatever the compute dtype.
``quantize_model_nf4`` / the NF4 file loader switch that off per layer (``support_avx512bf16_for_cpu = False``):
the layer then dequantizes to the run's dtype and multiplies (fp32 stays fp32, so a LoRA on it equals the LoRA on
the dequantized weights), its stored layout never changes (dequantizing, ``state_dict``, ``.to(device)`` and
offload hooks see what was loaded), and in bf16 it measured faster than the fused kernel (0.27 vs 0.31 CPU-s, one
3072 -> 12288 layer on 580 tokens; README "4-bit bases").
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

NF4_BLOCKSIZE = 64  # bitsandbytes' 4-bit default (and diffusers')
CPU_MIN_VERSION = (0, 47)  # first bitsandbytes with 4-bit layers on the CPU
INSTALLED = "installed"  # nf4_support(bnb_version=...): read the installed version


def nf4_support(device, *, cuda_available: bool | None = None, bnb_version: str | None = INSTALLED) -> str | None:
    """Why ``--quant nf4`` / an NF4 file cannot run on ``device`` (None when it can). The facts (CUDA present, the
    installed bitsandbytes version, None = not installed) can be passed in, so the decision is testable anywhere."""
    kind = torch.device(device).type
    if bnb_version == INSTALLED:
        bnb_version = bitsandbytes_version()
    if kind not in ("cuda", "cpu"):
        return f"bitsandbytes 4-bit layers run on CUDA or the CPU here, not on {kind} (use --quant int4 there)"
    if kind == "cuda":
        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            return "no CUDA device is available (use --device cpu, or --quant int4)"
    if bnb_version is None:
        return "the 'bitsandbytes' package is not installed (pip install 'bitsandbytes>=0.47', or use --quant int4)"
    if kind == "cpu" and version_tuple(bnb_version) < CPU_MIN_VERSION:
        return (f"bitsandbytes {bnb_version} runs 4-bit layers on CUDA only; 0.47+ runs them on the CPU "
                "(pip install -U bitsandbytes, or use --quant int4)")
    return None


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.50.2"`` -> (0, 50); a pre/dev release (``0.47.0.dev0``, ``0.47rc1``) counts as its release."""
    import re

    return tuple(int(n) for n in re.findall(r"\d+", version)[:2])


def mute_kernels_notice() -> None:
    """Silence one bitsandbytes import-time log line (idempotent; before bitsandbytes is imported — diffusers imports
    it with its model classes when it is installed). On AVX512-bf16 CPUs its CPU backend logs that the optional
    ``kernels`` package (a faster fused kernel) is missing; that kernel serves only the repacked path our layers
    switch off (``keep_codes_as_stored``), so for qwenstudio the line is noise, and it would land in CLI output."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def import_bitsandbytes():
    mute_kernels_notice()
    import bitsandbytes

    return bitsandbytes


def keep_codes_as_stored(layer) -> None:
    """Stop bitsandbytes' in-place CPU repack of this ``Linear4bit`` (see the module docstring for why)."""
    layer.support_avx512bf16_for_cpu = False


def quantize_model_nf4(model: nn.Module, *, device, compute_dtype: torch.dtype,
                       keep: tuple[str, ...] | None = None) -> list[str]:
    """Replace the float ``nn.Linear`` layers of ``model`` (outside ``keep``) by NF4 ``bnb.nn.Linear4bit`` on
    ``device``, in place; returns the names quantized. The engine checks ``nf4_support`` first."""
    bnb = import_bitsandbytes()

    from .fp8 import FP8_KEEP_HIGH_PRECISION, keep_high_precision

    keep = FP8_KEEP_HIGH_PRECISION if keep is None else keep
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not keep_high_precision(n, keep)]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=compute_dtype, compress_statistics=False, quant_type="nf4",
                                quant_storage=torch.uint8, device="meta")
        template = new.weight.__dict__
        new.weight = bnb.nn.Params4bit(old.weight.detach().to("cpu"), requires_grad=False, **template).to(device)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().to(device), requires_grad=False)
        keep_codes_as_stored(new)
        setattr(parent, leaf, new)
    return names


def nf4_dequantized_weight(module, dtype=torch.float32) -> torch.Tensor:
    """The float weight a bitsandbytes ``Linear4bit`` multiplies a ``dtype`` input by (what a LoRA-equivalence check
    compares against): the dequantization its inference matmul runs (``gemm_4bit``'s default implementation:
    double-quantized absmax restored in fp32, then the codes straight to ``dtype``). Not
    ``bnb.functional.dequantize_4bit``: that returns the dtype of the weight the file was quantized from (bf16 for
    diffusers' files), one rounding more than the layer does."""
    bnb = import_bitsandbytes()
    ops = torch.ops.bitsandbytes

    w = module.weight
    qs = w.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("this 4-bit weight was repacked for bitsandbytes' fused CPU kernel (a layer not built by "
                         "qwenstudio); dequantize it before its first forward")
    absmax = qs.absmax
    if qs.nested:
        absmax = ops.dequantize_blockwise.default(absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize,
                                                  torch.float32) + qs.offset
    del bnb  # imported for its ops' registration
    return ops.dequantize_4bit.default(w.data, absmax, qs.blocksize, qs.quant_type, qs.shape, dtype)


def bitsandbytes_version() -> str | None:
    """The installed bitsandbytes version without importing it (its import loads native libraries and logs)."""
    from importlib.metadata import PackageNotFoundError, version

    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None
