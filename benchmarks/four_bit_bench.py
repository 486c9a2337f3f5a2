"""4-bit DiT formats next to fp8 and GGUF: weight error, output error, latent error, memory and CPU speed vs fp32.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/four_bit_bench.py [--tokens 1024] [--repeat 3] [--json]
                                                                        [--skip-layer] [--layer-tokens 580]

The model is the 128-wide one-block DiT behind the nunchaku fixtures (qwenstudio.testing.svdquant_files; nunchaku
needs 128-channel tiles, the suite's tiny DiT is narrower), so the two committed nunchaku files
(tests/fixtures/peers/nunchaku, written by deepcompressor's packer) are measured on the exact model they came from.
Every other format is written from that fp32 model by our converters. Per format:

- ``w_err``: max |W_eff - W| / max |W| over the block linears (W_eff: the layer's dequantized weight; for SVDQuant
  ``residual / smooth + up @ down``),
- ``out_rms``: RMS(out - out_fp32) / RMS(out_fp32) of one DiT forward on fixed random inputs,
- ``MiB``: bytes of the DiT's tensors once loaded (this tiny model: embeddings and low-rank factors weigh more than at
  full size; ``bits/w @20B`` is the block-linear cost at Qwen-Image's real shapes, computed from the format),
- ``latent``: rel-L2 of the latents after a tiny generate (2 steps, 64², the engine with the tiny TE/VAE) vs fp32,
- ``GB @20.4B``: the DiT's memory at Qwen-Image's size, 20.43e9 x bits/weight / 8 (block linears at real shapes),
- ``cpu_s`` / ``time``: median single-thread CPU seconds of a forward, and relative to fp32 (no 4-bit kernels here:
  dequantize + matmul).

Rows: files written by our converters (bf16, fp8 scaled, GGUF, ``convert --to int4``), the quantize-on-load modes
(``--quant fp8`` with emulated fp8 compute, ``--quant int4``), bitsandbytes NF4 (the layers ``--quant nf4`` builds, run
through bitsandbytes' CPU backend as the engine runs them; skipped without ``bitsandbytes``),
torchao's int4 weight-only (an evaluation, not a qwenstudio mode: ``PrototypeInt4WeightOnlyConfig``, its CPU layout,
which takes bf16 activations; skipped without ``torchao``) and the nunchaku files. A second table (``--skip-layer``
to omit) times one shape-true linear, 3072 -> 12288 on 580 tokens, per implementation.
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
# --quant fp8 keeps the image MLP's down projection (12288 -> 3072, 37.7M of 339.7M per block) in float.
# NF4: 4-bit codes + an fp32 absmax per 64 (no double quantization); torchao int4 g64: bf16 scale + zero per 64.
REAL_BITS = {
    "fp32": 32.0, "bf16": 16.0, "fp8_scaled": 8.0, "fp8_on_load": (302.0 * 8 + 37.7 * 16) / 339.7,
    "gguf_q8_0": 8.5, "gguf_q4_0": 4.5, "int4_g64": 4.5, "nf4": 4.5, "torchao_int4_g64": 4.5,
    "svdq_int4_r32": (226.5 * 4.47 + 113.2 * 4.5) / 339.7, "svdq_nvfp4_r128": (226.5 * 5.39 + 113.2 * 4.5) / 339.7,
}
FULL_PARAMS = 20.43e9


def _weights(model):
    """Module name -> effective float weight of every block linear, whatever its storage."""
    import torch

    from qwenstudio.engine.quant.fp8 import FP8Linear
    from qwenstudio.engine.quant.gguf_linear import GGUFLinear
    from qwenstudio.engine.quant.int4 import Int4WeightLinear
    from qwenstudio.engine.quant.svdquant import SVDQuantLinear

    out = {}
    for name, m in model.named_modules():
        if not name.startswith("transformer_blocks."):
            continue
        kind = type(m).__name__
        if kind == "Linear4bit":  # bitsandbytes NF4
            from qwenstudio.engine.quant.nf4 import nf4_dequantized_weight

            out[name] = nf4_dequantized_weight(m)
        elif kind == "Linear" and type(m.weight).__name__ != "Parameter":  # a torchao tensor subclass: W = I @ W.T
            eye = torch.eye(m.in_features, dtype=m.weight.dtype)
            out[name] = torch.nn.functional.linear(eye, m.weight).t().float()
        elif isinstance(m, SVDQuantLinear):
            out[name] = m.effective_weight()
        elif isinstance(m, Int4WeightLinear | FP8Linear):
            out[name] = m.dequantized_weight()
        elif isinstance(m, GGUFLinear):
            out[name] = m.dequantize_weight()
        elif type(m).__name__ == "Linear":
            out[name] = m.weight.detach().float()
    return out


def _nbytes(model) -> int:
    """Bytes actually held: a tensor subclass (torchao) by its inner tensors, bitsandbytes weights with their
    quant-state absmax (kept outside the module's parameters)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if hasattr(t, "__tensor_flatten__") and type(t).__name__ not in ("Parameter", "Tensor", "Params4bit"):
            names, _ = t.__tensor_flatten__()
            for name in names:
                add(getattr(t, name))
            return
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for t in (*model.parameters(), *model.buffers()):
        if t is not None:
            add(t)
            state = getattr(t, "quant_state", None)
            if state is not None:
                add(state.absmax)
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
        out = model(**inputs)[0].float()
        times = []
        for _ in range(repeat):
            t = time.process_time()  # CPU time of this process: robust to other jobs on a shared machine
            model(**inputs)
            times.append(time.process_time() - t)
    return statistics.median(times), out


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _torchao_int4(model) -> None:
    """torchao's CPU int4 weight-only (group 64, tinygemm qparams) on the same layers our int4 quantizes."""
    import torch
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    from qwenstudio.engine.quant.fp8 import keep_high_precision

    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=64, set_inductor_config=False),
              filter_fn=lambda m, n: type(m) is torch.nn.Linear and not keep_high_precision(n) and m.in_features % 64 == 0)


