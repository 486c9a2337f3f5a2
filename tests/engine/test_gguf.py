"""GGUF DiT: torch dequant == gguf-py's numpy reference, weights stay quantized, generation close to the folder."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from qwenstudio.engine.formats.gguf import (
    gguf_fingerprint,
    gguf_quant_summary,
    load_dit_gguf,
    read_gguf,
    write_dit_gguf,
)
from qwenstudio.engine.formats.keymaps import CONFIG_METADATA_KEY
from qwenstudio.engine.quant.gguf_linear import GGUFLinear, dequantize
from qwenstudio.errors import CorruptFile, IncompatibleWeights, UnsupportedFormat
from qwenstudio.testing.gguf_files import (
    expected_weights,
    random_kquant_blocks,
    write_foreign_gguf,
    write_kquant_gguf,
    write_tiny_gguf,
)

LEGACY = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "F16", "BF16")
KQUANTS = ("Q4_K", "Q5_K", "Q6_K")
# Max |latent difference| vs the fp32 diffusers folder after 2 steps at 64x64 (latent std 1.2). Measured on CPU:
# Q8_0 1.17e-2, Q5_0 9.5e-2, Q4_0 2.25e-1, F16 5.6e-4 — scaling with the quantization step as expected
# (Q5_0/Q8_0 ~ 127/15); the random tiny DiT amplifies weight noise more than a trained one. Bounds ~2x measured.
LATENT_TOL = {"Q8_0": 2.5e-2, "Q5_0": 0.2, "Q4_0": 0.45, "F16": 1.2e-3}


def _gen(components):
    from qwenstudio.engine.engine import Engine
    from qwenstudio.engine.specs import get_spec

    return Engine(components, get_spec("tiny")).generate(prompt="x", steps=2, seed=0, width=64, height=64).latents


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def folder_components(tiny_folder):
    from qwenstudio.engine.loading import load_diffusers_folder

    return load_diffusers_folder(tiny_folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference_latents(folder_components):
    return _gen(folder_components)


@pytest.fixture(scope="module")
def legacy_file(tiny_folder, gguf_dir):
    files = {}

    def get(qtype: str):
        if qtype not in files:
            files[qtype] = write_tiny_gguf(tiny_folder, gguf_dir / f"tiny-{qtype}.gguf", qtype)
        return files[qtype]

    return get


@pytest.fixture(scope="module")
def kquant_file(gguf_dir):
    path = gguf_dir / "tiny-K_M.gguf"
    return path, write_kquant_gguf(path, KQUANTS, seed=1)


# ---- dequantization kernels ----------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", LEGACY + ("F32",))
def test_torch_dequant_matches_gguf_py_legacy(qtype):
    x = np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32) * 0.05
    qt = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(x, qt)
    ref = gguf.quants.dequantize(raw, qt)
    ours = dequantize(torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).copy()), qtype, (16, 256))
    assert ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("qtype", KQUANTS)
def test_torch_dequant_matches_gguf_py_kquants(qtype):
    blocks = random_kquant_blocks(qtype, 64, np.random.default_rng(0))
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])
    ours = dequantize(torch.from_numpy(blocks.copy()), qtype, (64, 256))
    assert np.isfinite(ref).all() and np.abs(ref).max() < 0.2
    np.testing.assert_array_equal(ours.numpy(), ref)
    assert dequantize(torch.from_numpy(blocks.copy()), qtype, (64, 256), torch.bfloat16).dtype == torch.bfloat16


def test_gguf_linear_forward_in_input_dtype():
    layer = GGUFLinear(64, 8, "Q8_0")
    raw = gguf.quants.quantize(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32),
                               gguf.GGMLQuantizationType.Q8_0)
    layer.weight.copy_(torch.from_numpy(raw.copy()))
    torch.nn.init.zeros_(layer.bias)
    x = torch.randn(3, 64)
    w = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0))
    torch.testing.assert_close(layer(x), x @ w.T)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


# ---- loading ------------------------------------------------------------------------------------------------

def _gguf_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}


@pytest.mark.parametrize("qtype", LEGACY)
def test_loaded_weights_equal_reference_dequant(qtype, legacy_file):
    path = legacy_file(qtype)
    model = load_dit_gguf(path, device="cpu", dtype=torch.float32)
    expected = expected_weights(path)
    state = model.state_dict()
    layers = _gguf_layers(model)
    assert bool(layers) == (qtype not in ("F16", "BF16"))  # float files load as plain parameters
    for key, want in expected.items():
        mod_name = key.rsplit(".", 1)[0]
        got = layers[mod_name].dequantize_weight() if key.endswith(".weight") and mod_name in layers else state[key]
        np.testing.assert_array_equal(got.float().numpy(), want, err_msg=key)
    assert gguf_quant_summary(path) == qtype


@pytest.mark.parametrize("qtype", ("Q8_0", "Q4_0"))
def test_weights_stay_quantized(qtype, legacy_file, folder_components):
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    model = load_dit_gguf(legacy_file(qtype), device="cpu", dtype=torch.float32)
    layers = _gguf_layers(model)
    assert len(layers) == sum(isinstance(m, torch.nn.Linear) for m in folder_components.transformer.modules())
    for name, m in layers.items():
        assert m.weight.dtype == torch.uint8, name
        assert m.weight.numel() == m.out_features * m.in_features // block * size, name
        assert all(p.dtype != torch.float32 or p.ndim == 1 for p in m.parameters(recurse=False)), name

    def nbytes(mod):
        return sum(t.numel() * t.element_size() for t in [*mod.parameters(), *mod.buffers()])

    ratio = nbytes(model) / nbytes(folder_components.transformer)
    print(f"{qtype}: model bytes / fp32 bytes = {ratio:.3f}")
    assert ratio < {"Q8_0": 0.35, "Q4_0": 0.22}[qtype]


def test_kquant_file_loads_exact_weights(kquant_file):
    path, expected = kquant_file
    model = load_dit_gguf(path, device="cpu", dtype=torch.float32)
    layers = _gguf_layers(model)
    assert {gguf.GGMLQuantizationType(m.qtype).name for m in layers.values()} == {*KQUANTS, "Q8_0"}
    for name, m in layers.items():
        np.testing.assert_array_equal(m.dequantize_weight().numpy(), expected[f"{name}.weight"], err_msg=name)
    assert gguf_quant_summary(path) in KQUANTS


# ---- generation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", tuple(LATENT_TOL))
def test_generation_close_to_folder(qtype, legacy_file, folder_components, reference_latents):
    model = load_dit_gguf(legacy_file(qtype), device="cpu", dtype=torch.float32)
    latents = _gen(dataclasses.replace(folder_components, transformer=model))
    diff = (latents.float() - reference_latents.float()).abs().max().item()
    print(f"{qtype}: max |latent diff| vs fp32 folder = {diff:.3e} (latent std {reference_latents.std():.2f})")
    assert diff <= LATENT_TOL[qtype]


def test_kquant_generation_is_finite(kquant_file, folder_components):
    model = load_dit_gguf(kquant_file[0], device="cpu", dtype=torch.float32)
    latents = _gen(dataclasses.replace(folder_components, transformer=model))
    assert torch.isfinite(latents).all()


# ---- errors and writing -------------------------------------------------------------------------------------

def test_truncated_gguf_is_corrupt(legacy_file, tmp_path):
    src = legacy_file("Q8_0")
    for keep in (src.stat().st_size // 2, 40):
        bad = tmp_path / f"cut-{keep}.gguf"
        bad.write_bytes(src.read_bytes()[:keep])
        with pytest.raises(CorruptFile, match=bad.name):
            load_dit_gguf(bad, device="cpu")


def test_not_gguf_is_unsupported(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(UnsupportedFormat, match="model.gguf"):
        read_gguf(bad)


def test_other_architecture_is_incompatible(tmp_path):
    with pytest.raises(IncompatibleWeights, match="llama.gguf"):
        load_dit_gguf(write_foreign_gguf(tmp_path / "llama.gguf"), device="cpu")
    with pytest.raises(IncompatibleWeights, match="noarch.gguf"):  # generic arch, but not Qwen-Image tensors
        read_gguf(write_foreign_gguf(tmp_path / "noarch.gguf", arch="pig"))


def test_write_q8_0_round_trip_from_prefixed_state_dict(folder_components, tmp_path):
    src = folder_components.transformer
    sd = {f"model.diffusion_model.{k}": v for k, v in src.state_dict().items()}
    config = dict(src.config)
    dst = write_dit_gguf(sd, tmp_path / "out.gguf", "Q8_0", config=config)
    arch, tensors, meta = read_gguf(dst)
    assert arch == "qwen_image" and CONFIG_METADATA_KEY in meta
    assert all(qt == gguf.GGMLQuantizationType.F32 for qt, shape, _ in tensors.values() if len(shape) == 1)
    model = load_dit_gguf(dst, device="cpu", dtype=torch.float32)
    assert model.config.axes_dims_rope == src.config.axes_dims_rope
    for name, m in _gguf_layers(model).items():
        ref = src.get_submodule(name).weight
        assert (m.dequantize_weight() - ref).abs().max() <= ref.abs().max() / 127 + 1e-6, name
    assert gguf_fingerprint(dst) == gguf_fingerprint(dst) != gguf_fingerprint(write_dit_gguf(sd, tmp_path / "b.gguf",
                                                                                               "BF16", config=config))
    with pytest.raises(UnsupportedFormat):
        write_dit_gguf(sd, tmp_path / "k.gguf", "Q2_K")  # read, never written
    shutil.rmtree(tmp_path, ignore_errors=True)
