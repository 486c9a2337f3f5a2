"""nunchaku SVDQuant files (written by deepcompressor's own nunchaku packer, tests/fixtures/peers/nunchaku): found
and named by content, unpacked exactly, dequantized within the format's error, run through the engine, with LoRAs."""

from __future__ import annotations

import copy
import gzip
import json
import shutil

import pytest
import torch
from torch import nn

from qwenstudio.engine.formats.detect import detect
from qwenstudio.engine.formats.nunchaku import load_dit_svdquant
from qwenstudio.engine.lora.adapters import LoraManager
from qwenstudio.engine.quant.int4 import Int4WeightLinear
from qwenstudio.engine.quant.svdquant import (
    SVDQuantLinear,
    e2m1_values,
    fake_quant_int4,
    fake_quant_nvfp4,
    kernel_support,
    pack_lowrank,
    pack_micro_scales,
    pack_scales,
    pack_weight,
    round_e2m1,
    set_activation_quant,
    unpack_lowrank,
    unpack_micro_scales,
    unpack_scales,
    unpack_weight,
)
from qwenstudio.testing.loras import write_lora
from qwenstudio.testing.svdquant_files import (
    FIXTURES,
    FP4_FILE,
    INT4_FILE,
    SVDQ_DIT_CONFIG,
    build_source_dit,
    save_source_dit,
)

FILES = {"int4": INT4_FILE, "nvfp4": FP4_FILE}
# Max |latent difference| vs the fp32 source model after 2 steps at 64x64 (latent std ~1.2), measured on CPU:
# int4 (W4A4, r16) 0.32, nvfp4 (W4A4, r32) 0.20. Bounds ~1.5x measured.
LATENT_TOL = {"int4": 0.5, "nvfp4": 0.3}


@pytest.fixture(scope="module")
def source():
    return build_source_dit()


@pytest.fixture(scope="module")
def loaded():
    return {p: load_dit_svdquant(FIXTURES / f, device="cpu", dtype=torch.float32) for p, f in FILES.items()}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 64, 64, generator=g),
            "encoder_hidden_states": torch.randn(1, 7, 32, generator=g),
            "encoder_hidden_states_mask": torch.ones(1, 7), "timestep": torch.tensor([0.6]),
            "img_shapes": [(1, 8, 8)], "return_dict": False}


def _run(model):
    with torch.no_grad():
        return model(**_inputs())[0]


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_detected_by_content_and_listed(precision, tmp_path):
    from qwenstudio.engine.registry import ModelRegistry

    renamed = tmp_path / "diffusion_models" / "some-download.bin"  # the name says nothing
    renamed.parent.mkdir()
    shutil.copy(FIXTURES / FILES[precision], renamed)
    info = detect(renamed)
    rank = 16 if precision == "int4" else 32
    assert (info.role, info.quant, info.dtype) == ("dit", f"svdq_{precision}_r{rank}", precision)
    [entry] = ModelRegistry([tmp_path]).scan()
    assert entry.public()["quant"] == f"svdq_{precision}_r{rank}" and entry.kind == "dit"


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_kernel_layouts_round_trip_exactly(precision):
    from safetensors.torch import load_file

    sd = load_file(str(FIXTURES / FILES[precision]))
    layer = "transformer_blocks.0.attn.to_qkv"
    qw, ws = sd[f"{layer}.qweight"], sd[f"{layer}.wscales"]
    n = qw.shape[0]
    assert torch.equal(pack_weight(unpack_weight(qw)), qw)
    if precision == "int4":
        assert torch.equal(pack_scales(unpack_scales(ws, n)), ws)
    else:
        assert torch.equal(pack_micro_scales(unpack_micro_scales(ws, n)).view(torch.uint8), ws.view(torch.uint8))
    for name in ("bias", "smooth_factor"):
        v = sd[f"{layer}.{name}"]
        assert torch.equal(pack_scales(unpack_scales(v, v.shape[0])), v)
    for name, down in (("proj_down", True), ("proj_up", False)):
        assert torch.equal(pack_lowrank(unpack_lowrank(sd[f"{layer}.{name}"], down), down), sd[f"{layer}.{name}"])