def _rows(root: Path):
    """(label, REAL_BITS key, engine factory) per row."""

    from qwenstudio import Engine
    from qwenstudio.testing.svdquant_files import FP4_FILE, INT4_FILE

    def load(name, **kw):
        return lambda: Engine.load(name, models_dirs=(root,), device="cpu", variant="tiny", **kw)

    def torchao():
        engine = load("fp32", dtype="bfloat16")()
        _torchao_int4(engine.components.transformer)
        return engine

    rows = [("fp32", "fp32", load("fp32")), ("bf16 (file)", "bf16", load("bf16")),
            ("fp8_scaled (file)", "fp8_scaled", load("fp8_scaled")),
            ("fp8 (--quant fp8, fp8 compute)", "fp8_on_load", load("fp32", quant="fp8")),
            ("gguf_q8_0", "gguf_q8_0", load("Q8_0")), ("gguf_q4_0", "gguf_q4_0", load("Q4_0")),
            ("int4 g64 (convert --to int4)", "int4_g64", load("int4")),
            ("int4 g64 (--quant int4)", "int4_g64", load("fp32", quant="int4"))]
    bnb = _installed("bitsandbytes")
    rows.append(("nf4 (bitsandbytes, --quant nf4)", "nf4", load("fp32", quant="nf4") if bnb else None))
    rows.append(("nf4 file (diffusers bnb save)", "nf4", load("qwen-image-nf4") if bnb else None))
    # torchao's CPU int4 takes bf16 activations: compare it with bf16 compute, plain and with our int4
    rows.append(("bf16 compute (fp32 file)", "bf16", load("fp32", dtype="bfloat16")))
    rows.append(("int4 g64 (--quant int4, bf16 compute)", "int4_g64", load("fp32", dtype="bfloat16", quant="int4")))
    rows.append(("torchao int4 g64 (bf16 compute, eval)", "torchao_int4_g64",
                 torchao if _installed("torchao") else None))
    rows += [("svdq_int4_r16 (nunchaku file)", "svdq_int4_r32", load(INT4_FILE.removesuffix(".safetensors"))),
             ("svdq_nvfp4_r32 (nunchaku file)", "svdq_nvfp4_r128", load(FP4_FILE.removesuffix(".safetensors")))]
    return rows


