"""Portable weight-only int4 (``qwenstudio convert --to int4``): written by the CLI, named by ``models``, weights
within the int4 step, runs on CPU in the engine, LoRAs on it equal LoRAs on its dequantized weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from qwenstudio.cli.main import app
from qwenstudio.engine.formats.comfy import load_dit_file
from qwenstudio.engine.formats.detect import detect
from qwenstudio.engine.lora.adapters import LoraManager
from qwenstudio.engine.quant.int4 import (
    Int4WeightLinear,
    dequantize_int4,
    int4_rounding_bound,
    pack_nibbles,
    quantize_int4,
    unpack_nibbles,
)
from qwenstudio.errors import InvalidRequest
from qwenstudio.testing.loras import write_lora
from qwenstudio.testing.svdquant_files import build_source_dit, save_source_dit, source_dit_inputs

# Max |latent difference| vs the fp32 model after 2 steps at 64x64 (latent std 1.45), measured on CPU: 0.24.
LATENT_TOL = 0.4


@pytest.fixture(scope="module")
def source():
    return build_source_dit()


@pytest.fixture(scope="module")
def files(tmp_path_factory, source, tiny_folder):
    """models/: the fp32 source DiT, its int4 conversion written by the CLI, tiny TE/VAE/tokenizer, a LoRA."""
    from qwenstudio.testing.formats import write_comfy_models_dir

    root = tmp_path_factory.mktemp("int4-models")
    write_comfy_models_dir(root, tiny_folder, variants=())
    src = save_source_dit(source, root / "diffusion_models" / "wide-fp32.safetensors", prefix="model.diffusion_model.")
    dst = root / "diffusion_models" / "wide-int4.safetensors"
    result = CliRunner().invoke(app, ["convert", str(src), str(dst), "--to", "int4"])
    assert result.exit_code == 0, result.output
    write_lora(root / "loras" / "style.safetensors", source, "comfy", seed=3)
    return root, src, dst


def test_pack_round_trip_and_grid():
    w = torch.randn(8, 128)
    packed, scale, zero = quantize_int4(w)
    assert packed.shape == (8, 64) and scale.shape == zero.shape == (8, 2)
    assert torch.equal(pack_nibbles(unpack_nibbles(packed)), packed)
    deq = dequantize_int4(packed, scale, zero)
    assert ((deq - w).abs() <= int4_rounding_bound(scale, zero)).all()
    assert int(unpack_nibbles(pack_nibbles(torch.tensor([[3, 12]])))[0, 1]) == 12  # high nibble = odd column
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(torch.randn(4, 40))


def test_converted_file_is_named_and_within_the_int4_step(files, source):
    root, src, dst = files
    info = detect(dst)
    assert (info.role, info.quant, info.dtype) == ("dit", "int4_g64", "int4")
    assert dst.stat().st_size < 0.45 * src.stat().st_size  # fp32 -> int4 (keep-list layers stay bf16)
    listing = CliRunner().invoke(app, ["models", "--json", "--models-dir", str(root)])
    entry = next(f for f in json.loads(listing.output)["files"] if f["name"] == "wide-int4")
    assert entry["quant"] == "int4_g64"
    model = load_dit_file(dst, device="cpu", dtype=torch.float32)
    ref = dict(source.named_modules())
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, Int4WeightLinear):
            err = (m.dequantized_weight() - ref[name].weight).abs()
            assert (err <= int4_rounding_bound(m.scales, m.zeros)).all(), name
            n += 1
    assert n == 14  # block linears: 8 attention, 4 MLP, 2 modulation; embeddings, norm_out, proj_out stay bf16
    assert type(model.get_submodule("img_in")).__name__ == "Linear"


def test_lora_on_int4_base_equals_lora_on_dequantized_base(files, source, tmp_path):
    _, _, dst = files
    model = load_dit_file(dst, device="cpu", dtype=torch.float32)
    dense = copy.deepcopy(source)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in dense.state_dict():
                dense.state_dict()[k].copy_(v)
        for name, m in model.named_modules():
            if isinstance(m, Int4WeightLinear):
                dense.get_submodule(name).weight.copy_(m.dequantized_weight())
    path, _ = write_lora(tmp_path / "l.safetensors", source, "kohya", seed=4)
    inputs = source_dit_inputs()
    with torch.no_grad():
        LoraManager(model).set_stack([(path, 0.7)])
        LoraManager(dense).set_stack([(path, 0.7)])
        diff = (model(**inputs)[0] - dense(**inputs)[0]).abs().max().item()
    print(f"int4: LoRA on the int4 base vs on its dequantized float weights {diff:.2e}")
    assert diff <= 1e-5


def test_engine_runs_int4_file_on_cpu(files):
    from qwenstudio import Engine

    root, _, _ = files
    kw = {"prompt": "a boat", "seed": 2, "steps": 2, "width": 64, "height": 64}
    ref = Engine.load("wide-fp32", models_dirs=(root,), device="cpu", variant="tiny").generate(**kw).latents
    engine = Engine.load("wide-int4", models_dirs=(root,), device="cpu", variant="tiny")
    out = engine.generate(**kw)
    err = (out.latents - ref).abs().max().item()
    print(f"int4: max |latent - fp32| after 2 steps {err:.3f} (latent std {ref.std():.2f})")
    assert out.images[0].metadata["model"]["format"] == "int4" and err < LATENT_TOL
    styled = engine.generate(**kw, loras=[("style", 1.0)]).latents
    assert (styled - out.latents).abs().max() > 1e-3
    assert torch.equal(engine.generate(**kw).latents, out.latents)


def test_four_bit_file_refused_as_conversion_source(files, tmp_path):
    _, _, dst = files
    from qwenstudio.engine.formats.convert import convert

    with pytest.raises(InvalidRequest, match="int4_g64"):
        convert(dst, tmp_path / "x.safetensors", "comfy")


def test_bitsandbytes_nf4_file_is_named_and_refused_with_the_reason_without_bitsandbytes(tiny_folder, tmp_path,
                                                                                          monkeypatch):
    """A DiT saved by diffusers' bitsandbytes quantizer keeps each 4-bit Linear as packed uint8 + quant-state keys;
    it is recognised by those keys and listed as bnb_nf4 without bitsandbytes, and refused with the reason there
    (files diffusers itself wrote, loaded and run: tests/engine/test_nf4.py)."""
    import sys

    from qwenstudio.engine.formats.convert import save_tensors
    from qwenstudio.engine.loading import component_files, iter_safetensors
    from qwenstudio.errors import UnsupportedFormat

    sd = dict(iter_safetensors(component_files(tiny_folder / "transformer")))
    w = sd.pop("transformer_blocks.0.attn.to_q.weight")
    layer = "transformer_blocks.0.attn.to_q.weight"
    sd[layer] = torch.zeros(w.numel() // 2, 1, dtype=torch.uint8)
    sd[layer + ".absmax"] = torch.ones(w.numel() // 64)
    sd[layer + ".quant_map"] = torch.linspace(-1, 1, 16)
    sd[layer + ".quant_state.bitsandbytes__nf4"] = torch.zeros(64, dtype=torch.uint8)
    path = save_tensors(sd, tmp_path / "qwen-image-nf4.safetensors", {"format": "pt"})
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not importable, as where it is not installed
    info = detect(path)
    assert (info.role, info.quant, info.dtype) == ("dit", "bnb_nf4", "nf4")
    with pytest.raises(UnsupportedFormat, match="not installed.*--to int4"):
        load_dit_file(path, device="cpu")
