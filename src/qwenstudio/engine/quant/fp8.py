"""float8 weight storage: ``nn.Linear`` layers whose weights stay float8 in memory and are upcast per call.

ComfyUI ships Qwen-Image as fp8 files in two flavours: plain ``float8_e4m3fn``/``float8_e5m2`` weights, and "fp8
scaled" files where each quantized layer carries a per-tensor ``<layer>.scale_weight`` (real weight =
``fp8_weight.float() * scale_weight``) and optionally ``<layer>.scale_input`` (used by fp8 matmul kernels; the
upcast path here does not need it but keeps it so a round trip loses nothing). Keeping the weights fp8 halves the
DiT's memory against bf16; the per-call upcast costs one temporary weight per layer at a time.

fp8 *compute* (``compute="scaled_mm"``): the activation is quantized too (per-tensor from the file's ``scale_input``,
else dynamic per row) and the product runs as one fp8 matmul, ``torch._scaled_mm`` — the tensor cores' fp8 path on
GPUs of compute capability 8.9+ (Ada, Hopper, Blackwell). ``compute="emulate"`` is the same arithmetic written out
(quantize with the scale, matmul in fp32, rescale): it runs anywhere, so the numbers of the fp8 path are tested on a
CPU. Layers on ``FP8_COMPUTE_KEEP`` keep high-precision activations (weights may still be stored fp8).
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

# Layers whose *activations* stay high precision under fp8 compute (in addition to FP8_KEEP_HIGH_PRECISION): the
# image MLP's down projection sees the widest activation range of the block (after GELU, 12288 wide); rounding its
# input to fp8 costs the most image quality for ~1/6 of a block's FLOPs. Matched as a suffix of the module name.
FP8_COMPUTE_KEEP_SUFFIXES = ("img_mlp.net.2",)
FP8_COMPUTE_MODES = ("upcast", "scaled_mm", "emulate")

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
        self.compute = "upcast"  # see the module docstring; set by ``set_fp8_compute``

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.scale_weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute != "upcast":
            return fp8_linear(x, self.weight, self.scale_weight, self.bias, input_scale=self.scale_input,
                              emulate=self.compute == "emulate")
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
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.dtype}{scaled}, "
                f"compute={self.compute}")


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


# ---- fp8 compute ---------------------------------------------------------------------------------------------------

def quantize_activation(x2d: torch.Tensor, scale: torch.Tensor | None = None, dtype=torch.float8_e4m3fn):
    """Activations [M, K] -> (fp8 tensor, fp32 scale). ``scale`` given (the file's ``scale_input``): per tensor;
    otherwise dynamic per row (amax of each row / fp8 max), which follows outlier tokens instead of letting one
    token flatten every other row's resolution."""
    fmax = torch.finfo(dtype).max
    if scale is None:
        amax = x2d.detach().abs().amax(dim=-1, keepdim=True).float()
        scale = (amax / fmax).clamp_min(1e-12)
    else:
        scale = scale.detach().float().reshape(())
    q = (x2d.float() / scale).clamp(-fmax, fmax).to(dtype)
    return q, scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None, bias: torch.Tensor | None,
               *, input_scale: torch.Tensor | None = None, emulate: bool = False) -> torch.Tensor:
    """``x @ W.T + b`` with both operands fp8: ``(q(x) @ W8.T) * (s_x * s_w) + b``. ``weight_scale``: a scalar
    (per tensor, ComfyUI files) or [out, 1] (per row, ``quantize_linear_fp8``); None means 1. ``emulate`` runs the
    formula in fp32 (any device); otherwise ``torch._scaled_mm`` (fp8 tensor cores)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, sx = quantize_activation(x2, input_scale)
    sw = (weight_scale.detach().float() if weight_scale is not None
          else torch.ones((), device=weight.device, dtype=torch.float32))
    rowwise = sx.dim() > 0 or sw.dim() > 0
    if rowwise:  # _scaled_mm's row-wise mode wants (M, 1) and (1, N) scales for both operands
        sx = sx.reshape(-1, 1).expand(x2.shape[0], 1).contiguous()
        sw = sw.reshape(1, -1).expand(1, weight.shape[0]).contiguous()
    if emulate:
        out = (xq.float() @ weight.float().t()) * (sx * sw)
    else:
        out = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=sw,  # noqa: SLF001  (no public name yet)
                               out_dtype=torch.bfloat16 if rowwise else x.dtype)
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*shape[:-1], weight.shape[0])


def scaled_mm_supported(device) -> bool:
    """fp8 tensor cores: CUDA compute capability 8.9+ (the CPU has a reference ``_scaled_mm``, slower than fp32)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def keep_activations_high_precision(name: str, keep: tuple[str, ...] = FP8_KEEP_HIGH_PRECISION,
                                    suffixes: tuple[str, ...] = FP8_COMPUTE_KEEP_SUFFIXES) -> bool:
    return name.split(".", 1)[0] in keep or any(name == s or name.endswith("." + s) for s in suffixes)


def quantize_linear_fp8(linear: nn.Linear, dtype=torch.float8_e4m3fn) -> FP8Linear:
    """A float ``nn.Linear`` -> ``FP8Linear`` with per-row weight scales ([out, 1]: amax of each output row)."""
    w = linear.weight.detach().float()
    fmax = torch.finfo(dtype).max
    scale = (w.abs().amax(dim=1, keepdim=True) / fmax).clamp_min(1e-12)
    new = FP8Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype, device="meta")
    new.weight = nn.Parameter((w / scale).clamp(-fmax, fmax).to(dtype), requires_grad=False)
    new.scale_weight = scale
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return new


def quantize_model_fp8(model: nn.Module, *, keep=FP8_KEEP_HIGH_PRECISION,
                       suffixes=FP8_COMPUTE_KEEP_SUFFIXES, device=None) -> list[str]:
    """``--quant fp8`` on a float model: every ``nn.Linear`` not on the keep-lists becomes an ``FP8Linear`` (per-row
    scales), in place. Returns the names quantized. ``device``: each layer moves there, then is quantized there."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not
             keep_activations_high_precision(n, keep, suffixes)]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, leaf)
        setattr(parent, leaf, quantize_linear_fp8(layer if device is None else layer.to(device)))
    return names


def set_fp8_compute(model: nn.Module, compute: str, *, keep=FP8_KEEP_HIGH_PRECISION,
                    suffixes=FP8_COMPUTE_KEEP_SUFFIXES) -> int:
    """Set how every ``FP8Linear`` in ``model`` multiplies (``upcast``/``scaled_mm``/``emulate``); layers on the
    keep-lists stay ``upcast`` (fp8 storage, high-precision activations). Returns how many use fp8 compute."""
    if compute not in FP8_COMPUTE_MODES:
        raise ValueError(f"unknown fp8 compute '{compute}'")
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            # fp8 tensor cores want K and N in multiples of 16; a smaller odd layer just keeps upcasting
            fp8_ok = (compute != "upcast" and not keep_activations_high_precision(name, keep, suffixes)
                      and (compute == "emulate" or (m.in_features % 16 == 0 and m.out_features % 16 == 0)))
            m.compute = compute if fp8_ok else "upcast"
            n += m.compute != "upcast"
    return n