def test_our_unpackers_invert_nunchakus_own_packers():
    """Seeded tensors packed by nunchaku's own packers (nunchaku_packer_examples.json.gz, record_nunchaku_layouts.py:
    NunchakuWeightPacker for W4A4, TinyChat pack_w4 for the AWQ modulation): our unpackers give the inputs back
    exactly, and our packers give nunchaku's bytes."""
    from qwenstudio.engine.quant.svdquant import unpack_awq_weight

    ex = json.loads(gzip.decompress((FIXTURES / "nunchaku_packer_examples.json.gz").read_bytes()))
    n, k, r = ex["n"], ex["k"], ex["rank"]

    def t(name, *shape):
        raw = torch.frombuffer(bytearray.fromhex(ex[name]), dtype=torch.uint8)
        return raw.view(getattr(torch, ex["dtypes"][name])).reshape(shape)

    codes = t("codes", n, k)
    assert torch.equal(int4_codes := unpack_weight(t("weight", n, k // 2)), codes.view(torch.uint8) & 0xF)
    assert torch.equal(pack_weight(int4_codes), t("weight", n, k // 2))
    assert torch.equal(unpack_scales(t("wscales", k // 64, n), n), t("scales", n, k // 64))
    assert torch.equal(pack_scales(t("scales", n, k // 64)), t("wscales", k // 64, n))
    fp4 = unpack_micro_scales(t("wscales_fp4", k // 16, n), n)
    assert fp4.dtype == torch.float8_e4m3fn and torch.equal(fp4.bfloat16(), t("micro", n, k // 16))
    assert torch.equal(unpack_scales(t("bias_packed", n), n), t("bias", n))
    assert torch.equal(unpack_lowrank(t("proj_down", k, r), down=True), t("down", r, k))
    assert torch.equal(unpack_lowrank(t("proj_up", n, r), down=False), t("up", n, r))
    assert torch.equal(pack_lowrank(t("down", r, k), True), t("proj_down", k, r))
    awq = unpack_awq_weight(t("awq_qweight", 4, 128).contiguous().view(torch.int32))
    assert torch.equal(awq, t("awq_codes", 16, 128))


def test_hand_computed_weight_element():
    """The element (n, k) of an int4 weight, located with the tile arithmetic written out by hand (nunchaku's
    128 x 64 tiles: 8 n-packs of 2 x 8 lanes, 2 k-packs of 4 lanes x 8 nibbles per int32), equals the unpacker's."""
    from safetensors.torch import load_file

    qw = load_file(str(FIXTURES / INT4_FILE))["transformer_blocks.0.img_mlp.net.2.qweight"]  # [128, 256]: 8 k-tiles
    codes = unpack_weight(qw)
    words = qw.contiguous().view(torch.int32).reshape(-1)
    n_total, k_total = codes.shape
    for n, k in ((0, 0), (5, 9), (17, 40), (127, 511), (64, 333), (100, 200)):
        n_tile, r = divmod(n, 128)
        n_packs, r = divmod(r, 16)
        n_pack, lane_n = divmod(r, 8)
        k_tile, kr = divmod(k, 64)
        k_pack, kr = divmod(kr, 32)
        lane_k, reg = divmod(kr, 8)
        word = (((((n_tile * (k_total // 64) + k_tile) * 8 + n_packs) * 8 + lane_n) * 4 + lane_k) * 2 + n_pack) * 2 \
            + k_pack
        nibble = (int(words[word]) >> (4 * reg)) & 0xF
        assert codes[n, k].item() == nibble, (n, k)
    assert n_total == 128


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_dequantized_weights_equal_source_within_format_error(precision, source, loaded):
    model = loaded[precision]
    ref = dict(source.named_modules())
    n_svdq = n_awq = 0
    for name, m in model.named_modules():
        w = ref.get(name)
        if isinstance(m, SVDQuantLinear):
            # Half a step of the 4-bit grid at each weight (int4: scale/2; e2m1: half the gap there), in the
            # smoothed basis, divided back by the smoothing factor; plus bf16 rounding of residual and factors.
            res = m.residual_weight()
            step = m.wscales.float().repeat_interleave(m.group_size, 1) * m.wtscale
            if precision == "nvfp4":
                mag = (res.abs() / step).clamp_min(0)
                step = step * torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0))  # gap above a point
            lowrank = m.proj_up.float().abs() @ m.proj_down.float().abs()
            bound = (0.5 * step + res.abs() * 2**-8) / m.smooth.float()[None, :] + lowrank * 2**-7 + 1e-6
            err = (m.effective_weight() - w.weight.float()).abs()
            assert (err <= bound).all(), f"{name}: {(err / bound).max():.2f}x the bound"
            assert (m.effective_bias() - w.bias.float()).abs().max() < (0.1 if m.act_unsigned else 1e-3)
            n_svdq += 1
        elif isinstance(m, Int4WeightLinear):
            scale = m.scales.float().repeat_interleave(64, 1)
            err = (m.dequantized_weight() - w.weight.float()).abs()
            bound = 0.5 * scale + 7 * scale * 2**-8 + w.weight.float().abs() * 2**-8 + 1e-7  # + bf16 input
            assert (err <= bound).all(), f"{name}: {(err / bound).max():.2f}x the bound"
            assert (m.bias - w.bias).abs().max() <= 1.1 * 2**-8  # the file stores bias + 1 in bf16 for the scales
            n_awq += 1
    assert (n_svdq, n_awq) == (12, 2)  # q, k, v, add_q/k/v, to_out, to_add_out, 2 MLPs x 2; img_mod, txt_mod
    norm = model.get_submodule("transformer_blocks.0.attn.norm_q").weight
    assert torch.equal(norm, source.get_submodule("transformer_blocks.0.attn.norm_q").weight.bfloat16().float())


def test_activation_grids_follow_the_kernels():
    x = torch.tensor([[0.0, 1.0, -2.0, 3.5, 7.0, -7.0, 0.5, 0.25] * 8], dtype=torch.float32)  # one group of 64
    q = fake_quant_int4(x)  # max 7 -> scale 1: integers round half to even, saturate at -8..7
    assert q[0, :8].tolist() == [0.0, 1.0, -2.0, 4.0, 7.0, -7.0, 0.0, 0.0]
    u = fake_quant_int4(x.abs(), unsigned=True)  # max 7 -> scale 7/15
    assert torch.allclose(u[0, 4], torch.tensor(7.0)) and (u >= 0).all()
    grid = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.75, -5.1])
    assert round_e2m1(grid).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -1.0, -6.0]
    assert e2m1_values(torch.arange(16)).tolist()[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    f = fake_quant_nvfp4(torch.linspace(-3, 3, 16)[None])  # max 3 -> scale 0.5 (exact in fp8)
    assert f[0, 0].item() == -3.0 and f[0, -1].item() == 3.0


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_tiny_model_output_vs_fp32(precision, source, loaded):
    model = loaded[precision]
    ref = _run(source)
    rms = lambda d: (d.pow(2).mean() / ref.pow(2).mean()).sqrt().item()
    w4a4 = rms(_run(model) - ref)
    set_activation_quant(model, False)
    try:
        w4a16 = rms(_run(model) - ref)
    finally:
        set_activation_quant(model, True)
    print(f"{precision}: relative RMS error of the DiT output vs fp32: W4A4 {w4a4:.4f}, weights only {w4a16:.4f}")
    # measured: int4 0.040 / 0.029, nvfp4 0.026 / 0.020
    assert w4a16 < w4a4 < (0.06 if precision == "int4" else 0.04)


def _dense_copy(source, model):
    """A float diffusers DiT holding every 4-bit layer's effective weights (the 'dequantized base')."""
    dense = copy.deepcopy(source)
    ref = dict(dense.named_modules())
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, SVDQuantLinear):
                ref[name].weight.copy_(m.effective_weight())
                ref[name].bias.copy_(m.effective_bias())
            elif isinstance(m, Int4WeightLinear):
                ref[name].weight.copy_(m.dequantized_weight())
                ref[name].bias.copy_(m.bias)
        for k, v in model.state_dict().items():  # bf16-rounded unquantized tensors (norms, embeddings)
            if k in dense.state_dict() and ".attn.to_" not in k and "_mlp." not in k and "add_" not in k \
                    and "_mod." not in k:
                dense.state_dict()[k].copy_(v)
    return dense


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_lora_on_4bit_base_equals_lora_on_dequantized_base(precision, source, loaded, tmp_path):
    """A Lightning-style LoRA (lightx2v key names, trained on the float model) on the nunchaku file: with the
    activation rounding off the 4-bit layers are exactly their dequantized weights, so LoRA-on-4bit must equal
    LoRA-on-dequantized to fp32 noise; with it on, the LoRA's branch is still exactly the branch on a float base."""
    model = copy.deepcopy(loaded[precision])
    dense = _dense_copy(source, model)
    path, _ = write_lora(tmp_path / "Qwen-Image-Lightning-4steps-V1.0.safetensors", source, "lightx2v", seed=5)
    mq, md = LoraManager(model), LoraManager(dense)
    set_activation_quant(model, False)
    base_q, base_d = _run(model), _run(dense)
    assert (base_q - base_d).abs().max() < 1e-4
    mq.set_stack([(path, 1.0)])
    md.set_stack([(path, 1.0)])
    with_q, with_d = _run(model), _run(dense)
    diff = ((with_q - base_q) - (with_d - base_d)).abs().max().item()
    print(f"{precision}: LoRA effect on the 4-bit base vs on the dequantized base {diff:.2e}")
    assert diff <= 1e-5 and (with_q - base_q).abs().max() > 1e-2
    assert type(model.get_submodule("transformer_blocks.0.attn.to_q")).__name__ == "LoraLinear"
    set_activation_quant(model, True)
    lin = model.get_submodule("transformer_blocks.0.attn.to_k")
    x = torch.randn(3, 128)
    branch = lin(x) - lin.base(x)
    dense_lin = dense.get_submodule("transformer_blocks.0.attn.to_k")
    assert (branch - (dense_lin(x) - dense_lin.base(x))).abs().max() <= 1e-5
    mq.clear()
    assert isinstance(model.get_submodule("transformer_blocks.0.attn.to_q"), SVDQuantLinear)
    assert torch.equal(_run(model), _run(loaded[precision]))  # hot swap back to no LoRA: exactly the base


def test_kernels_refused_with_reason_on_cpu():
    assert "CUDA" in kernel_support("int4", "cpu")
    assert "CUDA" in kernel_support("nvfp4", "cpu")


def test_fused_projections_split_exactly(loaded):
    """to_q/to_k/to_v cut from nunchaku's fused to_qkv give the fused layer's outputs (same activation rounding)."""
    from safetensors.torch import load_file

    from qwenstudio.engine.quant.svdquant import from_kernel_layout

    sd = load_file(str(FIXTURES / INT4_FILE))
    layer = "transformer_blocks.0.attn.to_qkv"
    fused = from_kernel_layout({k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.startswith(layer + ".")},
                               "int4", act_unsigned=False, dtype=torch.float32, device="cpu")
    x = torch.randn(2, 5, 128)
    parts = [loaded["int4"].get_submodule(f"transformer_blocks.0.attn.to_{c}")(x) for c in "qkv"]
    assert torch.allclose(torch.cat(parts, -1), fused(x), atol=1e-6)
    assert SVDQ_DIT_CONFIG["num_layers"] == 1


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_folder, source):
    """A ComfyUI models/ tree: both nunchaku files, the fp32 source DiT as a plain file, tiny TE/VAE, a LoRA."""
    from qwenstudio.testing.formats import write_comfy_models_dir

    root = tmp_path_factory.mktemp("svdq-models")
    write_comfy_models_dir(root, tiny_folder, variants=())
    (root / "diffusion_models").mkdir(exist_ok=True)
    for f in FILES.values():
        shutil.copy(FIXTURES / f, root / "diffusion_models" / f)
    save_source_dit(source, root / "diffusion_models" / "source-fp32.safetensors")
    write_lora(root / "loras" / "Qwen-Image-Lightning-8steps-V1.1.safetensors", source, "diffusers", seed=9)
    return root


def _generate(engine, **kw):
    return engine.generate(prompt="a red apple", seed=4, steps=2, width=64, height=64, **kw)


@pytest.fixture(scope="module")
def source_latents(models_dir):
    from qwenstudio import Engine

    return _generate(Engine.load("source-fp32", models_dirs=(models_dir,), device="cpu", variant="tiny")).latents


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_engine_runs_nunchaku_file_with_lora_per_request(precision, models_dir, source_latents):
    from qwenstudio import Engine

    ref = source_latents
    engine = Engine.load(FILES[precision].removesuffix(".safetensors"), models_dirs=(models_dir,), device="cpu",
                         variant="tiny")
    plain = _generate(engine)
    meta = plain.images[0].metadata["model"]
    assert meta["format"] == "nunchaku" and meta["quant"].startswith(f"svdq_{precision}")
    err = (plain.latents - ref).abs().max().item()
    print(f"{precision}: max |latent - fp32 source| after 2 steps: {err:.3f} (latent std {ref.std():.2f})")
    assert torch.isfinite(plain.latents).all() and err < LATENT_TOL[precision]
    lora = _generate(engine, loras=[("Qwen-Image-Lightning-8steps-V1.1", 1.0)], cfg=1.0).latents
    again = _generate(engine).latents
    assert (lora - plain.latents).abs().max() > 1e-3
    assert torch.equal(again, plain.latents)  # the stack is swapped out between requests, base untouched
    assert isinstance(engine.components.transformer.get_submodule("transformer_blocks.0.attn.to_v"), nn.Module)


def test_nunchaku_file_of_another_model_is_not_a_qwen_dit(tmp_path):
    """A nunchaku FLUX file has the same tensor kinds but FLUX's names: not listed as a Qwen-Image DiT."""
    from qwenstudio.engine.formats.convert import save_tensors

    t = {"transformer_blocks.0.qkv_proj.qweight": torch.zeros(128, 64, dtype=torch.int8),
         "transformer_blocks.0.qkv_proj.wscales": torch.zeros(2, 128, dtype=torch.bfloat16),
         "transformer_blocks.0.qkv_proj.proj_down": torch.zeros(128, 16, dtype=torch.bfloat16),
         "x_embedder.weight": torch.zeros(8, 8)}
    info = detect(save_tensors(t, tmp_path / "svdq-int4_r32-flux.1-dev.safetensors", {"format": "pt"}))
    assert info.role == "unknown" and info.quant == "svdq_int4_r16"


LAYOUTS = json.loads((FIXTURES / "nunchaku_linear_layouts.json").read_text())


class _RecordedSVDQW4A4Linear(nn.Module):
    """nunchaku's ``SVDQW4A4Linear`` as its own code made it (``nunchaku_linear_layouts.json``, written by
    record_nunchaku_layouts.py from nunchaku's models/linear.py): the constructor creates exactly the recorded
    tensors and attributes for the recorded sizes (others fail); ``forward`` enforces the input nunchaku's forward
    and kernels take (3-D, contiguous, the dtype of its tensors) and computes with our reference from the packed
    tensors — the layout check is nunchaku's, the numbers ours."""

    calls: list = []  # forward inputs seen, per test (reset by the tests)
    fused: list = []  # fused MLP inputs seen
    edit = staticmethod(lambda tensors: tensors)  # a test may alter the recorded layout to see it refused

    def __init__(self, in_features, out_features, rank=32, bias=True, precision="int4", act_unsigned=False,
                 torch_dtype=torch.bfloat16, device=None):
        super().__init__()
        args = {"in_features": in_features, "out_features": out_features, "rank": rank, "precision": precision,
                "act_unsigned": act_unsigned, "torch_dtype": str(torch_dtype).removeprefix("torch."), "bias": bias}
        case = next((c for c in LAYOUTS["SVDQW4A4Linear"]["cases"] if c["args"] == args), None)
        assert case is not None, f"no recorded nunchaku layout for {args}: add the size to the recorder"
        for name, spec in self.edit(dict(case["tensors"])).items():
            if spec is None:
                setattr(self, name, None)
                continue
            t = torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device)
            if spec["fill"] == "ones":
                t = torch.ones_like(t)
            self.register_parameter(name, nn.Parameter(t, requires_grad=spec["requires_grad"]))
        for name, value in case["attributes"].items():
            setattr(self, name, getattr(torch, value) if name == "torch_dtype" else value)

    def reference(self):
        from qwenstudio.engine.quant.svdquant import from_kernel_layout

        names = ("qweight", "wscales", "smooth_factor", "proj_down", "proj_up", "bias", "wcscales")
        t = {n: getattr(self, n).detach() for n in names if getattr(self, n) is not None}
        if self.wtscale is not None:
            t["wtscale"] = torch.tensor([float(self.wtscale)])
        return from_kernel_layout(t, self.precision, act_unsigned=self.act_unsigned, dtype=torch.float32, device="cpu")

    def forward(self, x, output=None):
        type(self).calls.append((tuple(x.shape), x.dtype, x.is_contiguous()))
        assert x.dim() == 3 and x.is_contiguous() and x.dtype == self.torch_dtype == self.proj_up.dtype
        assert not self.act_unsigned  # nunchaku's forward quantizes signed: an act_unsigned layer never runs alone
        return self.reference()(x.float()).to(x.dtype)


def _recorded_fused_gelu_mlp(x, fc1, fc2, pad_size=256):
    """nunchaku's ``fused_gelu_mlp(x, fc1, fc2, pad_size)`` (recorded signature and calls): a [B, S, C] contiguous
    input in the layers' dtype, fc2 act_unsigned for int4; computed with our reference (fc1, tanh GELU, fc2)."""
    _RecordedSVDQW4A4Linear.fused.append(tuple(x.shape))
    assert x.dim() == 3 and x.is_contiguous() and x.dtype == fc1.torch_dtype == fc2.torch_dtype
    assert not fc1.act_unsigned and fc2.act_unsigned == (fc2.precision == "int4")
    h = nn.functional.gelu(fc1.reference()(x.float()), approximate="tanh")
    return fc2.reference()(h).to(x.dtype)


def test_recorded_nunchaku_layout_is_what_the_reader_assumes():
    """nunchaku's own constructor (recorded) gives the files' layout: int8 [out, in/2] codes, scales [in/group,
    out] in the 16-bit type (fp8 for nvfp4), [in, r] / [out, r] factors, bf16 wcscales filled with ones for nvfp4,
    wtscale None for int4; and its forward takes [B, S, C], flattens it and pads the tokens to 256 itself."""
    for case in LAYOUTS["SVDQW4A4Linear"]["cases"]:
        a, t = case["args"], case["tensors"]
        n, k, r, dt = a["out_features"], a["in_features"], a["rank"], a["torch_dtype"]
        g, sdt = (16, "float8_e4m3fn") if a["precision"] == "nvfp4" else (64, dt)
        assert (t["qweight"]["shape"], t["qweight"]["dtype"]) == ([n, k // 2], "int8")
        assert (t["wscales"]["shape"], t["wscales"]["dtype"]) == ([k // g, n], sdt)
        assert t["proj_down"]["shape"] == [k, r] and t["proj_up"]["shape"] == [n, r]
        if a["precision"] == "nvfp4":
            assert t["wcscales"] == {"shape": [n], "dtype": dt, "kind": "parameter", "requires_grad": False,
                                     "fill": "ones"} and case["attributes"]["wtscale"] == 1.0
        else:
            assert t["wcscales"] is None and case["attributes"]["wtscale"] is None
        quant, gemm = case["calls"]
        assert case["forward_input"]["shape"] == [2, 300, k] and quant["args"]["input"]["shape"] == [600, k]
        assert quant["args"]["output"]["shape"] == [768, k // 2] and gemm["args"]["out"]["shape"] == [600, n]
        assert gemm["args"]["act_unsigned"] is a["act_unsigned"] and gemm["args"]["wcscales"] == (
            {"shape": [n], "dtype": dt, "contiguous": True} if a["precision"] == "nvfp4" else None)


def test_attach_policy_matches_nunchakus_mlp():
    """nunchaku runs the int4 MLP's fc2 only inside fused_gelu_mlp, fed by fc1's epilogue (qout, act_unsigned), so
    attach_kernels runs those MLPs fused and never calls an act_unsigned kernel alone; nvfp4 fc2s are signed."""
    mlp = LAYOUTS["NunchakuFeedForward"]
    assert mlp["int4"]["fc2_act_unsigned"] is True and mlp["nvfp4"]["fc2_act_unsigned"] is False
    _, fc1, fc2 = mlp["int4"]["calls"]
    assert fc1["args"]["qout"] is not None and fc1["args"]["out"] is None  # fc1 never returns a float output
    assert fc2["args"]["act_unsigned"] is True


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_kernel_layer_sets_nunchakus_recorded_layout(precision, loaded):
    from qwenstudio.engine.quant.svdquant import kernel_layer

    m = loaded[precision].get_submodule("transformer_blocks.0.attn.to_k")
    k = kernel_layer(m, _RecordedSVDQW4A4Linear, "cpu")
    case = next(c for c in LAYOUTS["SVDQW4A4Linear"]["cases"] if c["args"]["precision"] == precision
                and c["args"]["in_features"] == 128 and c["args"]["out_features"] == 128
                and c["args"]["torch_dtype"] == "bfloat16")
    for name, spec in case["tensors"].items():
        got = getattr(k, name)
        assert (got is None) if spec is None else (list(got.shape), str(got.dtype)) == (
            spec["shape"], f"torch.{spec['dtype']}"), name
    assert k.wtscale == (m.wtscale if precision == "nvfp4" else None)
    x = torch.randn(2, 9, 128).bfloat16()
    assert torch.allclose(k(x).float(), m(x.float()), atol=2e-2, rtol=1e-2)  # bf16 output rounding
    k16 = kernel_layer(m, _RecordedSVDQW4A4Linear, "cpu", torch.float16) if precision == "int4" else None
    if k16 is not None:  # Turing: fp16 tensors
        assert k16.bias.dtype == k16.proj_up.dtype == k16.wscales.dtype == torch.float16


@pytest.mark.parametrize("edit", ["transposed_scales", "int32_codes", "extra_tensor"])
def test_kernel_layer_refuses_a_layout_it_was_not_written_for(edit, loaded, monkeypatch):
    from qwenstudio.engine.quant.svdquant import kernel_layer
    from qwenstudio.errors import IncompatibleWeights

    def alter(t):
        if edit == "transposed_scales":
            t["wscales"] = {**t["wscales"], "shape": t["wscales"]["shape"][::-1]}
        elif edit == "int32_codes":
            t["qweight"] = {**t["qweight"], "shape": [128, 16], "dtype": "int32"}
        else:
            t["wzeros"] = dict(t["bias"])
        return t

    monkeypatch.setattr(_RecordedSVDQW4A4Linear, "edit", staticmethod(alter))
    m = loaded["int4"].get_submodule("transformer_blocks.0.attn.to_k")
    with pytest.raises(IncompatibleWeights, match="nunchaku's _RecordedSVDQW4A4Linear"):
        kernel_layer(m, _RecordedSVDQW4A4Linear, "cpu")


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_kernel_path_through_the_model(precision, loaded, monkeypatch, tmp_path):
    """attach_kernels on the tiny file with nunchaku's recorded class: every layer gets a kernel; the attention layers
    (and nvfp4's MLP layers) are called with a contiguous 3-D input in the kernel's dtype, the int4 MLPs as one
    fused_gelu_mlp (as nunchaku's Qwen-Image runs them); the output stays the reference's within bf16 noise. A LoRA
    on the MLP makes it fall back to per-layer calls (fc2 on the reference), never to a signed fc2 kernel call."""
    from qwenstudio.engine.quant.svdquant import attach_kernels

    assert LAYOUTS["NunchakuFeedForward"]["fused_gelu_mlp"].startswith("(x: torch.Tensor, fc1: nunchaku.models")
    model = copy.deepcopy(loaded[precision])
    monkeypatch.setattr(_RecordedSVDQW4A4Linear, "calls", [])
    monkeypatch.setattr(_RecordedSVDQW4A4Linear, "fused", [])
    n = attach_kernels(model, "cpu", linear_cls=_RecordedSVDQW4A4Linear, torch_dtype=torch.bfloat16,
                       fused_mlp=_recorded_fused_gelu_mlp)
    assert n == 12
    layers = [m for m in model.modules() if isinstance(m, SVDQuantLinear)]
    kept = [m for m in layers if not m.released]  # the natural copies still held: int4 fc2s only
    assert all(m.qweight is None and m.proj_up is None for m in layers if m.released)
    assert [m.act_unsigned for m in kept] == ([True, True] if precision == "int4" else [])
    ref, out = _run(loaded[precision]), _run(model)
    calls, fused = _RecordedSVDQW4A4Linear.calls, _RecordedSVDQW4A4Linear.fused
    assert (len(calls), len(fused)) == ((8, 2) if precision == "int4" else (12, 0))
    assert all(len(s) == 3 and s[0] == 1 and c and d == torch.bfloat16 for s, d, c in calls)
    rel = ((out - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
    print(f"{precision}: kernel-path stand-in (bf16 in/out) vs reference, relative RMS {rel:.4f}")
    assert rel < 0.05
    set_activation_quant(model, False)  # a released layer off the kernel path rebuilds its tensors from the kernel's
    try:
        w4a16 = _run(model)
    finally:
        set_activation_quant(model, True)
    set_activation_quant(loaded[precision], False)
    try:
        assert torch.allclose(w4a16, _run(loaded[precision]), atol=1e-5)
    finally:
        set_activation_quant(loaded[precision], True)
    to_k = model.get_submodule("transformer_blocks.0.attn.to_k")
    ref_k = loaded[precision].get_submodule("transformer_blocks.0.attn.to_k")
    assert torch.equal(to_k.effective_weight(), ref_k.effective_weight())  # exact round trip through the kernel
    path, _ = write_lora(tmp_path / "mlp-lora.safetensors", build_source_dit(), "diffusers", seed=3)
    LoraManager(model).set_stack([(path, 1.0)])
    calls.clear()
    fused.clear()
    _run(model)
    assert type(model.get_submodule("transformer_blocks.0.img_mlp.net.2")).__name__ == "LoraLinear"
    assert not fused and len(calls) == (10 if precision == "int4" else 12)  # int4 fc1s alone, fc2s on the reference


# ---- real files' layout: nunchaku's NunchakuQwenImageTransformer2DModel state dicts at the real config ----------

REAL = json.loads(gzip.decompress((FIXTURES / "nunchaku_qwenimage_state_dicts.json.gz").read_bytes()))
REAL_FILES = {"svdq-int4_r32-qwen-image": ("svdq_int4_r32", "int4"), "svdq-fp4_r128-qwen-image": ("svdq_nvfp4_r128",
                                                                                               "nvfp4")}
_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "I8": 1, "U8": 1, "I32": 4, "F8_E4M3": 1}


def _real_header(name, *, without=()):
    """The header of a real nunchaku file: the state dict nunchaku's loader expects plus the ``wtscale`` scalars it
    pops from the file (nvfp4), and the metadata nunchaku's merge_safetensors writes."""
    f = REAL["files"][name]
    table = {k: v for k, v in f["state_dict"].items() if not k.endswith(tuple(without))}
    table.update({f"{layer}.wtscale": [[1], "BF16"] for layer in f["wtscale_popped_from_file"]})
    fp4 = f["precision"] == "nvfp4"
    qcfg = {"method": "svdquant", "rank": f["rank"],
            **{side: {"dtype": "fp4_e2m1_all" if fp4 else "int4", "group_size": 16 if fp4 else 64}
               for side in ("weight", "activation")}}
    meta = {"config": json.dumps(REAL["config"]), "comfy_config": "{}",
            "model_class": "NunchakuQwenImageTransformer2DModel", "quantization_config": json.dumps(qcfg)}
    return table, meta


def _sparse_safetensors(path, table, meta):
    """A safetensors file with that exact header and no data written (sparse: ~12 GB apparent, ~0 on disk) — what
    ``qwenstudio models`` reads of a real download is its header alone."""
    header, offset = {"__metadata__": meta}, 0
    for k, (shape, dt) in table.items():
        n = _ITEMSIZE[dt]
        for d in shape:
            n *= d
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.truncate(8 + len(raw) + offset)
    return path


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_file_header_is_listed_as_what_it_is(name, tmp_path):
    from qwenstudio.engine.registry import ModelRegistry

    table, meta = _real_header(name)
    (tmp_path / "diffusion_models").mkdir()
    path = _sparse_safetensors(tmp_path / "diffusion_models" / f"{name}.safetensors", table, meta)
    info = detect(path)
    assert (info.role, info.quant, info.dtype) == ("dit", *REAL_FILES[name])
    [entry] = ModelRegistry([tmp_path]).scan()
    assert entry.kind == "dit" and entry.public()["quant"] == REAL_FILES[name][0]


@pytest.mark.parametrize("name", sorted(REAL_FILES))
@pytest.mark.parametrize("with_metadata", [True, False])
def test_real_file_header_config_and_every_key_placed(name, with_metadata):
    """The real config comes back (from the metadata, or from the shapes alone), and every key of the real layout
    has a place in diffusers' 60-block DiT: no key unused, no model tensor missing, no shape different."""
    from diffusers import QwenImageTransformer2DModel

    from qwenstudio.engine.formats.nunchaku import map_keys, nunchaku_config, svdquant_kind
    from qwenstudio.engine.loading import build_empty

    table, meta = _real_header(name)
    shapes = {k: tuple(s) for k, (s, _) in table.items()}
    dtypes = {k: d for k, (_, d) in table.items()}
    assert svdquant_kind(dtypes, shapes) == REAL_FILES[name]
    cfg = nunchaku_config(meta if with_metadata else {}, shapes)
    real = {k: v for k, v in REAL["config"].items() if not k.startswith("_")}
    assert {k: cfg[k] for k in cfg} == {k: real[k] for k in cfg}
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["joint_attention_dim"]) == (60, 24, 3584)
    model = build_empty(lambda: QwenImageTransformer2DModel.from_config(cfg))
    plans, plain = map_keys(model, shapes, dtypes)
    placed = [k for p in plans for k in p.keys] + plain
    assert len(placed) == len(set(placed)) and set(placed) == set(shapes)  # each key exactly once
    assert sum(p.kind == "awq" for p in plans) == 120 and sum(len(p.targets) for p in plans if p.kind == "svdq") \
        == 60 * 12  # q, k, v, add_q/k/v, to_out, to_add_out, 2 MLPs x 2 per block
    assert [p.targets for p in plans if p.layer == "transformer_blocks.7.attn.add_qkv_proj"] == [
        ("transformer_blocks.7.attn.add_q_proj", "transformer_blocks.7.attn.add_k_proj",
         "transformer_blocks.7.attn.add_v_proj")]
    assert {p.layer.split(".", 2)[2] for p in plans if p.act_unsigned} == {"img_mlp.net.2", "txt_mlp.net.2"}


def test_real_file_header_wrong_or_incomplete_is_refused():
    from diffusers import QwenImageTransformer2DModel

    from qwenstudio.engine.formats.nunchaku import map_keys, nunchaku_config
    from qwenstudio.errors import IncompatibleWeights

    table, meta = _real_header("svdq-fp4_r128-qwen-image", without=(".wcscales",))  # nunchaku fills ones: optional
    shapes = {k: tuple(s) for k, (s, _) in table.items()}
    dtypes = {k: d for k, (_, d) in table.items()}
    from qwenstudio.engine.loading import build_empty

    model = build_empty(lambda: QwenImageTransformer2DModel.from_config(nunchaku_config(meta, shapes)))
    map_keys(model, shapes, dtypes)
    for broken, match in (({k: v for k, v in shapes.items() if k != "norm_out.linear.weight"}, "missing"),
                          ({**shapes, "transformer_blocks.3.attn.to_qkv.lora_down": (3072, 128)}, "unexpected"),
                          ({**shapes, "txt_in.weight": (3072, 4096)}, "shape")):
        with pytest.raises(IncompatibleWeights, match=match):
            map_keys(model, broken, {**dtypes, "transformer_blocks.3.attn.to_qkv.lora_down": "BF16"})
