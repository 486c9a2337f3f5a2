"""4-bit DiT formats next to fp8 and GGUF: weight error, output error, resident memory and CPU speed vs fp32.

    PYTHONPATH=src python benchmarks/four_bit_bench.py [--tokens 1024] [--repeat 5] [--json]

The model is the 128-wide one-block DiT behind the nunchaku fixtures (qwenstudio.testing.svdquant_files; nunchaku
needs 128-channel tiles, the suite's tiny DiT is narrower), so the two committed nunchaku files
(tests/fixtures/peers/nunchaku, written by deepcompressor's packer) are measured on the exact model they came from.
Every other format is written from that fp32 model by our converters. Per format:

- ``w_err``: max |W_eff - W| / max |W| over the block linears (W_eff: the layer's dequantized weight; for SVDQuant
  ``residual / smooth + up @ down``),
- ``out_rms``: RMS(out - out_fp32) / RMS(out_fp32) of one DiT forward on fixed random inputs,
- ``MiB``: bytes of the DiT's tensors once loaded (this tiny model: embeddings and low-rank factors weigh more than at
  full size; ``bits/w @20B`` is the block-linear cost at Qwen-Image's real shapes, computed from the format),
- ``time``: median single-thread CPU time of a forward relative to fp32 (no 4-bit kernels here: dequantize +
  fp32 matmul).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

# Bits per block-linear weight at Qwen-Image's shapes (per block: attention 4 x 3072-wide incl. fused qkv, MLP
# 3072 <-> 12288, modulation 3072 -> 18432, img and txt streams). SVDQuant: 4-bit codes + scales (bf16 per 64 =
# 0.25 bit, fp8 per 16 = 0.5 bit) + the rank-r bf16 branch (r=32: 0.22 bit, r=128: 0.89 bit) on the W4A4 layers,
# and AWQ int4 g64 (4.5 bits) on the modulation third of the weights.
REAL_BITS = {
    "fp32": 32.0, "bf16": 16.0, "fp8_scaled": 8.0, "gguf_q8_0": 8.5, "gguf_q4_0": 4.5, "int4_g64": 4.5,
    "svdq_int4_r32": (226.5 * 4.47 + 113.2 * 4.5) / 339.7, "svdq_nvfp4_r128": (226.5 * 5.39 + 113.2 * 4.5) / 339.7,
}


def _weights(model):
    """Module name -> effective float weight of every block linear, whatever its storage."""
    from qwenstudio.engine.quant.fp8 import FP8Linear
    from qwenstudio.engine.quant.gguf_linear import GGUFLinear
    from qwenstudio.engine.quant.int4 import Int4WeightLinear
    from qwenstudio.engine.quant.svdquant import SVDQuantLinear

    out = {}
    for name, m in model.named_modules():
        if not name.startswith("transformer_blocks."):
            continue
        if isinstance(m, SVDQuantLinear):
            out[name] = m.effective_weight()
        elif isinstance(m, Int4WeightLinear | FP8Linear):
            out[name] = m.dequantized_weight()
        elif isinstance(m, GGUFLinear):
            out[name] = m.dequantize_weight()
        elif type(m).__name__ == "Linear":
            out[name] = m.weight.detach().float()
    return out


def _nbytes(model) -> int:
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _inputs(tokens: int):
    import torch

    side = int(tokens**0.5)
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, side * side, 64, generator=g),
            "encoder_hidden_states": torch.randn(1, 16, 32, generator=g),
            "encoder_hidden_states_mask": torch.ones(1, 16), "timestep": torch.tensor([0.6]),
            "img_shapes": [(1, side, side)], "return_dict": False}


def _time(model, inputs, repeat: int) -> tuple[float, object]:
    import torch

    with torch.no_grad():
        out = model(**inputs)[0]
        times = []
        for _ in range(repeat):
            t = time.process_time()  # CPU time of this process: robust to other jobs on a shared machine
            model(**inputs)
            times.append(time.process_time() - t)
    return statistics.median(times), out


def main() -> None:
    import torch

    from qwenstudio.engine.formats.comfy import load_dit_file
    from qwenstudio.engine.formats.convert import convert, save_tensors
    from qwenstudio.engine.formats.gguf import load_dit_gguf, write_dit_gguf
    from qwenstudio.engine.formats.keymaps import CONFIG_METADATA_KEY
    from qwenstudio.testing.svdquant_files import FIXTURES, FP4_FILE, INT4_FILE, SVDQ_DIT_CONFIG, build_source_dit

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread: CPU time then measures the work, not the scheduling

    source = build_source_dit()
    ref_w = _weights(source)
    inputs = _inputs(args.tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = save_tensors({k: v.detach() for k, v in source.state_dict().items()}, tmp / "fp32.safetensors",
                           {"format": "pt", CONFIG_METADATA_KEY: json.dumps(SVDQ_DIT_CONFIG)})
        files = {"fp32": src}
        for to in ("fp8_scaled", "int4"):
            files["int4_g64" if to == "int4" else to] = convert(src, tmp / f"{to}.safetensors", to)
        files["bf16"] = convert(src, tmp / "bf16.safetensors", "comfy", dtype="bf16")
        for q in ("Q8_0", "Q4_0"):
            files[f"gguf_{q.lower()}"] = write_dit_gguf({k: v.detach() for k, v in source.state_dict().items()},
                                                        tmp / f"{q}.gguf", q, config=SVDQ_DIT_CONFIG)
        files["svdq_int4_r16 (nunchaku file)"] = FIXTURES / INT4_FILE
        files["svdq_nvfp4_r32 (nunchaku file)"] = FIXTURES / FP4_FILE
        base_t = None
        for name, path in files.items():
            load = load_dit_gguf if path.suffix == ".gguf" else load_dit_file
            model = load(path, device="cpu", dtype=torch.float32)
            t, out = _time(model, inputs, args.repeat)
            if base_t is None:
                base_t, ref_out = t, out
            w = _weights(model)
            w_err = max(((w[k] - ref_w[k]).abs().max() / ref_w[k].abs().max()).item() for k in ref_w)
            rms = ((out - ref_out).pow(2).mean() / ref_out.pow(2).mean()).sqrt().item()
            key = {"svdq_int4_r16 (nunchaku file)": "svdq_int4_r32",
                   "svdq_nvfp4_r32 (nunchaku file)": "svdq_nvfp4_r128"}.get(name, name)  # the published ranks
            rows.append({"format": name, "w_err": w_err, "out_rms": rms, "MiB": _nbytes(model) / 2**20,
                         "bits_per_weight_at_20B": REAL_BITS.get(key), "time_vs_fp32": t / base_t})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'format':32} {'w_err':>8} {'out_rms':>8} {'MiB':>6} {'bits/w @20B':>11} {'time':>6}")
    for r in rows:
        bits = f"{r['bits_per_weight_at_20B']:.2f}" if r["bits_per_weight_at_20B"] else "-"
        print(f"{r['format']:32} {r['w_err']:8.4f} {r['out_rms']:8.4f} {r['MiB']:6.2f} {bits:>11} "
              f"{r['time_vs_fp32']:6.2f}")


if __name__ == "__main__":
    main()
