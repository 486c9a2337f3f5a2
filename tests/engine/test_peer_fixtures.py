"""qwenstudio against files the peers' OWN code wrote (tests/fixtures/peers/, made by make_fixtures.py; commits in
SOURCES.md): ComfyUI model saves and its loader's weights, our fp8_scaled as ComfyUI reads it, ComfyUI LoraSave /
PEFT / LyCORIS / musubi-tuner LoRAs against ComfyUI's LoRA loader or PEFT's merge, ComfyUI-GGUF conversions and
K-quant blocks against its dequantizer. No peer code runs here."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from qwenstudio.engine.formats.comfy import load_dit_file
from qwenstudio.engine.formats.convert import convert
from qwenstudio.engine.formats.detect import detect
from qwenstudio.engine.lora import LoraManager
from qwenstudio.engine.quant.fp8 import FP8Linear
from qwenstudio.errors import InvalidRequest, UnsupportedFormat

PEERS = Path(__file__).resolve().parents[1] / "fixtures" / "peers"
COMFY = PEERS / "comfyui"
LORAS = PEERS / "loras"
GGUF = PEERS / "gguf"


def _our_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter as our loader holds it, fp8 layers dequantized (what the forward pass multiplies by)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, FP8Linear):
            out[f"{name}.weight"] = mod.dequantized_weight(torch.float32)
            if mod.bias is not None:
                out[f"{name}.bias"] = mod.bias.float()
    for k, v in model.state_dict().items():
        if k not in out and not k.endswith(("scale_weight", "scale_input")):
            out[k] = v.float()
    return out


def _ref(path: Path) -> dict[str, torch.Tensor]:
    return {k[2:]: v for k, v in load_file(str(path)).items() if k.startswith("w.")}


def _max_diff(ours: dict, theirs: dict) -> float:
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))[:5]
    return max(float((ours[k] - v).abs().max()) for k, v in theirs.items())


# ---- ComfyUI model files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, quant", [("comfyui/model_fp32", None), ("comfyui/model_fp8_e4m3fn", "fp8"),
                                         ("comfyui/model_fp8_scaled", "fp8_scaled"),
                                         ("comfyui_0.3.64/model_fp8_scaled", "fp8_scaled"),
                                         ("comfyui_0.3.76/model_fp8_scaled", "fp8_scaled")])
def test_comfyui_saves_load_to_comfyuis_own_weights(name, quant):
    """ComfyUI's ModelSave output (fp32, fp8 cast, per-layer scaled fp8; and an older build's scaled_fp8 layout),
    read by our loader, gives exactly the weights ComfyUI's loader gives."""
    path = PEERS / f"{name}.safetensors"
    assert detect(path).quant == quant
    model = load_dit_file(path, device="cpu", dtype=torch.float32)
    diff = _max_diff(_our_weights(model), _ref(PEERS / f"{name}.ref.safetensors"))
    print(f"\n{name}: max |ours - ComfyUI loader| = {diff:.1e}")
    assert diff == 0.0


def test_comfyui_per_layer_file_converts_to_diffusers(tmp_path):
    from diffusers import QwenImageTransformer2DModel

    folder = convert(COMFY / "model_fp8_scaled.safetensors", tmp_path / "transformer", "diffusers", dtype="fp32")
    back = QwenImageTransformer2DModel.from_pretrained(str(folder)).state_dict()
    assert _max_diff({k: v.float() for k, v in back.items()}, _ref(COMFY / "model_fp8_scaled.ref.safetensors")) == 0.0


