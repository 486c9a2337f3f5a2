"""The CLI with peers' files: ``convert`` to the formats they read (ComfyUI's per-layer fp8_scaled, GGUF K-quants),
loaded back; a partly-matching ComfyUI LoraSave file warns on the console and is described in the PNG metadata."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from qwenstudio.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    """A 256-wide DiT (K-quant super-blocks are 256 values), one block, trained-looking small weights."""
    from diffusers import QwenImageTransformer2DModel

    from qwenstudio.testing.gguf_files import KQUANT_DIT_CONFIG

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel.from_config(KQUANT_DIT_CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    folder = tmp_path_factory.mktemp("wide") / "transformer"
    model.save_pretrained(str(folder))
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


# worst layer measured: 0.0724 (Q4_K), 0.0362 (Q5_K), 0.0174 (Q6_K)
@pytest.mark.parametrize("qtype, bound", [("q4_k", 0.075), ("q5_k", 0.038), ("q6_k", 0.018)])
def test_convert_to_kquant_gguf_loads_back(wide_folder, tmp_path, qtype, bound):
    from qwenstudio.engine.formats.gguf import load_dit_gguf
    from qwenstudio.engine.quant.gguf_linear import GGUFLinear, qtype_name

    folder, original = wide_folder
    dst = tmp_path / f"wide-{qtype}.gguf"
    r = runner.invoke(app, ["convert", str(folder), str(dst), "--to", f"gguf_{qtype}"])
    assert r.exit_code == 0, r.output
    model = load_dit_gguf(dst, device="cpu", dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    kinds = {qtype_name(m.qtype) for m in layers.values()}
    assert qtype.upper() in kinds and kinds <= {qtype.upper(), "Q8_0"}  # 64/32-wide rows (img_in, txt_in): Q8_0
    assert qtype_name(layers["transformer_blocks.0.attn.to_q"].qtype) == qtype.upper()
    worst = 0.0
    for name, m in layers.items():
        ref = original[f"{name}.weight"]
        rel = float((m.dequantize_weight() - ref).pow(2).mean().sqrt() / ref.std())
        worst = max(worst, rel)
    print(f"\n{qtype}: worst layer rms error / std = {worst:.4f}")
    assert worst < bound


def test_convert_to_fp8_scaled_writes_comfyui_per_layer_format(wide_folder, tmp_path):
    folder, _ = wide_folder
    dst = tmp_path / "wide_fp8.safetensors"
    r = runner.invoke(app, ["convert", str(folder), str(dst), "--to", "fp8_scaled"])
    assert r.exit_code == 0, r.output
    with safe_open(str(dst), framework="pt") as f:
        keys = list(f.keys())
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    assert "transformer_blocks.0.attn.to_q" in layers and "img_in" not in layers
    assert not any(k.endswith(("scaled_fp8", "scale_weight")) for k in keys)
    r = runner.invoke(app, ["convert", str(folder), str(tmp_path / "x.safetensors"), "--to", "fp8_scaled",
                            "--scale-input"])
    assert r.exit_code != 0 and "fp8_scaled_legacy" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["convert", str(folder), str(tmp_path / "x.gguf"), "--to", "gguf_q2_k"])
    assert r.exit_code != 0 and "Q2_K" in r.output


def test_partial_lora_warns_on_console_and_lands_in_metadata(tmp_path):
    """ComfyUI LoraSave with bias diffs also carries norm ``.diff`` tensors, which are not applied: the CLI says so
    on stderr (one line) and the PNG metadata lists the keys."""
    from qwenstudio.outputs import read_png_metadata

    lora = Path(__file__).resolve().parents[1] / "fixtures" / "peers" / "loras" / "comfy_lorasave_bias.safetensors"
    (tmp_path / "models" / "loras").mkdir(parents=True)
    shutil.copy(lora, tmp_path / "models" / "loras" / "extracted.safetensors")
    out = tmp_path / "x.png"
    p = subprocess.run([sys.executable, "-m", "qwenstudio.cli.main", "generate", "x", "--model", "tiny", "--steps",
                        "1", "--seed", "1", "--models-dir", str(tmp_path / "models"), "--lora", "extracted:1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr
    assert "LoRA extracted.safetensors: applied" in p.stderr and "keys matched no module" in p.stderr
    entry = read_png_metadata(out)["loras"][0]
    assert entry["name"] == "extracted" and entry["match"]["unmatched_count"] > 0
    assert all(k.endswith(".diff") for k in entry["match"]["unmatched"])
