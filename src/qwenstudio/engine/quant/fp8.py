"""float8 weight storage: ``nn.Linear`` layers whose weights stay float8 in memory and are upcast per call.

ComfyUI ships Qwen-Image as fp8 files in two flavours: plain ``float8_e4m3fn``/``float8_e5m2`` weights, and "fp8
scaled" files where each quantized layer carries a per-tensor ``<layer>.scale_weight`` (real weight =
``fp8_weight.float() * scale_weight``) and optionally ``<layer>.scale_input`` (used by fp8 matmul kernels; the
upcast path here does not need it but keeps it so a round trip loses nothing). Keeping the weights fp8 halves the
DiT's memory against bf16; the per-call upcast costs one temporary weight per layer at a time.
"""

from __future__ import annotations

import torch
from torch import nn

# Layers that stay in high precision when quantizing: the small input/output projections and the modulation /
# timestep embeddings, where fp8 rounding visibly hurts images and the memory saved is negligible. DATA: the
# converter and writers read it; callers may pass their own tuple.
FP8_KEEP_HIGH_PRECISION = (
    "img_in",
    "txt_in",
    "txt_norm",
    "proj_out",
    "norm_out",
    "time_text_embed",
    "pos_embed",
)

FP8_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_MANTISSA_AND_MIN_EXP = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}


def is_fp8(dtype) -> bool:
    return dtype in _MANTISSA_AND_MIN_EXP


def quantize_fp8(
    weight: torch.Tensor, scaled: bool, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round ``weight`` to fp8. ``scaled``: divide by a per-tensor fp32 scale (amax / fp8 max) first so the full fp8
    range is used, and return that scale (ComfyUI's ``scale_weight``); otherwise saturate and return ``None``."""
    fmax = torch.finfo(dtype).max
    w = weight.detach().float()
    if not scaled:
        return w.clamp(-fmax, fmax).to(dtype), None
    amax = w.abs().max()
    scale = (amax / fmax if amax > 0 else torch.tensor(1.0)).to(torch.float32).reshape(())
    return (w / scale).clamp(-fmax, fmax).to(dtype), scale


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    """ComfyUI's convention: ``weight.to(dtype) * scale_weight``."""
    w = weight.to(dtype)
    return w * scale.to(dtype) if scale is not None else w


def fp8_rounding_bound(weight: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | float | None = None):
    """Elementwise worst-case error of round-to-nearest into ``dtype`` (half an ulp, floored at the subnormal step),
    for values within range. With ``scale`` the bound is for ``weight / scale`` rounded then rescaled."""
    mant, min_exp = _MANTISSA_AND_MIN_EXP[dtype]
    s = float(scale) if scale is not None else 1.0
    x = (weight.detach().double() / s).abs()
    exp = torch.floor(torch.log2(x.clamp_min(1e-300))).clamp_min(min_exp)
    return torch.pow(2.0, exp - mant - 1) * s


class FP8Linear(nn.Module):
    """A Linear whose ``weight`` is float8; ``forward`` upcasts it to the input dtype (times ``scale_weight``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_dtype=torch.float8_e4m3fn, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        w = torch.empty(out_features, in_features, dtype=weight_dtype, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self.scale_weight: torch.Tensor | None
        self.scale_input: torch.Tensor | None
        self.register_buffer("scale_weight", None)
        self.register_buffer("scale_input", None)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.scale_weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, w, b)

    def _apply(self, fn, recurse=True):
        """``model.to(dtype)`` must move but never re-type the fp8 weight or the fp32 scales: find the target device
        from a probe, let the rest (bias) follow ``fn``, then put the protected tensors back, moved only."""
        keep = {n: t.detach() for n, t in (("weight", self.weight), ("scale_weight", self.scale_weight),
                                  ("scale_input", self.scale_input)) if t is not None}
        probe = fn(torch.zeros((), device=self.weight.device))
        super()._apply(fn, recurse)
        for name, t in keep.items():
            moved = t.to(probe.device)
            if name == "weight":
                self._parameters["weight"] = nn.Parameter(moved, requires_grad=False)
            else:
                self._buffers[name] = moved
        return self

    def extra_repr(self) -> str:
        scaled = ", scaled" if self.scale_weight is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.dtype}{scaled}"


def swap_linears_to_fp8(model: nn.Module, names: set[str], weight_dtypes: dict[str, torch.dtype] | None = None) -> None:
    """Replace the ``nn.Linear`` submodules called ``names`` by (meta) ``FP8Linear`` before the model is filled.
    ``weight_dtypes`` gives each layer's fp8 dtype (default e4m3fn). A name that is not a Linear is a TypeError."""
    weight_dtypes = weight_dtypes or {}
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is {type(old).__name__}, not a Linear")
        new = FP8Linear(old.in_features, old.out_features, old.bias is not None,
                        weight_dtypes.get(name, torch.float8_e4m3fn), device="meta")
        setattr(parent, leaf, new)


def keep_high_precision(key: str, keep: tuple[str, ...] = FP8_KEEP_HIGH_PRECISION) -> bool:
    """True if the (un-prefixed) parameter ``key`` belongs to a layer on the keep-list."""
    return key.split(".", 1)[0] in keep
