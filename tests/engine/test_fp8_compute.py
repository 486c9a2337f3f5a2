"""fp8 compute: the emulated arithmetic equals the reference formula and torch's own ``_scaled_mm``; ``--quant fp8``
quantizes the DiT except the keep-list and records what it did."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwenstudio import Engine
from qwenstudio.engine.quant.fp8 import FP8Linear, fp8_linear, quantize_activation, quantize_linear_fp8

E4M3_MAX = 448.0


def _data(seed=0, m=24, k=64, n=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m // 2, k, generator=g) * 3
    x[0, 0, 0] = 40.0  # one outlier activation: row-wise scaling must follow it
    w = torch.randn(n, k, generator=g) * 0.05
    return x, w, torch.randn(n, generator=g) * 0.1


def test_emulation_equals_the_reference_formula_rowwise():
    x, w, b = _data()
    wmax = w.abs().amax(dim=1, keepdim=True)
    sw = wmax / E4M3_MAX
    w8 = (w / sw).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    x2 = x.reshape(-1, 64)
    sx = x2.abs().amax(dim=1, keepdim=True) / E4M3_MAX
    x8 = (x2 / sx).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    reference = (x8.float() @ w8.float().t()) * sx * sw.t() + b  # the formula, written out
    out = fp8_linear(x, w8, sw, b, emulate=True)
    assert out.shape == (2, 12, 48)
    torch.testing.assert_close(out.reshape(-1, 48), reference, rtol=0, atol=1e-6)


def test_emulation_equals_torch_scaled_mm_per_tensor_and_rowwise():
    """torch ships a (slow) CPU ``_scaled_mm``: the GPU kernel's contract, checked against our emulation."""
    x, w, b = _data(1)
    for scale_w, input_scale in ((torch.tensor(0.002), torch.tensor(0.05)), (w.abs().amax(1, keepdim=True) / 448, None)):
        w8 = (w / scale_w).clamp(-448, 448).to(torch.float8_e4m3fn)
        emulated = fp8_linear(x, w8, scale_w, b, input_scale=input_scale, emulate=True)
        kernel = fp8_linear(x, w8, scale_w, b, input_scale=input_scale, emulate=False)
        tol = 2e-2 if input_scale is None else 1e-5  # row-wise _scaled_mm writes bf16 (8 bits of mantissa)
        torch.testing.assert_close(kernel, emulated, rtol=tol, atol=tol)


def test_fp8_compute_error_is_within_fp8_rounding_of_the_float_product():
    x, w, b = _data(2)
    exact = nn.functional.linear(x, w, b)
    lin = nn.Linear(64, 48)
    lin.weight.data, lin.bias.data = w.clone(), b.clone()
    q = quantize_linear_fp8(lin)
    q.compute = "emulate"
    rel = (q(x) - exact).norm() / exact.norm()
    assert 0 < rel < 0.08  # e4m3: 3 mantissa bits on both operands
    xq, sx = quantize_activation(x.reshape(-1, 64))
    assert sx.shape == (24, 1) and xq.dtype == torch.float8_e4m3fn


def test_quant_fp8_engine_keeps_sensitive_layers_and_records_it(tiny_engine):
    engine = Engine.load("tiny", device="cpu", quant="fp8")
    tr = engine.components.transformer
    acc = engine.describe()["acceleration"]
    assert acc["quant"] == "fp8" and acc["fp8_compute"] == "emulate" and acc["compile"] is False
    assert acc["fp8_compute_layers"] == acc["fp8_layers_quantized"] > 0
    assert type(tr.transformer_blocks[0].img_mlp.net[2]) is nn.Linear  # keep-list: image MLP down projection
    assert type(tr.proj_out) is nn.Linear and type(tr.img_in) is nn.Linear
    assert isinstance(tr.transformer_blocks[0].attn.to_q, FP8Linear)
    kw = {"prompt": "a red fox", "seed": 3, "steps": 3, "cfg": 3.0, "width": 64, "height": 64}
    out = engine.generate(**kw)
    ref = tiny_engine.generate(**kw)
    rel = float((out.latents - ref.latents).norm() / ref.latents.norm())
    assert 0 < rel < 0.1
    assert out.images[0].metadata["model"]["acceleration"]["quant"] == "fp8"


def test_fp8_on_gpu_without_compile_is_refused():
    """Eager fp8 is slower than bf16 on a GPU: refused before any layer is touched (checked on a CPU engine that
    claims a CUDA device; nothing runs on it)."""
    from qwenstudio.engine.acceleration import accelerate_engine
    from qwenstudio.errors import InvalidRequest

    engine = Engine.load("tiny", device="cpu")
    engine.components.device = torch.device("cuda")
    with pytest.raises(InvalidRequest) as e:
        accelerate_engine(engine, compile=False, quant="fp8")
    assert e.value.code == "fp8_needs_compile"
    assert not any(isinstance(m, FP8Linear) for m in engine.components.transformer.modules())
