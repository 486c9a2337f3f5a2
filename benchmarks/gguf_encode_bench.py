"""GGUF encoders on one Qwen-Image-sized matrix: CPU time and rel. RMS error per type, ours next to llama.cpp's.

    PYTHONPATH=src python benchmarks/gguf_encode_bench.py [--size 3072] [--repeat 3] [--ggml-lib libggml-base.so]

Encodes an N(0, 0.02) ``size x size`` float32 matrix (one attention projection of the real DiT at 3072) with what
``qwenstudio convert --to gguf_*`` uses: our K-quant encoders (quant/kquant.py) for Q4_K/Q5_K/Q6_K, gguf-py's numpy
quantizer for Q8_0/Q5_0/Q4_0. With ``--ggml-lib`` (a ggml build's ``libggml-base.so``, see
tests/fixtures/peers/SOURCES.md) llama.cpp's C quantizer (``ggml_quantize_chunk``) encodes the same matrix, and the
ratios ours / llama.cpp of time and error are printed. Time: best single-thread CPU seconds of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

GGML_IDS = {"Q4_0": 2, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


def ggml_quantizer(path: str):
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
        rows, n = x.shape
        out = np.zeros((rows, lib.ggml_row_size(GGML_IDS[qtype], n)), dtype=np.uint8)
        lib.ggml_quantize_chunk(GGML_IDS[qtype], x.ctypes.data, out.ctypes.data, 0, rows, n, None)
        return out

    return quantize


def best_time(fn, repeat: int) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(repeat):
        t = time.process_time()
        out = fn()
        times.append(time.process_time() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=3072)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ggml-lib", help="libggml-base.so, to compare with llama.cpp's quantizer")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import gguf

    from qwenstudio.engine.quant.kquant import QUANTIZERS
    from qwenstudio.engine.quant.kquant import quantize as kquantize

    x = (0.02 * np.random.default_rng(0).standard_normal((a.size, a.size))).astype(np.float32)
    theirs = ggml_quantizer(a.ggml_lib) if a.ggml_lib else None

    def rel(raw, qtype):
        y = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(x.shape)
        return float(np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean()))

    report = {}
    for qtype in ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0"):
        if qtype in QUANTIZERS:
            t, raw = best_time(lambda q=qtype: kquantize(x, q), a.repeat)
        else:
            t, raw = best_time(lambda q=qtype: gguf.quants.quantize(x, gguf.GGMLQuantizationType[q]), a.repeat)
        row = {"writer": "qwenstudio" if qtype in QUANTIZERS else "gguf-py", "cpu_s": round(t, 3),
               "rel_rms": round(rel(raw, qtype), 5)}
        if theirs:
            t2, raw2 = best_time(lambda q=qtype: theirs(x, q), a.repeat)
            row.update(llamacpp_cpu_s=round(t2, 3), llamacpp_rel_rms=round(rel(raw2, qtype), 5),
                       time_ratio=round(t / t2, 2), error_ratio=round(row["rel_rms"] / rel(raw2, qtype), 3))
        report[qtype] = row
    if a.json:
        print(json.dumps(report, indent=1))
        return
    for qtype, row in report.items():
        print(f"{qtype:5s} " + "  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
