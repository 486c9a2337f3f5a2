"""LoRA side branches on the tiny DiT: every key style against a merged-weights reference, stack switching, fuse,
quantized bases, spec parsing and Lightning recipes."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
from torch import nn

from qwenstudio.engine.engine import Engine
from qwenstudio.engine.loading import load_diffusers_folder
from qwenstudio.engine.lora import (
    LoraLinear,
    LoraManager,
    apply_recipe,
    convert_state_dict,
    detect_lightning,
    linear_targets,
    parse_lora_arg,
    parse_stack_spec,
)
from qwenstudio.engine.specs import get_spec
from qwenstudio.errors import IncompatibleWeights, InvalidRequest, UnsupportedFormat
from qwenstudio.testing.loras import STYLES, make_lora, merge_deltas, write_lora

TOL = 1e-5
GEN = dict(prompt="a red apple", steps=2, seed=0, width=64, height=64)


@pytest.fixture(scope="module")
def setup(tiny_folder):
    """Our own components (the shared tiny_engine is never touched), a pristine copy of the DiT for references."""
    comps = load_diffusers_folder(tiny_folder, device="cpu")
    return comps, copy.deepcopy(comps.transformer)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
                timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]], return_dict=False)


@pytest.fixture()
def manager(setup):
    comps, _ = setup
    mgr = LoraManager(comps.transformer)
    yield mgr
    mgr.clear()
    assert not any(isinstance(m, LoraLinear) for m in comps.transformer.modules())


def run(model, inputs):
    with torch.inference_mode():
        return model(**inputs)[0]


def merged(pristine, *weighted_deltas):
    ref = copy.deepcopy(pristine)
    for deltas, w in weighted_deltas:
        merge_deltas(ref, deltas, w)
    return ref


@pytest.mark.parametrize("style", STYLES)
def test_every_style_equals_merged_reference(style, setup, manager, inputs, tmp_path):
    comps, pristine = setup
    path, deltas = write_lora(tmp_path / f"{style}.safetensors", pristine, style, seed=1)
    lf = manager.load(path)
    assert set(lf.weights) == set(deltas) and lf.unmatched == []
    manager.set_stack([(lf, 1.0)])
    ref = merged(pristine, (deltas, 1.0))
    out, want = run(comps.transformer, inputs), run(ref, inputs)
    diff = (out - want).abs().max().item()
    print(f"{style}: transformer max diff {diff:.2e} (LoRA effect {(want - run(pristine, inputs)).abs().max():.2f})")
    assert diff <= TOL

    got = Engine(comps, get_spec("tiny")).generate(**GEN).latents
    ref_latents = Engine(dataclasses.replace(comps, transformer=ref), get_spec("tiny")).generate(**GEN).latents
    gdiff = (got - ref_latents).abs().max().item()
    print(f"{style}: generation latents max diff {gdiff:.2e}")
    assert gdiff <= TOL


def test_switching_stacks_is_exact_and_never_touches_base(setup, manager, inputs, tmp_path):
    comps, pristine = setup
    a, _ = write_lora(tmp_path / "a.safetensors", pristine, "kohya", seed=2)
    b, _ = write_lora(tmp_path / "b.safetensors", pristine, "diffusers", seed=3)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in comps.transformer.named_parameters()}
    base_out = run(comps.transformer, inputs)

    manager.set_stack([(a, 1.0)])
    out_a = run(comps.transformer, inputs)
    manager.set_stack([(b, 0.8)])
    out_b = run(comps.transformer, inputs)
    manager.set_stack([(a, 1.0)])
    assert torch.equal(run(comps.transformer, inputs), out_a)
    manager.clear()
    assert torch.equal(run(comps.transformer, inputs), base_out)
    manager.set_stack([(b, 0.8)])
    assert torch.equal(run(comps.transformer, inputs), out_b)  # same as its first (fresh) run
    manager.clear()

    after = dict(comps.transformer.named_parameters())
    assert after.keys() == before.keys()
    for n, (ptr, val) in before.items():
        assert after[n].data_ptr() == ptr and torch.equal(after[n], val), n
    assert manager.load(a) is manager.load(a)  # cached: not re-read
    os.utime(a, ns=(0, 10**18))
    assert manager.load(a) is not manager.load(b)


def test_weight_zero_is_exactly_no_lora(setup, manager, inputs, tmp_path):
    comps, pristine = setup
    path, _ = write_lora(tmp_path / "z.safetensors", pristine, "comfy", seed=4)
    base_out = run(comps.transformer, inputs)
    manager.set_stack([(path, 0.0)])
    assert torch.equal(run(comps.transformer, inputs), base_out)
    assert not any(isinstance(m, LoraLinear) for m in comps.transformer.modules())


def test_two_loras_stack_to_sum_of_deltas(setup, manager, inputs, tmp_path):
    comps, pristine = setup
    a, da = write_lora(tmp_path / "a.safetensors", pristine, "lightx2v", seed=5)
    b, db = write_lora(tmp_path / "b.safetensors", pristine, "loha", seed=6,
                       targets=["transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2"])
    manager.set_stack([(a, 0.7), (b, -0.5)])
    diff = (run(comps.transformer, inputs) - run(merged(pristine, (da, 0.7), (db, -0.5)), inputs)).abs().max().item()
    print(f"stack of two: max diff {diff:.2e}")
    assert diff <= TOL


def test_fuse_unfuse_is_bit_exact(setup, manager, inputs, tmp_path):
    comps, pristine = setup
    a, _ = write_lora(tmp_path / "a.safetensors", pristine, "lokr_factored", seed=7)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in comps.transformer.named_parameters()}
    manager.set_stack([(a, 0.9)])
    side = run(comps.transformer, inputs)
    manager.fuse()
    assert manager.fused and not any(isinstance(m, LoraLinear) for m in comps.transformer.modules())
    diff = (run(comps.transformer, inputs) - side).abs().max().item()
    print(f"fused vs side branches: max diff {diff:.2e}")
    assert diff <= TOL
    manager.set_stack([(a, 0.9)])  # same stack: stays fused
    assert manager.fused
    manager.unfuse()
    assert torch.equal(run(comps.transformer, inputs), side)  # side branches are back
    manager.clear()
    for n, p in comps.transformer.named_parameters():
        assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n


def test_lora_matching_nothing_is_an_error(setup, tmp_path):
    _, pristine = setup
    targets = linear_targets(pristine)
    flux = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(IncompatibleWeights, match="none of its 2 keys"):
        convert_state_dict(flux, targets)
    te_only = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(IncompatibleWeights):
        convert_state_dict(te_only, targets)
    wrong_size = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
                  "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)}
    with pytest.raises(IncompatibleWeights, match="shape"):
        convert_state_dict(wrong_size, targets)
    with pytest.raises(UnsupportedFormat, match="DoRA"):
        convert_state_dict({**make_lora(pristine, "comfy", targets=["img_in"])[0],
                            "diffusion_model.img_in.dora_scale": torch.ones(32, 1)}, targets)
    pickle = tmp_path / "x.safetensors"
    pickle.write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    with pytest.raises(UnsupportedFormat):
        LoraManager(pristine).load(pickle)


def test_partial_match_reports_unmatched_keys(setup):
    _, pristine = setup
    sd, _ = make_lora(pristine, "kohya", targets=["transformer_blocks.0.attn.to_q", "img_in"])
    sd["lora_unet_transformer_blocks_7_attn_to_q.lora_down.weight"] = torch.zeros(4, 32)  # block 7: not in tiny
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"] = torch.tensor(1.0)
    sd["lora_unet_img_in.lora_mid.weight"] = torch.zeros(4, 4)  # LoCon mid: whole module refused, reported
    weights, unmatched, style = convert_state_dict(sd, linear_targets(pristine))
    assert set(weights) == {"transformer_blocks.0.attn.to_q"} and style == "kohya"
    assert "lora_unet_transformer_blocks_7_attn_to_q.lora_down.weight" in unmatched
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha" in unmatched
    assert "lora_unet_img_in.lora_up.weight" in unmatched


def test_stack_spec_parsing():
    assert parse_lora_arg("style") == ("style", 1.0)
    assert parse_lora_arg("style:0.6") == ("style", 0.6)
    assert parse_lora_arg(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
    assert parse_lora_arg(r"C:\loras\x.safetensors:-1.5") == (r"C:\loras\x.safetensors", -1.5)
    assert parse_lora_arg("<lora:detail:0.5>") == ("detail", 0.5)
    text = "Qwen-Image-Lightning-4steps-V2.0 : 1\nanime style : 0.75, film grain:-.5\n\n"
    assert parse_stack_spec(text) == [("Qwen-Image-Lightning-4steps-V2.0", 1.0), ("anime style", 0.75), ("film grain", -0.5)]
    for bad in ("x:11", "x:-10.5", "x:nan", ":1"):
        with pytest.raises(InvalidRequest):
            parse_lora_arg(bad)


def test_lightning_detection_and_recipe():
    r4 = detect_lightning("loras/Qwen-Image-Lightning-4steps-V2.0.safetensors")
    r8 = detect_lightning("Qwen-Image-2512-LIGHTNING-8steps-V1.0-bf16.safetensors")
    assert (r4.steps, r4.cfg, r4.shift, r4.scheduler) == (4, 1.0, 3.0, "reference") and r8.steps == 8
    assert detect_lightning("x.safetensors", {"ss_output_name": "qwen_lightning_4step"}).steps == 4
    assert detect_lightning("anime_style.safetensors", {"ss_output_name": "anime"}) is None
    fields = {"prompt": "p", "steps": 50, "cfg": 4.0, "shift": None, "scheduler": "simple"}
    assert apply_recipe(fields, r4, set()) == {"prompt": "p", "steps": 4, "cfg": 1.0, "shift": 3.0, "scheduler": "reference"}
    assert apply_recipe(fields, r4, {"steps", "scheduler"}) == {
        "prompt": "p", "steps": 50, "cfg": 1.0, "shift": 3.0, "scheduler": "simple"}
    assert apply_recipe(fields, None, set()) == fields


# ---- quantized bases: the side branch only calls base(x) -----------------------------------------------------------

BLOCK_LINEARS = lambda model: [n for n in linear_targets(model) if n.startswith("transformer_blocks.")]  # noqa: E731


def _q8_0_bytes(w: torch.Tensor) -> torch.Tensor:
    """GGML Q8_0 blocks of ``w`` ([out, in], in % 32 == 0): fp16 scale + 32 int8 per block."""
    blocks = w.reshape(-1, 32)
    d = (blocks.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-8)
    q = torch.round(blocks / d.half().float()).clamp(-127, 127).to(torch.int8)
    raw = torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], dim=1)
    return raw.reshape(w.shape[0], -1)


def _quantize_copy(pristine, kind: str):
    """(model with quantized block linears, float model holding the same dequantized weights)."""
    quant, dense = copy.deepcopy(pristine), copy.deepcopy(pristine)
    for name in BLOCK_LINEARS(pristine):
        lin = pristine.get_submodule(name)
        if kind == "fp8":
            from qwenstudio.engine.quant.fp8 import FP8Linear, quantize_fp8

            q = FP8Linear(lin.in_features, lin.out_features, lin.bias is not None)
            w8, s = quantize_fp8(lin.weight, scaled=True)
            q.weight = nn.Parameter(w8, requires_grad=False)
            q.scale_weight = s
            deq = q.dequantized_weight(torch.float32)
        else:
            from qwenstudio.engine.quant.gguf_linear import GGUFLinear

            q = GGUFLinear(lin.in_features, lin.out_features, "Q8_0", bias=lin.bias is not None)
            q.weight = _q8_0_bytes(lin.weight.detach())
            deq = q.dequantize_weight(torch.float32)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(quant.get_submodule(parent), leaf, q)
        with torch.no_grad():
            dense.get_submodule(name).weight.copy_(deq)
    return quant, dense


@pytest.mark.parametrize("kind", ["fp8", "gguf"])
def test_lora_on_quantized_base_equals_lora_on_dequantized_float(kind, setup, inputs, tmp_path):
    mod = {"fp8": "qwenstudio.engine.quant.fp8", "gguf": "qwenstudio.engine.quant.gguf_linear"}[kind]
    pytest.importorskip(mod)
    _, pristine = setup
    quant, dense = _quantize_copy(pristine, kind)
    path, deltas = write_lora(tmp_path / "q.safetensors", pristine, "comfy", seed=8)
    ref_model = merged(dense, (deltas, 1.0))
    mq, md = LoraManager(quant), LoraManager(dense)
    assert mq.dtype == torch.float32
    mq.set_stack([(path, 1.0)])
    md.set_stack([(path, 1.0)])
    diff = (run(quant, inputs) - run(dense, inputs)).abs().max().item()
    ref = (run(quant, inputs) - run(ref_model, inputs)).abs().max().item()
    print(f"{kind}: LoRA on quantized vs on dequantized float {diff:.2e}; vs merged reference {ref:.2e}")
    assert diff <= 1e-6 and ref <= TOL
    with pytest.raises(InvalidRequest, match="quantized"):
        mq.fuse()
    mq.clear()
    assert type(quant.get_submodule("transformer_blocks.0.attn.to_q")).__name__ in ("FP8Linear", "GGUFLinear")
