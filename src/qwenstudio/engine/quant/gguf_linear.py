"""GGUF-quantized ``nn.Linear``: the raw GGML blocks stay in memory, the weight is dequantized per forward.

Why: a Q4_K Qwen-Image DiT is ~12 GB where the bf16 one is ~41 GB; inflating it at load time would defeat the point.
Dequantization is pure torch (ported from city96/ComfyUI-GGUF ``dequant.py``, itself a port of gguf-py's numpy
code), computed in float32 with the same operation order as gguf-py, so results match ``gguf.quants.dequantize``
bit for bit, then cast to the activation dtype. It runs on whatever device the bytes live on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

QK_K = 256
K_SCALE_SIZE = 12

# GGML type id -> (name, elements per block, bytes per block). Same values as gguf.GGML_QUANT_SIZES, kept here so
# importing this module does not need gguf-py.
QTYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}
FLOAT_QTYPES = frozenset({0, 1, 30})  # stored as plain floats: loaded as ordinary parameters


def qtype_id(qtype: int | str) -> int:
    """Accept a GGML type id, a ``GGMLQuantizationType`` or its name ('Q4_K')."""
    if isinstance(qtype, str):
        for k, (name, _, _) in QTYPES.items():
            if name == qtype.upper():
                return k
        raise ValueError(f"unsupported GGUF tensor type {qtype!r}")
    if int(qtype) not in QTYPES:
        raise ValueError(f"unsupported GGUF tensor type id {int(qtype)}")
    return int(qtype)


def qtype_name(qtype: int | str) -> str:
    return QTYPES[qtype_id(qtype)][0]


def is_supported(qtype: int) -> bool:
    return int(qtype) in QTYPES


def row_bytes(qtype: int | str, n: int) -> int:
    """Bytes of one row of ``n`` elements."""
    _, block, size = QTYPES[qtype_id(qtype)]
    if n % block:
        raise ValueError(f"row of {n} elements is not a multiple of the {qtype_name(qtype)} block size {block}")
    return n // block * size


# ---- block dequantizers: uint8 [n_blocks, type_size] -> float32 [n_blocks, block_size] ---------------------------

def _split(blocks: torch.Tensor, *sizes: int) -> tuple[torch.Tensor, ...]:
    return torch.split(blocks, [*sizes, blocks.shape[1] - sum(sizes)], dim=1)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.float16).float()


def _shifts(values: list[int], shape: tuple[int, ...], device) -> torch.Tensor:
    return torch.tensor(values, device=device, dtype=torch.uint8).reshape(shape)


def _nibbles(qs: torch.Tensor, n: int, group: int) -> torch.Tensor:
    """Low then high nibbles of each group of ``group`` bytes -> [n, -1] uint8."""
    q = qs.reshape(n, -1, 1, group) >> _shifts([0, 4], (1, 1, 2, 1), qs.device)
    return (q & 0x0F).reshape(n, -1)


def _high_bits32(qh: torch.Tensor, n: int) -> torch.Tensor:
    """The 32 fifth bits of Q5_0/Q5_1 (a little-endian uint32 per block) -> [n, 32] uint8."""
    b = qh.to(torch.int32)
    word = b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24
    bits = word.reshape(n, 1) >> torch.arange(32, device=qh.device, dtype=torch.int32).reshape(1, 32)
    return (bits & 1).to(torch.uint8)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d, x = _split(b, 2)
    return x.contiguous().view(torch.int8).float() * _f16(d)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d, qs = _split(b, 2)
    q = _nibbles(qs, b.shape[0], 16).to(torch.int8) - 8
    return _f16(d) * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m, qs = _split(b, 2, 2)
    return _f16(d) * _nibbles(qs, b.shape[0], 16).float() + _f16(m)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, qh, qs = _split(b, 2, 4)
    q = (_nibbles(qs, n, 16) | (_high_bits32(qh, n) << 4)).to(torch.int8) - 16
    return _f16(d) * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, m, qh, qs = _split(b, 2, 2, 4)
    q = _nibbles(qs, n, 16) | (_high_bits32(qh, n) << 4)
    return _f16(d) * q.float() + _f16(m)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12 bytes of eight 6-bit scales and eight 6-bit mins of Q4_K/Q5_K."""
    n = scales.shape[0]
    d, m, m_d = torch.split(scales.reshape(n, 3, 4), 1, dim=1)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.reshape(n, 8).float(), mn.reshape(n, 8).float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin, scales, qs = _split(b, 2, 2, K_SCALE_SIZE)
    sc, mn = _scale_min_k4(scales)
    d = (_f16(d) * sc).reshape(n, -1, 1)
    dm = (_f16(dmin) * mn).reshape(n, -1, 1)
    q = _nibbles(qs, n, 32).reshape(n, -1, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin, scales, qh, qs = _split(b, 2, 2, K_SCALE_SIZE, QK_K // 8)
    sc, mn = _scale_min_k4(scales)
    d = (_f16(d) * sc).reshape(n, -1, 1)
    dm = (_f16(dmin) * mn).reshape(n, -1, 1)
    ql = _nibbles(qs, n, 32).reshape(n, -1, 32)
    hi = qh.reshape(n, -1, 1, 32) >> _shifts(list(range(8)), (1, 1, 8, 1), b.device)
    hi = (hi & 1).reshape(n, -1, 32)
    q = (ql | (hi << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales, d = _split(b, QK_K // 2, QK_K // 4, QK_K // 16)
    d = (_f16(d) * scales.contiguous().view(torch.int8).float()).reshape(n, QK_K // 16, 1)
    lo = _nibbles(ql, n, 64).reshape(n, -1, 32)
    hi = qh.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)
    hi = (hi & 3).reshape(n, -1, 32)
    q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, -1).float()
    return (d * q).reshape(n, QK_K)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs, d, dmin = _split(b, QK_K // 16, QK_K // 4, 2)
    dl = (_f16(d) * (scales & 0x0F).float()).reshape(n, QK_K // 16, 1)
    ml = (_f16(dmin) * (scales >> 4).float()).reshape(n, QK_K // 16, 1)
    q = (qs.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3
    q = q.reshape(n, QK_K // 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = _split(b, QK_K // 8, QK_K // 4, 12)
    lsc = (scales[:, :8].reshape(n, 1, 8) >> _shifts([0, 4], (1, 2, 1), b.device)).reshape(n, 16)
    hsc = (scales[:, 8:].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], (1, 4, 1), b.device)).reshape(n, 16)
    sc = ((lsc & 0x0F) | ((hsc & 0x03) << 4)).to(torch.int8) - 32
    dl = (_f16(d) * sc.float()).reshape(n, 16, 1)
    ql = (qs.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)).reshape(n, 16, QK_K // 16) & 3
    qh = (hmask.reshape(n, -1, 1, 32) >> _shifts(list(range(8)), (1, 1, 8, 1), b.device)).reshape(n, 16, QK_K // 16)
    qh = (qh & 1) ^ 1  # the offset of 4 applies where the mask bit is 0
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _f16_blocks(b: torch.Tensor) -> torch.Tensor:
    return _f16(b)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


DEQUANTIZERS: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] = {
    0: _f32, 1: _f16_blocks, 30: _bf16,
    2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0,
    10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k, 14: _q6_k,
}


def dequantize(raw: torch.Tensor, qtype: int | str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
    """Raw GGML bytes (uint8, any shape whose total is whole blocks) -> tensor of logical ``shape`` in ``dtype``."""
    q = qtype_id(qtype)
    _, _, size = QTYPES[q]
    blocks = raw.reshape(-1).view(torch.uint8).reshape(-1, size)
    return DEQUANTIZERS[q](blocks).reshape(shape).to(dtype)


# ---- the module -------------------------------------------------------------------------------------------------

class GGUFLinear(nn.Module):
    """Linear layer whose ``weight`` is a uint8 buffer of GGML blocks ([out, bytes per row]); ``bias`` is a normal
    float parameter. The state-dict keys are those of ``nn.Linear`` so a file's tensor names load unchanged."""

    def __init__(self, in_features: int, out_features: int, qtype: int | str, bias: bool = True,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qtype = qtype_id(qtype)
        self.register_buffer(
            "weight", torch.empty(out_features, row_bytes(self.qtype, in_features), dtype=torch.uint8, device=device)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, w, b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={qtype_name(self.qtype)}, bias={self.bias is not None}")


def swap_linears_to_gguf(model: nn.Module, tensor_infos: Mapping[str, tuple]) -> list[str]:
    """Replace every ``nn.Linear`` whose ``<name>.weight`` is quantized in the file by an empty (meta) GGUFLinear.
    ``tensor_infos`` maps module-relative tensor names to tuples starting ``(qtype, shape, ...)``. Float-typed
    tensors (F32/F16/BF16) are left to ordinary parameters. Returns the swapped module names."""
    swapped = []
    for name, mod in list(model.named_modules()):
        info = tensor_infos.get(f"{name}.weight")
        if type(mod) is not nn.Linear or info is None or int(info[0]) in FLOAT_QTYPES:
            continue
        if tuple(info[1]) != (mod.out_features, mod.in_features):
            continue  # shape mismatch: left for the loader to report with the file's name
        bias = mod.bias
        new = GGUFLinear(mod.in_features, mod.out_features, info[0], bias=bias is not None, device="meta",
                         dtype=bias.dtype if bias is not None else None)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], new)
        swapped.append(name)
    return swapped


__all__ = ["QTYPES", "GGUFLinear", "dequantize", "qtype_id", "qtype_name", "row_bytes", "swap_linears_to_gguf"]
