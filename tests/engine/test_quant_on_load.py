"""4-bit quantize-on-load: ``--quant int4`` on a float DiT file is the same model as its ``convert --to int4`` file,
takes LoRAs exactly as its dequantized weights do, and re-runs from the PNG; ``--quant nf4`` (bitsandbytes) builds
diffusers' NF4 layers (its CLI runs and refusals: tests/engine/test_nf4.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

from qwenstudio import Engine
from qwenstudio.cli.main import app
from qwenstudio.engine.quant.int4 import Int4WeightLinear
from qwenstudio.errors import InvalidRequest
from qwenstudio.testing.loras import write_lora
from qwenstudio.testing.svdquant_files import build_source_dit, save_source_dit, source_dit_inputs

KW = {"prompt": "a boat", "seed": 2, "steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def source():
    return build_source_dit()


@pytest.fixture(scope="module")
def models(tmp_path_factory, source, tiny_folder):
    """models/: the 128-wide fp32 DiT (every block linear a multiple of the int4 group), its int4 conversion, tiny
    TE/VAE/tokenizer and a LoRA."""
    from qwenstudio.engine.formats.convert import convert
    from qwenstudio.testing.formats import write_comfy_models_dir

    root = tmp_path_factory.mktemp("quant-on-load")
    write_comfy_models_dir(root, tiny_folder, variants=())
    src = save_source_dit(source, root / "diffusion_models" / "wide-fp32.safetensors", prefix="model.diffusion_model.")
    convert(src, root / "diffusion_models" / "wide-int4.safetensors", "int4")
    write_lora(root / "loras" / "style.safetensors", source, "comfy", seed=3)
    return root


@pytest.fixture(scope="module")
def int4_engine(models):
    return Engine.load("wide-fp32", models_dirs=(models,), device="cpu", variant="tiny", quant="int4")


def test_quant_int4_is_the_converted_file_and_is_recorded(models, int4_engine):
    file_engine = Engine.load("wide-int4", models_dirs=(models,), device="cpu", variant="tiny")
    on_load = dict(int4_engine.components.transformer.named_modules())
    n = 0
    for name, m in file_engine.components.transformer.named_modules():
        if isinstance(m, Int4WeightLinear):
            q = on_load[name]
            assert isinstance(q, Int4WeightLinear), name
            assert torch.equal(q.qweight, m.qweight) and torch.equal(q.scales, m.scales), name
            n += 1
    assert n == 14  # the block linears; embeddings, norm_out, proj_out stay float (the weight keep-list)
    assert type(int4_engine.components.transformer.img_in).__name__ == "Linear"
    out = int4_engine.generate(**KW)
    # the same int4 layers; the file also rounds the keep-list layers and the biases to bf16, --quant keeps them fp32
    diff = (out.latents - file_engine.generate(**KW).latents).abs().max().item()
    print(f"--quant int4 vs the convert --to int4 file: max |latent diff| after 2 steps {diff:.4f}")
    assert diff < 0.02
    acc = out.images[0].metadata["model"]["acceleration"]
    assert acc["quant"] == "int4" and acc["int4_group_size"] == 64
    assert (acc["int4_layers_quantized"], acc["int4_layers_skipped"]) == (14, 0)


def test_lora_on_quant_int4_base_equals_lora_on_its_dequantized_base(models, int4_engine, source):
    dense = Engine.load("wide-fp32", models_dirs=(models,), device="cpu", variant="tiny")
    tr = dense.components.transformer
    with torch.no_grad():
        for name, m in int4_engine.components.transformer.named_modules():
            if isinstance(m, Int4WeightLinear):
                tr.get_submodule(name).weight.copy_(m.dequantized_weight())
    plain = int4_engine.generate(**KW).latents
    got = int4_engine.generate(**KW, loras=[("style", 0.8)]).latents
    want = dense.generate(**KW, loras=[("style", 0.8)]).latents
    diff = (got - want).abs().max().item()
    print(f"--quant int4: LoRA on the int4 base vs on its dequantized weights, latents after 2 steps {diff:.2e}")
    assert diff <= 1e-5 and (got - plain).abs().max() > 1e-3
    assert torch.equal(int4_engine.generate(**KW).latents, plain)  # the LoRA is a side branch: removed cleanly


def test_cli_quant_int4_png_reruns_with_the_same_quantization(models, tmp_path):
    from PIL import Image

    from qwenstudio.outputs import read_png_metadata

    base = ["generate", "a boat", "--model", "wide-fp32", "--variant", "tiny", "--models-dir", str(models),
            "--device", "cpu", "--steps", "2", "--width", "64", "--height", "64", "--seed", "5"]
    first = CliRunner().invoke(app, [*base, "--quant", "int4", "--lora", "style:0.8", "--out", str(tmp_path / "a.png")])
    assert first.exit_code == 0, first.output
    meta = read_png_metadata(tmp_path / "a.png")
    assert meta["model"]["acceleration"]["quant"] == "int4"
    again = CliRunner().invoke(app, ["generate", "--from-image", str(tmp_path / "a.png"), "--model", "wide-fp32",
                                     "--models-dir", str(models), "--device", "cpu", "--out", str(tmp_path / "b.png")])
    assert again.exit_code == 0, again.output
    assert read_png_metadata(tmp_path / "b.png")["model"]["acceleration"]["quant"] == "int4"
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.tobytes() == b.tobytes()
    plain = CliRunner().invoke(app, [*base, "--lora", "style:0.8", "--out", str(tmp_path / "c.png")])
    assert plain.exit_code == 0, plain.output
    assert Image.open(tmp_path / "c.png").tobytes() != a.tobytes()  # int4 is lossy: the quant had to be repeated


def test_quant_on_an_already_quantized_base_is_refused_before_loading(models, tmp_path, monkeypatch):
    """Every ``--quant`` needs float weights: on an int4, nunchaku or GGUF file (and a 4-bit one on an fp8 file) it
    is refused from the headers, in one CLI line, before any weight is read. Before this, ``--quant fp8`` on such a
    file quantized nothing while the PNG said ``quant: fp8``. An fp8 file still takes ``--quant fp8``."""
    import shutil

    from qwenstudio.engine import loading
    from qwenstudio.engine.formats.convert import convert
    from qwenstudio.engine.formats.gguf import write_dit_gguf
    from qwenstudio.testing.svdquant_files import FIXTURES, INT4_FILE, SVDQ_DIT_CONFIG

    models = shutil.copytree(models, tmp_path / "models")
    dm = models / "diffusion_models"
    shutil.copy(FIXTURES / INT4_FILE, dm / INT4_FILE)
    convert(dm / "wide-fp32.safetensors", dm / "wide-fp8.safetensors", "fp8_scaled", overwrite=True)
    source = build_source_dit()
    write_dit_gguf({k: v.detach() for k, v in source.state_dict().items()}, dm / "wide-Q8_0.gguf", "Q8_0",
                   config=SVDQ_DIT_CONFIG)
    refused = [("wide-int4", q) for q in ("int4", "nf4", "fp8")] + [
        (INT4_FILE.removesuffix(".safetensors"), "fp8"), ("wide-Q8_0", "fp8"), ("wide-Q8_0", "int4"),
        ("wide-fp8", "int4")]
    read = []
    monkeypatch.setattr(loading, "fill_module", lambda *a, **k: read.append(a))  # nothing may be read
    for name, quant in refused:
        with pytest.raises(InvalidRequest) as e:
            Engine.load(name, models_dirs=(models,), device="cpu", variant="tiny", quant=quant)
        assert e.value.code == "quant_needs_float_base" and "already" in str(e.value), (name, quant)
        r = CliRunner().invoke(app, ["generate", "x", "--model", name, "--models-dir", str(models), "--variant",
                                     "tiny", "--quant", quant, "--steps", "1"])
        assert r.exit_code != 0 and "Traceback" not in r.output and "already" in r.output, (name, quant, r.output)
        assert r.output.strip().count("\n") == 0, r.output
    assert not read
    monkeypatch.undo()
    fp8 = Engine.load("wide-fp8", models_dirs=(models,), device="cpu", variant="tiny", quant="fp8")
    assert fp8.acceleration["quant"] == "fp8" and fp8.acceleration["fp8_compute_layers"] > 0


def test_nf4_layers_match_bitsandbytes_and_take_loras(source, tmp_path):
    """The layers ``--quant nf4`` builds, run through bitsandbytes' own CPU backend: within NF4's step of the source
    weights, and a LoRA on them equals the LoRA on their dequantized weights (exactly, in fp32: the layers keep
    their stored layout, so bitsandbytes dequantizes to fp32 rather than using its bf16 fused CPU kernel)."""
    bnb = pytest.importorskip("bitsandbytes")
    from qwenstudio.engine.lora.adapters import LoraManager
    from qwenstudio.engine.quant.nf4 import nf4_dequantized_weight, quantize_model_nf4

    model = copy.deepcopy(source)
    names = quantize_model_nf4(model, device="cpu", compute_dtype=torch.float32)
    assert len(names) == 14 and type(model.img_in).__name__ == "Linear"
    dense = copy.deepcopy(source)
    ref = dict(source.named_modules())
    with torch.no_grad():
        for name in names:
            m = model.get_submodule(name)
            assert isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state.quant_type == "nf4"
            w = nf4_dequantized_weight(m)
            absmax = ref[name].weight.detach().reshape(-1, 64).abs().amax(1, keepdim=True)
            # NF4's widest gap between code values is 0.304 (-1 -> -0.696): half of it times the block's absmax
            err = (w - ref[name].weight).reshape(-1, 64).abs()
            assert (err <= 0.153 * absmax + 1e-6).all(), name
            dense.get_submodule(name).weight.copy_(w)
    path, _ = write_lora(tmp_path / "l.safetensors", source, "kohya", seed=4)
    inputs = source_dit_inputs()
    with torch.no_grad():
        exact = source(**inputs)[0]
        rel = ((model(**inputs)[0] - exact).norm() / exact.norm()).item()
        LoraManager(model).set_stack([(path, 0.7)])
        LoraManager(dense).set_stack([(path, 0.7)])
        diff = (model(**inputs)[0] - dense(**inputs)[0]).abs().max().item()
    print(f"nf4: DiT output rel-L2 vs fp32 {rel:.4f}; LoRA on NF4 vs on its dequantized weights {diff:.2e}")
    assert 0 < rel < 0.2 and diff <= 1e-5
