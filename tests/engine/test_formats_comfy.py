"""ComfyUI single files load to the same weights (and the same images) as the diffusers folder they came from."""

from __future__ import annotations

import pytest
import torch

from qwenstudio import IncompatibleWeights
from qwenstudio.engine.formats.comfy import (
    QWEN25_VL_7B_CONFIG,
    QWEN_IMAGE_VAE_CONFIG,
    bundled_tokenizer,
    find_tokenizer,
    load_dit_file,
    load_single_files,
    load_text_encoder_file,
    load_vae_file,
    vae_key_to_comfy,
)
from qwenstudio.engine.quant.fp8 import FP8Linear, fp8_rounding_bound
from qwenstudio.testing.formats import DIT_VARIANTS, write_comfy_models_dir, write_dit_file, write_text_encoder_file

FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "fp8_scaled": torch.float8_e4m3fn,
       "fp8_scaled_legacy": torch.float8_e4m3fn, "fp8_scaled_input": torch.float8_e4m3fn}


@pytest.fixture(scope="module")
def comfy_dir(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy") / "models"
    paths = write_comfy_models_dir(root, tiny_folder, variants=DIT_VARIANTS)
    paths["dit_noprefix"] = write_dit_file(tiny_folder, root / "diffusion_models" / "noprefix.safetensors", "fp32",
                                           prefix=False)
    paths["te_fp8"] = write_text_encoder_file(tiny_folder, root / "text_encoders" / "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                              fp8_scaled=True)
    paths["te_fp32"] = write_text_encoder_file(tiny_folder, root / "text_encoders" / "te_fp32.safetensors", dtype="fp32")
    paths["te_prefixed"] = write_text_encoder_file(tiny_folder, root / "text_encoders" / "prefixed.safetensors",
                                                   prefix="text_encoders.qwen25_7b.transformer.")
    return paths


@pytest.fixture(scope="module")
def ref(tiny_folder):
    from qwenstudio.engine.loading import load_diffusers_folder

    return load_diffusers_folder(tiny_folder, device="cpu")


@pytest.mark.parametrize("variant", ["dit_fp32", "dit_noprefix"])
def test_lossless_dit_equals_folder(comfy_dir, ref, variant):
    ours = load_dit_file(comfy_dir[variant], device="cpu").state_dict()
    theirs = ref.transformer.state_dict()
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k


def test_bf16_dit_equals_folder_rounded_to_bf16(comfy_dir, ref):
    ours = load_dit_file(comfy_dir["dit_bf16"], device="cpu")
    assert ours.proj_out.weight.dtype == torch.float32  # loaded in the compute dtype of the device
    for k, v in ref.transformer.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v.to(torch.bfloat16).float()), k
    assert load_dit_file(comfy_dir["dit_bf16"], device="cpu", dtype=torch.bfloat16).proj_out.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("variant", ["fp8_e4m3fn", "fp8_e5m2", "fp8_scaled", "fp8_scaled_legacy", "fp8_scaled_input"])
def test_fp8_dit_stays_fp8_within_rounding_bound(comfy_dir, ref, variant):
    model = load_dit_file(comfy_dir[f"dit_{variant}"], device="cpu")
    theirs = ref.transformer.state_dict()
    fp8_layers = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert len(fp8_layers) == 28  # every Linear of the 2 blocks; img_in/txt_in/proj_out/norm_out/time embed stay high
    assert not isinstance(model.proj_out, FP8Linear) and not isinstance(model.img_in, FP8Linear)
    worst = 0.0
    for name, mod in fp8_layers.items():
        assert mod.weight.dtype == FP8[variant]
        scaled = variant.startswith("fp8_scaled")
        assert (mod.scale_weight is not None) == scaled
        assert (mod.scale_input is not None) == variant.endswith("input")
        orig = theirs[name + ".weight"]
        err = (mod.dequantized_weight() - orig).abs()
        assert bool((err <= fp8_rounding_bound(orig, FP8[variant], mod.scale_weight) + 1e-12).all()), name
        worst = max(worst, err.max().item())
        assert torch.equal(mod.bias, theirs[name + ".bias"].to(torch.bfloat16).float())  # non-fp8 tensors: bf16
    print(f"\n{variant}: max |dequantized - original| weight error = {worst:.3e}")
    assert worst > 0  # it really is quantized
    model.to(torch.float32)  # the engine's fp32 retry must not upcast stored fp8 weights
    assert next(iter(fp8_layers.values())).weight.dtype == FP8[variant]


def test_text_encoder_files(comfy_dir, ref):
    theirs = {k: v for k, v in ref.text_encoder.state_dict().items() if not k.startswith("lm_head")}
    for key in ("text_encoder", "te_prefixed"):  # written in bf16
        ours = load_text_encoder_file(comfy_dir[key], device="cpu").state_dict()
        for k, v in theirs.items():
            assert torch.equal(ours[k], v.to(torch.bfloat16).float()), (key, k)
    fp8 = load_text_encoder_file(comfy_dir["te_fp8"], device="cpu")
    layers = {n: m for n, m in fp8.named_modules() if isinstance(m, FP8Linear)}
    assert "model.language_model.layers.0.self_attn.q_proj" in layers and "model.visual.blocks.0.attn.qkv" in layers
    worst = 0.0
    for n, m in layers.items():
        orig = theirs[n + ".weight"]
        err = (m.dequantized_weight() - orig).abs()
        assert bool((err <= fp8_rounding_bound(orig, torch.float8_e4m3fn, m.scale_weight) + 1e-12).all()), n
        worst = max(worst, err.max().item())
    print(f"\ntext encoder fp8_scaled: max weight error = {worst:.3e}")


def test_vae_file_equals_folder(comfy_dir, ref):
    ours = load_vae_file(comfy_dir["vae"], device="cpu").state_dict()
    for k, v in ref.vae.state_dict().items():
        assert torch.equal(ours[k], v), k


def test_vae_key_map_agrees_with_diffusers_wan_converter():
    """On the real config (num_res_blocks=2) our diffusers->Wan names invert diffusers' own Wan->diffusers map."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from qwenstudio.engine.loading import build_empty

    model = build_empty(lambda: AutoencoderKLQwenImage.from_config(QWEN_IMAGE_VAE_CONFIG))
    keys = list(model.state_dict())
    comfy = {vae_key_to_comfy(k, 2): k for k in keys}
    assert len(comfy) == len(keys)
    back = convert_wan_vae_to_diffusers(dict(zip(comfy, comfy)))  # diffusers name -> (value) our comfy name
    assert len(back) == len(keys)
    assert all(comfy[ck] == dk for dk, ck in back.items())
    assert "decoder.upsamples.4.shortcut.weight" in comfy and "decoder.head.2.weight" in comfy and "conv2.weight" in comfy


def test_default_text_encoder_config_matches_comfy_file_shapes():
    """The built-in Qwen2.5-VL-7B config yields the shapes of ComfyUI's qwen_2.5_vl_7b_fp8_scaled.safetensors."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from qwenstudio.engine.loading import build_empty, text_encoder_key_map

    model = build_empty(lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(QWEN25_VL_7B_CONFIG)))
    sd = model.state_dict()
    for key, shape in {
        "model.embed_tokens.weight": (152064, 3584),
        "model.layers.27.self_attn.k_proj.weight": (512, 3584),
        "model.layers.0.mlp.down_proj.weight": (3584, 18944),
        "visual.blocks.31.mlp.down_proj.weight": (1280, 3420),
        "visual.merger.mlp.0.weight": (5120, 5120),
        "visual.merger.mlp.2.weight": (3584, 5120),
        "visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14),
    }.items():
        assert tuple(sd[text_encoder_key_map(key)].shape) == shape, key