def _write_models(root: Path, source) -> None:
    """models/: the fp32 source DiT and its conversions, the nunchaku fixtures, the tiny TE/VAE/tokenizer."""
    import shutil

    from qwenstudio.engine.formats.convert import convert, save_tensors
    from qwenstudio.engine.formats.gguf import write_dit_gguf
    from qwenstudio.engine.formats.keymaps import CONFIG_METADATA_KEY
    from qwenstudio.testing.formats import write_comfy_models_dir
    from qwenstudio.testing.svdquant_files import FIXTURES, FP4_FILE, INT4_FILE, SVDQ_DIT_CONFIG
    from qwenstudio.testing.tiny import write_diffusers_folder

    write_comfy_models_dir(root, write_diffusers_folder(root.parent / "tiny-qwen-image"), variants=())
    dm = root / "diffusion_models"
    sd = {k: v.detach() for k, v in source.state_dict().items()}
    src = save_tensors(sd, dm / "fp32.safetensors", {"format": "pt", CONFIG_METADATA_KEY: json.dumps(SVDQ_DIT_CONFIG)})
    convert(src, dm / "fp8_scaled.safetensors", "fp8_scaled")
    convert(src, dm / "int4.safetensors", "int4")
    convert(src, dm / "bf16.safetensors", "comfy", dtype="bf16")
    for q in ("Q8_0", "Q4_0"):
        write_dit_gguf(sd, dm / f"{q}.gguf", q, config=SVDQ_DIT_CONFIG)
    for f in (INT4_FILE, FP4_FILE):
        shutil.copy(FIXTURES / f, dm / f)
    # the folder diffusers' bitsandbytes quantizer + save_pretrained wrote from the same model
    shutil.copytree(FIXTURES.parent / "bnb" / "qwen-image-nf4", dm / "qwen-image-nf4")


