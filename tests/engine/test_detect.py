"""File detection by content: role, dtype and quantization of every layout; pickles refused unopened."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from qwenstudio import CorruptFile, UnsupportedFormat
from qwenstudio.engine.formats.detect import detect
from qwenstudio.engine.loading import looks_like_pickle as _is_pickle
from qwenstudio.testing.formats import write_dit_file, write_text_encoder_file, write_vae_file


def _fire(path):
    with open(path, "w") as f:
        f.write("unpickled!")  # would prove the file was unpickled


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_fire, (self.path,))


@pytest.fixture(scope="module")
def files(tiny_folder, tmp_path_factory):
    d = tmp_path_factory.mktemp("detect")
    out = {v: write_dit_file(tiny_folder, d / f"dit_{v}.safetensors", v)
           for v in ("bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2", "fp8_scaled")}
    out["noprefix"] = write_dit_file(tiny_folder, d / "dit_np.safetensors", "bf16", prefix=False)
    out["te"] = write_text_encoder_file(tiny_folder, d / "qwen_2.5_vl_7b.safetensors")
    out["te_fp8"] = write_text_encoder_file(tiny_folder, d / "qwen_2.5_vl_7b_fp8_scaled.safetensors", fp8_scaled=True)
    out["vae"] = write_vae_file(tiny_folder, d / "qwen_image_vae.safetensors")
    out["vae_diffusers"] = tiny_folder / "vae" / "diffusion_pytorch_model.safetensors"
    out["dit_diffusers"] = tiny_folder / "transformer" / "diffusion_pytorch_model.safetensors"
    return out


@pytest.mark.parametrize("name,role,dtype,quant,prefix", [
    ("bf16", "dit", "bf16", None, "model.diffusion_model."),
    ("fp32", "dit", "fp32", None, "model.diffusion_model."),
    ("fp8_e4m3fn", "dit", "fp8_e4m3fn", "fp8", "model.diffusion_model."),
    ("fp8_e5m2", "dit", "fp8_e5m2", "fp8", "model.diffusion_model."),
    ("fp8_scaled", "dit", "fp8_e4m3fn", "fp8_scaled", "model.diffusion_model."),
    ("noprefix", "dit", "bf16", None, ""),
    ("dit_diffusers", "dit", "fp32", None, ""),
    ("te", "text_encoder", "bf16", None, ""),
    ("te_fp8", "text_encoder", "bf16", "fp8_scaled", ""),  # tiny: bf16 embeddings outweigh the fp8 layers
    ("vae", "vae", "fp32", None, ""),
    ("vae_diffusers", "vae", "fp32", None, ""),
])
def test_roles_dtypes_quant(files, name, role, dtype, quant, prefix):
    info = detect(files[name])
    assert (info.container, info.role, info.dtype, info.quant, info.prefix) == ("safetensors", role, dtype, quant, prefix)
    assert info.n_tensors == len(info.shapes) > 0 and info.size_bytes == files[name].stat().st_size


def test_extension_is_ignored(files, tmp_path):
    renamed = tmp_path / "model.ckpt"
    shutil.copy(files["bf16"], renamed)
    assert detect(renamed).role == "dit"


def _st(tmp_path, name, tensors):
    p = tmp_path / name
    save_file({k: v.clone() for k, v in tensors.items()}, str(p))
    return p


def test_lora_controlnet_and_foreign(tmp_path):
    z = torch.zeros(2, 2)
    lora = _st(tmp_path, "l.safetensors", {"transformer_blocks.0.attn.to_q.lora_A.weight": z,
                                           "transformer_blocks.0.attn.to_q.lora_B.weight": z})
    assert detect(lora).role == "lora"
    kohya = _st(tmp_path, "k.safetensors", {"lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": z,
                                            "lora_unet_transformer_blocks_0_attn_to_q.alpha": torch.tensor(1.0)})
    assert detect(kohya).role == "lora"
    cn = _st(tmp_path, "c.safetensors", {"controlnet_x_embedder.weight": z, "controlnet_blocks.0.weight": z,
                                         "img_in.weight": z})
    assert detect(cn).role == "controlnet"
    sdxl = _st(tmp_path, "sdxl.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                                              "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)})
    assert detect(sdxl).role == "unknown"  # SD VAE convs are 2-D: not the Qwen/Wan VAE


def test_pickles_are_refused_without_unpickling(tmp_path):
    sentinel = tmp_path / "fired"
    for name, writer in [("model.safetensors", lambda f: pickle.dump(_Boom(str(sentinel)), f, protocol=4)),
                         ("model.ckpt", lambda f: torch.save({"x": _Boom(str(sentinel))}, f))]:
        p = tmp_path / name
        with open(p, "wb") as f:
            writer(f)
        with pytest.raises(UnsupportedFormat, match=r"is a pickle checkpoint; it is never unpickled. Convert it to safetensors"):
            detect(p)
    assert not sentinel.exists()


def test_safetensors_whose_length_byte_is_0x80_is_not_pickle():
    head = (0x280).to_bytes(8, "little") + b"{"
    assert not _is_pickle(head, 10_000)
    assert _is_pickle(b"\x80\x04\x95" + b"\0" * 6, 10_000)


def test_truncated_and_garbage_are_corrupt(files, tmp_path):
    data = files["bf16"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFile, match="cut.safetensors"):
        detect(cut)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not weights at all" * 10)
    with pytest.raises(CorruptFile):
        detect(junk)


def test_gguf(tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    p = tmp_path / "qwen-image-Q8_0.bin"  # extension irrelevant
    w = GGUFWriter(str(p), "qwen_image")
    q = quantize(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    for name in ("img_in.weight", "transformer_blocks.0.attn.to_q.weight"):
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("img_in.bias", np.zeros(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = detect(p)
    assert (info.container, info.role, info.quant, info.arch, info.n_tensors) == ("gguf", "dit", "Q8_0", "qwen_image", 3)
    assert info.shapes["img_in.weight"] == (64, 64)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CorruptFile, match="cut.gguf"):
        detect(cut)
