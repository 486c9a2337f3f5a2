"""SVDQuant W4A4 linears (nunchaku's ``svdq-int4_r32-*`` / ``svdq-fp4_r128-*`` files) as plain torch.

What a nunchaku layer computes (read from nunchaku's CUDA kernels, ``src/kernels/zgemm/gemm_w4a4*.cuh``):

    lora = x @ proj_down                                   (fp32, on the raw input)
    xs   = (x [+ 0.171875 if act_unsigned]) / smooth      (in the activation dtype)
    int4:  per row and group of 64: s = max|xs| / 7 (fp32, stored in the activation dtype, / 15 and codes 0..15 when
           act_unsigned), q = round_half_even(xs * (1/s)) saturated to -8..7
    nvfp4: per row and group of 16: s = min(max|xs| / 6, 448) rounded to fp8 e4m3, q = xs * (1/s_unrounded)
           rounded to the e2m1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} (half to even, saturating)
    y    = wtscale * sum_groups (q * s) . (w * wscales) * wcscales + bias + lora @ proj_up.T

``w`` is the 4-bit residual of the *smoothed* weight after the rank-r SVD branch was taken out. The reference here
dequantizes activation and weight onto exactly those grids and does one fp32 matmul (on every device: 4-bit codes
times bf16 scales are not exact in bf16), so it differs from the kernels only by accumulation order.
``act_quant=False`` skips the activation rounding: the layer is then exactly ``x @ effective_weight().T +
effective_bias()`` (a W4A16 view of the same file, used to compare LoRAs).

The tensors in the files are in the kernels' tiled MMA layout (nunchaku ``lora/flux/packer.py``, deepcompressor
``backend/nunchaku/utils.py``: weights in 128 x 64 tiles of int32 lanes, scales/bias/smooth in 128-channel warp
order, low-rank factors in 16 x 16 packs). ``unpack_*`` below invert those permutations (re-derived from their
source and checked against files their code wrote); ``pack_*`` are the forward permutations, for round trips.
"""

from __future__ import annotations

import torch
from torch import nn

from .int4 import pack_nibbles, unpack_nibbles

WARP_N = 128  # output channels per weight / scale tile
MEM_K = 64  # input channels per weight tile (one int4 MMA)
GELU_SHIFT = 0.171875  # added to fc2's input so the int4 activation is unsigned (nunchaku SHIFT_GELU)
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
PRECISIONS = {"int4": 64, "nvfp4": 16}  # precision -> group size along the input


# ---- the kernels' memory layouts ------------------------------------------------------------------------------

# pack_weight view of an [n, k] int32 tensor: (n_tiles, n_packs 8, n_pack 2, n_lanes 8, reg_n 1,
# k_tiles, k_packs 1, k_pack 2, k_lanes 4, reg_k 8), permuted to (0, 5, 6, 1, 3, 8, 2, 7, 4, 9) before the eight
# 4-bit values of reg_k are packed little-endian into one int32.
_W_PERM = (0, 5, 6, 1, 3, 8, 2, 7, 4, 9)
_W_INV = tuple(_W_PERM.index(i) for i in range(10))


def _weight_view(n: int, k: int) -> tuple[int, ...]:
    return (n // WARP_N, 8, 2, 8, 1, k // MEM_K, 1, 2, 4, 8)


def unpack_weight(qweight: torch.Tensor) -> torch.Tensor:
    """Kernel-layout int8 [n, k/2] -> the 4-bit codes [n, k] as uint8 0..15 in natural order (int4: two's
    complement nibbles; nvfp4: e2m1 codes, bit 3 = sign)."""
    n, half = qweight.shape
    k = half * 2
    if n % WARP_N or k % (2 * MEM_K):
        raise ValueError(f"SVDQuant weight [{n}, {k}] is not made of whole {WARP_N}x{2 * MEM_K} tiles")
    words = qweight.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int64)
    nib = (words.reshape(-1, 1) >> shifts) & 0xF  # [..., reg_k]
    perm_shape = [_weight_view(n, k)[i] for i in _W_PERM]
    return nib.reshape(perm_shape).permute(_W_INV).reshape(n, k).to(torch.uint8)