def dit_table(args) -> list[dict]:
    import torch

    from qwenstudio.testing.svdquant_files import build_source_dit

    source = build_source_dit()
    ref_w = _weights(source)
    inputs = _inputs(args.tokens)
    gen = {"prompt": "a red apple", "seed": 4, "steps": 2, "width": 64, "height": 64}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        _write_models(root, source)
        base_t = ref_out = ref_lat = None
        for label, bits_key, make in _rows(root):
            bits = REAL_BITS.get(bits_key)
            row = {"format": label, "bits_per_weight_at_20B": bits, "GB_at_20B": FULL_PARAMS * bits / 8e9}
            if make is None:
                rows.append({**row, "skipped": "not installed"})
                continue
            engine = make()
            model = engine.components.transformer
            dt = engine.components.dtype
            ins = {k: v.to(dt) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
            w = _weights(model)
            t, out = _time(model, ins, args.repeat)
            latents = engine.generate(**gen).latents.float()
            if base_t is None:
                base_t, ref_out, ref_lat = t, out, latents
            w_err = max(((w[k] - ref_w[k]).abs().max() / ref_w[k].abs().max()).item() for k in ref_w)
            rows.append({**row, "w_err": w_err,
                         "out_rms": ((out - ref_out).pow(2).mean() / ref_out.pow(2).mean()).sqrt().item(),
                         "latent_rel_l2": ((latents - ref_lat).norm() / ref_lat.norm()).item(),
                         "MiB": _nbytes(model) / 2**20, "cpu_s": t, "time_vs_fp32": t / base_t})
            del engine, model
    return rows


def layer_table(args) -> list[dict]:
    """One 3072 -> 12288 linear (Qwen-Image's MLP up projection) on ``--layer-tokens`` tokens, per implementation:
    CPU seconds per forward, rel-L2 error vs the fp32 product, weight bytes."""
    import copy

    import torch

    from qwenstudio.engine.quant.fp8 import quantize_linear_fp8
    from qwenstudio.engine.quant.int4 import quantize_linear_int4

    g = torch.Generator().manual_seed(0)
    k, n = 3072, 12288
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
    x = torch.randn(1, args.layer_tokens, k, generator=g)
    with torch.no_grad():
        exact = lin(x)
    cases = [("fp32 dense", lambda: lin, torch.float32), ("bf16 dense", lambda: copy.deepcopy(lin).bfloat16(),
             torch.bfloat16), ("fp8 e4m3 (upcast)", lambda: quantize_linear_fp8(lin), torch.float32),
             ("int4 g64 ours, fp32 act", lambda: quantize_linear_int4(lin), torch.float32),
             ("int4 g64 ours, bf16 act", lambda: quantize_linear_int4(lin), torch.bfloat16)]
    if _installed("bitsandbytes"):
        def nf4(dtype):
            from qwenstudio.engine.quant.nf4 import quantize_model_nf4

            m = torch.nn.Sequential(copy.deepcopy(lin))
            quantize_model_nf4(m, device="cpu", compute_dtype=dtype)
            return m[0]
        for dt, act in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            cases.append((f"nf4 bitsandbytes CPU, {act} act", lambda dt=dt: nf4(dt), dt))
    if _installed("torchao"):
        def tao():
            m = torch.nn.Sequential(copy.deepcopy(lin).bfloat16())
            _torchao_int4(m)
            return m[0]
        cases.append(("torchao int4 g64, bf16 act", tao, torch.bfloat16))
    rows = []
    for label, make, dt in cases:
        m = make()
        xx = x.to(dt)
        with torch.no_grad():
            y = m(xx).float()
            times = []
            for _ in range(args.repeat):
                t = time.process_time()
                m(xx)
                times.append(time.process_time() - t)
        rows.append({"layer": label, "cpu_s": statistics.median(times),
                     "rel_l2": ((y - exact).norm() / exact.norm()).item(), "weight_MiB": _nbytes(m) / 2**20})
    return rows


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layer-tokens", type=int, default=580)
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread: CPU time then measures the work, not the scheduling
    rows = dit_table(args)
    layers = [] if args.skip_layer else layer_table(args)
    if args.json:
        print(json.dumps({"dit": rows, "layer": layers}, indent=2))
        return
    print(f"{'format':38} {'w_err':>7} {'out_rms':>7} {'latent':>7} {'bits/w':>6} {'GB@20.4B':>8} {'cpu_s':>7} "
          f"{'time':>5}")
    for r in rows:
        head = f"{r['format']:38}"
        tail = f"{r['bits_per_weight_at_20B']:6.2f} {r['GB_at_20B']:8.1f}"
        if "skipped" in r:
            print(f"{head} {'(' + r['skipped'] + ')':>23} {tail}")
            continue
        print(f"{head} {r['w_err']:7.4f} {r['out_rms']:7.4f} {r['latent_rel_l2']:7.4f} {tail} {r['cpu_s']:7.3f} "
              f"{r['time_vs_fp32']:5.2f}")
    if layers:
        print(f"\none linear 3072 -> 12288, {args.layer_tokens} tokens, 1 thread")
        print(f"{'implementation':38} {'cpu_s':>7} {'rel_l2':>7} {'weight MiB':>10}")
        for r in layers:
            print(f"{r['layer']:38} {r['cpu_s']:7.3f} {r['rel_l2']:7.4f} {r['weight_MiB']:10.1f}")


if __name__ == "__main__":
    main()
