"""Conversions between DiT layouts are written atomically, validated, and round-trip to the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from qwenstudio import IncompatibleWeights, InvalidRequest
from qwenstudio.engine.formats import convert as convert_mod
from qwenstudio.engine.formats.convert import convert
from qwenstudio.engine.formats.detect import detect
from qwenstudio.engine.formats.keymaps import CONFIG_METADATA_KEY
from qwenstudio.engine.quant.fp8 import FP8_KEEP_HIGH_PRECISION, fp8_rounding_bound
from qwenstudio.testing.formats import write_vae_file


@pytest.fixture(scope="module")
def original(tiny_folder):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(str(tiny_folder / "transformer")).state_dict()


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def test_diffusers_to_comfy_and_back_is_lossless(tiny_folder, tmp_path, original):
    from diffusers import QwenImageTransformer2DModel

    single = convert(tiny_folder, tmp_path / "qwen_image.safetensors", "comfy")
    tensors, meta = _tensors(single)
    assert set(tensors) == {"model.diffusion_model." + k for k in original}
    assert all(torch.equal(tensors["model.diffusion_model." + k], v) for k, v in original.items())
    assert json.loads(meta[CONFIG_METADATA_KEY])["num_layers"] == 2
    assert detect(single).role == "dit"

    folder = convert(single, tmp_path / "transformer", "diffusers")
    back = QwenImageTransformer2DModel.from_pretrained(str(folder)).state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], v) for k, v in original.items())
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_fp8_scaled_round_trip_within_bound(tiny_folder, tmp_path, original):
    from diffusers import QwenImageTransformer2DModel

    fp8 = convert(tiny_folder, tmp_path / "fp8.safetensors", "fp8_scaled_legacy", scale_input=True)
    tensors, _ = _tensors(fp8)
    assert tensors["model.diffusion_model.scaled_fp8"].dtype == torch.float8_e4m3fn
    for k, t in tensors.items():
        native = k[len("model.diffusion_model."):]
        if native.split(".")[0] in FP8_KEEP_HIGH_PRECISION:
            assert t.dtype == torch.bfloat16, k  # keep-list stays high precision
    assert tensors["model.diffusion_model.transformer_blocks.0.attn.to_q.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.diffusion_model.transformer_blocks.0.attn.to_q.scale_weight"].shape == ()
    folder = convert(fp8, tmp_path / "transformer", "diffusers", dtype="fp32")
    back = QwenImageTransformer2DModel.from_pretrained(str(folder)).state_dict()
    worst = 0.0
    for k, v in original.items():
        layer = "model.diffusion_model." + k[: -len(".weight")]
        if tensors["model.diffusion_model." + k].dtype == torch.float8_e4m3fn:
            bound = fp8_rounding_bound(v, torch.float8_e4m3fn, tensors[layer + ".scale_weight"])
        else:  # bf16: half an ulp of 8 mantissa bits
            bound = v.abs().double() * 2.0 ** -8 + 1e-30
        err = (back[k] - v).abs()
        assert bool((err <= bound + 1e-12).all()), k
        worst = max(worst, err.max().item())
    print(f"\nfp8_scaled -> diffusers fp32 round trip: max weight error = {worst:.3e}")


def test_plain_fp8_e5m2(tiny_folder, tmp_path):
    out = convert(tiny_folder, tmp_path / "e5m2.safetensors", "fp8", fp8_dtype="float8_e5m2", prefix=False)
    info = detect(out)
    assert (info.quant, info.dtype, info.prefix) == ("fp8", "fp8_e5m2", "")


def test_errors_and_atomicity(tiny_folder, tmp_path, monkeypatch):
    dst = tmp_path / "x.safetensors"
    with pytest.raises(InvalidRequest, match="unknown conversion target"):
        convert(tiny_folder, dst, "gguf_q8_0")
    convert(tiny_folder, dst, "comfy")
    with pytest.raises(InvalidRequest, match="already exists"):
        convert(tiny_folder, dst, "comfy")
    vae = write_vae_file(tiny_folder, tmp_path / "vae.safetensors")
    with pytest.raises(IncompatibleWeights, match="vae.safetensors"):
        convert(vae, tmp_path / "y.safetensors", "comfy")

    def broken(*a, **k):
        raise RuntimeError("validation failed")

    monkeypatch.setattr(convert_mod, "_validate_file", broken)
    with pytest.raises(RuntimeError):
        convert(tiny_folder, tmp_path / "z.safetensors", "fp8")
    assert not (tmp_path / "z.safetensors").exists() and not list(tmp_path.glob(".*tmp*"))
