"""GGML K-quant encoders (Q4_K, Q5_K, Q6_K), numpy, for writing GGUF files gguf-py cannot quantize to.

gguf-py only dequantizes K-types and llama.cpp's quantizer is C; these encoders write the exact ggml block layouts
(ggml-common.h ``block_q4_K`` / ``block_q5_K`` / ``block_q6_K``). The scales come from a small search per sub-block,
the idea of llama.cpp's ``make_qkx2_quants`` / ``make_qx_quants`` in a cheaper, vectorised form: a few candidate
steps around the plain min/max (type-1: Q4_K, Q5_K) or absmax (type-0: Q6_K) step; for each, the values are rounded
once and step (and offset) are refit to those levels by least squares; the candidate with the least squared error
(known in closed form from the same sums) wins. Super-block scales are then rounded to fp16, sub-block scales to 6
(Q4/5_K) or 8 (Q6_K) bits, and each value is rounded to the nearest level of its *rounded* scale. The error is
unweighted (llama.cpp weights large values more without an importance matrix); on Gaussian, Laplacian and uniform
weights it is within about 1 % of llama.cpp's reference quantizer (tests/fixtures/peers/llamacpp/). The bytes differ
from llama.cpp's in the last bits; gguf-py's ``dequantize`` and ComfyUI-GGUF's loader decode them identically.
Rows must be whole 256-value super-blocks.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
TYPE_SIZES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
# Candidate steps, as divisors of the sub-block's range (type-1) or of its extreme value (type-0), around the plain
# min/max step: a coarser step keeps every value in range, a finer one clips the extremes a little but rounds the
# bulk more finely (which pays off for bell-shaped weights); four candidates get within ~1 % of llama.cpp's 20-step
# scan in 0.3-0.8x its CPU time (benchmarks/gguf_encode_bench.py).
TYPE1_SPANS = (-0.75, -0.25, 0.25, 0.75)  # added to the top level, 15 (Q4_K) / 31 (Q5_K)
TYPE0_SPANS = (31.0, 31.7, 32.3, 33.0)  # |extreme| / step, levels -32..31


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("...i,...i->...", a, b)


def _safe_inv(s: np.ndarray) -> np.ndarray:
    return np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)


def _type1_fit(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """x [..., 32] -> (step >= 0, offset <= 0) per sub-block, x ~= step * q + offset with q in 0..levels."""
    n = x.shape[-1]
    ones = np.ones(n, dtype=x.dtype)
    sx, sxx = x @ ones, _dot(x, x)
    lo = np.minimum(x.min(-1), 0.0)
    z = x - lo[..., None]  # >= 0; every candidate rounds z / step
    span = z.max(-1)
    q = np.empty_like(z)
    best_err = best_step = best_off = None
    for extra in TYPE1_SPANS:
        step = span / (levels + extra)
        np.multiply(z, _safe_inv(step)[..., None], out=q)
        np.clip(np.rint(q, out=q), 0, levels, out=q)
        sq, sqq, sxq = q @ ones, _dot(q, q), _dot(x, q)
        det = n * sqq - sq * sq
        ok = det > 0
        det = np.where(ok, det, 1.0)
        new_step = (n * sxq - sx * sq) / det
        new_off = (sqq * sx - sq * sxq) / det
        above = new_off > 0  # the format's offset is -dmin * m with m >= 0: refit the step alone
        new_step = np.where(above, sxq / np.where(sqq > 0, sqq, 1.0), new_step)
        new_off = np.where(above, 0.0, new_off)
        step, off = np.where(ok, new_step, step), np.where(ok, new_off, lo)
        err = sxx - 2 * step * sxq - 2 * off * sx + step * step * sqq + 2 * step * off * sq + n * off * off
        if best_err is None:
            best_err, best_step, best_off = err, step, off
        else:
            take = err < best_err
            best_err = np.where(take, err, best_err)
            best_step, best_off = np.where(take, step, best_step), np.where(take, off, best_off)
    return np.maximum(best_step, 0.0), np.minimum(best_off, 0.0)


def _type1_scales(x: np.ndarray, levels: int):
    """x [n, 8, 32] -> (d f16 [n], dmin f16 [n], sc u8 [n, 8], m u8 [n, 8], q u8 [n, 8, 32]) with
    x ~= d*sc*q - dmin*m."""
    step, off = _type1_fit(x, levels)
    mins = -off
    d = _f16(step.max(axis=-1) / 63.0)
    dmin = _f16(mins.max(axis=-1) / 63.0)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.rint(step * _safe_inv(df)).clip(0, 63).astype(np.uint8)
    m = np.rint(mins * _safe_inv(dminf)).clip(0, 63).astype(np.uint8)
    step_r = (df * sc.astype(np.float32))[..., None]
    off_r = (dminf * m.astype(np.float32))[..., None]
    q = np.rint((x + off_r) * _safe_inv(step_r)).clip(0, levels).astype(np.uint8)
    return d, dmin, sc, m, q


def _type0_fit(x: np.ndarray) -> np.ndarray:
    """x [..., 16] -> signed step per sub-block, x ~= step * q with q in -32..31 (the extreme value at -32)."""
    sxx = _dot(x, x)
    extreme = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    q = np.empty_like(x)
    best_err = best_step = None
    for span in TYPE0_SPANS:
        step = -extreme / span
        np.multiply(x, _safe_inv(step)[..., None], out=q)
        np.clip(np.rint(q, out=q), -32, 31, out=q)
        sqq, sxq = _dot(q, q), _dot(x, q)
        step = np.where(sqq > 0, sxq / np.where(sqq > 0, sqq, 1.0), step)
        err = sxx - step * sxq
        if best_err is None:
            best_err, best_step = err, step
        else:
            take = err < best_err
            best_err, best_step = np.where(take, err, best_err), np.where(take, step, best_step)
    return best_step


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
    scale = _type0_fit(sub)
    d = _f16(np.abs(scale).max(axis=-1) / 127.0)
    df = d.astype(np.float32)[:, None]
    sc = np.rint(scale * _safe_inv(df)).clip(-128, 127).astype(np.int8)
    step = (df * sc.astype(np.float32))[..., None]
    q = np.rint(sub * _safe_inv(step)).clip(-32, 31).astype(np.int16) + 32  # 0..63
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


__all__ = ["QUANTIZERS", "TYPE0_SPANS", "TYPE1_SPANS", "TYPE_SIZES", "quantize", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k"]
