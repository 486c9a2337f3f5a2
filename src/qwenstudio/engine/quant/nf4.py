"""``--quant nf4``: bitsandbytes NF4 applied to a loaded float DiT, as diffusers' bitsandbytes quantizer does it.

What ``QwenImageTransformer2DModel.from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPE, llm_int8_skip_modules=KEEP))`` builds: every
``nn.Linear`` outside ``KEEP`` becomes ``bnb.nn.Linear4bit(compute_dtype=DTYPE, compress_statistics=False,
quant_type="nf4")`` whose weight is ``bnb.nn.Params4bit(w, requires_grad=False, **template.__dict__).to(device)``
(diffusers' ``create_quantized_param``): absmax per block of 64, no double quantization, uint8 storage. ``KEEP`` is
our weight keep-list (the small sensitive layers every other quantizer here keeps bf16; diffusers' default keeps
none). Why bitsandbytes and not our own NF4: it is the format NF4 users already have, with its CUDA kernels.

bitsandbytes 0.45+ also has a CPU backend, but diffusers refuses bitsandbytes 4-bit without a GPU, and so do we
(``nf4_support``): on CPU the portable ``--quant int4`` is the 4-bit path.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

NF4_BLOCKSIZE = 64  # bitsandbytes' 4-bit default (and diffusers')


def nf4_support(device, *, cuda_available: bool | None = None, bnb_installed: bool | None = None) -> str | None:
    """Why ``--quant nf4`` / an NF4 file cannot run on ``device`` (None when it can). The two facts can be passed in,
    so the decision is testable without a GPU."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if bnb_installed is None:
        bnb_installed = importlib.util.find_spec("bitsandbytes") is not None
    if torch.device(device).type != "cuda" or not cuda_available:
        return "bitsandbytes 4-bit layers run on CUDA only (use --quant int4 on this device)"
    if not bnb_installed:
        return "the 'bitsandbytes' package is not installed (pip install bitsandbytes)"
    return None


def quantize_model_nf4(model: nn.Module, *, device, compute_dtype: torch.dtype,
                       keep: tuple[str, ...] | None = None) -> list[str]:
    """Replace the float ``nn.Linear`` layers of ``model`` (outside ``keep``) by NF4 ``bnb.nn.Linear4bit`` on
    ``device``, in place; returns the names quantized. Device-agnostic by itself: the engine checks
    ``nf4_support`` first."""
    import bitsandbytes as bnb

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
        setattr(parent, leaf, new)
    return names


def nf4_dequantized_weight(module, dtype=torch.float32) -> torch.Tensor:
    """The float weight an NF4 ``Linear4bit`` multiplies by (what a LoRA-equivalence check compares against).
    Call it before the layer's first CPU forward: bitsandbytes then repacks the codes for its AVX512-bf16 kernel."""
    import bitsandbytes as bnb

    w = module.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        raise ValueError("this NF4 weight was repacked for bitsandbytes' CPU kernel; dequantize it before a forward")
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(dtype)


def bitsandbytes_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None