def pack_weight(codes: torch.Tensor) -> torch.Tensor:
    """Natural [n, k] codes 0..15 -> kernel-layout int8 [n, k/2] (nunchaku ``NunchakuWeightPacker.pack_weight``)."""
    n, k = codes.shape
    w = codes.to(torch.int64).reshape(_weight_view(n, k)).permute(_W_PERM).contiguous() & 0xF
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    words = (w << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.contiguous().view(torch.int8).reshape(n, k // 2)


# pack_scale view of [n, groups]: (n / 128, 1, 8, 2, 4, 2, groups) permuted to (0, 6, 1, 2, 4, 3, 5).
_S_PERM = (0, 6, 1, 2, 4, 3, 5)
_S_INV = tuple(_S_PERM.index(i) for i in range(7))


def unpack_scales(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Kernel-layout scales (wscales [G, n], or a bias/smooth/wcscales vector [n]) -> natural [n, G] ([n] for a
    vector). ``n`` is the channel count (out features; in features for ``smooth_factor``)."""
    groups = packed.numel() // n
    view = (n // WARP_N, 1, 8, 2, 4, 2, groups)
    out = packed.reshape(-1).reshape([view[i] for i in _S_PERM]).permute(_S_INV).reshape(n, groups)
    return out.reshape(n) if packed.dim() == 1 else out


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """Natural [n, G] (or [n]) -> kernel layout ([G, n], or [n]); nunchaku ``pack_scale``."""
    n = scales.shape[0]
    groups = 1 if scales.dim() == 1 else scales.shape[1]
    out = scales.reshape(n // WARP_N, 1, 8, 2, 4, 2, groups).permute(_S_PERM).contiguous()
    return out.reshape(n) if scales.dim() == 1 else out.reshape(groups, n)


# pack_micro_scale (nvfp4, fp8 scales per 16): view (n / 128, 1, 4, 4, 8, G / 4, 4) permuted to (0, 5, 1, 4, 3, 2, 6).
_M_PERM = (0, 5, 1, 4, 3, 2, 6)
_M_INV = tuple(_M_PERM.index(i) for i in range(7))


def unpack_micro_scales(packed: torch.Tensor, n: int) -> torch.Tensor:
    groups = packed.numel() // n
    view = (n // WARP_N, 1, 4, 4, 8, groups // 4, 4)
    flat = packed.reshape(-1).view(torch.uint8)  # permute on bytes: fp8 permutes are not implemented everywhere
    out = flat.reshape([view[i] for i in _M_PERM]).permute(_M_INV).reshape(n, groups)
    return out.view(packed.dtype)


def pack_micro_scales(scales: torch.Tensor) -> torch.Tensor:
    n, groups = scales.shape
    b = scales.view(torch.uint8).reshape(n // WARP_N, 1, 4, 4, 8, groups // 4, 4).permute(_M_PERM).contiguous()
    return b.reshape(groups, n).view(scales.dtype)


# pack_lowrank_weight: [c, r] in packs of 16 x 16, each (2, 8, 1, 2, 4, 2) permuted to (2 lanes-first) order.
_L_PERM = (0, 1, 3, 6, 2, 5, 4, 7)
_L_INV = tuple(_L_PERM.index(i) for i in range(8))


def unpack_lowrank(packed: torch.Tensor, down: bool) -> torch.Tensor:
    """Kernel-layout ``proj_down`` [in, r] / ``proj_up`` [out, r] -> natural ``down`` [r, in] (a Linear weight
    applied first) / ``up`` [out, r]."""
    c, r = packed.shape
    w = packed.reshape(c // 16, r // 16, 8, 4, 2, 2, 1, 2).permute(_L_INV).reshape(c // 16, r // 16, 16, 16)
    if down:  # packs were (c_packs, r_packs) of a [r, c] matrix
        return w.permute(1, 2, 0, 3).reshape(r, c)
    return w.permute(0, 2, 1, 3).reshape(c, r)


def pack_lowrank(weight: torch.Tensor, down: bool) -> torch.Tensor:
    """Natural ``down`` [r, in] / ``up`` [out, r] -> kernel layout [in, r] / [out, r]."""
    if down:
        r, c = weight.shape
        w = weight.reshape(r // 16, 16, c // 16, 16).permute(2, 0, 1, 3)
    else:
        c, r = weight.shape
        w = weight.reshape(c // 16, 16, r // 16, 16).permute(0, 2, 1, 3)
    w = w.reshape(c // 16, r // 16, 2, 8, 1, 2, 4, 2).permute(_L_PERM).contiguous()
    return w.reshape(c, r)


# ---- number formats -------------------------------------------------------------------------------------------

def int4_values(codes: torch.Tensor) -> torch.Tensor:
    """Two's complement nibbles 0..15 -> -8..7 (float32)."""
    c = codes.to(torch.int16)
    return torch.where(c >= 8, c - 16, c).float()


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (bit 3 sign, bits 0-2 index into the grid) -> float32."""
    grid = torch.tensor(E2M1_GRID, device=codes.device)
    c = codes.to(torch.int64)
    mag = grid[c & 7]
    return torch.where(c >= 8, -mag, mag)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to the nearest e2m1 value, ties to the even code, saturating at +-6 (``cvt.rn.satfinite``)."""
    grid = torch.tensor(E2M1_GRID, device=x.device)
    mids = (grid[1:] + grid[:-1]) / 2
    a = x.abs().clamp_max(6.0).contiguous()
    idx = torch.bucketize(a, mids)  # number of midpoints strictly below |x|; a tie sits at mids[idx]
    tie = (mids[idx.clamp_max(6)] == a) & (idx % 2 == 1)  # the lower neighbour's code is odd: go up to even
    return torch.copysign(grid[idx + tie.long()], x)


def fake_quant_int4(xs: torch.Tensor, unsigned: bool = False, group: int = 64) -> torch.Tensor:
    """The int4 activation grid: per row and group, q * s with the kernel's scale (see module doc), float32."""
    m, k = xs.shape
    g = xs.reshape(m, k // group, group)
    qmax = 15.0 if unsigned else 7.0
    scale = g.abs().amax(-1, keepdim=True).float() * (1.0 / qmax)
    stored = scale.to(xs.dtype).float()
    q = torch.round(g.float() * torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale)))
    q = q.clamp(0.0, 15.0) if unsigned else q.clamp(-8.0, 7.0)
    return (q * stored).reshape(m, k)


def fake_quant_nvfp4(xs: torch.Tensor, group: int = 16) -> torch.Tensor:
    """The nvfp4 activation grid: e2m1 codes times an fp8 e4m3 scale per 16 values, float32."""
    m, k = xs.shape
    g = xs.reshape(m, k // group, group).float()
    scale = (g.abs().amax(-1, keepdim=True) * (1.0 / 6.0)).clamp_max(448.0)
    stored = scale.to(torch.float8_e4m3fn).float()
    q = round_e2m1(g * torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale)))
    return (q * stored).reshape(m, k)


# ---- the module -----------------------------------------------------------------------------------------------

class SVDQuantLinear(nn.Module):
    """One SVDQuant W4A4 layer in natural layout: ``qweight`` uint8 [out, in/2] (two codes per byte), ``wscales``
    [out, in/group] (bf16/fp16 for int4, fp8 e4m3 for nvfp4), ``smooth`` [in], ``proj_down`` [r, in], ``proj_up``
    [out, r], ``bias`` [out], and for nvfp4 ``wcscales`` [out] and the scalar ``wtscale``."""

    def __init__(self, in_features: int, out_features: int, rank: int, precision: str = "int4", *,
                 act_unsigned: bool = False, bias: bool = True):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"unknown SVDQuant precision {precision!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.precision, self.group_size = precision, PRECISIONS[precision]
        self.act_unsigned = act_unsigned and precision == "int4"
        self.act_quant = True
        self.wtscale = 1.0
        self.kernel: nn.Module | None = None  # a nunchaku SVDQW4A4Linear, set by attach_kernels
        self.released = False  # True once the kernel alone holds the tensors (release_to_kernel)
        for name in ("qweight", "wscales", "smooth", "proj_down", "proj_up", "wcscales"):
            self.register_buffer(name, None)
        self.register_parameter("bias", None)
        self.has_bias = bias

    @classmethod
    def from_tensors(cls, *, qweight, wscales, smooth, proj_down, proj_up, bias=None, wcscales=None,
                     wtscale: float = 1.0, precision: str = "int4", act_unsigned: bool = False) -> SVDQuantLinear:
        n, half = qweight.shape
        m = cls(half * 2, n, proj_down.shape[0], precision, act_unsigned=act_unsigned, bias=bias is not None)
        m.qweight, m.wscales, m.smooth, m.proj_down, m.proj_up = qweight, wscales, smooth, proj_down, proj_up
        m.wcscales, m.wtscale = wcscales, float(wtscale)
        if bias is not None:
            m.bias = nn.Parameter(bias, requires_grad=False)
        return m

    def release_to_kernel(self) -> None:
        """Drop the natural-layout tensors once ``kernel`` holds the same numbers, so the kernel path keeps the
        file's bytes once, not twice. A reference call afterwards rebuilds them from the kernel's tensors (an exact
        round trip, per call: only for the slow paths — activation rounding off, inputs on another device)."""
        if self.kernel is None:
            raise ValueError("release_to_kernel needs an attached kernel")
        for name in ("qweight", "wscales", "smooth", "proj_down", "proj_up", "wcscales"):
            self._buffers[name] = None
        self.bias = None
        self.released = True

    def natural(self, device=None) -> SVDQuantLinear:
        """This layer with its natural-layout tensors: itself, or when released a copy rebuilt from the kernel's."""
        if not self.released:
            return self
        k = self.kernel
        names = ("qweight", "wscales", "smooth_factor", "proj_down", "proj_up", "bias", "wcscales")
        t = {n: getattr(k, n).detach() for n in names if getattr(k, n, None) is not None}
        if k.wtscale is not None:
            t["wtscale"] = torch.tensor([float(k.wtscale)])
        m = from_kernel_layout(t, self.precision, act_unsigned=self.act_unsigned, dtype=k.proj_up.dtype,
                               device=device if device is not None else k.qweight.device)
        m.act_quant = self.act_quant
        return m

    def residual_weight(self) -> torch.Tensor:
        """The dequantized 4-bit part, in the smoothed input basis: float32 [out, in]."""
        if self.released:
            return self.natural().residual_weight()
        codes = unpack_nibbles(self.qweight)
        vals = int4_values(codes) if self.precision == "int4" else e2m1_values(codes)
        n, k = vals.shape
        w = vals.reshape(n, -1, self.group_size) * self.wscales.float()[..., None]
        w = w.reshape(n, k) * self.wtscale
        if self.wcscales is not None:
            w = w * self.wcscales.float()[:, None]
        return w

    def effective_weight(self, dtype=torch.float32) -> torch.Tensor:
        """``W = residual / smooth + up @ down``: the float weight this layer stands for (without the activation
        rounding). Used to compare against the source weights and as the 'dequantized base'."""
        if self.released:
            return self.natural().effective_weight(dtype)
        w = self.residual_weight() / self.smooth.float()[None, :] + self.proj_up.float() @ self.proj_down.float()
        return w.to(dtype)

    def effective_bias(self, dtype=torch.float32) -> torch.Tensor:
        """The bias of the float layer this stands for: for act_unsigned (fc2) layers the file's bias absorbed
        ``-W_res @ shift`` (the shift is added to the input), so it is added back."""
        if self.released:
            return self.natural().effective_bias(dtype)
        b = self.bias.float() if self.bias is not None else torch.zeros(self.out_features, device=self.qweight.device)
        if self.act_unsigned:
            b = b + (self.residual_weight() / self.smooth.float()[None, :]).sum(1) * GELU_SHIFT
        return b.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and self.act_quant and not self.act_unsigned and x.device == self.kernel.qweight.device:
            # nunchaku's forward takes [B, S, C] (it flattens B*S and pads the tokens to 256 itself), contiguous
            # (its kernels read raw pointers, no strides), in the dtype of its tensors (the kernel's type follows it).
            # An int4 fc2 (act_unsigned) has a kernel only for the fused MLP (attach_kernels): alone, it is the reference.
            k_in = x.reshape(1, -1, self.in_features).to(self.kernel.proj_up.dtype).contiguous()
            return self.kernel(k_in).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.released:
            return self.natural(x.device)(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        lora = nn.functional.linear(nn.functional.linear(x2.float(), self.proj_down.float()), self.proj_up.float())
        shifted = x2 + GELU_SHIFT if self.act_unsigned else x2
        xs = shifted / self.smooth.to(x.dtype)
        if self.act_quant:
            xq = fake_quant_int4(xs, self.act_unsigned) if self.precision == "int4" else fake_quant_nvfp4(xs)
        else:
            xq = xs.float()
        w = self.residual_weight()
        y = nn.functional.linear(xq, w) + lora
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        """``model.to(dtype)`` moves the quantized tensors but keeps their types; bias and factors follow."""
        keep = {n: getattr(self, n) for n in ("qweight", "wscales", "wcscales") if getattr(self, n) is not None}
        probe = fn(torch.zeros((), device=self.qweight.device if self.qweight is not None else "cpu"))
        super()._apply(fn, recurse)
        for name, t in keep.items():
            self._buffers[name] = t.to(probe.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"precision={self.precision}, act_unsigned={self.act_unsigned}, act_quant={self.act_quant}")


def from_kernel_layout(tensors: dict, precision: str, *, act_unsigned: bool, dtype, device) -> SVDQuantLinear:
    """Build a layer from one nunchaku layer's tensors (``qweight, wscales, smooth_factor, proj_down, proj_up, bias``
    and for nvfp4 optionally ``wcscales, wtscale``), unpacking every kernel layout."""
    qw = tensors["qweight"]
    n, k = qw.shape[0], qw.shape[1] * 2
    codes = unpack_weight(qw.to(device))
    ws = tensors["wscales"].to(device)
    ws = unpack_micro_scales(ws, n) if precision == "nvfp4" else unpack_scales(ws, n)
    wc = tensors.get("wcscales")
    wt = tensors.get("wtscale")
    return SVDQuantLinear.from_tensors(
        qweight=pack_nibbles(codes),
        wscales=ws[:, : k // PRECISIONS[precision]].contiguous(),
        smooth=unpack_scales(tensors["smooth_factor"].to(device), k).to(dtype),
        proj_down=unpack_lowrank(tensors["proj_down"].to(device), down=True).to(dtype),
        proj_up=unpack_lowrank(tensors["proj_up"].to(device), down=False).to(dtype),
        bias=unpack_scales(tensors["bias"].to(device), n).to(dtype) if "bias" in tensors else None,
        wcscales=unpack_scales(wc.to(device), n).float() if wc is not None else None,
        wtscale=float(wt.float().reshape(-1)[0]) if wt is not None else 1.0,
        precision=precision,
        act_unsigned=act_unsigned,
    )


def split_outputs(layer: SVDQuantLinear, sizes: list[int]) -> list[SVDQuantLinear]:
    """A fused layer (nunchaku's to_qkv) as one layer per output slice. Exact: every slice quantizes the same input
    the same way and shares smooth + proj_down; only the weight rows, scales, bias and proj_up are split."""
    out, start = [], 0
    for size in sizes:
        sl = slice(start, start + size)
        out.append(SVDQuantLinear.from_tensors(
            qweight=layer.qweight[sl].clone(), wscales=layer.wscales[sl].clone(), smooth=layer.smooth,
            proj_down=layer.proj_down, proj_up=layer.proj_up[sl].clone(),
            bias=layer.bias.detach()[sl].clone() if layer.bias is not None else None,
            wcscales=layer.wcscales[sl].clone() if layer.wcscales is not None else None,
            wtscale=layer.wtscale, precision=layer.precision, act_unsigned=layer.act_unsigned))
        start += size
    return out


def set_activation_quant(model: nn.Module, enabled: bool) -> int:
    """Turn the 4-bit activation rounding of every SVDQuant layer on/off; returns how many layers were set."""
    n = 0
    for m in model.modules():
        if isinstance(m, SVDQuantLinear):
            m.act_quant = enabled
            n += 1
    return n


# ---- nunchaku's AWQ W4A16 layers (img_mod / txt_mod): TinyChat layout ------------------------------------------

def unpack_awq_weight(qweight: torch.Tensor) -> torch.Tensor:
    """TinyChat int32 [n/4, k/2] -> codes uint8 [n, k]. deepcompressor ``tinychat/utils.py pack_w4``: in each row,
    32 values ``a*8+b`` (a<4, b<8) make 8 int16 ``sum_a v << 4a``; rows are interleaved 4 at a time per 64 inputs."""
    n4, half = qweight.shape
    n, k = n4 * 4, half * 2
    w16 = qweight.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF  # [n/4, k]
    w16 = w16.reshape(n4, k // 64, 4, 16).permute(0, 2, 1, 3).reshape(n, k // 32, 1, 8)
    shifts = torch.tensor([0, 4, 8, 12], dtype=torch.int32, device=qweight.device).reshape(1, 1, 4, 1)
    return ((w16 >> shifts) & 0xF).reshape(n, k).to(torch.uint8)


def deinterleave_rows(t: torch.Tensor, splits: int) -> torch.Tensor:
    """deepcompressor's adanorm packing stores output ``d*splits + j`` for diffusers' ``j*dim + d``; undo it."""
    n = t.shape[0]
    return t.reshape(n // splits, splits, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def awq_modulation_layer(tensors: dict, *, splits: int = 6, dtype=torch.float32, device="cpu"):
    """nunchaku's AWQ ``img_mod.1`` / ``txt_mod.1`` -> an ``Int4WeightLinear`` in diffusers' output order and
    convention: the kernels' file adds 1 to both modulation scales (nunchaku runs its blocks with scale_shift=0),
    diffusers computes ``1 + scale``, so 1 is taken back off those chunks here."""
    from .int4 import Int4WeightLinear

    codes = unpack_awq_weight(tensors["qweight"].to(device))
    n, k = codes.shape
    groups = k // 64
    scales = tensors["wscales"].to(device)[:groups].t()
    zeros = tensors["wzeros"].to(device)[:groups].t()
    bias = tensors["bias"].to(device).float()
    codes, scales, zeros, bias = (deinterleave_rows(t, splits) for t in (codes, scales, zeros, bias))
    dim = n // splits
    for chunk in (1, splits - 2):  # shift, scale, gate, shift, scale, gate
        bias[chunk * dim:(chunk + 1) * dim] -= 1.0
    return Int4WeightLinear.from_tensors(pack_nibbles(codes), scales.contiguous(), zeros.contiguous(),
                                         bias.to(dtype))


# ---- nunchaku's CUDA kernels, where they exist -----------------------------------------------------------------
# Checked against nunchaku's own classes (tests/fixtures/peers/nunchaku/record_nunchaku_layouts.py records
# SVDQW4A4Linear's tensors, attributes and kernel calls from its code; tests/engine/test_svdquant.py holds this
# adapter to that record). Never run: no GPU the kernels support was available.

INT4_SM = (75, 80, 86, 89)  # nunchaku utils.check_hardware_compatibility and setup.py's build targets
NVFP4_SM = (120, 121)


def kernel_support(precision: str, device) -> str | None:
    """Why nunchaku's kernels cannot run ``precision`` on ``device`` (None when they can): they need CUDA, the
    ``nunchaku`` package, and int4: sm75/80/86/89 (Turing, Ampere, Ada), nvfp4: sm120/121 (Blackwell RTX 50,
    GB10) — exactly the list nunchaku checks; other GPUs (Hopper, sm87 Orin, datacenter Blackwell) have no build."""
    import importlib.util

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "nunchaku's kernels are CUDA-only"
    major, minor = torch.cuda.get_device_capability(device)
    cap = major * 10 + minor
    if cap not in (INT4_SM if precision == "int4" else NVFP4_SM):  # the GPU first: installing cannot fix it
        need = "sm75/80/86/89" if precision == "int4" else "sm120/121"
        return f"{precision} kernels do not support this GPU (sm{cap}; they need {need})"
    if importlib.util.find_spec("nunchaku") is None:
        return "the 'nunchaku' package is not installed"
    return None


def kernel_dtype(device) -> torch.dtype:
    """The 16-bit type nunchaku's kernels compute in on ``device``: fp16 on Turing (sm75 has no bf16 MMA; nunchaku's
    Turing example: "Turing GPUs only support fp16 precision"), bf16 elsewhere (its Qwen-Image default)."""
    return torch.float16 if torch.cuda.get_device_capability(torch.device(device)) == (7, 5) else torch.bfloat16


def kernel_tensors(m: SVDQuantLinear) -> dict[str, torch.Tensor]:
    """``m`` in the kernels' layout under nunchaku's parameter names (the files' layout: a round trip is exact)."""
    scales = pack_micro_scales(m.wscales) if m.precision == "nvfp4" else pack_scales(m.wscales)
    t = {"qweight": pack_weight(unpack_nibbles(m.qweight)), "wscales": scales,
         "smooth_factor": pack_scales(m.smooth), "smooth_factor_orig": pack_scales(m.smooth),
         "proj_down": pack_lowrank(m.proj_down, True), "proj_up": pack_lowrank(m.proj_up, False)}
    if m.bias is not None:
        t["bias"] = pack_scales(m.bias.detach())
    if m.precision == "nvfp4":  # nunchaku fills ones when a file has none (patch_scale_key)
        wc = m.wcscales if m.wcscales is not None else torch.ones(m.out_features, device=m.qweight.device)
        t["wcscales"] = pack_scales(wc)
    return t


def kernel_layer(m: SVDQuantLinear, linear_cls, device, torch_dtype=torch.bfloat16) -> nn.Module:
    """``m`` as a nunchaku ``SVDQW4A4Linear`` (``linear_cls``) in ``torch_dtype``. Every tensor nunchaku's class
    has is set, each with exactly the shape and dtype its constructor made (``.data = t`` would accept any shape):
    a nunchaku whose layout differs is refused here, by name, instead of computing garbage in the kernel."""
    from ...errors import IncompatibleWeights

    k = linear_cls(m.in_features, m.out_features, rank=m.rank, bias=m.bias is not None, precision=m.precision,
                   act_unsigned=m.act_unsigned, torch_dtype=torch_dtype, device=device)
    cls = type(k).__name__
    tensors = kernel_tensors(m)
    theirs = {n for n, _ in k.named_parameters(recurse=False)} | {n for n, _ in k.named_buffers(recurse=False)}
    if theirs != set(tensors):
        raise IncompatibleWeights(f"nunchaku's {cls} has tensors {sorted(theirs)}, this adapter sets "
                                  f"{sorted(tensors)}: a nunchaku version it was not written for")
    for name, t in tensors.items():
        target = getattr(k, name)
        want = t.dtype if t.dtype in (torch.int8, torch.float8_e4m3fn) else torch_dtype  # codes are never cast
        if target.dtype != want or tuple(target.shape) != tuple(t.shape):
            raise IncompatibleWeights(f"nunchaku's {cls}.{name} is {tuple(target.shape)} {target.dtype}; the "
                                      f"layer's packed tensor is {tuple(t.shape)} {want}")
        target.data = t.to(device=device, dtype=want)
    k.wtscale = m.wtscale if m.precision == "nvfp4" else None  # int4: nunchaku keeps None (the kernel asserts 1)
    return k


def attach_kernels(model: nn.Module, device, *, linear_cls=None, torch_dtype=None, fused_mlp=None,
                   release: bool = True) -> int:
    """Give every SVDQuant layer a nunchaku ``SVDQW4A4Linear`` (``kernel_layer``), used for inputs on ``device``
    with the activation rounding on; the caller checks ``kernel_support`` first. As in nunchaku's Qwen-Image, the
    int4 MLPs (fc2 act_unsigned) run as one ``fused_gelu_mlp``: fc1's epilogue applies the tanh GELU, adds 0.171875
    and quantizes for fc2 — nunchaku's plain ``forward`` would quantize fc2's float input signed, so an int4 fc2 never
    runs alone: when a LoRA wraps fc1 or fc2 that MLP falls back to per-layer calls, its fc2 on the reference path.
    nvfp4 fc2s are signed and also run alone. With ``release`` every layer but those int4 fc2s (kept for that
    fallback) drops its natural-layout copy (``release_to_kernel``): the 4-bit weights are held once, as in nunchaku.
    Returns the number of layers given a kernel."""
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward

    if linear_cls is None:
        from nunchaku.models.linear import SVDQW4A4Linear as linear_cls
    if fused_mlp is None:
        from nunchaku.ops.fused import fused_gelu_mlp as fused_mlp
    torch_dtype = torch_dtype or kernel_dtype(device)
    n = 0
    for m in model.modules():
        if isinstance(m, SVDQuantLinear):
            # not a submodule: model.to(dtype) must not re-type the kernel's tensors
            object.__setattr__(m, "kernel", kernel_layer(m, linear_cls, device, torch_dtype))
            if release and not m.act_unsigned:
                m.release_to_kernel()
            n += 1

    class KernelFeedForward(FeedForward):
        """diffusers' FeedForward (same module tree and names) whose forward is nunchaku's fused MLP when both
        layers are still bare SVDQuant layers with kernels."""

        fused = staticmethod(fused_mlp)

        def forward(self, hidden_states, *args, **kwargs):
            fc1, fc2 = self.net[0].proj, self.net[2]
            if not (isinstance(fc1, SVDQuantLinear) and isinstance(fc2, SVDQuantLinear) and fc1.kernel is not None
                    and fc2.kernel is not None and fc1.act_quant and fc2.act_quant
                    and hidden_states.device == fc1.kernel.qweight.device):
                return super().forward(hidden_states, *args, **kwargs)
            x = hidden_states.reshape(1, -1, fc1.in_features).to(fc1.kernel.proj_up.dtype).contiguous()
            y = self.fused(x, fc1.kernel, fc2.kernel)
            return y.to(hidden_states.dtype).reshape(*hidden_states.shape[:-1], fc2.out_features)

    for ff in model.modules():
        if type(ff) is FeedForward and isinstance(ff.net[0], GELU) and ff.net[0].approximate == "tanh" \
                and isinstance(ff.net[0].proj, SVDQuantLinear) and isinstance(ff.net[2], SVDQuantLinear) \
                and ff.net[2].act_unsigned:
            ff.__class__ = KernelFeedForward
    return n
