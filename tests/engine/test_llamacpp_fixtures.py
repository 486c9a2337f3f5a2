"""GGUF files written by llama.cpp's own quantizer (ggml ``ggml_quantize_chunk``, tests/fixtures/peers/llamacpp/):
read exactly, generated from through the models home, and our K-quant writer's error held against llama.cpp's on
the same inputs. No llama.cpp at test time: the files and its measured numbers are in the fixture folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from qwenstudio.engine.formats.gguf import gguf_quant_summary, load_dit_gguf, read_gguf  # noqa: E402
from qwenstudio.engine.quant.gguf_linear import GGUFLinear, qtype_name  # noqa: E402
from qwenstudio.engine.quant.kquant import quantize  # noqa: E402
from qwenstudio.testing.gguf_files import expected_weights  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "peers" / "llamacpp"
MEASURED = json.loads((FIX / "measured.json").read_text())
FILE_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0")
OURS = ("Q4_K", "Q5_K", "Q6_K")  # what `convert --to gguf_*` writes with quant/kquant.py
K_ABLE = ("transformer_blocks.0.img_mlp.net.2.weight", "transformer_blocks.0.txt_mlp.net.2.weight")
# Max |latent difference| vs the fp32 source model, 2 steps at 64x64, cfg 1 (latent std 1.18). Measured on CPU:
# Q2_K 1.97e-2, Q3_K 1.07e-2, Q4_K 4.0e-3, Q5_K 1.8e-3, Q6_K 8.5e-4 (the 64-wide layers are Q8_0 in every K file),
# Q4_0 8.2e-3 (every block layer Q4_0). Bounds ~2x measured. "F32": our lossless GGUF of the same source through
# the same path, 0 — so the numbers above are the quantization alone.
LATENT_TOL = {"Q2_K": 0.04, "Q3_K": 0.022, "Q4_K": 0.009, "Q5_K": 0.004, "Q6_K": 0.002, "Q4_0": 0.017, "F32": 0.0}
# Ours / llama.cpp's rel. RMS error on the same floats may exceed 1 by at most this much.
RATIO_TOL = 1.05


def _file(qtype: str) -> Path:
    return FIX / f"tiny64-{qtype}.gguf"


def _rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(((y.astype(np.float64) - x) ** 2).mean() / (x.astype(np.float64) ** 2).mean()))


def _dequant(raw: np.ndarray, qtype: str, shape) -> np.ndarray:
    return gguf.quants.dequantize(np.asarray(raw), gguf.GGMLQuantizationType[qtype]).reshape(shape)


@pytest.fixture(scope="module")
def source():
    """The fp32 tiny DiT the fixtures were made from, rebuilt from its spec (checked against the files' hashes)."""
    from qwenstudio.testing.tiny import TinySpec, build_components

    spec = dict(MEASURED["spec"], axes_dims_rope=tuple(MEASURED["spec"]["axes_dims_rope"]))
    return build_components(TinySpec(**spec))["transformer"]


@pytest.fixture(scope="module")
def source_f16(source):
    """What llama.cpp quantized: ComfyUI-GGUF's convert.py stores the fp32 matrices as F16 (<= 1024 values: F32)."""
    out = {}
    for k, v in source.state_dict().items():
        a = v.detach().numpy()
        out[k] = a.astype(np.float32 if a.ndim == 1 or a.size <= 1024 else np.float16)
    return out


def test_rebuilt_source_is_the_one_llamacpp_quantized(source_f16):
    got = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in source_f16.items()}
    assert got == MEASURED["source_f16_sha256"]


@pytest.mark.parametrize("qtype", FILE_TYPES)
def test_llamacpp_file_loads_with_exact_weights(qtype, source_f16):
    """Every layer of the loaded model equals gguf-py's dequantize of llama.cpp's bytes; layers stay quantized."""
    path = _file(qtype)
    arch, tensors, metadata = read_gguf(path)
    assert arch == "qwen_image" and metadata["general.file_type"] == gguf.LlamaFileType[
        {"Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S",
         "Q6_K": "MOSTLY_Q6_K", "Q4_0": "MOSTLY_Q4_0"}[qtype]]
    expected = expected_weights(path)
    model = load_dit_gguf(path, device="cpu", dtype=torch.float32)
    layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    kinds = {qtype_name(m.qtype) for m in layers.values()}
    assert kinds == ({qtype} if qtype == "Q4_0" else {qtype, "Q8_0"})  # 64-wide rows: Q8_0 in the K files
    assert {qtype_name(layers[k].qtype) for k in K_ABLE} == {qtype}
    assert "img_in.weight" not in layers and "time_text_embed.timestep_embedder.linear_1.weight" not in layers
    for name, m in layers.items():
        np.testing.assert_array_equal(m.dequantize_weight().numpy(), expected[name], err_msg=name)
    for name, p in model.state_dict().items():
        if name not in layers:
            np.testing.assert_array_equal(p.numpy(), expected[name], err_msg=name)
            np.testing.assert_array_equal(p.numpy(), source_f16[name].astype(np.float32), err_msg=name)
    for name in K_ABLE:  # llama.cpp's error, recomputed from the file and the rebuilt source
        x = source_f16[name].astype(np.float32)
        assert _rel(x, expected[name]) == pytest.approx(MEASURED[f"tiny64-{qtype}.{name}"]["llamacpp_rel_rms"],
                                                         rel=1e-6)
    assert gguf_quant_summary(path) == ("Q8_0" if qtype != "Q4_0" else "Q4_0")  # by element count


