"""LoRA stacks through the Engine: by registry name, per request, no reload, Lightning recipe defaults."""

from __future__ import annotations

import copy

import pytest
import torch

from qwenstudio import Engine, InvalidRequest, ModelNotFound
from qwenstudio.config import Settings
from qwenstudio.engine.engine import Engine as EngineCls
from qwenstudio.engine.loading import load_diffusers_folder
from qwenstudio.engine.requests import GenerateRequest
from qwenstudio.engine.specs import get_spec
from qwenstudio.testing.loras import merge_deltas, write_lora


@pytest.fixture(scope="module")
def lora_home(tmp_path_factory, tiny_folder):
    home = tmp_path_factory.mktemp("lora-home")
    model = load_diffusers_folder(tiny_folder, device="cpu").transformer
    loras = {}
    for name, style, seed in (("style_a", "comfy", 1), ("style_b", "kohya", 2),
                              ("Qwen-Image-Lightning-4steps-V1.0", "diffusers", 3)):
        _, deltas = write_lora(home / "models" / "loras" / f"{name}.safetensors", model, style, seed=seed)
        loras[name] = deltas
    return home, loras


@pytest.fixture(scope="module")
def engine(lora_home, tiny_folder):
    home, _ = lora_home
    engine = Engine.load(tiny_folder, variant="tiny", device="cpu", settings=Settings(home=home))
    engine.allow_paths = False  # as the server runs it: LoRAs by registry name only
    return engine


def _run(engine, **kw):
    return engine.generate(prompt="a lamp", seed=3, steps=2, cfg=2.0, **kw).latents


def test_lora_by_name_equals_merged_weights(engine, lora_home, tiny_folder):
    _, loras = lora_home
    ours = _run(engine, loras=[{"name": "style_a", "weight": 0.8}])
    ref_components = load_diffusers_folder(tiny_folder, device="cpu")
    merge_deltas(ref_components.transformer, loras["style_a"], weight=0.8)
    ref = EngineCls(ref_components, get_spec("tiny")).generate(prompt="a lamp", seed=3, steps=2, cfg=2.0).latents
    diff = (ours - ref).abs().max().item()
    print(f"engine LoRA vs merged: {diff:.2e}")
    assert diff < 1e-4 and (ours - _run(engine)).abs().max() > 1e-3


def test_stack_switching_between_requests_is_exact_and_reload_free(engine):
    weights_before = {k: v.data_ptr() for k, v in engine.components.transformer.state_dict().items()}
    base = _run(engine)
    a = _run(engine, loras=[("style_a", 1.0)])
    b = _run(engine, loras=[("style_b", 0.5), ("style_a", 0.3)])
    a2 = _run(engine, loras=[("style_a", 1.0)])
    zero = _run(engine, loras=[("style_a", 0.0)])
    assert torch.equal(a, a2) and torch.equal(base, zero) and torch.equal(base, _run(engine))
    assert not torch.equal(a, b)
    after = {k: v.data_ptr() for k, v in engine.components.transformer.state_dict().items()}
    assert weights_before == after


def test_lightning_lora_switches_defaults_unless_user_set(engine):
    r = engine.generate(prompt="x", seed=1, loras=[("Qwen-Image-Lightning-4steps-V1.0", 1.0)])
    req = r.request
    assert (req.steps, req.cfg, req.shift) == (4, 1.0, 3.0)
    r = engine.generate(prompt="x", seed=1, steps=2, loras=[("Qwen-Image-Lightning-4steps-V1.0", 1.0)])
    assert (r.request.steps, r.request.cfg) == (2, 1.0)
    assert r.images[0].metadata["loras"][0]["name"] == "Qwen-Image-Lightning-4steps-V1.0"


def test_unknown_lora_and_paths_refused_for_remote_callers(engine, lora_home):
    home, _ = lora_home
    with pytest.raises(ModelNotFound, match="no lora named 'nope'"):
        _run(engine, loras=[("nope", 1.0)])
    with pytest.raises(ModelNotFound):
        _run(engine, loras=[(str(home / "models" / "loras" / "style_a.safetensors"), 1.0)])
    with pytest.raises(InvalidRequest, match="out of range"):
        _run(engine, loras=[("style_a", 11.0)])
    assert _run(engine).shape[0] == 1  # the engine still works


def test_request_round_trip_with_loras():
    r = GenerateRequest(prompt="a", loras=[("x", 0.5)], seed=1).resolve(get_spec("tiny"))
    assert GenerateRequest.from_dict(copy.deepcopy(r.to_dict())) == r
    with pytest.raises(InvalidRequest, match="a LoRA must be"):
        GenerateRequest(prompt="a", loras=[42])
