"""The models home: a ComfyUI-layout folder scanned by content, models picked by name, the same images as the
diffusers folder (exact for lossless files), LoRAs on quantized bases through the engine."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch

from qwenstudio import Engine, ModelNotFound
from qwenstudio.config import Settings
from qwenstudio.engine.identity import identify_name
from qwenstudio.engine.registry import ModelRegistry


class _Sentinel:
    def __reduce__(self):  # would run on unpickling: the registry must never unpickle
        return (pytest.fail, ("a pickle file was unpickled",))


@pytest.fixture(scope="module")
def comfy_root(tmp_path_factory, tiny_folder):
    from qwenstudio.engine.formats.gguf import write_dit_gguf
    from qwenstudio.engine.loading import load_diffusers_folder
    from qwenstudio.testing.formats import write_comfy_models_dir, write_text_encoder_file
    from qwenstudio.testing.loras import write_lora

    root = tmp_path_factory.mktemp("comfy") / "models"
    write_comfy_models_dir(root, tiny_folder, variants=("fp32", "fp8_scaled"))
    # lossless text encoder, so the fp32 DiT file must reproduce the folder exactly
    write_text_encoder_file(tiny_folder, root / "text_encoders" / "qwen_2.5_vl_7b.safetensors", dtype="fp32")
    write_dit_gguf(tiny_folder, root / "diffusion_models" / "qwen-image-Q8_0.gguf", "Q8_0")
    model = load_diffusers_folder(tiny_folder, device="cpu").transformer
    write_lora(root / "loras" / "detail_boost.safetensors", model, "kohya", seed=9)
    (root / "loras" / "old_style.ckpt").write_bytes(pickle.dumps(_Sentinel()) * 200)
    (root / "README.md").write_text("# my models\n" * 200)
    shutil.copytree(tiny_folder, root / "diffusers" / "tiny-folder")
    return root


def _engine(root, name, **kw):
    return Engine.load(name, variant="tiny", device="cpu", settings=Settings(home=root.parent / "home"),
                       models_dirs=(root,), **kw)


def test_scan_finds_every_component_by_content(comfy_root):
    reg = ModelRegistry([comfy_root])
    found = {(e.kind, e.name): e for e in reg.scan()}
    assert found[("dit", "qwen_image_fp32")].dtype == "fp32"
    assert found[("dit", "qwen_image_fp8_scaled")].quant == "fp8_scaled"
    assert found[("dit", "qwen-image-Q8_0")].container == "gguf"
    assert ("text_encoder", "qwen_2.5_vl_7b") in found and ("vae", "qwen_image_vae") in found
    assert ("lora", "detail_boost") in found and ("diffusers", "tiny-folder") in found
    problems = {p.name: why for p, why in reg.problems}
    assert "pickle" in problems["old_style.ckpt"] and "README.md" not in problems
    assert all("path" not in e.public() for e in found.values())


def test_dit_by_name_equals_diffusers_folder(comfy_root, tiny_engine):
    engine = _engine(comfy_root, "qwen_image_fp32")
    assert engine.components.identity["files"] == ["qwen_image_fp32", "qwen_2.5_vl_7b", "qwen_image_vae"]
    kw = dict(prompt="a bridge", seed=2, steps=2, cfg=3.0)
    assert torch.equal(engine.generate(**kw).latents, tiny_engine.generate(**kw).latents)


def test_quantized_bases_by_name_with_lora(comfy_root, tiny_engine):
    kw = dict(prompt="a bridge", seed=2, steps=2, cfg=3.0)
    ref = tiny_engine.generate(**kw).latents
    for name, tol in (("qwen-image-Q8_0", 0.05), ("qwen_image_fp8_scaled", 0.2)):
        engine = _engine(comfy_root, name)
        plain = engine.generate(**kw).latents
        with_lora = engine.generate(**kw, loras=[("detail_boost", 1.0)]).latents
        diff = (plain - ref).abs().max().item()
        print(f"{name}: max |latent diff| vs fp32 folder = {diff:.3e}")
        assert diff < tol
        assert (with_lora - plain).abs().max() > 1e-3  # the LoRA applies on the quantized base
        assert torch.equal(engine.generate(**kw).latents, plain)  # and comes off again exactly


def test_diffusers_folder_by_name_and_unknown_names(comfy_root):
    assert _engine(comfy_root, "tiny-folder").components.identity["format"] == "diffusers"
    with pytest.raises(ModelNotFound, match="known: .*qwen_image_fp32"):
        _engine(comfy_root, "qwen_image_nope")


def test_remote_callers_cannot_pass_paths(comfy_root):
    with pytest.raises(ModelNotFound):
        _engine(comfy_root, str(comfy_root / "diffusion_models" / "qwen_image_fp32.safetensors"), allow_paths=False)


def test_without_any_tokenizer_the_bundled_one_is_used(comfy_root, tmp_path, monkeypatch):
    root = tmp_path / "models"
    shutil.copytree(comfy_root, root, ignore=shutil.ignore_patterns("tokenizer", "diffusers"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    engine = _engine(root, "qwen_image_fp32")
    assert engine.components.identity["tokenizer"] == "bundled Qwen2.5"


def test_single_file_variant_from_published_names_says_why():
    assert identify_name("qwen_image_fp8_e4m3fn").variant == "qwen-image"
    assert "use --variant" in identify_name("qwen_image_fp8_e4m3fn").reason
    assert identify_name("qwen_image_2512_bf16").variant == "qwen-image-2512"
    assert identify_name("Qwen-Image-Lightning-4steps-V1.0").variant == "qwen-image-lightning-4step"
    assert identify_name("qwen-image-2512-lightning-8steps").variant == "qwen-image-2512"  # no such recipe
    assert identify_name("qwen_image_edit_2509_fp8_e4m3fn").variant == "qwen-image-edit-2509"
    assert identify_name("Qwen-Image-Edit-2511-Q4_K_M").variant == "qwen-image-edit-2511"
    assert all(identify_name(n).guessed for n in ("qwen_image_fp8_e4m3fn", "qwen_image_edit_2509_fp8_e4m3fn"))
