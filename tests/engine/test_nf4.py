"""bitsandbytes NF4/FP4 on the CPU, entered where users enter: DiT files written by diffusers' own bitsandbytes
quantizer + ``save_pretrained`` (tests/fixtures/peers/bnb) listed by ``qwenstudio models``, generated from by the CLI
with a LoRA, read as a transformer folder, a single file and inside a pipeline folder; ``--quant nf4`` on a float
DiT re-run from its PNG; LoRAs on the 4-bit base equal the same LoRAs on its dequantized weights; offload and
``state_dict`` see the stored codes unchanged; the refusals where bitsandbytes cannot serve."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from qwenstudio import Engine
from qwenstudio.cli.main import app
from qwenstudio.engine.quant.nf4 import nf4_support
from qwenstudio.errors import InvalidRequest, UnsupportedFormat
from qwenstudio.testing.loras import write_lora
from qwenstudio.testing.svdquant_files import SVDQ_DIT_CONFIG, build_source_dit, save_source_dit

bnb = pytest.importorskip("bitsandbytes")  # in the `test` extra (CI); skipped only where it is not installed

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "peers" / "bnb"
KW = {"prompt": "a boat", "seed": 2, "steps": 2, "width": 64, "height": 64}
CLI = ["--variant", "tiny", "--device", "cpu", "--steps", "2", "--width", "64", "--height", "64", "--seed", "5"]
FP32 = torch.float32  # module-scoped engines are built before conftest's QWENSTUDIO_DTYPE=float32 is set
# Latents after 2 steps at 64x64 vs the fp32 source (latent std 1.38), measured on CPU in fp32, (rel-L2, max |diff|):
# nf4 (0.105, 0.645), fp4 double-quant (0.143, 0.766). Every Linear is 4-bit, as diffusers' quantizer does by
# default (embeddings, modulation and proj_out too, which `--quant nf4` keeps float), the rest bf16. Bounds ~1.5x.
LATENT_TOL = {"qwen-image-nf4": (0.16, 1.0), "qwen-image-fp4-dq": (0.22, 1.15)}


@pytest.fixture(scope="module")
def source():
    return build_source_dit()


@pytest.fixture(scope="module")
def models(tmp_path_factory, source, tiny_folder):
    """models/: the diffusers-written NF4 and FP4 transformer folders (as `save_pretrained` left them) under
    diffusion_models/, the same DiT in fp32, tiny TE/VAE/tokenizer and a LoRA."""
    from qwenstudio.testing.formats import write_comfy_models_dir

    root = tmp_path_factory.mktemp("nf4-models")
    write_comfy_models_dir(root, tiny_folder, variants=())
    for name in LATENT_TOL:
        shutil.copytree(FIXTURES / name, root / "diffusion_models" / name)
    save_source_dit(source, root / "diffusion_models" / "wide-fp32.safetensors")
    write_lora(root / "loras" / "style.safetensors", source, "comfy", seed=3)
    return root


@pytest.fixture(scope="module")
def fp32_latents(models):
    engine = Engine.load("wide-fp32", models_dirs=(models,), device="cpu", variant="tiny", dtype=FP32)
    return {lora: engine.generate(**KW, loras=[("style", 0.8)] if lora else []).latents for lora in (False, True)}


@pytest.fixture(scope="module")
def nf4_engine(models):
    return Engine.load("qwen-image-nf4", models_dirs=(models,), device="cpu", variant="tiny", dtype=FP32)


def _errors(got, want) -> tuple[float, float]:
    return float((got - want).norm() / want.norm()), float((got - want).abs().max())


def _dequantized_copy(engine) -> Engine:
    """The same engine with every bitsandbytes layer replaced by a float nn.Linear of its dequantized weight."""
    from qwenstudio.engine.quant.nf4 import nf4_dequantized_weight

    twin = Engine.load("qwen-image-nf4", models_dirs=engine.registry.dirs, device="cpu", variant="tiny", dtype=FP32)
    tr = twin.components.transformer
    for name, m in list(tr.named_modules()):
        if isinstance(m, bnb.nn.Linear4bit):
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            dense.weight = nn.Parameter(nf4_dequantized_weight(m), requires_grad=False)
            if m.bias is not None:
                dense.bias = nn.Parameter(m.bias.detach().float().clone(), requires_grad=False)
            parent, _, leaf = name.rpartition(".")
            setattr(tr.get_submodule(parent) if parent else tr, leaf, dense.eval())
    return twin


def test_models_lists_the_diffusers_written_files_by_their_format(models):
    result = CliRunner().invoke(app, ["models", "--json", "--models-dir", str(models)])
    assert result.exit_code == 0, result.output
    files = {f["name"]: f for f in json.loads(result.output)["files"]}
    # the file is diffusers' diffusion_pytorch_model.safetensors: named after its folder
    nf4, fp4 = files["qwen-image-nf4"], files["qwen-image-fp4-dq"]
    assert (nf4["kind"], nf4["quant"], nf4["dtype"]) == ("dit", "bnb_nf4", "nf4")
    assert (fp4["kind"], fp4["quant"], fp4["dtype"]) == ("dit", "bnb_fp4", "fp4")


@pytest.mark.parametrize("name", list(LATENT_TOL))
def test_diffusers_written_file_vs_the_same_model_in_fp32(models, fp32_latents, name):
    engine = Engine.load(name, models_dirs=(models,), device="cpu", variant="tiny", dtype=FP32)
    layers = [m for m in engine.components.transformer.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 20  # diffusers quantizes every Linear (no keep-list by default)
    assert layers[0].weight.quant_state.nested == name.endswith("-dq")
    out = engine.generate(**KW)
    rel, err = _errors(out.latents, fp32_latents[False])
    print(f"{name}: latents after 2 steps vs fp32: rel-L2 {rel:.3f}, max |diff| {err:.3f} "
          f"(latent std {fp32_latents[False].std():.2f})")
    assert 0 < rel < LATENT_TOL[name][0] and err < LATENT_TOL[name][1]
    model = out.images[0].metadata["model"]
    assert (model["format"], model["quant"]) == ("bitsandbytes", "bnb_" + name.split("-")[2])


def test_cli_generate_on_the_nf4_folder_with_a_lora(models, nf4_engine, fp32_latents, tmp_path):
    """`--model` at the folder diffusers wrote (and at its file): a PNG saying what ran, the LoRA applied."""
    from PIL import Image

    from qwenstudio.outputs import read_png_metadata

    folder = models / "diffusion_models" / "qwen-image-nf4"
    for i, target in enumerate((folder, folder / "diffusion_pytorch_model.safetensors")):
        out = tmp_path / f"{i}.png"
        result = CliRunner().invoke(app, ["generate", "a boat", "--model", str(target), "--models-dir", str(models),
                                          *CLI, "--lora", "style:0.8", "--out", str(out)])
        assert result.exit_code == 0, result.output
        meta = read_png_metadata(out)
        assert meta["model"]["name"] == "qwen-image-nf4" and meta["model"]["format"] == "bitsandbytes"
        assert meta["model"]["quant"] == "bnb_nf4" and meta["loras"][0]["name"] == "style"
    assert Image.open(tmp_path / "0.png").tobytes() == Image.open(tmp_path / "1.png").tobytes()
    styled = nf4_engine.generate(**KW, loras=[("style", 0.8)]).latents
    plain = nf4_engine.generate(**KW).latents
    rel, err = _errors(styled, fp32_latents[True])
    print(f"nf4 file + LoRA vs fp32 + LoRA: latents after 2 steps rel-L2 {rel:.3f}, max |diff| {err:.3f}")
    assert rel < LATENT_TOL["qwen-image-nf4"][0] and err < LATENT_TOL["qwen-image-nf4"][1]
    assert (styled - plain).abs().max() > 1e-3


def test_pipeline_folders_with_the_nf4_transformer_whole_and_sharded(tiny_folder, tmp_path):
    """A diffusers pipeline folder whose transformer/ is diffusers' bitsandbytes save: the same DiT as the file.
    Sharded too (full-size NF4 transformers exceed diffusers' 10 GB shard): the same state dict re-saved by
    diffusers' ``save_pretrained(max_shard_size=...)``, which puts some layers' statistics in another shard than
    their codes."""
    from qwenstudio.engine.formats.comfy import load_dit_file

    file = load_dit_file(FIXTURES / "qwen-image-nf4" / "diffusion_pytorch_model.safetensors", device="cpu",
                         dtype=torch.bfloat16)
    whole, sharded = tmp_path / "qwen-image-nf4-pipeline", tmp_path / "qwen-image-nf4-sharded"
    for pipe in (whole, sharded):
        shutil.copytree(tiny_folder, pipe, ignore=shutil.ignore_patterns("transformer"))
    shutil.copytree(FIXTURES / "qwen-image-nf4", whole / "transformer")
    file.save_pretrained(sharded / "transformer", max_shard_size="150KB")
    shutil.copy(FIXTURES / "qwen-image-nf4" / "config.json", sharded / "transformer" / "config.json")
    weight_map = json.loads((sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = {}
    for key, shard in weight_map["weight_map"].items():
        shards.setdefault(key.split(".weight")[0], set()).add(shard)
    assert len(set(weight_map["weight_map"].values())) == 3 and any(len(s) > 1 for s in shards.values())
    g = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 16, 64, generator=g), "encoder_hidden_states": torch.randn(1, 5, 32),
              "encoder_hidden_states_mask": torch.ones(1, 5), "timestep": torch.tensor([0.4]),
              "img_shapes": [(1, 4, 4)], "return_dict": False}
    with torch.no_grad():
        want = load_dit_file(FIXTURES / "qwen-image-nf4" / "diffusion_pytorch_model.safetensors", device="cpu",
                             dtype=FP32)(**inputs)[0]
        for pipe in (whole, sharded):
            engine = Engine.load(pipe, device="cpu", variant="tiny", dtype=FP32)
            assert engine.describe()["quant"] == "bnb_nf4" and engine.describe()["format"] == "diffusers"
            assert torch.equal(engine.components.transformer(**inputs)[0], want), pipe.name


def test_other_quantized_folders_are_refused_by_name(tiny_folder, tmp_path):
    pipe = tmp_path / "qwen-image-int8"
    shutil.copytree(tiny_folder, pipe)
    config = json.loads((pipe / "transformer" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}
    (pipe / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedFormat, match="bitsandbytes 8-bit quantized transformer"):
        Engine.load(pipe, device="cpu", variant="tiny", dtype=FP32)


def test_a_lone_file_takes_its_shapes_from_the_quant_state(models, tmp_path):
    """Copied out of its folder (no config.json): the 4-bit layers' logical shapes come from their quant-state
    blobs (the packed codes are [n*k/2, 1]); the head size here is not the real 128, so only the RoPE split is
    inferred rather than read."""
    from qwenstudio.engine.formats.comfy import load_dit_file

    lone = tmp_path / "qwen-image-nf4.safetensors"
    shutil.copy(FIXTURES / "qwen-image-nf4" / "diffusion_pytorch_model.safetensors", lone)
    config = dict(load_dit_file(lone, device="cpu", dtype=FP32).config)
    assert {k: config[k] for k in SVDQ_DIT_CONFIG if k != "axes_dims_rope"} == \
        {k: v for k, v in SVDQ_DIT_CONFIG.items() if k != "axes_dims_rope"}


def test_lora_on_the_nf4_file_equals_lora_on_its_dequantized_weights(nf4_engine):
    """fp32 runs: bitsandbytes dequantizes to fp32 and multiplies (its bf16 fused CPU kernel is switched off), so
    the side branch sees the same base numbers: latents after 2 steps agree to float rounding."""
    twin = _dequantized_copy(nf4_engine)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in twin.components.transformer.modules())
    base = (nf4_engine.generate(**KW).latents - twin.generate(**KW).latents).abs().max().item()
    got = nf4_engine.generate(**KW, loras=[("style", 0.8)]).latents
    want = twin.generate(**KW, loras=[("style", 0.8)]).latents
    diff = (got - want).abs().max().item()
    print(f"nf4 file: vs its dequantized weights {base:.2e}; with a LoRA {diff:.2e}")
    assert base <= 1e-5 and diff <= 1e-5


def test_stored_codes_never_change_and_offload_gives_the_resident_pixels(models, nf4_engine):
    """bitsandbytes would repack the codes in place on the first CPU forward (AVX512-bf16 machines); ours keep
    the layout diffusers saved, so state_dict() after runs is the file, and streamed blocks run the same."""
    from safetensors import safe_open

    resident = nf4_engine.generate(**KW)
    sd = nf4_engine.components.transformer.state_dict()
    key = "transformer_blocks.0.attn.to_q.weight"
    with safe_open(str(models / "diffusion_models" / "qwen-image-nf4" / "diffusion_pytorch_model.safetensors"),
                   framework="pt") as f:
        assert torch.equal(sd[key], f.get_tensor(key)) and torch.equal(sd[key + ".absmax"], f.get_tensor(key + ".absmax"))
    layer = nf4_engine.components.transformer.transformer_blocks[0].attn.to_q
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    moved = layer.to("cpu")  # Module.to: bitsandbytes' Params4bit.to keeps its quant state
    assert isinstance(moved.weight, bnb.nn.Params4bit) and moved.weight.bnb_quantized
    with pytest.warns(UserWarning, match="memory plan .*group_offload"):
        streamed = Engine.load("qwen-image-nf4", models_dirs=(models,), device="cpu", variant="tiny",
                               offload="group_offload", vram_budget=1, dtype=FP32)
    got = streamed.generate(**KW)
    assert got.images[0].image.tobytes() == resident.images[0].image.tobytes()
    assert (got.latents - resident.latents).abs().max() <= 1e-5


def test_cli_quant_nf4_on_a_float_dit_and_from_image(models, tmp_path):
    from PIL import Image

    from qwenstudio.outputs import read_png_metadata

    base = ["generate", "a boat", "--model", "wide-fp32", "--models-dir", str(models), *CLI]
    first = CliRunner().invoke(app, [*base, "--quant", "nf4", "--lora", "style:0.8", "--out", str(tmp_path / "a.png")])
    assert first.exit_code == 0, first.output
    acc = read_png_metadata(tmp_path / "a.png")["model"]["acceleration"]
    assert acc["quant"] == "nf4" and acc["nf4_layers_quantized"] == 14 and acc["nf4_blocksize"] == 64
    assert acc["nf4_compute_dtype"] == "float32" and acc["bitsandbytes"] == bnb.__version__
    again = CliRunner().invoke(app, ["generate", "--from-image", str(tmp_path / "a.png"), "--model", "wide-fp32",
                                     "--models-dir", str(models), "--device", "cpu", "--out", str(tmp_path / "b.png")])
    assert again.exit_code == 0, again.output
    assert read_png_metadata(tmp_path / "b.png")["model"]["acceleration"]["quant"] == "nf4"
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()
    plain = CliRunner().invoke(app, [*base, "--lora", "style:0.8", "--out", str(tmp_path / "c.png")])
    assert plain.exit_code == 0, plain.output
    assert Image.open(tmp_path / "c.png").tobytes() != Image.open(tmp_path / "a.png").tobytes()  # nf4 is lossy


def test_nf4_decision():
    assert nf4_support("cpu", bnb_version="0.50.2") is None
    assert nf4_support("cpu", bnb_version="0.47.0.dev0") is None
    assert nf4_support("cuda", cuda_available=True, bnb_version="0.45.0") is None  # CUDA: any version
    old = nf4_support("cpu", bnb_version="0.46.1")
    assert "0.46.1" in old and "0.47+" in old and "--quant int4" in old
    assert "not on mps" in nf4_support("mps", bnb_version="0.50.2")
    assert "no CUDA device" in nf4_support("cuda:0", cuda_available=False, bnb_version="0.50.2")
    assert "not installed" in nf4_support("cpu", bnb_version=None)


def test_refused_in_one_line_where_bitsandbytes_is_missing(models, monkeypatch):
    """`sys.modules[name] = None` is how Python spells "not importable": find_spec answers None, import fails."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    for args in (["--model", "wide-fp32", "--quant", "nf4"], ["--model", "qwen-image-nf4"]):
        result = CliRunner().invoke(app, ["generate", "a boat", "--models-dir", str(models), *CLI, *args])
        assert result.exit_code != 0
        line = result.output.strip()
        assert "\n" not in line and "Traceback" not in line and "pip install" in line, line
    with pytest.raises(InvalidRequest) as e:  # before the model is even looked up
        Engine.load("no-such-model", device="cpu", quant="nf4")
    assert e.value.code == "quant_unavailable"
    with pytest.raises(UnsupportedFormat, match="not installed.*--to int4"):
        Engine.load("qwen-image-nf4", models_dirs=(models,), device="cpu", variant="tiny", dtype=FP32)


def test_refused_on_a_device_bitsandbytes_does_not_serve_here():
    from qwenstudio.engine.quant.load_time import check_quant_device

    with pytest.raises(InvalidRequest) as e:
        check_quant_device("nf4", torch.device("mps"))
    assert e.value.code == "quant_unavailable" and "mps" in str(e.value)