@pytest.mark.parametrize("variant,tol", [("fp32", 0.0), ("bf16", 0.02), ("fp8_e4m3fn", 0.05), ("fp8_e5m2", 0.08),
                                         ("fp8_scaled", 0.04)])  # measured: 0, 5.0e-3, 1.1e-2, 2.3e-2, 9.8e-3
def test_generation_matches_diffusers_folder(comfy_dir, ref, variant, tol):
    from qwenstudio.engine.engine import Engine
    from qwenstudio.engine.specs import get_spec

    # fp32 text encoder and VAE files, so any difference comes from the DiT file alone
    comps = load_single_files(comfy_dir[f"dit_{variant}"], comfy_dir["te_fp32"], comfy_dir["vae"],
                              comfy_dir["tokenizer"], device="cpu")
    assert comps.identity["format"] == "comfy"
    # Parameters are zero-copy views of the memory-mapped files, so their addresses' alignment differs between the
    # two layouts and CPU GEMM kernels then round differently (~1e-6). Give both sides freshly allocated (aligned)
    # copies so "lossless" can be checked bit for bit.
    for model in (ref.transformer, comps.transformer):
        for prm in model.parameters():
            prm.data = prm.data.clone()
    kw = {"prompt": "a red apple", "steps": 2, "seed": 0, "width": 64, "height": 64}
    want = Engine(ref, get_spec("tiny")).generate(**kw).latents
    got = Engine(comps, get_spec("tiny")).generate(**kw).latents
    diff = (got - want).abs().max().item()
    print(f"\n{variant}: max |latents - diffusers latents| = {diff:.3e} (latent std {want.std().item():.3f})")
    assert diff <= tol


def test_find_tokenizer_locations(tiny_folder, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_tokenizer([tiny_folder.parent]) == tiny_folder / "tokenizer"  # <models>/<diffusers folder>/tokenizer
    comfy_tok = tmp_path / "ComfyUI" / "comfy" / "text_encoders" / "qwen25_tokenizer"
    shutil.copytree(tiny_folder / "tokenizer", comfy_tok)
    assert find_tokenizer([tmp_path / "ComfyUI"]) == comfy_tok
    assert find_tokenizer([tmp_path / "empty"]) == bundled_tokenizer()  # nothing found: the shipped Qwen2.5 one
    snap = tmp_path / "hub" / "models--Qwen--Qwen-Image" / "snapshots" / "abc" / "tokenizer"
    shutil.copytree(tiny_folder / "tokenizer", snap)
    assert find_tokenizer([tmp_path / "empty"]) == snap


def test_wrong_or_foreign_files_name_the_file(comfy_dir, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(IncompatibleWeights, match=r"qwen_image_vae.safetensors: expected a Qwen-Image diffusion model"):
        load_dit_file(comfy_dir["vae"], device="cpu")
    with pytest.raises(IncompatibleWeights, match="expected a Qwen-Image text encoder"):
        load_text_encoder_file(comfy_dir["dit_bf16"], device="cpu")
    sdxl = tmp_path / "sd_xl_base_1.0.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4),
               "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.zeros(1, 4)}, str(sdxl))
    with pytest.raises(IncompatibleWeights, match=r"sd_xl_base_1.0.safetensors: .*unrecognised architecture"):
        load_dit_file(sdxl, device="cpu")
