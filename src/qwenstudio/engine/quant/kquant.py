"""GGML K-quant encoders (Q4_K, Q5_K, Q6_K), numpy, for writing GGUF files gguf-py cannot quantize to.

gguf-py only dequantizes K-types and llama.cpp's quantizer is C; these encoders write the exact ggml block layouts
(ggml-common.h ``block_q4_K`` / ``block_q5_K`` / ``block_q6_K``) with a simple, deterministic choice of scales:
per sub-block min/max (type-1: Q4_K, Q5_K) or absmax (type-0: Q6_K), super-block scales rounded to fp16, sub-block
scales to 6 (Q4/5_K) or 8 (Q6_K) bits, then each value rounded to the nearest level of its *rounded* scale. That is
not llama.cpp's iterative search (its files differ in the last bits), but the blocks are valid ggml blocks that
gguf-py's ``dequantize`` and ComfyUI-GGUF's loader decode identically, with a rounding error within about one
quantization step. Rows must be whole 256-value super-blocks.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
TYPE_SIZES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _type1_scales(x: np.ndarray, levels: int):
    """x [n, 8, 32] -> (d f16 [n], dmin f16 [n], sc u8 [n, 8], m u8 [n, 8], q u8 [n, 8, 32]) with
    x ~= d*sc*q - dmin*m."""
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = x.max(axis=-1)
    scale = (hi - lo) / levels  # per sub-block step, >= 0
    mins = -lo  # >= 0
    d = _f16(scale.max(axis=-1) / 63.0)
    dmin = _f16(mins.max(axis=-1) / 63.0)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.rint(scale / df), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dminf > 0, np.rint(mins / dminf), 0).clip(0, 63).astype(np.uint8)
        step = (df * sc.astype(np.float32))[..., None]
        off = (dminf * m.astype(np.float32))[..., None]
        q = np.where(step > 0, np.rint((x + off) / step), 0).clip(0, levels).astype(np.uint8)
    return d, dmin, sc, m, q


def _pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> the 12 bytes ``get_scale_min`` unpacks."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return out


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q [n, 8, 32] (4-bit) -> 128 bytes: group g holds sub-block 2g in low nibbles, 2g+1 in high ones."""
    q = q.reshape(q.shape[0], 4, 2, 32)
    return ((q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)).reshape(q.shape[0], 128).astype(np.uint8)


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.size % QK_K:
        raise ValueError(f"{x.size} values are not whole {QK_K}-value K-quant super-blocks")
    return x.reshape(-1, QK_K)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    d, dmin, sc, m, q = _type1_scales(b.reshape(-1, 8, 32), 15)
    n = b.shape[0]
    return np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2),
                           _pack_scale_min(sc, m), _pack_nibbles(q)], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    d, dmin, sc, m, q = _type1_scales(b.reshape(-1, 8, 32), 31)
    n = b.shape[0]
    high = (q >> 4) & 1  # [n, 8, 32]: bit i of qh[l] is the fifth bit of sub-block i's value l
    qh = np.zeros((n, 32), dtype=np.uint8)
    for i in range(8):
        qh |= (high[:, i] << i).astype(np.uint8)
    return np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2),
                           _pack_scale_min(sc, m), qh, _pack_nibbles(q & 15)], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    n = b.shape[0]
    sub = b.reshape(n, 16, 16)
    scale = np.maximum(-sub.min(axis=-1) / 32.0, sub.max(axis=-1) / 31.0)  # levels -32..31, none clipped
    d = _f16(scale.max(axis=-1) / 127.0)
    df = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.rint(scale / df), 0).clip(-128, 127).astype(np.int8)
        step = (df * sc.astype(np.float32))[..., None]
        q = np.where(step > 0, np.rint(sub / step), 0).clip(-32, 31).astype(np.int16) + 32  # 0..63
    Q = q.astype(np.uint8).reshape(n, 2, 4, 32)  # (half, quarter, lane) as _q6_k reads them back
    lo, hi = Q & 15, Q >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=-1)  # [n, 2, 64]
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [n, 2, 32]
    return np.concatenate([ql.reshape(n, 128).astype(np.uint8), qh.reshape(n, 64).astype(np.uint8),
                           sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """float array [..., k] (k a multiple of 256) -> uint8 [..., k / 256 * type_size], gguf-py's raw layout."""
    x = np.asarray(x, dtype=np.float32)
    blocks = QUANTIZERS[qtype](x)
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // QK_K * TYPE_SIZES[qtype])


__all__ = ["QUANTIZERS", "TYPE_SIZES", "quantize", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k"]
