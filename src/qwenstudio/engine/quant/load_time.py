"""4-bit quantize-on-load (``--quant int4`` / ``--quant nf4``): a bf16/fp32 DiT file quantized after loading.

Why at load rather than only through ``convert``: a user with a bf16 file gets 4-bit memory without writing a second
11 GB file. ``int4`` is our groupwise W4A16 (quant/int4.py; the same numbers ``convert --to int4`` writes, so a run
on the converted file is the same run), on any device; ``nf4`` is bitsandbytes NF4 the way diffusers' quantizer
builds it (quant/nf4.py), on CUDA or the CPU (bitsandbytes >= 0.47). Both keep the small sensitive layers of
``FP8_KEEP_HIGH_PRECISION`` in float (the activation keep-list of fp8 compute does not apply: these are weight-only
formats) and return what they did for the metadata (``model.acceleration``), so ``--from-image`` repeats the same
quantization.
"""

from __future__ import annotations

import warnings

from ...errors import InvalidRequest

FOUR_BIT_QUANTS = ("int4", "nf4")
LOAD_TIME_QUANTS = ("fp8", "int4", "nf4")  # the --quant values that rewrite a float DiT's Linear weights at load
QUANTIZED_LINEARS = ("FP8Linear", "GGUFLinear", "Int4WeightLinear", "SVDQuantLinear", "Linear4bit")


def check_quant_device(quant: str | None, device) -> None:
    """Refuse, before any weight is read, a quantization the device cannot run."""
    if quant == "nf4":
        from .nf4 import nf4_support

        reason = nf4_support(device)
        if reason is not None:
            raise InvalidRequest(f"--quant nf4 cannot run on {device}: {reason}", code="quant_unavailable")


def check_quant_base(quant: str | None, source) -> None:
    """Refuse, from the DiT file's headers (before any weight is read), a ``--quant`` its weights cannot take: the
    quantize-on-load modes need float weights. On an already-quantized DiT (GGUF, int4, nunchaku, bitsandbytes) the
    option would stack a second rounding (int4/nf4) or silently do nothing while the metadata said ``quant: fp8``;
    an fp8 file takes ``--quant fp8`` (its fp8 compute) but not a 4-bit one. ``refuse_quantized_base`` checks the loaded modules
    too (a folder's headers may not say)."""
    from ..precision import stored_weight_kind

    if quant not in LOAD_TIME_QUANTS:
        return
    stored = stored_weight_kind(source)
    if stored == "quantized" or (stored == "fp8" and quant != "fp8"):
        dit = getattr(source, "dit", None)
        what = (dit.quant or dit.container) if dit is not None else stored
        raise InvalidRequest(f"--quant {quant} quantizes a bf16/fp32 DiT; '{source.name}' is already {what}: drop "
                             f"--quant or load the float file", code="quant_needs_float_base")


def refuse_quantized_base(transformer, quant: str) -> None:
    """The loaded-module side of ``check_quant_base``: ``--quant`` on a DiT whose layers are already quantized (an
    fp8 DiT only takes ``--quant fp8``, its fp8 compute)."""
    already = quantized_layer_kinds(transformer) - ({"FP8Linear"} if quant == "fp8" else set())
    if already:
        raise InvalidRequest(f"--quant {quant} quantizes a bf16/fp32 DiT; this one is already quantized "
                             f"({', '.join(sorted(already))}): drop --quant or load the float file",
                             code="quant_needs_float_base")


def quantized_layer_kinds(model) -> set[str]:
    """Class names of the already-quantized linears in ``model`` (fp8, GGUF, int4, SVDQuant, bitsandbytes)."""
    return {type(m).__name__ for m in model.modules() if type(m).__name__ in QUANTIZED_LINEARS}


def quantize_on_load(transformer, quant: str, *, device, dtype, place=None) -> dict:
    """Quantize ``transformer`` in place to ``quant`` (int4 or nf4); returns the metadata entries. ``device``: the
    run's device (what it must support); ``place``: where the quantized layers go (the device for a resident DiT,
    the CPU for an offloaded one; default: where the weights are), one layer at a time, so the float DiT never has
    to fit there."""
    refuse_quantized_base(transformer, quant)
    if quant == "int4":
        from .int4 import GROUP_SIZE, quantize_model_int4

        quantized, skipped = quantize_model_int4(transformer, device=place)
        if skipped:
            warnings.warn(f"--quant int4: {len(skipped)} linear layers stay float (input size not a multiple of "
                          f"{GROUP_SIZE}), e.g. {skipped[0]}", stacklevel=3)
        return {"int4_group_size": GROUP_SIZE, "int4_layers_quantized": len(quantized),
                "int4_layers_skipped": len(skipped)}
    if quant == "nf4":
        check_quant_device(quant, device)
        import torch

        from .nf4 import NF4_BLOCKSIZE, bitsandbytes_version, quantize_model_nf4

        if place is None:
            place = next(transformer.parameters(), torch.empty(0, device=device)).device
        names = quantize_model_nf4(transformer, device=place, compute_dtype=dtype)
        return {"nf4_layers_quantized": len(names), "nf4_blocksize": NF4_BLOCKSIZE, "nf4_double_quant": False,
                "nf4_compute_dtype": str(dtype).replace("torch.", ""), "bitsandbytes": bitsandbytes_version()}
    raise ValueError(f"not a 4-bit quantize-on-load mode: {quant}")


def quantized_weight_bytes(layer: str, shape: tuple[int, ...], quant: str) -> int | None:
    """Bytes the float weight of Linear ``layer`` (un-prefixed diffusers name, weight ``shape`` [out, in]) takes after
    ``--quant quant`` (None: the quantizer leaves that layer float). The memory planner sizes a quantize-on-load run
    with it (engine/footprints.py), so a bf16 file run with ``--quant int4`` is planned at 4-bit size, not at the
    file's. Each rule is the storage of the layer the quantizer builds:
      int4  ``Int4WeightLinear``: 0.5 B per weight + bf16 scale and zero per 64 inputs (input a multiple of 64)
      nf4   bitsandbytes ``Linear4bit``: 0.5 B per weight + an fp32 absmax per block of 64 weights
      fp8   ``FP8Linear``: 1 B per weight + an fp32 scale per output row
    """
    from .fp8 import keep_activations_high_precision, keep_high_precision

    if quant not in LOAD_TIME_QUANTS or len(shape) != 2:
        return None
    out_features, in_features = shape
    numel = out_features * in_features
    if quant == "fp8":
        return None if keep_activations_high_precision(layer) else numel + 4 * out_features
    if keep_high_precision(layer):
        return None
    if quant == "int4":
        from .int4 import GROUP_SIZE

        return None if in_features % GROUP_SIZE else numel // 2 + 2 * 2 * out_features * (in_features // GROUP_SIZE)
    from .nf4 import NF4_BLOCKSIZE

    return numel // 2 + 4 * -(-numel // NF4_BLOCKSIZE)