def test_our_fp8_scaled_is_read_by_comfyui_exactly_as_written(tmp_path):
    """``convert --to fp8_scaled`` writes ComfyUI's per-layer format; ComfyUI's loader (fixture) dequantizes it to
    the very weights our loader uses, and only fp8 layers are marked: keep-list layers stay bf16, not re-cast."""
    out = convert(COMFY / "model_fp32.safetensors", tmp_path / "ours.safetensors", "fp8_scaled")
    with safe_open(str(out), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        conf = json.loads(bytes(f.get_tensor("model.diffusion_model.transformer_blocks.0.attn.to_q.comfy_quant")
                                .tolist()))
        assert f.get_tensor("model.diffusion_model.img_in.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.diffusion_model.transformer_blocks.0.attn.to_q.weight").dtype == torch.float8_e4m3fn
    assert conf == {"format": "float8_e4m3fn"}
    assert "model.diffusion_model.img_in.comfy_quant" not in keys and not any(k.endswith("scaled_fp8") for k in keys)
    layers = json.loads(meta["_quantization_metadata"])["layers"]
    assert {f"model.diffusion_model.{k}.comfy_quant" for k in layers} == {k for k in keys if k.endswith("comfy_quant")}
    ours = _our_weights(load_dit_file(out, device="cpu", dtype=torch.float32))
    comfy = load_file(str(COMFY / "ours_fp8_scaled.ref.safetensors"))
    assert _max_diff(ours, _ref(COMFY / "ours_fp8_scaled.ref.safetensors")) == 0.0
    fp32 = load_file(str(COMFY / "model_fp32.ref.safetensors"))["forward"]
    loss = float((comfy["forward"] - fp32).abs().max())
    print(f"\nComfyUI forward on our fp8_scaled vs fp32: {loss:.2e}")
    assert loss < 0.01  # fp8 rounding of the quantized layers only (measured 5.3e-3; whole-model fp8 is 6.4e-2)
    with pytest.raises(InvalidRequest, match="fp8_scaled_legacy"):
        convert(COMFY / "model_fp32.safetensors", tmp_path / "x.safetensors", "fp8_scaled", scale_input=True)


def test_unsupported_comfy_quant_format_is_refused_by_name(tmp_path):
    sd = load_file(str(COMFY / "model_fp8_scaled.safetensors"))
    key = next(k for k in sd if k.endswith(".comfy_quant"))
    sd[key] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    save_file(sd, str(tmp_path / "nvfp4.safetensors"))
    with pytest.raises(UnsupportedFormat, match="nvfp4"):
        load_dit_file(tmp_path / "nvfp4.safetensors", device="cpu")


# ---- LoRAs -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_model():
    return load_dit_file(COMFY / "model_fp32.safetensors", device="cpu", dtype=torch.float32)


def _fused_weights(model, path: Path):
    """Fuse one LoRA at weight 1 into a copy-free view: returns (weights after fuse, the file's match report)."""
    manager = LoraManager(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager.set_stack([(path, 1.0)])
    lf = manager.stack[0][0]
    manager.fuse()
    try:
        return {k: v.detach().clone().float() for k, v in model.state_dict().items()}, lf.report
    finally:
        manager.clear()


COMFY_REFERENCE = ["comfy_lorasave_nobias", "comfy_lorasave_bias", "musubi_alpha_r", "musubi_alpha_2r",
                   "lycoris_lora_alpha_r", "lycoris_lora_alpha_2r", "lycoris_loha_alpha_r", "lycoris_loha_alpha_2r",
                   "lycoris_lokr_alpha_r", "lycoris_lokr_alpha_2r"]


@pytest.mark.parametrize("name", COMFY_REFERENCE)
def test_lora_files_apply_like_comfyuis_lora_loader(base_model, name):
    weights, report = _fused_weights(base_model, LORAS / f"{name}.safetensors")
    ref = _ref(LORAS / f"{name}.ref.safetensors")
    linear = {n for n, m in base_model.named_modules() if isinstance(m, nn.Linear)}
    applied = {k: v for k, v in ref.items() if k.rsplit(".", 1)[0] in linear}
    diff = _max_diff(weights, applied)
    print(f"\n{name}: max |ours - ComfyUI LoRA loader| = {diff:.1e} over {len(applied)} tensors")
    assert diff <= 2e-6
    others = set(ref) - set(applied)  # norm weights ComfyUI patches from `.diff` keys: not applied, but listed
    assert {k.split("diffusion_model.", 1)[1].rsplit(".", 1)[0] for k in report.unmatched} >= {
        k.rsplit(".", 1)[0] for k in others}
    if name.endswith("_bias"):
        assert others and report.warning() and not report.complete
    else:
        assert report.complete and report.warning() is None


def test_lorasave_bias_diff_side_branch_equals_fused(base_model):
    """The unfused path (side branch + bias) gives the fused model's output."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 32, generator=g)
    manager = LoraManager(base_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager.set_stack([(LORAS / "comfy_lorasave_bias.safetensors", 0.7)])
    layer = base_model.transformer_blocks[0].attn.to_q
    side = layer(x)
    manager.fuse()
    fused = base_model.transformer_blocks[0].attn.to_q(x)
    manager.clear()
    assert float((side - fused).abs().max()) < 1e-6
    assert float((base_model.transformer_blocks[0].attn.to_q(x) - side).abs().max()) > 1e-4  # it did something


@pytest.mark.parametrize("name, source", [("peft_alpha_r", "lora_adapter_metadata"),
                                          ("peft_alpha_2r", "lora_adapter_metadata"),
                                          ("peft_alpha_2r_bias", "lora_adapter_metadata"),
                                          ("peft_save_pretrained/adapter_model", "adapter_config.json")])
def test_peft_loras_apply_like_peft_merge(base_model, name, source):
    """PEFT/diffusers files keep alpha in metadata (or adapter_config.json): scale alpha/r, and lora_B.bias is
    applied — PEFT's own merge is the reference (ComfyUI's loader ignores both: measured 0.24 and 1.0 off)."""
    weights, report = _fused_weights(base_model, LORAS / f"{name}.safetensors")
    diff = _max_diff(weights, _ref(LORAS / f"{name}.peft_ref.safetensors"))
    print(f"\n{name}: max |ours - PEFT merge| = {diff:.1e}")
    assert diff <= 2e-6 and report.alpha_source == source and report.complete


@pytest.mark.parametrize("name", ["diffsynth_alpha_r", "diffsynth_alpha_2r"])
def test_diffsynth_loras_apply_like_diffsynth_and_comfyui(base_model, name):
    """DiffSynth-Studio files carry no alpha (PEFT ``.default`` keys); its own loader and ComfyUI's apply up @ down
    at scale 1, and so do we."""
    weights, report = _fused_weights(base_model, LORAS / f"{name}.safetensors")
    d1 = _max_diff(weights, _ref(LORAS / f"{name}.diffsynth_ref.safetensors"))
    d2 = _max_diff(weights, _ref(LORAS / f"{name}.ref.safetensors"))
    print(f"\n{name}: max |ours - DiffSynth loader| = {d1:.1e}, |ours - ComfyUI loader| = {d2:.1e}")
    assert d1 <= 2e-6 and d2 <= 2e-6 and report.complete and report.alpha_source == "none"


def test_dora_is_refused_by_name(base_model):
    with pytest.raises(UnsupportedFormat, match="DoRA"):
        LoraManager(base_model).load(LORAS / "lycoris_dora.safetensors")


def test_partial_match_warns_and_reports(base_model, tmp_path):
    sd = load_file(str(LORAS / "musubi_alpha_r.safetensors"))
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(32, 4)
    sd["lora_unet_transformer_blocks_9_attn_to_q.lora_down.weight"] = torch.zeros(4, 32)
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    with pytest.warns(UserWarning, match=r"2 text-encoder keys not applied.*1 keys matched no module"):
        lf = LoraManager(base_model).load(tmp_path / "mixed.safetensors")
    meta = lf.report.as_metadata()
    assert meta["text_encoder_count"] == 2 and meta["unmatched"] == [
        "lora_unet_transformer_blocks_9_attn_to_q.lora_down.weight"]
    assert meta["applied_keys"] == meta["total_keys"] - 3 and meta["alpha_source"] == "tensors"


# ---- GGUF --------------------------------------------------------------------------------------------------------

def test_comfyui_gguf_convert_output_loads_to_its_loaders_weights():
    from qwenstudio.engine.formats.gguf import load_dit_gguf
    from qwenstudio.engine.quant.gguf_linear import GGUFLinear

    model = load_dit_gguf(GGUF / "comfyui_gguf_convert.gguf", device="cpu", dtype=torch.float32)
    ours = {k: v.float() for k, v in model.state_dict().items()}
    for n, m in model.named_modules():
        if isinstance(m, GGUFLinear):
            ours[f"{n}.weight"] = m.dequantize_weight()
    assert _max_diff(ours, _ref(GGUF / "comfyui_gguf_convert.ref.safetensors")) == 0.0


def test_kquant_blocks_match_comfyui_gguf_and_gguf_py():
    """Q2_K/Q3_K (read only) and our Q4_K/Q5_K/Q6_K encoder's blocks decode identically here, in gguf-py and in
    ComfyUI-GGUF; re-encoding the source floats reproduces the fixture bytes; the error is within the expected
    step size."""
    import gguf

    from qwenstudio.engine.quant.gguf_linear import dequantize
    from qwenstudio.engine.quant.kquant import quantize

    reader = gguf.GGUFReader(str(GGUF / "kquants.gguf"))
    ref = _ref(GGUF / "kquants.ref.safetensors")
    src = load_file(str(GGUF / "kquants.src.safetensors"))
    rel = {}
    for t in reader.tensors:
        raw = np.array(t.data)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        ours = dequantize(torch.from_numpy(raw), t.tensor_type.name, shape)
        assert torch.equal(ours, ref[t.name]), t.name
        assert np.array_equal(ours.numpy(), gguf.quants.dequantize(raw, t.tensor_type).reshape(shape)), t.name
        if f"src.{t.tensor_type.name}" in src:
            x = src[f"src.{t.tensor_type.name}"]
            assert np.array_equal(quantize(x.numpy(), t.tensor_type.name), raw), t.name
            rel[t.name] = float((ours - x).pow(2).mean().sqrt() / x.std())
    print(f"\nK-quant rms error / std: {rel}")
    assert rel["q4_k"] < 0.075 and rel["q5_k"] < 0.038 and rel["q6_k"] < 0.018  # measured 0.0721, 0.0364, 0.0169
