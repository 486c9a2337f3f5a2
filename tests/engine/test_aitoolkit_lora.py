"""A Qwen-Image LoRA written by ai-toolkit's own network + save code (tests/fixtures/peers/aitoolkit/, made by
make_aitoolkit_lora.py; commit in SOURCES.md; no ai-toolkit code runs here): every key matches, and through the
Engine (by registry name, as the CLI and server load it) it does what merging its factors by hand does, and what
ai-toolkit's own forward with its network applied did."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenstudio import Engine
from qwenstudio.config import Settings
from qwenstudio.engine.engine import Engine as EngineCls
from qwenstudio.engine.loading import load_diffusers_folder
from qwenstudio.engine.lora import LoraManager
from qwenstudio.engine.specs import get_spec
from qwenstudio.testing.loras import merge_deltas

AITK = Path(__file__).resolve().parents[1] / "fixtures" / "peers" / "aitoolkit"
LORA = AITK / "aitoolkit_qwen_lora.safetensors"
GEN = dict(prompt="a lamp", seed=3, steps=2, cfg=2.0, width=64, height=64)


def hand_deltas() -> dict[str, torch.Tensor]:
    """``lora_B @ lora_A`` per module, scale 1: ai-toolkit's peft format sets alpha = rank for transformers
    (``LoRASpecialNetwork``: "no alpha for peft") and saves no alpha."""
    sd = load_file(str(LORA))
    out = {}
    for key, down in sd.items():
        if key.endswith(".lora_A.weight"):
            module = key[len("diffusion_model."):-len(".lora_A.weight")]
            out[module] = sd[key.replace(".lora_A.", ".lora_B.")].float() @ down.float()
    return out


def test_every_key_of_the_aitoolkit_file_matches(tiny_folder):
    model = load_diffusers_folder(tiny_folder, device="cpu").transformer
    lf = LoraManager(model).load(LORA)
    assert lf.unmatched == []
    assert set(lf.weights) == set(hand_deltas()) and len(lf.weights) == 28  # every Linear of both blocks
    assert lf.report.complete and lf.report.warning() is None


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_folder):
    home = tmp_path_factory.mktemp("aitk-home")
    (home / "models" / "loras").mkdir(parents=True)
    shutil.copy(LORA, home / "models" / "loras" / "aitk_style.safetensors")
    engine = Engine.load(tiny_folder, variant="tiny", device="cpu", settings=Settings(home=home))
    engine.allow_paths = False  # by registry name, as the server resolves it
    return engine


def test_through_the_engine_it_equals_its_factors_merged_by_hand(engine, tiny_folder):
    """Requested by name at weight 0.7 (the user path): the DiT the engine runs with the stack applied gives the
    hand-merged DiT's output (<= 1e-6), and the render's latents match the hand-merged render's."""
    ours = engine.generate(**GEN, loras=[{"name": "aitk_style", "weight": 0.7}])
    entry = ours.images[0].metadata["loras"][0]
    assert (entry["name"], entry["weight"], entry["file"]) == ("aitk_style", 0.7, "aitk_style.safetensors")
    assert "match" not in entry  # a complete match: nothing to report
    ref_components = load_diffusers_folder(tiny_folder, device="cpu")
    merge_deltas(ref_components.transformer, hand_deltas(), weight=0.7)
    assert [lo["name"] for lo in engine.lora_metadata()] == ["aitk_style"]  # the stack the render ran with
    inputs = forward_inputs()
    with torch.inference_mode():
        dit = (engine.components.transformer(**inputs)[0] - ref_components.transformer(**inputs)[0]).abs().max()
    ref = EngineCls(ref_components, get_spec("tiny")).generate(**GEN)
    diff = (ours.latents - ref.latents).abs().max().item()
    effect = (ours.latents - engine.generate(**GEN).latents).abs().max().item()
    print(f"\nai-toolkit LoRA via Engine vs hand merge: DiT output {dit:.1e}, latents after 2 steps {diff:.1e} "
          f"(LoRA effect on latents {effect:.2f})")
    assert dit <= 1e-6
    assert diff <= 1e-5 and effect > 1e-2  # side branch vs merged weights: float rounding, 2 steps x 2 passes


def forward_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
                timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]], return_dict=False)


def test_dit_output_equals_aitoolkits_own_forward(tiny_folder):
    """Our side branch at weight 1 vs ai-toolkit's network applied (multiplier 1) on the same inputs: the same
    output; the base output is checked first, so a different tiny model fails here, not as a LoRA mismatch."""
    ref = load_file(str(AITK / "aitoolkit_qwen_lora.ref.safetensors"))
    inputs = dict(hidden_states=ref["input.hidden_states"], encoder_hidden_states=ref["input.encoder_hidden_states"],
                  timestep=ref["input.timestep"], img_shapes=[[(1, 4, 4)]], return_dict=False)
    model = load_diffusers_folder(tiny_folder, device="cpu").transformer
    with torch.inference_mode():
        base = model(**inputs)[0]
    assert (base - ref["base_forward"]).abs().max().item() <= 1e-6
    manager = LoraManager(model)
    manager.set_stack([(manager.load(LORA), 1.0)])
    with torch.inference_mode():
        out = model(**inputs)[0]
    manager.clear()
    diff = (out - ref["lora_forward"]).abs().max().item()
    print(f"\nours vs ai-toolkit's forward: {diff:.1e} (LoRA effect {(ref['lora_forward'] - base).abs().max():.2f})")
    assert diff <= 1e-6