# ---- generation through the models home -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def models_root(tmp_path_factory, tiny_folder, source):
    """A ComfyUI models/ tree: the tiny text encoder (fp32) and VAE, llama.cpp's six files as DiTs, and the fp32
    source as an F32 GGUF of ours (the harness check: that one must reproduce the reference exactly)."""
    from qwenstudio.engine.formats.gguf import write_dit_gguf
    from qwenstudio.testing.formats import write_text_encoder_file, write_vae_file

    root = tmp_path_factory.mktemp("llamacpp") / "models"
    write_text_encoder_file(tiny_folder, root / "text_encoders" / "qwen_2.5_vl_7b.safetensors", dtype="fp32")
    write_vae_file(tiny_folder, root / "vae" / "qwen_image_vae.safetensors")
    shutil.copytree(Path(tiny_folder) / "tokenizer", root / "tokenizer")
    for q in FILE_TYPES:
        (root / "diffusion_models").mkdir(parents=True, exist_ok=True)
        shutil.copy(_file(q), root / "diffusion_models" / _file(q).name)
    write_dit_gguf(source.state_dict(), root / "diffusion_models" / "tiny64-F32.gguf", "F32")
    return root


GEN = dict(prompt="a bridge at dusk", seed=3, steps=2, width=64, height=64, cfg=1.0)


@pytest.fixture(scope="module")
def reference_latents(tiny_folder, source):
    """The same pipeline with the fp32 source DiT."""
    from qwenstudio.engine.engine import Engine
    from qwenstudio.engine.loading import load_diffusers_folder
    from qwenstudio.engine.specs import get_spec

    comps = load_diffusers_folder(tiny_folder, device="cpu", dtype=torch.float32)
    return Engine(dataclasses.replace(comps, transformer=source), get_spec("tiny")).generate(**GEN).latents


@pytest.mark.parametrize("qtype", (*FILE_TYPES, "F32"))
def test_generate_from_llamacpp_file_by_name(qtype, models_root, reference_latents, tmp_path):
    from qwenstudio import Engine
    from qwenstudio.config import Settings

    engine = Engine.load(f"tiny64-{qtype}", variant="tiny", device="cpu", models_dirs=(models_root,),
                         settings=Settings(home=tmp_path / "home", dtype="float32"))  # the bounds are for fp32 compute
    assert engine.components.identity["files"][0] == f"tiny64-{qtype}"
    latents = engine.generate(**GEN).latents
    diff = (latents.float() - reference_latents.float()).abs().max().item()
    print(f"{qtype}: max |latent diff| vs fp32 source = {diff:.3e} (latent std {reference_latents.std():.2f})")
    assert torch.isfinite(latents).all() and diff <= LATENT_TOL[qtype]


# ---- our writer vs llama.cpp's quantizer ----------------------------------------------------------------------

def _blocks():
    from safetensors.numpy import load_file

    src = load_file(str(FIX / "kquant_blocks.src.safetensors"))
    reader = gguf.GGUFReader(str(FIX / "kquant_blocks.gguf"))
    return {k: v.astype(np.float32) for k, v in src.items()}, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("qtype", OURS)
def test_our_kquant_error_within_5_percent_of_llamacpp(qtype, source_f16):
    """Same floats, both quantizers: bell-shaped samples (Gaussian, Laplacian) and the DiT's 256-wide layers."""
    samples, theirs = _blocks()
    cases = {name: (x, np.array(theirs[f"{name}.{qtype.lower()}"].data)) for name, x in samples.items()}
    f = gguf.GGUFReader(str(_file(qtype)))
    for t in f.tensors:
        if t.name in K_ABLE:
            cases[t.name] = (source_f16[t.name].astype(np.float32), np.array(t.data))
    report = {}
    for name, (x, raw) in cases.items():
        lcpp = _rel(x, _dequant(raw, qtype, x.shape))
        ours = _rel(x, _dequant(quantize(x, qtype), qtype, x.shape))
        report[name] = (round(ours, 5), round(lcpp, 5), round(ours / lcpp, 3))
        assert ours <= RATIO_TOL * lcpp, (name, ours, lcpp)
    print(f"\n{qtype} (ours, llama.cpp, ratio): {report}")


