"""Loading a diffusers folder from safetensors only; every broken layout gives a typed error naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qwenstudio import CorruptFile, IncompatibleWeights, ModelNotFound, UnsupportedFormat
from qwenstudio.engine.loading import load_diffusers_folder


@pytest.fixture
def folder_copy(tiny_folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_folder, dst)
    return dst


def test_loaded_weights_equal_the_files(tiny_folder):
    from diffusers import QwenImageTransformer2DModel

    comps = load_diffusers_folder(tiny_folder, device="cpu")
    ref = QwenImageTransformer2DModel.from_pretrained(str(tiny_folder / "transformer"))
    ours = comps.transformer.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(ours[k], v), k
    assert comps.dtype == torch.float32
    assert not any(p.device.type == "meta" for p in comps.transformer.parameters())
    assert comps.identity["format"] == "diffusers" and len(comps.identity["fingerprint"]) == 16


def test_dtype_override(tiny_folder):
    comps = load_diffusers_folder(tiny_folder, device="cpu", dtype=torch.bfloat16)
    assert comps.transformer.proj_out.weight.dtype == torch.bfloat16


def test_missing_component(folder_copy):
    shutil.rmtree(folder_copy / "vae")
    with pytest.raises(ModelNotFound, match="missing component folder.*vae"):
        load_diffusers_folder(folder_copy)


def test_not_a_diffusers_folder(tmp_path):
    with pytest.raises(ModelNotFound, match="model_index.json"):
        load_diffusers_folder(tmp_path)
    with pytest.raises(ModelNotFound, match="not found"):
        load_diffusers_folder(tmp_path / "nope")


class _Boom:
    def __reduce__(self):
        raise AssertionError("unpickled")


def test_pickle_weights_are_refused_without_unpickling(folder_copy):
    import pickle

    for f in (folder_copy / "transformer").glob("*.safetensors"):
        f.unlink()
    (folder_copy / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(UnsupportedFormat, match="pickle"):
        load_diffusers_folder(folder_copy)


def test_pickle_disguised_as_safetensors(folder_copy):
    import io
    import zipfile

    target = next((folder_copy / "vae").glob("*.safetensors"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x04K\x01.")
    target.write_bytes(buf.getvalue())
    with pytest.raises(UnsupportedFormat, match="never unpickled"):
        load_diffusers_folder(folder_copy)


def test_truncated_file(folder_copy):
    target = next((folder_copy / "transformer").glob("*.safetensors"))
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFile, match="truncated"):
        load_diffusers_folder(folder_copy)


def test_garbage_file(folder_copy):
    target = next((folder_copy / "text_encoder").glob("*.safetensors"))
    target.write_bytes(b"hello this is not a weights file at all")
    with pytest.raises(CorruptFile):
        load_diffusers_folder(folder_copy)


def test_wrong_architecture_shapes(folder_copy):
    cfg_path = folder_copy / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["joint_attention_dim"] = 48
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleWeights, match="transformer: tensor 'txt_in.weight' has shape"):
        load_diffusers_folder(folder_copy)


def test_missing_tokenizer(folder_copy):
    shutil.rmtree(folder_copy / "tokenizer")
    with pytest.raises(ModelNotFound, match="tokenizer"):
        load_diffusers_folder(folder_copy)