def test_q2_q3_blocks_and_legacy_bytes():
    """llama.cpp's Q2_K/Q3_K blocks decode here as in gguf-py, within their expected error; its Q8_0 bytes are
    byte-for-byte what gguf-py's quantizer (our legacy-type writer) makes of the same floats, its Q4_0 bytes too but
    for one value in 16384 (FMA rounding in llama.cpp's x86 build puts a value on the neighbouring level)."""
    from qwenstudio.engine.quant.gguf_linear import dequantize

    samples, theirs = _blocks()
    for name, x in samples.items():
        for qtype, bound in (("Q2_K", 0.4), ("Q3_K", 0.2)):
            raw = np.array(theirs[f"{name}.{qtype.lower()}"].data)
            ref = _dequant(raw, qtype, x.shape)
            ours = dequantize(torch.from_numpy(raw), qtype, x.shape).numpy()
            np.testing.assert_array_equal(ours, ref)
            assert _rel(x, ref) < bound
        raw = np.array(theirs[f"{name}.q8_0"].data)
        assert np.array_equal(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0), raw), name
        raw = np.array(theirs[f"{name}.q4_0"].data).reshape(-1, 18)  # fp16 d, 16 bytes of nibbles
        mine = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0).reshape(-1, 18)
        assert np.array_equal(mine[:, :2], raw[:, :2]), name  # every scale equal
        differ = np.argwhere(mine != raw)
        assert len(differ) <= 1, (name, differ)
        for b, i in differ:
            lo, hi = int(mine[b, i]) & 15, int(mine[b, i]) >> 4
            lo2, hi2 = int(raw[b, i]) & 15, int(raw[b, i]) >> 4
            assert abs(lo - lo2) + abs(hi - hi2) == 1, (name, b, i)


def test_cli_generate_from_llamacpp_file(models_root, tmp_path):
    """`qwenstudio generate --model <llama.cpp file's name> --models-dir ...`: the PNG says which file made it."""
    from typer.testing import CliRunner

    from qwenstudio.cli.main import app
    from qwenstudio.outputs import read_png_metadata

    out = tmp_path / "bridge.png"
    r = CliRunner().invoke(app, ["generate", "a bridge", "--model", "tiny64-Q3_K", "--variant", "tiny",
                                 "--models-dir", str(models_root), "--steps", "2", "--seed", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    meta = read_png_metadata(out)
    assert meta["model"]["files"][0] == "tiny64-Q3_K" and meta["model"]["format"] == "gguf"
    assert meta["request"]["steps"] == 2 and meta["seed"] == 1


# ---- ComfyUI-GGUF's patched llama-quantize itself ----------------------------------------------------------------

def test_llama_quantize_tool_bytes_equal_the_fixtures():
    """Tensors the patched llama-quantize wrote (copied byte for byte into llama_quantize_blocks.gguf) equal the
    fixtures' ggml_quantize_chunk bytes for the same tensor and type, and decode here as in gguf-py; the script
    compared every tensor the tool quantized (28, incl. Q2_K/Q3_K of a 2-block model) and found them all equal."""
    from qwenstudio.engine.quant.gguf_linear import dequantize

    tool = {t.name: t for t in gguf.GGUFReader(str(FIX / "llama_quantize_blocks.gguf")).tensors}
    same_file = {"Q2_K.1.transformer_blocks.0.img_mlp.net.2.weight": "Q4_K",  # the patch lifts block 0 to Q4_K
                 "Q4_K_S.1.transformer_blocks.0.img_mlp.net.2.weight": "Q5_K",  # ffn_down rule
                 "Q6_K.1.transformer_blocks.0.img_mlp.net.2.weight": "Q6_K",
                 "Q4_0.1.transformer_blocks.0.img_mod.1.weight": "Q4_0"}
    assert set(same_file) < set(tool)
    for name, qtype in same_file.items():
        t = tool[name]
        assert t.tensor_type.name == qtype
        ours = {x.name: x for x in gguf.GGUFReader(str(_file(qtype))).tensors}[name.split(".", 2)[2]]
        assert np.array_equal(np.array(t.data), np.array(ours.data)), name
    for name, t in tool.items():
        raw = np.array(t.data)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        np.testing.assert_array_equal(dequantize(torch.from_numpy(raw), t.tensor_type.name, shape).numpy(),
                                      _dequant(raw, t.tensor_type.name, shape), err_msg=name)
    assert {tool[f"{f}.2.transformer_blocks.1.img_mlp.net.2.weight"].tensor_type.name for f in ("Q2_K", "Q3_K_S")} \
        == {"Q2_K", "Q3_K"}
    checked = {k: v for k, v in MEASURED.items() if k.startswith("llama_quantize.")}
    assert len(checked) == 28 and all(v["bytes_equal_ggml_quantize_chunk"] for v in checked.values())
